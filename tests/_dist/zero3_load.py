"""Worker: load EVA-CLIP vision towers under DeepSpeed ZeRO-3 on every rank and record what each rank holds and computes.

Run by tests/test_zero3.py as `torchrun --nproc_per_node N zero3_load.py --case CASE --out OUT`. CASE holds the
checkpoints and inputs the test wrote (manifest.json names them); OUT receives rank{N}.json (partition statistics,
flags, errors) and rank{N}.pt (features and gathered weights). The test compares them with single-process loads.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
from common import Results, distributed_run, run_worker, zero3_config


def record(results: Results, key: str, model: torch.nn.Module, pixel_values: torch.Tensor) -> None:
    """Partition statistics, features computed with the parameters gathered, and the gathered weights."""
    from llava_evaclip import zero

    stats = zero.partition_stats(model).as_dict()
    stats["local_param_numel"] = sum(
        param.ds_tensor.numel() if zero.is_partitioned(param) else param.numel() for param in model.parameters()
    )
    stats["full_param_numel"] = sum(zero.full_numel(param) for param in model.parameters())
    stats["placeholder_numel"] = sum(param.numel() for param in model.parameters())
    model.eval()
    with _multi_parameter_gathers() as multi_parameter_gathers:
        with torch.no_grad(), zero.gathered_parameters(model):
            output = model(pixel_values)
        state = zero.gathered_state_dict(model)
    stats["multi_parameter_gathers"] = multi_parameter_gathers
    results.tensor(f"{key}/last_hidden_state", output.last_hidden_state)
    results.tensor(f"{key}/pooler_output", output.pooler_output)
    for name, tensor in state.items():
        results.tensor(f"{key}/state/{name}", tensor)
    results[key] = stats


@contextlib.contextmanager
def _multi_parameter_gathers() -> Iterator[list[int]]:
    """The sizes of DeepSpeed's blocking gathers of several parameters at once (`_allgather_params_coalesced`, which
    before DeepSpeed 0.19.8 waits only for the last parameter's collective: on gloo the others may still be arriving)."""
    from deepspeed.runtime.zero.partition_parameters import Init

    sizes: list[int] = []
    original = Init._allgather_params_coalesced

    def counted(self, param_list, *args, **kwargs):
        if len(param_list) > 1:
            sizes.append(len(param_list))
        return original(self, param_list, *args, **kwargs)

    Init._allgather_params_coalesced = counted
    try:
        yield sizes
    finally:
        Init._allgather_params_coalesced = original


def record_rotary(results: Results, key: str, model: torch.nn.Module) -> None:
    rotary = model.vision_model.rotary_embedding
    results.tensor(f"{key}/rotary_cos", rotary.cos)
    results.tensor(f"{key}/rotary_sin", rotary.sin)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    manifest = json.loads((args.case / "manifest.json").read_text())

    with distributed_run(args.out) as results:
        import deepspeed
        from safetensors.torch import load_file
        from transformers.integrations import HfDeepSpeedConfig

        from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel, zero
        from llava_evaclip.configuration_evaclip import resolve_arch
        from llava_evaclip.tower import EvaCLIPVisionTower

        rank = results.rank
        pixel_values = torch.load(args.case / "inputs.pt", weights_only=True)["pixel_values"]
        ds_config = zero3_config()
        results["zero3_before"] = zero.is_zero3_enabled()

        # 1. transformers' own ZeRO-3 path: an HfDeepSpeedConfig of stage 3 kept alive (what the Trainer does).
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        results["zero3_with_hf_config"] = zero.is_zero3_enabled()
        for name in manifest["checkpoints"]:
            model = EvaCLIPVisionModel.from_pretrained(args.case / name)
            record(results, f"hf/{name}", model, pixel_values)
            del model
        del hf_ds_config
        gc.collect()
        results["zero3_after_hf_config"] = zero.is_zero3_enabled()

        # 2. A bare deepspeed.zero.Init (no transformers config): from_pretrained, and plain construction, which must
        # not read parameter shapes or values (they are empty placeholders by the time the constructor ends).
        eva02 = args.case / manifest["rotary_checkpoint"]
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            results["zero3_in_zero_init"] = zero.is_zero3_enabled()
            loaded = EvaCLIPVisionModel.from_pretrained(eva02)
            constructed = EvaCLIPVisionModel(EvaCLIPVisionConfig.from_pretrained(eva02))
        results["zero3_after_zero_init"] = zero.is_zero3_enabled()
        record(results, "zero_init/from_pretrained", loaded, pixel_values)
        record_rotary(results, "zero_init/constructed", constructed)
        state_dict = load_file(eva02 / "model.safetensors") if rank == 0 else None  # only the source rank reads it
        report = zero.load_state_dict(constructed, state_dict, source=str(eva02))
        results["zero_init/load_report"] = {"loaded": len(report.loaded_keys), "missing": report.missing_keys}
        record(results, "zero_init/constructed", constructed, pixel_values)
        del loaded, constructed, state_dict

        # 2b. An original BAAI .pt, loaded straight into a tower built under zero.Init: only rank 0 reads and maps it.
        baai_config = resolve_arch(str(args.case / manifest["baai_arch"])).vision_config
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            baai_tower = EvaCLIPVisionModel(baai_config)
        report = zero.load_checkpoint(baai_tower, args.case / manifest["baai_checkpoint"])
        results["baai_pt/load_report"] = {"loaded": len(report.loaded_keys), "missing": report.missing_keys}
        record(results, "baai_pt", baai_tower, pixel_values)

        # 3. LLaVA's contract: EvaCLIPVisionTower(path, args, delay_load=True).load_model() under a live config.
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        tower_args = SimpleNamespace(**manifest["tower_args"])
        tower = EvaCLIPVisionTower(str(args.case / manifest["tower_checkpoint"]), tower_args, delay_load=True)
        results["tower/loaded_before"] = bool(tower.is_loaded)
        tower.load_model()
        stats = zero.partition_stats(tower).as_dict()
        with torch.no_grad(), zero.gathered_parameters(tower):
            features = tower(pixel_values)
        results.tensor("tower/features", features)
        results["tower"] = stats
        del tower, hf_ds_config
        gc.collect()

        # 4. Faults: a checkpoint that lacks keys must fail on every rank, naming the keys, with no rank left waiting.
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        with results.expect_error("fault/from_pretrained_missing"):
            zero.from_pretrained(EvaCLIPVisionModel, args.case / manifest["missing_checkpoint"])
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            target = EvaCLIPVisionModel(EvaCLIPVisionConfig.from_pretrained(eva02))
        partial = load_file(args.case / manifest["missing_checkpoint"] / "model.safetensors") if rank == 0 else None
        with results.expect_error("fault/load_state_dict_missing"):
            zero.load_state_dict(target, partial, source="the partial state dict")
        with results.expect_error("fault/load_state_dict_no_source"):
            zero.load_state_dict(target, None, source="nothing")  # the source rank forgot its state dict
        with results.expect_error("fault/load_checkpoint_missing"):
            zero.load_checkpoint(baai_tower, args.case / manifest["baai_missing_checkpoint"])
        del hf_ds_config
        torch.distributed.barrier()  # every rank reaches this only if none is stuck in a collective of the above
        results["barrier_after_faults"] = True


if __name__ == "__main__":
    run_worker(main)

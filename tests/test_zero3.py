"""DeepSpeed ZeRO-3 loading of the EVA-CLIP tower on 2 CPU ranks (gloo), compared with plain single-process loads.

One torchrun run (tests/_dist/zero3_load.py) does every loading check; each test below asserts on what the ranks
recorded. Separate short runs check that a crashed or stalled rank ends the whole job with an error in bounded time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from _dist.runner import DIST_DIR, load_scale, read_rank_results, run_torchrun  # noqa: E402
from conftest import needs_gloo_all_gather, tiny_config, tiny_vision_config  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel  # noqa: E402
from llava_evaclip.tower import EvaCLIPVisionTower  # noqa: E402

pytestmark = needs_gloo_all_gather()

NPROC = 2
RUN_TIMEOUT_S = 240  # hard limit per torchrun run (the machine is shared; a healthy run takes well under a minute)
ATOL = 1e-5
CHECKPOINTS = {  # name -> (builder, family): each EVA family's flags, and a full CLIP dir as LLaVA points at
    "eva02": (EvaCLIPVisionModel, "eva02"),
    "eva01_layer_scale": (EvaCLIPVisionModel, "eva01_layer_scale"),
    "bige": (EvaCLIPVisionModel, "bige"),
    "eva18b": (EvaCLIPVisionModel, "eva18b"),  # RMSNorm, post-norm, no biases: EVA-CLIP-18B's flags
    "eva02_full_clip": (EvaCLIPModel, "eva02"),
}
MISSING_KEYS = ["vision_model.post_layernorm.weight", "vision_model.encoder.layers.1.mlp.fc2.bias"]
# A toy EVA02 release in BAAI's own code and layout (xattn / fusedLN off on CPU); image and patch as the tiny towers.
BAAI_ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 28, "patch_size": 7, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 2.6667,
                   "rope": True, "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True,
                   "xattn": False, "fusedLN": False, "drop_path_rate": 0.0, "eva_model_name": "eva-clip-test"},
    "text_cfg": {"context_length": 8, "vocab_size": 99, "width": 32, "heads": 4, "layers": 1, "xattn": False,
                 "fusedLN": False},
}
BAAI_MISSING_KEY = "visual.blocks.1.mlp.w3.weight"  # ours: vision_model.encoder.layers.1.mlp.fc2.weight
TOWER_ARGS = {"mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SimpleNamespace:
    """Checkpoints and inputs for the workers, plus what a plain single-process load computes from them."""
    root = tmp_path_factory.mktemp("zero3_case")
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, 28, 28)
    torch.save({"pixel_values": pixel_values}, root / "inputs.pt")
    for name, (model_class, family) in CHECKPOINTS.items():
        config = tiny_config(family) if model_class is EvaCLIPModel else tiny_vision_config(family)
        model_class(config).save_pretrained(root / name)
    # A copy of eva02 that lacks two weights.
    missing = root / "eva02_missing"
    EvaCLIPVisionModel.from_pretrained(root / "eva02").save_pretrained(missing)
    state = load_file(missing / "model.safetensors")
    for key in MISSING_KEYS:
        del state[key]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    baai_reference = _write_baai_checkpoints(root, pixel_values)
    (root / "manifest.json").write_text(json.dumps({
        "baai_arch": "baai_arch.json",
        "baai_checkpoint": "baai_eva02.pt",
        "baai_missing_checkpoint": "baai_eva02_missing.pt",
        "checkpoints": list(CHECKPOINTS),
        "rotary_checkpoint": "eva02",
        "missing_checkpoint": "eva02_missing",
        "tower_checkpoint": "eva02_full_clip",
        "tower_args": TOWER_ARGS,
    }))

    reference = {}
    with torch.no_grad():
        for name in CHECKPOINTS:
            model = EvaCLIPVisionModel.from_pretrained(root / name).eval()
            output = model(pixel_values)
            reference[name] = {
                "last_hidden_state": output.last_hidden_state,
                "pooler_output": output.pooler_output,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
        tower = EvaCLIPVisionTower(str(root / "eva02_full_clip"), SimpleNamespace(**TOWER_ARGS))
        tower_features = tower(pixel_values)
    return SimpleNamespace(root=root, pixel_values=pixel_values, reference=reference, tower_features=tower_features,
                           baai=baai_reference)


def _write_baai_checkpoints(root: Path, pixel_values: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """BAAI's model with random non-trivial weights, saved as a release .pt (and a copy lacking one weight); returns
    what BAAI's own forward computes (all tokens before the final norm, and the pooled CLS after it)."""
    consisid_model = pytest.importorskip("consisid_eva_clip.model")
    torch.manual_seed(1)
    model = consisid_model.CustomCLIP(**json.loads(json.dumps(BAAI_ARCH))).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # unit norms / zero biases would hide a mapping error
            parameter.add_(torch.randn_like(parameter) * 0.05)
        tokens = model.visual.forward_features(pixel_values, return_all_features=True)
        pooled, _ = model.visual.forward_features(pixel_values)
    state = model.state_dict()
    torch.save(state, root / "baai_eva02.pt")
    del state[BAAI_MISSING_KEY]
    torch.save(state, root / "baai_eva02_missing.pt")
    (root / "baai_arch.json").write_text(json.dumps(BAAI_ARCH))
    return {"last_hidden_state": tokens, "pooler_output": pooled}


@pytest.fixture(scope="module")
def zero3_run(case, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("zero3_out")
    result = run_torchrun(DIST_DIR / "zero3_load.py", "--case", case.root, "--out", out,
                          nproc=NPROC, timeout=RUN_TIMEOUT_S)
    ranks = read_rank_results(out, NPROC)
    tensors = [torch.load(out / f"rank{r}.pt", weights_only=True) if (out / f"rank{r}.pt").exists() else {}
               for r in range(NPROC)]
    assert result.returncode == 0 and all(r.get("finished") for r in ranks), result.describe()
    return SimpleNamespace(result=result, ranks=ranks, tensors=tensors)


def _checkpoint_state(case, name: str) -> dict[str, torch.Tensor]:
    state = load_file(case.root / name / "model.safetensors")
    return {k: v for k, v in state.items() if k.startswith("vision_model.")}


def _assert_partitioned(stats: dict, nproc: int = NPROC) -> None:
    """Every parameter is a ZeRO-3 placeholder and this rank holds about 1/N of the tower (each slice is padded to
    ceil(numel / N), at most N - 1 extra elements per parameter)."""
    assert stats["num_partitioned"] == stats["num_params"] > 0
    assert stats["placeholder_numel"] == 0
    full, local = stats["full_param_numel"], stats["local_param_numel"]
    assert full / nproc <= local <= full / nproc + stats["num_params"] * (nproc - 1) / nproc + 1
    assert stats["local_param_bytes"] <= 1.1 * stats["full_param_bytes"] / nproc + 4 * stats["num_params"]


def test_zero3_detection(zero3_run):
    for rank in zero3_run.ranks:
        assert rank["zero3_before"] is False
        assert rank["zero3_with_hf_config"] is True
        assert rank["zero3_after_hf_config"] is False  # the weak reference died with the config
        assert rank["zero3_in_zero_init"] is True
        assert rank["zero3_after_zero_init"] is False


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_from_pretrained_with_hf_deepspeed_config(zero3_run, case, name):
    """Partitioned across the ranks, and the checkpoint's values are in the partitions: gathered, the weights equal the
    file exactly and the features equal a plain single-process load."""
    expected_state = _checkpoint_state(case, name)
    for rank, tensors in zip(zero3_run.ranks, zero3_run.tensors):
        _assert_partitioned(rank[f"hf/{name}"])
        gathered = {k[len(f"hf/{name}/state/"):]: v for k, v in tensors.items() if k.startswith(f"hf/{name}/state/")}
        assert gathered.keys() == expected_state.keys()
        for key, value in expected_state.items():
            assert torch.equal(gathered[key], value), key
        for output in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(tensors[f"hf/{name}/{output}"], case.reference[name][output],
                                       atol=ATOL, rtol=0)


def test_cpu_ranks_gather_one_parameter_at_a_time(zero3_run):
    """`zero.gathered_parameters` / `gathered_state_dict` over several parameters never use DeepSpeed's multi-parameter
    gather on gloo: before 0.19.8 it waits for the last parameter's collective only, and the values gathered on CPU
    ranks were partly uninitialised memory (weights ~1e-36 in the gathered state; features off by 1e37)."""
    for rank in zero3_run.ranks:
        recorded = {key: value for key, value in rank.items() if isinstance(value, dict)
                    and "multi_parameter_gathers" in value}
        assert len(recorded) >= len(CHECKPOINTS) + 3  # every load `record`ed (hf/*, zero_init/*, baai_pt)
        for key, stats in recorded.items():
            assert stats["multi_parameter_gathers"] == [], key


def test_from_pretrained_inside_bare_zero_init(zero3_run, case):
    """Without any transformers config, inside `deepspeed.zero.Init` (transformers alone fails there with "size
    mismatch ... torch.Size([0])")."""
    for rank, tensors in zip(zero3_run.ranks, zero3_run.tensors):
        _assert_partitioned(rank["zero_init/from_pretrained"])
        for output in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(tensors[f"zero_init/from_pretrained/{output}"],
                                       case.reference["eva02"][output], atol=ATOL, rtol=0)


def test_construction_under_zero_init_reads_no_parameters(zero3_run, case):
    """Built inside zero.Init, the rotary tables come from the config (checked against BAAI's own
    VisionRotaryEmbeddingFast); loading a rank-0-only state dict then gives the plain model's outputs."""
    rope = pytest.importorskip("consisid_eva_clip.rope")
    config = tiny_vision_config("eva02")
    grid = config.image_size // config.patch_size
    baai = rope.VisionRotaryEmbeddingFast(dim=config.head_dim // 2, pt_seq_len=config.rope_pt_grid_size,
                                          ft_seq_len=grid)
    for rank, tensors in zip(zero3_run.ranks, zero3_run.tensors):
        cos, sin = tensors["zero_init/constructed/rotary_cos"], tensors["zero_init/constructed/rotary_sin"]
        assert cos.dtype == sin.dtype == torch.float32
        torch.testing.assert_close(cos[1:], baai.freqs_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[1:], baai.freqs_sin, atol=1e-6, rtol=0)
        assert torch.equal(cos[0], torch.ones_like(cos[0])) and torch.equal(sin[0], torch.zeros_like(sin[0]))
        assert rank["zero_init/load_report"]["missing"] == []
        _assert_partitioned(rank["zero_init/constructed"])
        for output in ("last_hidden_state", "pooler_output"):
            torch.testing.assert_close(tensors[f"zero_init/constructed/{output}"],
                                       case.reference["eva02"][output], atol=ATOL, rtol=0)


def test_baai_pt_loads_into_partitioned_tower(zero3_run, case):
    """`zero.load_checkpoint`: rank 0 alone reads and maps BAAI's .pt into a tower built under zero.Init; gathered, it
    computes what BAAI's own code computes (fp32 parity: 2e-5 relative to the magnitude, as for the converter)."""
    for rank, tensors in zip(zero3_run.ranks, zero3_run.tensors):
        _assert_partitioned(rank["baai_pt"])
        assert rank["baai_pt/load_report"]["missing"] == []
        for output, expected in case.baai.items():
            actual = tensors[f"baai_pt/{output}"]
            scale = max(1.0, expected.abs().max().item())
            assert (actual - expected).abs().max().item() <= 2e-5 * scale, output


def test_tower_load_model_under_zero3(zero3_run, case):
    """LLaVA's contract: EvaCLIPVisionTower(path, args, delay_load=True), then load_model(), with ZeRO-3 live."""
    for rank, tensors in zip(zero3_run.ranks, zero3_run.tensors):
        assert rank["tower/loaded_before"] is False
        stats = rank["tower"]
        assert stats["num_partitioned"] == stats["num_params"] > 0
        assert stats["local_param_bytes"] <= 1.1 * stats["full_param_bytes"] / NPROC + 4 * stats["num_params"]
        torch.testing.assert_close(tensors["tower/features"], case.tower_features, atol=ATOL, rtol=0)


@pytest.mark.parametrize("check", ["fault/from_pretrained_missing", "fault/load_state_dict_missing",
                                   "fault/load_checkpoint_missing"])
def test_missing_keys_fail_on_every_rank(zero3_run, check):
    expected_keys = ["vision_model.encoder.layers.1.mlp.fc2.weight"] if "checkpoint" in check else MISSING_KEYS
    messages = set()
    for rank in zero3_run.ranks:
        error = rank[check]
        assert error["raised"] and error["type"] == "ValueError", error
        for key in expected_keys:
            assert key in error["message"]
        messages.add(error["message"])
    assert len(messages) == 1  # the ranks agreed on one error
    assert all(rank["barrier_after_faults"] for rank in zero3_run.ranks)  # and none was left in a collective


def test_missing_source_state_dict_fails_on_every_rank(zero3_run):
    for rank in zero3_run.ranks:
        error = rank["fault/load_state_dict_no_source"]
        assert error["raised"] and error["type"] == "ValueError" and "no state dict" in error["message"], error


@pytest.mark.parametrize("mode", ["exit", "stall"])
def test_failed_rank_ends_the_run(tmp_path, mode):
    """A rank that dies (os._exit: no exception, no teardown) is reaped by torchrun, which stops the others; a rank
    that stalls outside the collective makes its peer fail at the collective's timeout. Either way the whole run
    ends with a non-zero status soon after rank 0 entered the collective, and rank 0 never completes it.

    Bounds count from that moment (wall clock, recorded by rank 0), not from the start: a loaded machine may take long
    to start two ranks, but must not take long to end a failed run. Only the collective under test has the short
    timeout; joining the group and the readiness barrier keep the long one."""
    collective_timeout = 8.0  # short: the run waits it out; both ranks create the group together after a barrier
    result = run_torchrun(DIST_DIR / "crash.py", "--out", tmp_path, "--mode", mode,
                          "--collective-timeout", str(collective_timeout), nproc=NPROC, timeout=240)
    ended = time.time()
    assert not result.timed_out, result.describe()
    assert result.returncode not in (0, None), result.describe()
    rank0, rank1 = read_rank_results(tmp_path, NPROC)
    assert rank0.get("joined") and rank1.get("joined"), result.describe()
    assert rank0.get("entered_collective") and not rank0.get("left_collective")
    assert not rank0.get("finished") and not rank1.get("finished")
    # torchrun notices a dead rank within its monitor interval; allow for teardown on a busy machine
    slack = 30.0 * load_scale()
    if mode == "stall":
        assert "Timed out" in rank0.get("error", "") or "timeout" in rank0.get("error", "").lower(), rank0
        waited = rank0["failed_at"] - rank0["entered_collective"]
        assert collective_timeout * 0.9 <= waited <= collective_timeout + slack, waited  # it was this timeout
        assert ended - rank0["entered_collective"] <= collective_timeout + 2 * slack
    else:
        assert ended - rank0["entered_collective"] <= 2 * slack


def test_a_taken_port_does_not_fail_the_run(tmp_path, monkeypatch):
    """Another job can take the port between `free_port` and torchrun binding it (7 test runs share one machine):
    the run starts again on another port instead of failing."""
    import socket

    from _dist import runner

    worker = tmp_path / "worker.py"
    # one write per line: with unbuffered stdout `print` writes each piece on its own, and the two ranks' pieces
    # interleave on the shared pipe ("rankrank 0 up"); a single write of under PIPE_BUF bytes is atomic
    worker.write_text("import os\nos.write(1, f\"rank {os.environ['RANK']} up\\n\".encode())\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real_free_port = runner.free_port
        monkeypatch.setattr(runner, "free_port", lambda: ports.pop() if ports else real_free_port())
        result = run_torchrun(worker, nproc=NPROC, timeout=120)
    assert result.returncode == 0 and not ports, result.describe()
    assert sorted(line for line in result.output.splitlines() if line.startswith("rank")) == ["rank 0 up", "rank 1 up"]

"""Streaming a safetensors checkpoint into a ZeRO-3 partitioned EVA-CLIP tower on 2 CPU ranks: the loaded weights are
the checkpoint's, and rank 0's peak memory stays near its share instead of the whole checkpoint (issue 14 item 4)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from _dist.runner import DIST_DIR, read_rank_results, run_torchrun  # noqa: E402
from conftest import needs_gloo_all_gather, tiny_config, tiny_vision_config  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel  # noqa: E402

pytestmark = needs_gloo_all_gather()

NPROC = 2
# A checkpoint large enough for its size to dominate the ranks' RSS noise: ~270 MB fp32, one file.
LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=5, num_attention_heads=8, image_size=28,
             patch_size=14)
# Rank 0 may grow by its half plus a few tensors (one read, one gathered, construction): 0.75 of the checkpoint.
# transformers' loader reads the whole file on rank 0 first, so it needs more than the whole checkpoint.
PEAK_BOUND = 0.75


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3_stream")
    torch.manual_seed(0)
    EvaCLIPVisionModel(tiny_vision_config("eva02", **LARGE)).save_pretrained(root / "large")
    EvaCLIPVisionModel(tiny_vision_config("eva02")).save_pretrained(root / "tiny")
    EvaCLIPModel(tiny_config("eva02")).save_pretrained(root / "full")
    EvaCLIPVisionModel(tiny_vision_config("eva02")).save_pretrained(root / "mismatched")
    state = load_file(root / "mismatched" / "model.safetensors")
    state["vision_model.post_layernorm.weight"] = torch.ones(31)
    save_file(state, root / "mismatched" / "model.safetensors", metadata={"format": "pt"})
    for name in ("corrupt_index", "truncated"):
        (root / name).mkdir()
        (root / name / "config.json").write_bytes((root / "tiny" / "config.json").read_bytes())
    (root / "corrupt_index" / "model.safetensors.index.json").write_text("{not json")
    weights = (root / "tiny" / "model.safetensors").read_bytes()
    (root / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    out = root / "out"
    out.mkdir()
    result = run_torchrun(DIST_DIR / "zero3_stream.py", "--case", str(root), "--out", str(out), nproc=NPROC,
                          timeout=240)
    assert result.returncode == 0, result.describe()
    ranks = read_rank_results(out, NPROC)
    checkpoint_bytes = (root / "large" / "model.safetensors").stat().st_size
    return ranks, checkpoint_bytes


def test_streamed_weights_equal_the_checkpoint(run):
    ranks, _ = run
    for rank in ranks:
        large = rank["large"]
        assert large["num_partitioned"] == large["num_params"]
        assert large["local_param_bytes"] <= large["full_param_bytes"] / NPROC * 1.01
        assert large["max_abs_difference"] == 0.0
        assert rank["full"]["max_abs_difference"] == 0.0 and rank["full"]["missing_keys"] == []
        assert rank["zero_init"]["max_abs_difference"] == 0.0 and rank["zero_init"]["num_partitioned"] > 0


def test_streamed_load_keeps_rank0_peak_near_its_share(run):
    ranks, checkpoint_bytes = run
    rank0 = ranks[0]
    bound = PEAK_BOUND * checkpoint_bytes
    assert rank0["large"]["streamed_peak_growth_bytes"] < bound, (rank0["large"], checkpoint_bytes)
    # The bound is one that transformers' own ZeRO-3 loader, measured the same way in the same run, exceeds.
    assert rank0["large_transformers_peak_growth_bytes"] > bound, (rank0, checkpoint_bytes)
    assert ranks[1]["large"]["streamed_peak_growth_bytes"] < bound


def test_no_rank_ever_receives_a_whole_parameter(run):
    """zero.Init broadcasts each new parameter whole from rank 0 before partitioning it; the streamed load skips that
    (every value is overwritten from the checkpoint), so no collective carries more than one rank's share, while the
    weights still equal the checkpoint on every rank and DeepSpeed's own hook is back afterwards."""
    ranks, _ = run
    for rank in ranks:
        large = rank["large"]
        share = large["largest_param_bytes"] / NPROC
        assert large["collective_calls"] > 0 and large["largest_collective_bytes"] < share, large
        assert large["max_abs_difference"] == 0.0
        assert large["zero_init_restored"]
        # The same spy sees the whole parameters in transformers' own ZeRO-3 load of the same checkpoint.
        assert rank["large_transformers_largest_collective_bytes"] >= large["largest_param_bytes"], rank


def test_dtype_follows_transformers_rules(run):
    ranks, _ = run
    for rank in ranks:
        for name in ("bfloat16", "auto", "none"):
            case = rank[f"dtype_{name}"]
            assert [case["dtype"]] == case["transformers_dtypes"], name  # what transformers' ZeRO-3 loader gives
            assert case["max_abs_difference"] == 0.0, name  # the checkpoint in that dtype, exactly
            assert case["num_partitioned"] > 0


def test_mismatched_shape_raises_on_every_rank(run):
    ranks, _ = run
    messages = {rank["mismatched"]["message"] for rank in ranks}
    assert all(rank["mismatched"]["raised"] and rank["mismatched"]["type"] == "ValueError" for rank in ranks)
    assert len(messages) == 1
    (message,) = messages
    assert "vision_model.post_layernorm.weight" in message and "[31]" in message and "[32]" in message


@pytest.mark.parametrize("case", ["corrupt_index", "truncated"])
def test_unreadable_weights_raise_on_every_rank(run, case):
    """Rank 0 reads the index and the headers; a damaged one must reach every rank as one ValueError, or the other
    ranks would wait in the broadcast until the process-group timeout."""
    ranks, _ = run
    assert all(rank[case]["raised"] and rank[case]["type"] == "ValueError" for rank in ranks), ranks
    messages = {rank[case]["message"] for rank in ranks}
    assert len(messages) == 1
    (message,) = messages
    assert "Cannot read the safetensors weights of" in message and case in message
    assert not message.startswith("ValueError:")

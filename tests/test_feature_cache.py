"""LLaVA stage-1 training from cached tower features (`--vision_feature_cache`, a FeatureStore from `llava-evaclip
features`), with the real `llava` package: the loss equals the loss with the tower computing the same features, every
reason the cache cannot stand in for the tower is refused at start in one line, and LLaVA-1.5's pretrain script runs
from the cache on 2 CPU ranks under torchrun."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")

from llava_evaclip import launch  # noqa: E402
from llava_evaclip.cli import main as cli_main  # noqa: E402
from conftest import needs_cpu_fp16  # noqa: E402
from test_llava_launcher import INTEGRATION, logged_losses, workspace  # noqa: E402,F401  (fixture)


def make_cache(workspace: Path, out: Path, *extra: str) -> Path:
    assert cli_main(["features", str(workspace / "images"), "--model", str(workspace / "tower"), "--out", str(out),
                     "--format", "shards", *extra]) == 0
    return out


def model_args(workspace: Path, **overrides) -> types.SimpleNamespace:
    fields = dict(vision_tower=str(workspace / "tower"), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu",
                  vision_feature_cache=None, unfreeze_mm_vision_tower=False)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def stage1_loss(workspace: Path, cache: Path | None, select_feature: str = "patch") -> torch.Tensor:
    """One stage-1 batch through LLaVA's own dataset, collator and model (fp32), as llava.train.train builds them."""
    import transformers
    from llava import conversation
    from llava.model import LlavaLlamaForCausalLM

    train_module = launch.prepare_llava("llava.train.train")
    launch._feature_cache.clear()
    conversation.default_conversation = conversation.conv_templates["plain"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(workspace / "lm"), use_fast=False,
                                                           model_max_length=512, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    torch.manual_seed(0)  # the projector's initialisation
    model = LlavaLlamaForCausalLM.from_pretrained(str(workspace / "lm"), torch_dtype=torch.float32)
    model.get_model().initialize_vision_modules(model_args(workspace, vision_feature_cache=cache and str(cache),
                                                           mm_vision_select_feature=select_feature))
    tower = model.get_vision_tower()
    data_args = types.SimpleNamespace(data_path=str(workspace / "data.json"), image_folder=str(workspace / "images"),
                                      image_processor=tower.image_processor, is_multimodal=True,
                                      image_aspect_ratio="square", mm_use_im_start_end=False, lazy_preprocess=True)
    dataset = train_module.LazySupervisedDataset(tokenizer=tokenizer, data_path=data_args.data_path,
                                                 data_args=data_args)
    batch = train_module.DataCollatorForSupervisedDataset(tokenizer=tokenizer)([dataset[i] for i in range(4)])
    if cache is not None:
        # features, not pixels, reached the model: 16 patches, and CLS where it is selected
        assert batch["images"].shape == (4, 16 + (select_feature == "cls_patch"), 48)
    model.eval()
    with torch.no_grad():
        return model(**batch).loss


@pytest.mark.parametrize("select_feature", ["patch", "cls_patch"])
def test_the_loss_from_cached_features_equals_the_loss_from_the_tower(workspace, tmp_path, select_feature):
    """cls_patch: the tower's num_patches already counts CLS; the cache's shape check once added it again and refused
    every batch of the features `llava-evaclip features --select-feature cls_patch` wrote."""
    cache = make_cache(workspace, tmp_path / "cache", "--select-feature", select_feature)
    with_tower = stage1_loss(workspace, None, select_feature)
    with_cache = stage1_loss(workspace, cache, select_feature)
    launch._feature_cache.clear()
    assert torch.isfinite(with_tower)
    torch.testing.assert_close(with_cache, with_tower, atol=1e-5, rtol=0)


def test_a_cache_that_cannot_stand_in_for_the_tower_is_refused(workspace, tmp_path):
    cache = make_cache(workspace, tmp_path / "cache")
    other_layer = make_cache(workspace, tmp_path / "other_layer", "--select-layer", "-1")
    args = model_args(workspace)
    from llava_evaclip.tower import EvaCLIPVisionTower

    tower = EvaCLIPVisionTower(str(workspace / "tower"), args)
    with pytest.raises(launch.FeatureCacheError, match="made with other settings than this tower: select_layer"):
        launch.attach_feature_cache(copy.deepcopy(tower), str(other_layer), args)
    with pytest.raises(launch.FeatureCacheError, match="cannot be used with --unfreeze_mm_vision_tower"):
        launch.attach_feature_cache(copy.deepcopy(tower), str(cache),
                                    model_args(workspace, unfreeze_mm_vision_tower=True))
    retrained = tmp_path / "retrained"  # same architecture, other weights
    import shutil

    shutil.copytree(workspace / "tower", retrained)
    from safetensors.torch import load_file, save_file

    weights = load_file(retrained / "model.safetensors")
    weights = {key: value + 0.01 if value.is_floating_point() else value for key, value in weights.items()}
    save_file(weights, retrained / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(launch.FeatureCacheError, match="weights_fingerprint"):
        launch.attach_feature_cache(EvaCLIPVisionTower(str(retrained), args), str(cache), args)
    launch._feature_cache.clear()


def test_a_cache_resized_by_the_other_library_is_refused(workspace, tmp_path):
    """transformers 5's CLIPImageProcessor resizes with torchvision, 4.37's (LLaVA's pin) with PIL: a store made on one
    line differs from the other's tower by up to 0.19 on text and line art (reviewer's 756x343 image), which the
    settings did not show. The store records the resize; another one is refused, and a store made before the field
    existed is still taken."""
    from llava_evaclip import features
    from llava_evaclip.tower import EvaCLIPVisionTower

    cache = make_cache(workspace, tmp_path / "cache")
    args = model_args(workspace)
    tower = EvaCLIPVisionTower(str(workspace / "tower"), args)
    here = features.tower_settings(tower)["image_resize"]
    import transformers

    expected_here = "torchvision" if int(transformers.__version__.split(".")[0]) >= 5 else "pil"
    assert here == expected_here
    index_path = cache / "index.json"
    index = json.loads(index_path.read_text())
    assert index["settings"]["image_resize"] == here
    index["settings"]["image_resize"] = {"pil": "torchvision", "torchvision": "pil"}[here]
    index_path.write_text(json.dumps(index))
    with pytest.raises(launch.FeatureCacheError, match=f"image_resize .*{here}"):
        launch.attach_feature_cache(copy.deepcopy(tower), str(cache), args)
    del index["settings"]["image_resize"]
    index_path.write_text(json.dumps(index))
    assert len(launch.attach_feature_cache(copy.deepcopy(tower), str(cache), args)) == len(list(
        (workspace / "images").rglob("*.png")))
    launch._feature_cache.clear()


def run_pretrain(workspace: Path, output_dir: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    sys.path.insert(0, str(Path(__file__).parent / "_dist"))
    from runner import free_port, worker_env

    launcher = sys.executable if nproc == 1 else (
        f"{sys.executable} -m torch.distributed.run --nnodes 1 --nproc_per_node {nproc} --master_addr 127.0.0.1 "
        f"--master_port {free_port()}")
    env = worker_env({
        "LAUNCHER": launcher, "ENTRY": "llava.train.train", "DEEPSPEED_CONFIG": "",
        "MODEL_PATH": str(workspace / "lm"), "VISION_TOWER": str(workspace / "tower"),
        "DATA_PATH": str(workspace / "data.json"), "IMAGE_FOLDER": str(workspace / "images"),
        "OUTPUT_DIR": str(output_dir), "WANDB_MODE": "disabled"})
    cpu_args = ["--bf16", "False", "--tf32", "False", "--max_steps", "2", "--per_device_train_batch_size", "1",
                "--dataloader_num_workers", "0", "--report_to", "none", "--gradient_checkpointing", "False",
                "--model_max_length", "512", "--save_strategy", "no"]
    if nproc > 1:
        # Without it the Trainer on a CPU-only machine sees no parallel mode (world size 1 on every rank): each rank
        # trains alone and both write trainer_state.json into one output dir, a race that once left it unreadable.
        cpu_args += ["--use_cpu", "True"]
    return subprocess.run(["bash", str(INTEGRATION / "pretrain.sh"), *cpu_args, *extra], env=env,
                          capture_output=True, text=True, timeout=400)


@needs_cpu_fp16
def test_pretrain_script_from_the_cache_on_two_cpu_ranks(workspace, tmp_path):
    # LLaVA runs a frozen tower in fp16 without --bf16: the store is made in the tower's dtype.
    cache = make_cache(workspace, tmp_path / "cache", "--dtype", "float16")
    missing = tmp_path / "data_missing.json"
    records = json.loads((workspace / "data.json").read_text())
    missing.write_text(json.dumps(records + [{**records[0], "id": "x", "image": "not_there.png"}]))

    refused = run_pretrain(workspace, tmp_path / "refused", 1, "--vision_feature_cache", str(cache),
                           "--data_path", str(missing))
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("run_llava.py: error:")]
    assert len(errors) == 1 and "1 of 5 images" in errors[0] and "'not_there.png'" in errors[0], refused.stderr[-3000:]

    # LLaVA initialises the projector before the Trainer seeds anything: both runs start from one saved projector.
    torch.manual_seed(0)
    projector = tmp_path / "projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.randn(64, 48) * 0.1, "model.mm_projector.0.bias": torch.zeros(64),
                "model.mm_projector.2.weight": torch.randn(64, 64) * 0.1, "model.mm_projector.2.bias": torch.zeros(64)},
               projector)
    start = ["--pretrain_mm_mlp_adapter", str(projector)]
    cached = run_pretrain(workspace, tmp_path / "cached", 2, *start, "--vision_feature_cache", str(cache))
    assert cached.returncode == 0, cached.stdout[-2000:] + cached.stderr[-6000:]
    tower = run_pretrain(workspace, tmp_path / "tower", 2, *start)
    assert tower.returncode == 0, tower.stdout[-2000:] + tower.stderr[-6000:]
    # Logged losses are rounded to 4 decimals; the fp32 comparison at 1e-5 is the in-process test above.
    assert logged_losses(tmp_path / "cached") == logged_losses(tmp_path / "tower")


def test_image_paths_resolve_as_llava_opens_them(workspace, tmp_path):
    """`image` values LLaVA opens as os.path.join(image_folder, image) -- absolute, with '..', with './' -- find
    their cached features; a list of images is refused in one line instead of a TypeError."""
    import transformers
    from llava_evaclip.tower import EvaCLIPVisionTower

    cache = make_cache(workspace, tmp_path / "cache")
    train_module = launch.prepare_llava("llava.train.train")
    launch._feature_cache.clear()
    args = model_args(workspace)
    tower = EvaCLIPVisionTower(str(workspace / "tower"), args)
    store = launch.attach_feature_cache(tower, str(cache), args)
    images = workspace / "images"
    records = json.loads((workspace / "data.json").read_text())
    spellings = [str(images / "0.png"), f"../{images.name}/1.png", "./2.png", f"{images}/../{images.name}/3.png"]
    data = [{**record, "image": image} for record, image in zip(records, spellings)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(workspace / "lm"), use_fast=False,
                                                           model_max_length=512, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token

    def dataset(records: list) -> object:
        path = tmp_path / "data.json"
        path.write_text(json.dumps(records))
        data_args = types.SimpleNamespace(data_path=str(path), image_folder=str(images),
                                          image_processor=tower.image_processor, is_multimodal=True,
                                          image_aspect_ratio="square", mm_use_im_start_end=False, lazy_preprocess=True)
        return train_module.LazySupervisedDataset(tokenizer=tokenizer, data_path=str(path), data_args=data_args)

    try:
        built = dataset(data)
        for index, image in enumerate(spellings):
            assert os.path.isfile(os.path.join(images, image))  # LLaVA opens it
            assert torch.equal(built[index]["image"], store[f"{index}.png"].float()), image
        with pytest.raises(launch.FeatureCacheError, match=r"sample 'x' has 'image' \['0.png', '1.png'\]"):
            dataset(data + [{**records[0], "id": "x", "image": ["0.png", "1.png"]}])
        outside = tmp_path / "elsewhere.png"
        shutil.copy(images / "0.png", outside)  # LLaVA opens it, the store (made over image_folder) lacks it
        with pytest.raises(launch.FeatureCacheError, match=f"1 of 5 images .* e.g. '{outside}'"):
            dataset(data + [{**records[0], "id": "y", "image": str(outside)}])
    finally:
        launch._feature_cache.clear()

"""Issue 15 items 1 and 2 against LLaVA-NeXT's own code: the hook into its `build_vision_tower` (EVA-CLIP towers to
ours, every other tower to its builder unchanged) and the tower contract its `llava_arch.py` and `builder.py` rely on,
with its `mm_vision_select_feature` values reproduced exactly (compared with its `CLIPVisionTower.feature_select`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from next_common import GRID, IMAGE_SIZE, LLAVA_NEXT_TRAINS, NEXT_PATH, TOWER_LAYERS, TOWER_WIDTH, workspace_once

import llava.model.llava_arch as llava_arch  # noqa: E402
import llava.model.multimodal_encoder.builder as next_builder  # noqa: E402
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower  # noqa: E402

from llava_evaclip import EvaCLIPVisionTower, llava_registry, register_with_llava, unregister_from_llava  # noqa: E402

SELECT_FEATURES = ["patch", "cls_patch", "slicefour_patch", "slicefour_cls_patch", "slice_m25811_f6_patch",
                   "slice_m25811_f6_cls_patch"]


@pytest.fixture(scope="module")
def ws():
    return workspace_once()


@pytest.fixture
def hooked():
    register_with_llava()
    yield
    unregister_from_llava()


def tower_args(tower: str, **fields) -> SimpleNamespace:
    values = dict(mm_vision_tower=tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    values.update(fields)
    return SimpleNamespace(**values)


# --------------------------------------------------------------------------------------------------------------------
# Item 1: the hook
# --------------------------------------------------------------------------------------------------------------------


def test_register_hooks_llava_next_builder_and_unregister_restores(ws):
    original = next_builder.build_vision_tower
    assert llava_arch.build_vision_tower is original
    register_with_llava()
    try:
        assert next_builder.build_vision_tower is llava_registry.build_vision_tower
        assert llava_arch.build_vision_tower is llava_registry.build_vision_tower  # what LlavaMetaModel calls
        tower = llava_arch.build_vision_tower(tower_args(str(ws.eva)), delay_load=False)
        assert isinstance(tower, EvaCLIPVisionTower) and tower.is_loaded
    finally:
        unregister_from_llava()
    assert next_builder.build_vision_tower is original and llava_arch.build_vision_tower is original


def test_the_launcher_hooks_llava_next():
    from llava_evaclip import launch

    assert launch.is_llava_next()
    # where LLaVA-NeXT cannot train (see LLAVA_NEXT_TRAINS) the launcher refuses training modules: hook an eval one
    train_module = launch.prepare_llava("llava.train.train" if LLAVA_NEXT_TRAINS else "llava.eval.model_vqa")
    try:
        assert llava_arch.build_vision_tower is llava_registry.build_vision_tower
        if LLAVA_NEXT_TRAINS:
            assert Path(train_module.__file__).resolve().is_relative_to(NEXT_PATH)
            assert train_module.LLaVATrainer._evaclip_next  # the training-loop fix (see test_launcher_shims)
        else:
            assert train_module is None
    finally:
        unregister_from_llava()


class Recorder:
    """Stands in for one of LLaVA-NeXT's tower classes inside its builder module: records what the builder passed."""

    calls: list = []

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, name, *args, **kwargs):
        Recorder.calls.append((self.kind, name, kwargs.get("args", kwargs.get("vision_tower_cfg")), kwargs))
        return self.kind


@pytest.mark.parametrize("name, kind", [
    ("CLIP_DIR", "CLIPVisionTower"),
    ("openai/clip-vit-large-patch14-336", "CLIPVisionTower"),
    ("google/siglip-so400m-patch14-384", "SigLipVisionTower"),
    ("hf:timm/eva02_base_patch14_224.mim_in22k", "HFVisionTower"),  # an EVA model, but LLaVA-NeXT's hf: loader
    ("open_clip_hub:EVA02-L-14", "OpenCLIPVisionTower"),
    ("open_clip_hub:ViT-B-16", "OpenCLIPVisionTower"),
])
def test_every_other_tower_reaches_llava_nexts_builder_unchanged(ws, hooked, monkeypatch, name, kind):
    for tower_class in ("CLIPVisionTower", "SigLipVisionTower", "HFVisionTower", "OpenCLIPVisionTower"):
        monkeypatch.setattr(next_builder, tower_class, Recorder(tower_class))
    Recorder.calls = []
    name = str(ws.clip) if name == "CLIP_DIR" else name
    args = tower_args(name)
    assert llava_arch.build_vision_tower(args, delay_load=True) == kind
    assert Recorder.calls == [(kind, name, args, {("args" if kind != "SigLipVisionTower" else "vision_tower_cfg"): args,
                                                  "delay_load": True})]


# --------------------------------------------------------------------------------------------------------------------
# Item 2: the tower contract
# --------------------------------------------------------------------------------------------------------------------


def next_feature_select(select_feature: str, select_layer: int, hidden_states) -> torch.Tensor:
    """LLaVA-NeXT's CLIPVisionTower.feature_select, run on the given hidden states."""
    state = SimpleNamespace(select_feature=select_feature, select_layer=select_layer)
    return CLIPVisionTower.feature_select(state, SimpleNamespace(hidden_states=hidden_states))


def next_counts(select_feature: str, config) -> tuple[int, int]:
    """LLaVA-NeXT's CLIPVisionTower.hidden_size and num_patches for a config."""
    state = SimpleNamespace(select_feature=select_feature, config=config)
    return CLIPVisionTower.hidden_size.fget(state), CLIPVisionTower.num_patches.fget(state)


@pytest.mark.parametrize("select_layer", [-2, -1])  # slicefour reads 4 hidden states of this tower for both
@pytest.mark.parametrize("select_feature", SELECT_FEATURES)
def test_select_feature_and_layer_as_llava_next(ws, select_feature, select_layer):
    tower = EvaCLIPVisionTower(str(ws.eva), tower_args(str(ws.eva), mm_vision_select_layer=select_layer,
                                                        mm_vision_select_feature=select_feature))
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden_states = tower.vision_tower(images, output_hidden_states=True).hidden_states  # all of them, eager
        expected = next_feature_select(select_feature, select_layer, hidden_states)
        features = tower(images)
    assert len(hidden_states) == TOWER_LAYERS + 1
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert (tower.hidden_size, tower.num_patches) == next_counts(select_feature, tower.config)
    assert features.shape == (2, tower.num_patches, tower.hidden_size)
    # A list of images gives one feature tensor per image, as LLaVA-NeXT's tower does.
    listed = tower(list(images))
    assert len(listed) == 2 and all(torch.allclose(f[0], e, atol=1e-5) for f, e in zip(listed, expected))


def test_slice_selections_on_a_too_short_tower_fail_clearly(ws, tmp_path):
    from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel

    config = EvaCLIPVisionConfig.from_pretrained(ws.eva)
    config.num_hidden_layers = 4
    EvaCLIPVisionModel(config).save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match="slice_m25811_f6_patch.*selects hidden states"):
        EvaCLIPVisionTower(str(tmp_path / "short"), tower_args("x", mm_vision_select_feature="slice_m25811_f6_patch"))
    with pytest.raises(ValueError, match="is not supported; choose one of"):
        EvaCLIPVisionTower(str(ws.eva), tower_args("x", mm_vision_select_feature="slicethree_patch"))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_slicefour_on_a_tower_under_three_layers_fails_clearly(ws, tmp_path, num_layers):
    """LLaVA-NeXT's own slicefour fails on such a tower with Python's bare range() error; ours names the problem at
    construction."""
    from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel

    hidden_states = tuple(torch.zeros(1, 2, 3) for _ in range(num_layers + 1))
    with pytest.raises(ValueError, match="range"):
        next_feature_select("slicefour_patch", -2, hidden_states)
    config = EvaCLIPVisionConfig.from_pretrained(ws.eva)
    config.num_hidden_layers = num_layers
    EvaCLIPVisionModel(config).save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match=f"needs at least 3 layers; this tower has {num_layers}"):
        EvaCLIPVisionTower(str(tmp_path / "short"), tower_args("x", mm_vision_select_feature="slicefour_patch"))


def test_attributes_llava_next_reads(ws):
    """What llava_arch.py (anyres, unpad, video pooling), builder.py and train.py read from the tower."""
    eva = EvaCLIPVisionTower(str(ws.eva), tower_args(str(ws.eva)))
    clip = CLIPVisionTower(str(ws.clip), tower_args(str(ws.clip)))
    for name in ("num_patches_per_side", "image_size", "hidden_size", "num_patches", "is_loaded"):
        assert getattr(eva, name) == getattr(clip, name), name
    assert eva.num_patches_per_side == GRID and eva.image_size == IMAGE_SIZE and eva.hidden_size == TOWER_WIDTH
    assert eva.config.image_size == IMAGE_SIZE and eva.config.patch_size == clip.config.patch_size
    assert eva.dummy_feature.shape == clip.dummy_feature.shape == (1, TOWER_WIDTH)
    assert eva.dtype == torch.float32 and eva.device.type == "cpu"
    eva.to(torch.bfloat16)  # train.py casts the tower like this
    assert eva.dtype == torch.bfloat16 and eva.dummy_feature.dtype == torch.bfloat16
    for processor in (eva.image_processor, clip.image_processor):
        assert processor.crop_size["height"] == IMAGE_SIZE and processor.size["shortest_edge"] == IMAGE_SIZE
    image_mean = eva.image_processor.image_mean  # process_images("pad") fills with it
    assert len(image_mean) == 3


@pytest.mark.parametrize("fields, loaded", [
    ({}, False),
    ({"mm_tunable_parts": "mm_mlp_adapter"}, False),
    ({"mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model"}, True),
    ({"unfreeze_mm_vision_tower": True}, True),
])
def test_delay_load_as_llava_next(ws, fields, loaded):
    """A delay-loaded tower stays empty, except when the checkpoint holds trained tower weights."""
    eva = EvaCLIPVisionTower(str(ws.eva), tower_args(str(ws.eva), **fields), delay_load=True)
    clip = CLIPVisionTower(str(ws.clip), tower_args(str(ws.clip), **fields), delay_load=True)
    assert eva.is_loaded == clip.is_loaded == loaded
    assert eva.config.image_size == IMAGE_SIZE and eva.num_patches_per_side == GRID and eva.hidden_size == TOWER_WIDTH


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}])
def test_load_model_takes_device_map(ws, device_map):
    """LLaVA-NeXT's load_pretrained_model calls vision_tower.load_model(device_map=device_map)."""
    tower = EvaCLIPVisionTower(str(ws.eva), tower_args(str(ws.eva)), delay_load=True)
    tower.load_model(device_map=device_map)
    assert tower.is_loaded and tower.device.type == "cpu"
    assert tower(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)).shape == (1, GRID * GRID, TOWER_WIDTH)

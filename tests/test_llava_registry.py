"""The hook into the real LLaVA package's `build_vision_tower`: every binding patched, matching, routing, errors."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")

import llava.model.llava_arch as llava_arch  # noqa: E402
import llava.model.multimodal_encoder.builder as llava_builder  # noqa: E402
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from conftest import tiny_config, tiny_vision_config  # noqa: E402
from llava_evaclip import (  # noqa: E402
    EvaCLIPModel,
    EvaCLIPVisionModel,
    EvaCLIPVisionTower,
    register_vision_tower,
    register_with_llava,
    unregister_from_llava,
)
from llava_evaclip import llava_registry  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402


@pytest.fixture(scope="module")
def original_builder():
    """LLaVA's own function, whatever state earlier tests left the hook in."""
    unregister_from_llava()
    return llava_builder.build_vision_tower


@pytest.fixture
def hooked(original_builder):
    register_with_llava()
    yield
    unregister_from_llava()


@pytest.fixture(scope="module")
def eva_dir(tmp_path_factory):
    config = tiny_config("eva02")
    path = tmp_path_factory.mktemp("eva_full")
    EvaCLIPModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def eva_vision_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vision_only")
    EvaCLIPVisionModel(tiny_vision_config("bige")).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def internvl_port_dir(tmp_path_factory, eva_dir):
    """Our weights under the InternVL port's config.json: model_type "clip", CLIP-typed sub-configs with EVA fields."""
    path = tmp_path_factory.mktemp("internvl_port")
    model = EvaCLIPModel.from_pretrained(eva_dir)
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "clip"
    for key, model_type in (("vision_config", "clip_vision_model"), ("text_config", "clip_text_model")):
        tower = getattr(model.config, key)
        config[key].update(model_type=model_type, **{field: getattr(tower, field) for field in
                                                       ("q_bias", "k_bias", "v_bias", "post_layernorm")})
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A plain transformers CLIP vision checkpoint, in a directory whose name contains "eva" (judged by config)."""
    path = tmp_path_factory.mktemp("evaluation_clip")
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=28, patch_size=7)
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(path)
    return str(path)


def llava_args(tower: str, **fields) -> types.SimpleNamespace:
    fields.setdefault("mm_vision_select_layer", -2)
    return types.SimpleNamespace(mm_vision_tower=tower, **fields)


# --------------------------------------------------------------------------------------------------------------------
# Patching LLaVA's bindings
# --------------------------------------------------------------------------------------------------------------------


def test_register_patches_every_binding_and_unregister_restores(original_builder):
    # A module that imported the function by name before the hook was registered, as llava_arch does.
    late = types.ModuleType("llava._evaclip_test_importer")
    late.build_vision_tower = original_builder
    sys.modules[late.__name__] = late
    try:
        assert llava_arch.build_vision_tower is original_builder
        register_with_llava()
        register_with_llava()  # idempotent
        for module in (llava_builder, llava_arch, late):
            assert module.build_vision_tower is llava_registry.build_vision_tower
        assert llava_registry.is_registered_with_llava()
        unregister_from_llava()
        for module in (llava_builder, llava_arch, late):
            assert module.build_vision_tower is original_builder
        assert not llava_registry.is_registered_with_llava()
        unregister_from_llava()  # a second call is a no-op
        assert llava_builder.build_vision_tower is original_builder
    finally:
        del sys.modules[late.__name__]


def test_modules_imported_after_registration_get_the_hook(hooked):
    from llava.model.multimodal_encoder.builder import build_vision_tower

    assert build_vision_tower is llava_registry.build_vision_tower


# --------------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------------


def test_matching_rules(eva_dir, eva_vision_dir, internvl_port_dir, clip_dir, tmp_path):
    match = llava_registry.is_evaclip_tower
    assert match(eva_dir) and match(eva_vision_dir) and match(internvl_port_dir)
    assert not match(clip_dir)  # a CLIP config decides, whatever the path says
    for name in ("BAAI/EVA02-CLIP-L-14-336", "QuanSun/EVA-CLIP", "my-eva02-tower", "EVA01-CLIP-g-14"):
        assert match(name)
    for name in ("openai/clip-vit-large-patch14-336", "laion/CLIP-ViT-H-14", "google/siglip-so400m", "foo/bar"):
        assert not match(name)
    # LLaVA-NeXT's prefixed loaders (timm / HF Hub, open_clip) keep their names, EVA models included.
    for name in ("hf:timm/eva02_base_patch14_224.mim_in22k", "open_clip_hub:EVA02-L-14", "open_clip_hub:ViT-B-16"):
        assert not match(name)
    unreadable = tmp_path / "eva_dir_without_config"
    unreadable.mkdir()
    assert match(str(unreadable))  # no config.json: judged by name
    port_vision = tmp_path / "port_vision"
    port_vision.mkdir()
    (port_vision / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "k_bias": False}))
    assert match(str(port_vision))
    siglip = tmp_path / "siglip"
    siglip.mkdir()
    (siglip / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_size": 32}))
    assert not match(str(siglip))


# --------------------------------------------------------------------------------------------------------------------
# Routing through LLaVA's builder
# --------------------------------------------------------------------------------------------------------------------


def test_eva_dirs_build_our_tower(hooked, eva_dir, eva_vision_dir, internvl_port_dir):
    for path in (eva_dir, eva_vision_dir, internvl_port_dir):
        tower = llava_builder.build_vision_tower(llava_args(path))
        assert isinstance(tower, EvaCLIPVisionTower) and tower.is_loaded
        assert tower(torch.randn(1, 3, 28, 28)).shape == (1, 16, 32)
    # LLaVA's ModelArguments name the field `vision_tower` (the config names it `mm_vision_tower`).
    tower = llava_arch.build_vision_tower(types.SimpleNamespace(vision_tower=eva_dir, mm_vision_select_layer=-1))
    assert isinstance(tower, EvaCLIPVisionTower) and tower.select_layers == (3,)


def test_port_dir_tower_has_the_checkpoint_weights(hooked, eva_dir, internvl_port_dir):
    images = torch.randn(2, 3, 28, 28)
    ours = llava_builder.build_vision_tower(llava_args(eva_dir))(images)
    port = llava_builder.build_vision_tower(llava_args(internvl_port_dir))(images)
    assert torch.equal(ours, port)


def test_delay_loaded_path_has_config_and_counts_without_weights(hooked, eva_dir):
    cfg = llava_args(eva_dir, mm_vision_select_layer="-2,-3", mm_vision_select_feature="patch")
    tower = llava_builder.build_vision_tower(cfg, delay_load=True)
    assert isinstance(tower, EvaCLIPVisionTower) and not tower.is_loaded
    assert not list(tower.parameters()) and not hasattr(tower, "vision_tower")
    assert tower.config.model_type == "evaclip_vision_model" and tower.config.num_hidden_layers == 3
    assert tower.hidden_size == 64 and tower.num_patches == 16 and tower.num_patches_per_side == 4


def test_other_towers_go_to_llava_unchanged(hooked, clip_dir):
    tower = llava_builder.build_vision_tower(llava_args(clip_dir), delay_load=True)
    assert type(tower) is CLIPVisionTower
    assert tower.config.model_type == "clip_vision_model" and tower.num_patches == 16
    with pytest.raises(ValueError, match="^Unknown vision tower: foo/bar$"):
        llava_builder.build_vision_tower(llava_args("foo/bar"))


def test_eva_looking_name_that_cannot_load_says_what_was_tried(hooked, tmp_path):
    with pytest.raises(ValueError, match=r"EVA-CLIP vision tower 'BAAI/EVA02-CLIP-L-14-336'.*tried .*Hub repo id"):
        llava_builder.build_vision_tower(llava_args("BAAI/EVA02-CLIP-L-14-336"))
    empty = tmp_path / "eva02_checkpoint"
    empty.mkdir()
    (empty / "EVA02_CLIP_L_336_psz14_s6B.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"tried the local directory .*config.json is missing.*llava-evaclip convert"):
        llava_builder.build_vision_tower(llava_args(str(empty)), delay_load=True)


def test_bad_tower_options_fail_at_build(hooked, eva_dir):
    with pytest.raises(ValueError, match="valid indices"):
        llava_builder.build_vision_tower(llava_args(eva_dir, mm_vision_select_layer=7), delay_load=True)
    with pytest.raises(ValueError, match="mm_vision_select_feature"):
        llava_builder.build_vision_tower(llava_args(eva_dir, mm_vision_select_feature="avg"), delay_load=True)


def test_a_new_tower_type_is_one_registration(hooked, eva_dir):
    built = []

    def toy_matcher(name: str) -> bool:
        return name.startswith("toy:")

    def toy_factory(name, args, **kwargs):
        built.append((name, args, kwargs))
        return "toy tower"

    register_vision_tower(toy_matcher, toy_factory)
    try:
        cfg = llava_args("toy:model")
        assert llava_arch.build_vision_tower(cfg, delay_load=True) == "toy tower"
        assert built == [("toy:model", cfg, {"delay_load": True})]
        assert isinstance(llava_builder.build_vision_tower(llava_args(eva_dir)), EvaCLIPVisionTower)
    finally:
        llava_registry.unregister_vision_tower(toy_matcher)
    with pytest.raises(ValueError, match="Unknown vision tower: toy:model"):
        llava_builder.build_vision_tower(llava_args("toy:model"))
    with pytest.raises(ValueError, match="two callables"):
        register_vision_tower("eva", toy_factory)

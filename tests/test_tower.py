"""EvaCLIPVisionTower: LLaVA's CLIPVisionTower contract, layer/feature selection, early stop, dtype/grad, bad input."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import tiny_config, tiny_vision_config
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionConfig, EvaCLIPVisionModel, EvaCLIPVisionTower
from llava_evaclip.processing import EVA_CLIP_MEAN, EVA_CLIP_STD, build_image_processor

NUM_LAYERS = 3  # tiny configs: 3 layers, 28x28 images, 7x7 patches -> a 4x4 grid, width 32
GRID = 4
WIDTH = 32


def tower_args(**fields) -> types.SimpleNamespace:
    """What LLaVA passes as `args`: its ModelArguments, or the model config when reloading."""
    fields.setdefault("mm_vision_select_layer", -2)
    return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def full_model_dir(tmp_path_factory):
    """A full EvaCLIPModel checkpoint with its image processor (the layout LLaVA loads the tower from)."""
    torch.manual_seed(1)
    config = tiny_config("eva02")
    model = EvaCLIPModel(config).eval()
    path = tmp_path_factory.mktemp("evaclip_full")
    model.save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return str(path), model


@pytest.fixture(scope="module")
def vision_only_dir(tmp_path_factory):
    """A vision-only checkpoint without preprocessor_config.json: the processor is built from the config."""
    torch.manual_seed(2)
    model = EvaCLIPVisionModel(tiny_vision_config("eva01_layer_scale")).eval()
    path = tmp_path_factory.mktemp("evaclip_vision")
    model.save_pretrained(path)
    return str(path), model


def reference_hidden_states(model, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """hidden_states of the original (saved) model's vision tower, all layers run."""
    with torch.no_grad():
        return model.vision_model(images, output_hidden_states=True).hidden_states


# --------------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "select_layer, states",
    [(-2, [2]), (-1, [3]), (0, [0]), ("-2", [2]), ("-2,-3,0", [2, 1, 0]), ([3, -4], [3, 0]), ((1,), [1])],
)
def test_selected_layers_equal_hidden_states_exactly(full_model_dir, select_layer, states):
    path, model = full_model_dir
    args = tower_args(mm_vision_select_layer=select_layer, mm_vision_select_feature="cls_patch")
    tower = EvaCLIPVisionTower(path, args)
    images = torch.randn(2, 3, 28, 28)
    expected = torch.cat([reference_hidden_states(model, images)[k] for k in states], dim=-1)
    features = tower(images)
    assert torch.equal(features, expected)
    assert tower.hidden_size == WIDTH * len(states) == features.shape[-1]


def test_select_feature_patch_cls_patch_cls(full_model_dir):
    path, model = full_model_dir
    images = torch.randn(3, 3, 28, 28)
    state = reference_hidden_states(model, images)[-2]
    outputs = {}
    for feature in ("patch", "cls_patch", "cls"):
        tower = EvaCLIPVisionTower(path, tower_args(mm_vision_select_feature=feature))
        outputs[feature] = tower(images)
    assert torch.equal(outputs["patch"], state[:, 1:])
    assert torch.equal(outputs["cls_patch"], state)
    assert torch.equal(outputs["cls"], state[:, :1])
    assert outputs["patch"].shape == (3, GRID * GRID, WIDTH)
    # LLaVA's default when the argument is absent is "patch".
    assert EvaCLIPVisionTower(path, tower_args()).select_feature == "patch"


@pytest.mark.parametrize(
    "select_layer, expected_calls", [(-2, [1, 1, 0]), (1, [1, 0, 0]), (0, [0, 0, 0]), ("-1,1", [1, 1, 1])]
)
def test_layers_after_the_deepest_selected_one_do_not_run(full_model_dir, select_layer, expected_calls):
    path, _ = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args(mm_vision_select_layer=select_layer))
    calls = [0] * NUM_LAYERS
    handles = [
        layer.register_forward_hook(lambda module, args, output, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(tower.vision_tower.vision_model.encoder.layers)
    ]
    try:
        tower(torch.randn(2, 3, 28, 28))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == expected_calls


def test_only_selected_hidden_states_are_kept(full_model_dir):
    path, _ = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args(mm_vision_select_layer="-2,0"))
    kept = tower.vision_tower.vision_model.select_hidden_states(torch.randn(1, 3, 28, 28), tower.select_layers)
    assert sorted(kept) == [0, 2]


def test_list_of_images_gives_one_feature_per_image(full_model_dir):
    path, model = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    images = [torch.randn(3, 28, 28) for _ in range(3)]
    features = tower(images)
    expected = reference_hidden_states(model, torch.stack(images))[-2][:, 1:]
    assert isinstance(features, list) and len(features) == 3
    for index, feature in enumerate(features):
        assert feature.shape == (1, GRID * GRID, WIDTH)
        assert torch.equal(feature, expected[index : index + 1])
    # Mixed dtypes run one by one, each returned in its own dtype.
    mixed = tower([images[0], images[1].to(torch.bfloat16)])
    assert [f.dtype for f in mixed] == [torch.float32, torch.bfloat16]
    assert torch.equal(mixed[0], reference_hidden_states(model, images[0][None])[-2][:, 1:])


# --------------------------------------------------------------------------------------------------------------------
# LLaVA's contract: loading, properties, dtype, gradients
# --------------------------------------------------------------------------------------------------------------------


def test_eager_load_and_properties(full_model_dir):
    path, model = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    assert tower.is_loaded and tower.vision_tower_name == path
    assert tower.select_layer == -2 and tower.select_feature == "patch"
    assert isinstance(tower.config, EvaCLIPVisionConfig)
    for field in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "use_rope", "use_swiglu"):
        assert getattr(tower.config, field) == getattr(model.config.vision_config, field)
    assert tower.hidden_size == WIDTH
    assert tower.num_patches_per_side == GRID and tower.num_patches == GRID * GRID
    assert tower.dtype == torch.float32 and tower.device == torch.device("cpu")
    assert tower.dummy_feature.shape == (1, WIDTH) and not tower.dummy_feature.any()
    # Frozen, as LLaVA's tower is.
    assert not any(p.requires_grad for p in tower.parameters())
    # The weights are the checkpoint's, not a fresh init.
    assert torch.equal(
        tower.vision_tower.vision_model.embeddings.patch_embedding.weight,
        model.vision_model.embeddings.patch_embedding.weight,
    )


def test_load_model_is_idempotent(full_model_dir):
    path, _ = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    model, processor = tower.vision_tower, tower.image_processor
    tower.load_model()
    assert tower.vision_tower is model and tower.image_processor is processor


def test_delay_load_has_config_only_then_loads(full_model_dir):
    path, model = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args(mm_vision_select_layer="-2,-3"), delay_load=True)
    assert not tower.is_loaded
    assert not hasattr(tower, "vision_tower") and not list(tower.parameters())
    assert isinstance(tower.config, EvaCLIPVisionConfig)
    assert tower.config.num_hidden_layers == NUM_LAYERS
    assert tower.hidden_size == 2 * WIDTH and tower.num_patches == GRID * GRID and tower.num_patches_per_side == GRID
    with pytest.raises(RuntimeError, match="load_model"):
        tower(torch.randn(1, 3, 28, 28))
    tower.load_model()
    assert tower.is_loaded
    images = torch.randn(1, 3, 28, 28)
    states = reference_hidden_states(model, images)
    assert torch.equal(tower(images), torch.cat([states[2], states[1]], dim=-1)[:, 1:])


def test_unfreeze_loads_eagerly_and_keeps_the_graph(full_model_dir):
    path, model = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args(unfreeze_mm_vision_tower=True), delay_load=True)
    assert tower.is_loaded
    images = torch.randn(2, 3, 28, 28)
    frozen = tower(images)
    assert not frozen.requires_grad  # no_grad while frozen
    tower.requires_grad_(True)
    trained = tower(images)
    assert trained.requires_grad
    trained.square().mean().backward()
    grads = [p.grad for p in tower.vision_tower.vision_model.encoder.layers[0].parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # Layers past the selected one take no part in the graph.
    assert all(p.grad is None for p in tower.vision_tower.vision_model.encoder.layers[-1].parameters())
    # The same features: the frozen tower's inference path turns RoPE pairs as complex numbers, within fp32 rounding
    # of the module calls' real arithmetic (its own tests compare both with timm's rotation).
    torch.testing.assert_close(trained.detach(), frozen, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert not tower(images).requires_grad


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_features_come_back_in_the_input_dtype(full_model_dir, input_dtype):
    path, model = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    images = torch.randn(2, 3, 28, 28).to(input_dtype)
    features = tower(images)
    assert features.dtype == input_dtype
    expected = reference_hidden_states(model, images.float())[-2][:, 1:].to(input_dtype)
    assert torch.equal(features, expected)


def test_tower_in_bfloat16(full_model_dir):
    """LLaVA casts the tower (`vision_tower.to(dtype=torch.bfloat16)`); inputs follow it, outputs keep theirs."""
    path, model = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    tower.to(dtype=torch.bfloat16)
    assert tower.dtype == torch.bfloat16 and tower.dummy_feature.dtype == torch.bfloat16
    images = torch.randn(2, 3, 28, 28)
    reference = EvaCLIPVisionModel.from_pretrained(path).to(torch.bfloat16).eval()
    with torch.no_grad():
        expected = reference(images.to(torch.bfloat16), output_hidden_states=True).hidden_states[-2][:, 1:]
    features = tower(images)
    assert features.dtype == torch.float32
    assert torch.equal(features, expected.float())


def test_vision_only_dir_and_processor_built_from_config(vision_only_dir):
    path, model = vision_only_dir
    tower = EvaCLIPVisionTower(path, tower_args(mm_vision_select_layer=-1))
    processor = tower.image_processor
    assert list(processor.image_mean) == pytest.approx(EVA_CLIP_MEAN)
    assert list(processor.image_std) == pytest.approx(EVA_CLIP_STD)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 28
    images = torch.randn(2, 3, 28, 28)
    assert torch.equal(tower(images), reference_hidden_states(model, images)[-1][:, 1:])


def test_processor_saved_in_the_dir_is_used(tmp_path):
    config = tiny_vision_config("eva02")
    EvaCLIPVisionModel(config).save_pretrained(tmp_path)
    processor = build_image_processor(config)
    processor.image_mean = [0.5, 0.5, 0.5]
    processor.save_pretrained(tmp_path)
    tower = EvaCLIPVisionTower(str(tmp_path), tower_args())
    assert list(tower.image_processor.image_mean) == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "select_layer",
    [4, -5, 100, "4", "-2,4", "abc", "", "-2,,-3", "1.5", 1.5, True, [], [-1, 3], "-2,-2", [0, "x"]],
)
def test_invalid_select_layer_raises_at_construction(full_model_dir, select_layer):
    path, _ = full_model_dir
    with pytest.raises(ValueError, match=r"valid indices are -4\.\.3"):
        EvaCLIPVisionTower(path, tower_args(mm_vision_select_layer=select_layer), delay_load=True)


def test_invalid_select_feature_names_the_choices(full_model_dir):
    path, _ = full_model_dir
    with pytest.raises(ValueError, match=r"'patch', 'cls_patch', 'cls'"):
        EvaCLIPVisionTower(path, tower_args(mm_vision_select_feature="mean"), delay_load=True)


def test_wrong_image_size_names_the_expected_size(full_model_dir):
    path, _ = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    with pytest.raises(ValueError, match="28x28"):
        tower(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="28x28"):
        tower([torch.randn(3, 28, 28), torch.randn(3, 56, 56)])
    with pytest.raises(ValueError, match=r"\[batch, 3, 28, 28\]"):
        tower(torch.randn(3, 28, 28))  # a single image must come batched or in a list
    with pytest.raises(ValueError, match=r"\[batch, 3, 28, 28\]"):
        tower(torch.randn(1, 1, 28, 28))


def test_empty_input_raises(full_model_dir):
    path, _ = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    with pytest.raises(ValueError, match="empty list"):
        tower([])
    with pytest.raises(ValueError, match="empty batch"):
        tower(torch.randn(0, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        tower([torch.randn(1, 3, 28, 28)])


def test_processor_that_does_not_fit_the_model_is_rejected(tmp_path):
    config = tiny_vision_config("eva02")
    EvaCLIPVisionModel(config).save_pretrained(tmp_path)
    build_image_processor(56).save_pretrained(tmp_path)
    tower = EvaCLIPVisionTower(str(tmp_path), tower_args(), delay_load=True)
    with pytest.raises(ValueError, match="56x56 images but the tower takes 28x28"):
        tower.load_model()


def test_unloadable_name_says_what_was_tried(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*Hub repo id"):
        EvaCLIPVisionTower(str(tmp_path / "EVA02-CLIP-L-14-336"), tower_args())
    (tmp_path / "empty_eva").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        EvaCLIPVisionTower(str(tmp_path / "empty_eva"), tower_args())
    with pytest.raises(ValueError, match="architecture preset, which has no weights"):
        EvaCLIPVisionTower("EVA02-CLIP-L-14-336", tower_args())


def test_checkpoint_with_missing_weights_is_refused(tmp_path):
    """transformers alone would only warn and leave the two weights randomly initialised."""
    from safetensors.torch import load_file, save_file

    EvaCLIPModel(tiny_config("eva02")).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    missing = ["vision_model.encoder.layers.1.mlp.fc2.bias", "vision_model.post_layernorm.weight"]
    for key in missing:
        del state[key]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tower = EvaCLIPVisionTower(str(tmp_path), tower_args(), delay_load=True)
    with pytest.raises(ValueError, match="lacks 2 weight") as error:
        tower.load_model()
    assert all(key in str(error.value) for key in missing), error.value
    assert not tower.is_loaded


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.bool])
def test_integer_pixels_are_refused(full_model_dir, dtype):
    """Raw 0-255 pixels would become features of unnormalised (and, for uint8 outputs, wrapped) values."""
    path, _ = full_model_dir
    tower = EvaCLIPVisionTower(path, tower_args())
    pixels = torch.randint(0, 2, (1, 3, 28, 28)).to(dtype)
    with pytest.raises(ValueError, match=rf"floating-point tensor .*got dtype {dtype}; pass image_processor"):
        tower(pixels)
    with pytest.raises(ValueError, match=r"floating-point tensor"):
        tower([pixels[0], pixels[0]])


@pytest.mark.parametrize("num_layers", [1, 2])
def test_slicefour_on_a_tower_under_three_layers_says_so(num_layers):
    """LLaVA-NeXT's slicefour reads every (L+1)//4-th hidden state: `range(step + layer, L + 1, step)` with step 0 is
    Python's bare "range() arg 3 must not be zero"; the tower names the problem instead."""
    from llava_evaclip.tower import parse_select_feature

    with pytest.raises(ValueError, match="range"):
        hidden_states = list(range(num_layers + 1))  # what its CLIPVisionTower.feature_select indexes
        step = len(hidden_states) // 4
        [hidden_states[i] for i in range(step - 2, len(hidden_states), step)]
    with pytest.raises(ValueError, match=f"slicefour_patch.*needs at least 3 layers; this tower has {num_layers}"):
        parse_select_feature("slicefour_patch", -2, num_layers)
    assert parse_select_feature("slicefour_patch", -2, 3) == ("patch", [3, 0, 1, 2, 3])  # LLaVA-NeXT's [-1, 0, 1, 2, 3]

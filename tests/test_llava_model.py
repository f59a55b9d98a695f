"""EvaCLIPVisionTower inside the real LLaVA model: initialize_vision_modules, LLaVA's multimodal input preparation,
loss and projector gradients, reloading a saved model (delay-loaded tower), S2 and several layers, generation."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("llava", reason="LLaVA's code (pip install --no-deps llava-torch) is needed for these tests")
pytestmark = pytest.mark.usefixtures("llava_registered")

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import tiny_config  # noqa: E402
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionTower  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402

VOCAB, LM_WIDTH = 96, 64
NUM_PATCHES = 16  # tiny tower: 28x28 images, 7x7 patches


@pytest.fixture(scope="module")
def eva_dir(tmp_path_factory):
    """A converted-style checkpoint: a full EvaCLIPModel saved with its image processor."""
    torch.manual_seed(5)
    config = tiny_config("eva02")
    path = tmp_path_factory.mktemp("eva_for_llava")
    EvaCLIPModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return str(path)


def tiny_llava() -> LlavaLlamaForCausalLM:
    config = LlavaConfig(vocab_size=VOCAB, hidden_size=LM_WIDTH, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlavaLlamaForCausalLM(config)


def model_args(tower: str, **fields) -> types.SimpleNamespace:
    """The fields of LLaVA's ModelArguments that initialize_vision_modules reads."""
    values = dict(vision_tower=tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu")
    values.update(fields)
    return types.SimpleNamespace(**values)


def batch_with_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded samples with the image placeholder at different places; labels on every text token."""
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10], [1, IMAGE_TOKEN_INDEX, 11, 12, 0, 0, 0]])
    attention_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    labels[~attention_mask] = IGNORE_INDEX
    return ids, attention_mask, labels


def test_llava_builds_and_trains_through_an_eva_tower(eva_dir):
    torch.manual_seed(0)
    model = tiny_llava()
    model.get_model().initialize_vision_modules(model_args(eva_dir))
    tower = model.get_vision_tower()
    assert isinstance(tower, EvaCLIPVisionTower) and tower.is_loaded
    assert model.config.mm_vision_tower == eva_dir and model.config.mm_hidden_size == tower.hidden_size == 32
    assert tower.num_patches == NUM_PATCHES

    # LLaVA's own preprocessing ("pad" fills with the processor's mean) with the tower's processor.
    model.config.image_aspect_ratio = "pad"
    pictures = [Image.new("RGB", (40, 24), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 40, 220))]
    images = process_images(pictures, tower.image_processor, model.config)
    assert images.shape == (2, 3, 28, 28)

    ids, attention_mask, labels = batch_with_images()
    (_, position_ids, new_mask, _, inputs_embeds, new_labels) = model.prepare_inputs_labels_for_multimodal(
        ids, None, attention_mask, None, labels, images
    )
    text_lengths = (attention_mask.sum(dim=1) - 1).tolist()  # the placeholder token is replaced
    assert new_mask.sum(dim=1).tolist() == [n + NUM_PATCHES for n in text_lengths]
    assert inputs_embeds.shape == (2, max(text_lengths) + NUM_PATCHES, LM_WIDTH)
    # The image span holds the projected tower features, one row per patch, and carries no labels.
    with torch.no_grad():
        projected = model.get_model().mm_projector(tower(images))
    assert torch.equal(inputs_embeds[0, 2 : 2 + NUM_PATCHES], projected[0])
    assert torch.equal(inputs_embeds[1, 1 : 1 + NUM_PATCHES], projected[1])
    assert (new_labels[0, 2 : 2 + NUM_PATCHES] == IGNORE_INDEX).all()
    assert ((new_labels == IGNORE_INDEX) & new_mask).sum(dim=1).tolist() == [NUM_PATCHES, NUM_PATCHES]

    output = model(input_ids=ids, attention_mask=attention_mask, labels=labels, images=images)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    projector_grads = [p.grad for p in model.get_model().mm_projector.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in projector_grads)
    assert all(g.abs().sum() > 0 for g in projector_grads)
    assert all(p.grad is None for p in tower.parameters())  # the frozen tower stays out of the graph


def test_images_as_a_list_go_through_llava(eva_dir):
    torch.manual_seed(0)
    model = tiny_llava()
    model.get_model().initialize_vision_modules(model_args(eva_dir))
    ids, attention_mask, labels = batch_with_images()
    images = torch.randn(2, 3, 28, 28)
    stacked = model(input_ids=ids, attention_mask=attention_mask, labels=labels, images=images)
    listed = model(input_ids=ids, attention_mask=attention_mask, labels=labels, images=list(images))
    torch.testing.assert_close(listed.loss, stacked.loss, rtol=0, atol=1e-6)


def assert_same_logits(model, reloaded) -> None:
    """The reloaded LLaVA model gives the original's logits on a batch with images."""
    ids, attention_mask, _ = batch_with_images()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention_mask, images=images).logits
        actual = reloaded(input_ids=ids, attention_mask=attention_mask, images=images).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_reloading_a_saved_llava_model_delay_loads_the_tower(eva_dir, tmp_path):
    torch.manual_seed(0)
    model = tiny_llava().eval()
    model.get_model().initialize_vision_modules(model_args(eva_dir, mm_vision_select_layer="-2,-3"))
    assert model.config.mm_hidden_size == 64
    model.save_pretrained(tmp_path)

    reloaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path).eval()
    tower = reloaded.get_vision_tower()
    assert isinstance(tower, EvaCLIPVisionTower) and not tower.is_loaded  # LLaVA builds it with delay_load=True
    assert not list(tower.parameters())
    assert tower.hidden_size == 64 and tower.num_patches == NUM_PATCHES and tower.config.image_size == 28
    tower.load_model()  # what llava.model.builder.load_pretrained_model does next
    assert_same_logits(model, reloaded)


def test_s2_and_several_layers_in_llava(eva_dir):
    torch.manual_seed(0)
    model = tiny_llava()
    args = model_args(eva_dir, mm_vision_select_layer="-2,-4", s2=True, s2_scales="28,56")
    model.get_model().initialize_vision_modules(args)
    tower = model.get_vision_tower()
    assert tower.hidden_size == 32 * 2 * 2 == model.config.mm_hidden_size
    assert tower.image_processor.crop_size["height"] == 56
    ids, attention_mask, labels = batch_with_images()
    output = model(input_ids=ids, attention_mask=attention_mask, labels=labels, images=torch.randn(2, 3, 56, 56))
    assert torch.isfinite(output.loss)
    # A config carrying the same options rebuilds the same tower when the model is reloaded.
    model.config.s2, model.config.s2_scales = True, "28,56"
    rebuilt = LlavaLlamaForCausalLM(model.config).get_vision_tower()
    assert not rebuilt.is_loaded and rebuilt.hidden_size == tower.hidden_size and rebuilt.s2_scales == [28, 56]


def test_generation_uses_the_eva_features(eva_dir):
    """Greedy `generate` (with the KV cache) equals step-by-step argmax of full forwards over the image prompt."""
    from llava_evaclip.llava_registry import patch_llava_forward

    patch_llava_forward()  # transformers 5's generate passes arguments LLaVA's forward does not name
    torch.manual_seed(0)
    model = tiny_llava().eval()
    model.get_model().initialize_vision_modules(model_args(eva_dir))
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8]])
    images = torch.randn(1, 3, 28, 28)
    generated = model.generate(ids, images=images, do_sample=False, max_new_tokens=4, use_cache=True)
    sequence, expected = ids, []
    with torch.no_grad():
        for _ in range(4):
            next_token = model(input_ids=sequence, images=images).logits[:, -1].argmax(-1, keepdim=True)
            expected.append(next_token.item())
            sequence = torch.cat([sequence, next_token], dim=1)
    assert generated[0, -4:].tolist() == expected


def test_reloading_a_model_with_a_trained_tower_takes_its_weights_from_the_llava_checkpoint(tmp_path):
    """`unfreeze_mm_vision_tower` in the config makes LLaVA build the tower eagerly inside `from_pretrained`, which
    transformers 5 (always) and 4.x with `low_cpu_mem_usage` (as LLaVA's builder loads) do on the meta device. The
    tower is then built from its config alone: it loads even after its own weights file is gone, and ends up with the
    trained weights from the LLaVA checkpoint."""
    torch.manual_seed(3)
    config = tiny_config("eva02")
    tower_dir = tmp_path / "tower"
    EvaCLIPModel(config).save_pretrained(tower_dir)
    build_image_processor(config).save_pretrained(tower_dir)
    model = tiny_llava().eval()
    model.get_model().initialize_vision_modules(model_args(str(tower_dir)))
    model.config.unfreeze_mm_vision_tower = True  # what the launcher records for a trained tower
    with torch.no_grad():  # "train" the tower: its weights now differ from the tower checkpoint's
        for parameter in model.get_vision_tower().parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "llava")
    (tower_dir / "model.safetensors").unlink()

    reloaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "llava", low_cpu_mem_usage=True).eval()
    tower = reloaded.get_vision_tower()
    assert isinstance(tower, EvaCLIPVisionTower) and tower.is_loaded
    trained = model.get_vision_tower().state_dict()
    assert tower.state_dict().keys() == trained.keys()
    for key, value in tower.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, trained[key]), key
    assert_same_logits(model, reloaded)

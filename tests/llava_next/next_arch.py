"""Issue 15 item 3: LLaVA-NeXT's LlavaQwenForCausalLM and LlavaLlamaForCausalLM with the EVA-CLIP tower. Its
`prepare_inputs_labels_for_multimodal` ("pad", anyres_max_N + spatial_unpad, video frames pooled with
mm_spatial_pool_mode) must lay out as many image tokens as for LLaVA-NeXT's own CLIPVisionTower of the same grid; the
loss is finite, gradients reach the projector and, with the tower unfrozen the way `mm_tunable_parts` does it, the
tower; `mm_vision_tower_lr` gives the tower its own parameter groups in LLaVA-NeXT's trainer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from next_common import GRID, LLAVA_NEXT_TRAINS, LM_WIDTH, PINPOINTS, workspace_once

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM  # noqa: E402
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower  # noqa: E402

from llava_evaclip import EvaCLIPVisionTower, register_with_llava, unregister_from_llava  # noqa: E402

VOCAB = 100
MODELS = {
    "qwen": (LlavaQwenForCausalLM, LlavaQwenConfig, {"num_key_value_heads": 2}),
    "llama": (LlavaLlamaForCausalLM, LlavaConfig, {"num_key_value_heads": 4}),
}
PICTURE_SIZES = [(60, 30), (26, 60), (40, 40)]  # (width, height): wide, tall, square: different anyres grids
NUM_FRAMES = 3


@pytest.fixture(scope="module", autouse=True)
def hooked():
    register_with_llava()
    yield
    unregister_from_llava()


@pytest.fixture(scope="module")
def ws():
    return workspace_once()


def build(kind: str, tower: str, merge: str, aspect: str, **config_fields):
    """A tiny LLaVA-NeXT model whose vision modules come from LLaVA-NeXT's own initialize_vision_modules."""
    model_class, config_class, extra = MODELS[kind]
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=LM_WIDTH, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=512, **extra)
    model = model_class(config)
    model.get_model().initialize_vision_modules(SimpleNamespace(
        vision_tower=tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch", pretrain_mm_mlp_adapter=None,
        mm_patch_merge_type=merge, mm_projector_type="mlp2x_gelu", add_faster_video=False))
    # What train.py copies from its arguments into the config.
    model.config.image_aspect_ratio = aspect
    model.config.image_grid_pinpoints = PINPOINTS
    model.config.mm_newline_position = "grid"
    model.config.mm_spatial_pool_stride = 2
    model.config.mm_spatial_pool_mode = "bilinear"
    model.config.add_faster_video = False
    for key, value in config_fields.items():
        setattr(model.config, key, value)
    return model


def batch(num_images: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded samples, one image placeholder each, labels on the text after it."""
    generator = torch.Generator().manual_seed(1)
    rows, lengths = [], []
    for index in range(num_images):
        before, after = 2 + index, 5 - index
        rows.append(torch.cat([torch.randint(3, VOCAB, (before,), generator=generator), torch.tensor([IMAGE_TOKEN_INDEX]),
                               torch.randint(3, VOCAB, (after,), generator=generator)]))
        lengths.append(len(rows[-1]))
    width = max(lengths)
    ids = torch.zeros(num_images, width, dtype=torch.long)
    mask = torch.zeros(num_images, width, dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)], mask[index, : len(row)] = row, True
    labels = ids.clone()
    labels[(ids == IMAGE_TOKEN_INDEX) | ~mask] = IGNORE_INDEX
    return ids, mask, labels


def inputs(model, case: str) -> dict:
    """LLaVA-NeXT's own preprocessing of the pictures (or of video frames) with the tower's image processor."""
    processor = model.get_vision_tower().image_processor
    generator = torch.Generator().manual_seed(2)
    if case == "video":
        frames = [torch.randint(0, 256, (40, 50, 3), generator=generator, dtype=torch.uint8) for _ in range(NUM_FRAMES)]
        video = processor.preprocess([Image.fromarray(f.numpy()) for f in frames], return_tensors="pt")["pixel_values"]
        ids, mask, labels = batch(1)
        return dict(input_ids=ids, attention_mask=mask, labels=labels, images=[video], modalities=["video"],
                    image_sizes=[(50, 40)])
    pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
                for w, h in PICTURE_SIZES]
    images = process_images(pictures, processor, model.config)
    ids, mask, labels = batch(len(pictures))
    return dict(input_ids=ids, attention_mask=mask, labels=labels, images=images,
                modalities=["image"] * len(pictures), image_sizes=[p.size for p in pictures])


CASES = {  # case -> (mm_patch_merge_type, image_aspect_ratio)
    "pad": ("flat", "pad"),
    "anyres_max_9": ("spatial_unpad", "anyres_max_9"),
    "video": ("spatial_unpad", "anyres_max_9"),
}


def image_token_counts(model, case: str) -> tuple[list[int], dict]:
    batch_inputs = inputs(model, case)
    text_lengths = (batch_inputs["attention_mask"].sum(dim=1) - 1).tolist()
    with torch.no_grad():
        _, _, mask, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
            batch_inputs["input_ids"], None, batch_inputs["attention_mask"], None, batch_inputs["labels"],
            batch_inputs["images"], batch_inputs["modalities"], image_sizes=batch_inputs["image_sizes"])
    assert embeds.shape[-1] == LM_WIDTH
    counts = [int(n) - t for n, t in zip(mask.sum(dim=1).tolist(), text_lengths)]
    # Image positions carry no labels: every ignored position in the mask is an image token.
    assert ((labels == IGNORE_INDEX) & mask).sum(dim=1).tolist() == counts
    return counts, batch_inputs


@pytest.mark.parametrize("pool_mode", ["average", "max", "bilinear"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_video_frames_are_pooled_like_llava_nexts_clip_tower(ws, kind, pool_mode):
    merge, aspect = CASES["video"]
    eva = build(kind, str(ws.eva), merge, aspect, mm_spatial_pool_mode=pool_mode)
    clip = build(kind, str(ws.clip), merge, aspect, mm_spatial_pool_mode=pool_mode)
    assert isinstance(eva.get_vision_tower(), EvaCLIPVisionTower)
    assert isinstance(clip.get_vision_tower(), CLIPVisionTower)
    counts, _ = image_token_counts(eva, "video")
    pooled = -(-GRID // 2)
    assert counts == image_token_counts(clip, "video")[0] == [NUM_FRAMES * pooled * (pooled + 1)]  # + newline per row


@pytest.mark.parametrize("case", ["pad", "anyres_max_9"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_image_tokens_loss_and_gradients(ws, kind, case):
    merge, aspect = CASES[case]
    eva = build(kind, str(ws.eva), merge, aspect)
    clip = build(kind, str(ws.clip), merge, aspect)
    counts, batch_inputs = image_token_counts(eva, case)
    assert counts == image_token_counts(clip, case)[0]
    if case == "pad":
        assert counts == [GRID * GRID] * len(PICTURE_SIZES)
    else:  # base tile + unpadded grid with a newline per row: more than one tile, and different per aspect ratio
        assert all(count > GRID * GRID for count in counts) and len(set(counts)) == len(counts)

    output = eva(**batch_inputs)
    assert torch.isfinite(output.loss)
    output.loss.backward()
    projector = list(eva.get_model().mm_projector.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in projector)
    tower = eva.get_vision_tower()
    assert all(p.grad is None for p in tower.parameters())  # frozen: outside the graph


@pytest.mark.skipif(not LLAVA_NEXT_TRAINS, reason="LLaVA-NeXT's trainer needs accelerate < 1.0 and a "
                                                 "TrainingArguments with dispatch_batches")
@pytest.mark.parametrize("kind", list(MODELS))
def test_tunable_tower_gets_gradients_and_its_own_learning_rate(ws, kind, tmp_path):
    from llava_evaclip import launch

    train_module = launch.prepare_llava("llava.train.train")  # LLaVA-NeXT's trainer, importable on this transformers
    model = build(kind, str(ws.eva), *CASES["anyres_max_9"])
    # What train.py does for --mm_tunable_parts mm_vision_tower,mm_mlp_adapter,mm_language_model.
    model.requires_grad_(True)
    tower = model.get_vision_tower()
    output = model(**inputs(model, "anyres_max_9"))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    # Layer -2 is read: every parameter up to it gets a gradient; the last layer and the final norm are not run.
    unused = (f"encoder.layers.{tower.config.num_hidden_layers - 1}.", "post_layernorm")
    tower_parameters = list(tower.parameters())
    for name, parameter in tower.named_parameters():
        if any(part in name for part in unused):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.abs().sum() > 0 or name.endswith("bias"), name

    args = train_module.TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, mm_vision_tower_lr=2e-6,
                                          report_to="none", weight_decay=0.1)
    trainer = train_module.LLaVATrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    tower_ids = {id(p) for p in tower_parameters}
    grouped_ids = {id(p) for group in optimizer.param_groups if group.get("lr") == 2e-6 for p in group["params"]}
    assert grouped_ids == tower_ids
    others = [group for group in optimizer.param_groups if not {id(p) for p in group["params"]} <= tower_ids]
    assert others and all(group["lr"] == 1e-3 for group in others)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-NeXT's "(1x1),...,(6x6)" pinpoint notation at real tile sizes (it asserts a tile size of 224 ... 512, so the
# tiny towers above cannot take it): the processor's size (the pinpoint unit and base-image size), its crop size (the
# tile LLaVA-NeXT cuts) and the tower's image_size (the grid llava_arch lays out) must agree as for its CLIP tower.
# --------------------------------------------------------------------------------------------------------------------

REAL_TILE_PICTURES = [(1000, 300), (300, 1000), (640, 480), (50, 40)]  # (width, height)


@pytest.fixture(scope="module")
def real_tile_towers(tmp_path_factory):
    """1-layer EVA-CLIP and CLIP towers at 336 / 14 and 448 / 14, the EVA one with the processor our converter saves."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from llava_evaclip import EvaCLIPVisionConfig, EvaCLIPVisionModel
    from llava_evaclip.processing import build_image_processor

    root = tmp_path_factory.mktemp("real_tiles")
    towers = {}
    for size in (336, 448):
        shapes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=size, patch_size=14, projection_dim=16)
        torch.manual_seed(5)
        config = EvaCLIPVisionConfig(use_rope=True, rope_pt_grid_size=size // 14, use_swiglu=True,
                                     use_sub_layernorm=True, **shapes)
        EvaCLIPVisionModel(config).save_pretrained(root / f"eva-{size}")
        build_image_processor(config).save_pretrained(root / f"eva-{size}")
        CLIPVisionModel(CLIPVisionConfig(**shapes)).save_pretrained(root / f"clip-{size}")
        CLIPImageProcessor(size={"shortest_edge": size},
                           crop_size={"height": size, "width": size}).save_pretrained(root / f"clip-{size}")
        towers[size] = (str(root / f"eva-{size}"), str(root / f"clip-{size}"))
    return towers


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres"])
@pytest.mark.parametrize("size", [336, 448])
def test_string_pinpoints_at_real_tile_sizes_as_llava_nexts_clip_tower(real_tile_towers, size, aspect):
    """Same tiles (pixel for pixel: both processors use OpenAI's mean / std and bicubic resizing) and the same image
    token counts as LLaVA-NeXT's CLIPVisionTower, with the pinpoints in LLaVA-NeXT's string notation."""
    generator = torch.Generator().manual_seed(3)
    pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy())
                for w, h in REAL_TILE_PICTURES]
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6]] * len(pictures))
    results = []
    for tower in real_tile_towers[size]:
        model = build("qwen", tower, "spatial_unpad", aspect, image_grid_pinpoints="(1x1),...,(6x6)")
        images = process_images(pictures, model.get_vision_tower().image_processor, model.config)
        with torch.no_grad():
            _, _, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
                ids, None, torch.ones_like(ids, dtype=torch.bool), None, ids.clone(), images,
                ["image"] * len(pictures), image_sizes=[p.size for p in pictures])
        results.append((images, (mask.sum(dim=1) - 2).tolist()))
    (eva_images, eva_counts), (clip_images, clip_counts) = results
    assert isinstance(build("qwen", real_tile_towers[size][0], "flat", "pad").get_vision_tower(), EvaCLIPVisionTower)
    assert [tuple(x.shape) for x in eva_images] == [tuple(x.shape) for x in clip_images]
    assert all(torch.equal(e, c) for e, c in zip(eva_images, clip_images))
    assert eva_counts == clip_counts
    assert all(count > (size // 14) ** 2 for count in eva_counts)  # base tile + unpadded grid

"""LLaVA-NeXT's loading and evaluation paths with an EVA-CLIP tower (LLaVA-NeXT first on PYTHONPATH, transformers
4.x), in a process of its own:

- `load_pretrained_model(path, None, "llava_qwen", device_map="auto", attn_implementation="sdpa",
  overwrite_config=...)` overriding the select layer, the video pool mode and the pinpoints (pixel sizes for a
  28-pixel tower, which the "(1x1)" notation cannot take);
- OneVision-style multi-image anyres and video generate (`modalities`);
- its `llava.eval.model_vqa` (multi-image, Qwen prompt) through `llava_evaclip.launch.main`, with `.cuda()` made a
  no-op and `attn_implementation` set to sdpa (its builder's default is flash_attention_2; neither exists here).

For each, the pixels the tower got are compared with a CLIPImageProcessor built from EVA-CLIP's published
preprocessing and its features with our tower model run directly on those pixels. Writes ROOT/report.json.

    python eval_next.py ROOT
"""

import functools
import json
import os
import sys
import types
import uuid
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "llava_next")]
torch.Tensor.cuda = lambda self, *args, **kwargs: self
nn.Module.cuda = lambda self, *args, **kwargs: self
if "shortuuid" not in sys.modules:
    try:
        import shortuuid  # noqa: F401
    except ImportError:
        sys.modules["shortuuid"] = types.SimpleNamespace(uuid=lambda: uuid.uuid4().hex[:22])

import next_common  # noqa: E402  (refuses any llava but LLaVA-NeXT's)
from conftest import tiny_config  # noqa: E402
from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, register_with_llava  # noqa: E402
from llava_evaclip.processing import build_image_processor  # noqa: E402
from llava_evaclip.tower import EvaCLIPVisionTower  # noqa: E402

register_with_llava()
import llava.model.builder as builder  # noqa: E402
from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_anyres_image, process_images  # noqa: E402
from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor  # noqa: E402

SIZE, LAYERS, SELECT_LAYER = 28, 4, -3
EVA_MEAN, EVA_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

root = Path(sys.argv[1])
torch.manual_seed(0)
config = tiny_config("eva02", num_hidden_layers=LAYERS)
EvaCLIPModel(config).save_pretrained(root / "tower")
build_image_processor(config).save_pretrained(root / "tower")
qwen = next_common.write_qwen(root)
model_dir = root / "llava-qwen-evaclip-tiny"
torch.manual_seed(1)
model = LlavaQwenForCausalLM.from_pretrained(qwen, config=LlavaQwenConfig.from_pretrained(qwen, bos_token_id=0))
model.get_model().initialize_vision_modules(types.SimpleNamespace(
    vision_tower=str(root / "tower"), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
    pretrain_mm_mlp_adapter=None, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
    add_faster_video=False))
model.config.update(dict(image_aspect_ratio="anyres_max_9", image_grid_pinpoints=[[SIZE, SIZE], [2 * SIZE, 2 * SIZE]],
                         mm_newline_position="grid", mm_spatial_pool_stride=2, mm_spatial_pool_mode="bilinear",
                         add_faster_video=False, mm_use_im_start_end=False, mm_use_im_patch_token=False))
model.generation_config.bos_token_id = 0  # generate from inputs_embeds needs one; the toy Qwen has none
model.save_pretrained(model_dir)
for name in os.listdir(qwen):
    if not name.startswith(("model", "config", "generation_config")):
        (model_dir / name).write_bytes((qwen / name).read_bytes())

calls = []
_forward = EvaCLIPVisionTower.forward


def forward(self, images):
    features = _forward(self, images)
    calls.append((images, features))
    return features


EvaCLIPVisionTower.forward = forward
direct = EvaCLIPVisionModel.from_pretrained(root / "tower").float().eval()
reference_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                         resample=3, image_mean=EVA_MEAN, image_std=EVA_STD)
report = {}


def compare(pixels: torch.Tensor, layer: int = SELECT_LAYER) -> dict:
    """The last tower call against our tower model run directly on `pixels` (the reference processor's)."""
    images, features = calls[-1]
    if isinstance(images, list):
        images = torch.cat([image.reshape(-1, *image.shape[-3:]) for image in images])
    with torch.no_grad():
        expected = direct(pixels.float(), output_hidden_states=True).hidden_states[layer][:, 1:]
    return {"pixels": (images.float() - pixels).abs().max().item(),
            "features": (features.float() - expected).abs().max().item()}


overwrite = {"mm_vision_select_layer": SELECT_LAYER, "mm_spatial_pool_mode": "average",
             "image_grid_pinpoints": f"[({SIZE}, {SIZE}), ({SIZE}, {2 * SIZE}), ({2 * SIZE}, {SIZE}), "
                                     f"({2 * SIZE}, {2 * SIZE})]"}
tokenizer, model, processor, _ = builder.load_pretrained_model(
    str(model_dir), None, "llava_qwen", device_map="auto", attn_implementation="sdpa", overwrite_config=overwrite)
tower = model.get_vision_tower()
report.update(tower=type(tower).__name__, select_layers=list(tower.select_layers))
model = model.float().eval()
generator = torch.Generator().manual_seed(3)
pictures = [Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).numpy())
            for h, w in [(30, 60), (60, 26)]]

images = process_images(pictures, processor, model.config)
expected = [process_anyres_image(p, reference_processor, model.config.image_grid_pinpoints) for p in pictures]
with torch.inference_mode():
    model.generate(torch.tensor([[5, 6, IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, 8]]), images=list(images),
                   image_sizes=[p.size for p in pictures], modalities=["image", "image"], do_sample=False,
                   max_new_tokens=2)
report["multi_image"] = compare(torch.cat(expected))
report["multi_image"]["processor_matches_reference"] = all(
    torch.allclose(a, b, atol=1e-6) for a, b in zip(images, expected))

frames = processor.preprocess(pictures * 2, return_tensors="pt")["pixel_values"]
expected_frames = reference_processor(pictures * 2, return_tensors="pt")["pixel_values"]
pooled = []
_get_2d_pool = type(model).get_2dPool


def get_2d_pool(self, feature, *args, **kwargs):
    out = _get_2d_pool(self, feature, *args, **kwargs)
    pooled.append(out.shape[0] * out.shape[1])
    return out


type(model).get_2dPool = get_2d_pool
with torch.inference_mode():
    model.generate(torch.tensor([[5, IMAGE_TOKEN_INDEX, 7]]), images=[frames], modalities=["video"], do_sample=False,
                   max_new_tokens=2)
report["video"] = compare(expected_frames)
report["video"].update(processor_matches_reference=torch.allclose(frames, expected_frames, atol=1e-6),
                       frames=len(frames), pooled_tokens=pooled[0] if pooled else None)

# Its model_vqa script, as a user runs it through the launcher.
image_dir = root / "images"
image_dir.mkdir()
for index, picture in enumerate(pictures):
    picture.save(image_dir / f"{index}.png")
(root / "q.json").write_text(json.dumps([{
    "sample_id": 0, "metadata": {"question_type": "open-ended", "dataset": "toy"}, "image": ["0.png", "1.png"],
    "conversations": [{"from": "human", "value": "<image> and <image> what is in the image"},
                      {"from": "gpt", "value": "a red square"}]}]))
builder.load_pretrained_model = functools.partial(builder.load_pretrained_model, attn_implementation="sdpa")
from llava_evaclip.launch import main  # noqa: E402

calls.clear()
rc = main(["llava.eval.model_vqa", "--model-path", str(model_dir), "--image-folder", str(image_dir), "--question-file",
           str(root / "q.json"), "--answers-file", str(root / "answers.jsonl"), "--temperature", "0"])
plain = torch.cat([reference_processor(p, return_tensors="pt")["pixel_values"] for p in pictures])
answers = (root / "answers.jsonl").read_text().count("\n")
report["model_vqa"] = dict(rc=rc, answers=answers, **compare(plain, layer=-2))  # the saved config's layer
(root / "report.json").write_text(json.dumps(report))

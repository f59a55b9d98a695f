"""LLaVA 1.5's own serving path from user code, in a fresh process: `register_with_llava()` and nothing else from
llava_evaclip, then llava.model.builder.load_pretrained_model, process_images, tokenizer_image_token and generate.
Writes what it generated and, for comparison, the greedy tokens of step-by-step full forwards (no KV cache, no
generate) as JSON; the test decides."""

import json
import sys

import torch
from PIL import Image

from llava_evaclip import register_with_llava

register_with_llava()  # the one call the README asks of code that imports LLaVA itself

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402

model_dir, image_path, out_path = sys.argv[1:4]
tokenizer, model, image_processor, _ = load_pretrained_model(model_dir, None, "llava-v1.5-evaclip-tiny", device="cpu")
model = model.float().eval()  # LLaVA's builder loads fp16; fp32 keeps greedy decoding free of near ties on CPU
image = Image.open(image_path).convert("RGB")
images = process_images([image], image_processor, model.config).to(model.dtype)
prompt = "USER: <image>\nwhat is in the image ASSISTANT:"
ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
result = {"tower": type(model.get_vision_tower()).__name__, "images_shape": list(images.shape)}
try:
    with torch.inference_mode():
        generated = model.generate(ids, images=images, image_sizes=[image.size], do_sample=False, max_new_tokens=4,
                                   min_new_tokens=4, use_cache=True)
    result["generated"] = generated[0, -4:].tolist()
except Exception as error:  # reported to the test, which shows it
    result["error"] = f"{type(error).__name__}: {error}"
sequence, stepwise = ids, []
with torch.inference_mode():
    for _ in range(4):
        next_token = model(input_ids=sequence, images=images).logits[:, -1].argmax(-1, keepdim=True)
        stepwise.append(next_token.item())
        sequence = torch.cat([sequence, next_token], dim=1)
result["stepwise"] = stepwise
with open(out_path, "w") as handle:
    json.dump(result, handle)

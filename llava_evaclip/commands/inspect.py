"""`llava-evaclip inspect`: what a checkpoint dir or preset is, how big each part is, and what LLaVA gets from it.

The model is built on the meta device (no weight memory), so even EVA02-CLIP-bigE-14-plus (5B) inspects instantly.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .._safetensors import read_safetensors_header
from ..cli import CLIError
from . import _common
from ._common import ModelSource


# safetensors' header dtype codes, by torch's names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="architecture, parameter counts and LLaVA token count of a checkpoint dir or preset",
        description="Describe a converted checkpoint dir or a preset without loading its weights: architecture, "
                    "parameter counts per part, image size, patches, layers, and the number of visual tokens "
                    "LLaVA gets per image for the chosen --select-layer / --select-feature.",
    )
    parser.add_argument("model", metavar="DIR_OR_PRESET", help="a converted checkpoint dir or a preset name")
    _common.add_selection_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def _numel(module: Any) -> int:
    return sum(parameter.numel() for parameter in module.parameters()) if module is not None else 0


def model_class(source: ModelSource) -> type:
    """The class a checkpoint dir was saved as (`architectures` in its config.json: a vision dir written with its
    projection is an `EvaCLIPVisionModelWithProjection`); for presets, and names that are not ours or do not take
    this config, the two-tower or the vision model."""
    from .. import modeling_evaclip

    default = "EvaCLIPModel" if source.has_text_tower else "EvaCLIPVisionModel"
    saved = (getattr(source.config, "architectures", None) or [default])[0]
    found = getattr(modeling_evaclip, saved, None) if saved.startswith("EvaCLIP") else None
    if isinstance(found, type) and getattr(found, "config_class", None) is type(source.config):
        return found
    return getattr(modeling_evaclip, default)


def count_parameters(source: ModelSource) -> dict[str, int]:
    """Parameters per part, counted on a meta-device build of the real module tree (no weight memory). Every tensor
    is created on the meta device: accelerate's `init_empty_weights` creates each parameter on the CPU first, so a
    config within the validated bounds (hidden 65536 x MLP 262144: one 64 GiB matrix) failed to allocate."""
    import torch

    with torch.device("meta"):
        model = model_class(source)(source.config)
    vision = model.vision_model
    counts = {
        "vision_embeddings": _numel(vision.embeddings),
        "vision_encoder": _numel(vision.encoder),
        "vision_heads": _numel(vision.post_layernorm) + _numel(getattr(model, "visual_projection", None)),
        "text_tower": _numel(getattr(model, "text_model", None)) + _numel(getattr(model, "text_projection", None)),
        "logit_scale": model.logit_scale.numel() if hasattr(model, "logit_scale") else 0,
    }
    other = _numel(model) - sum(counts.values())
    if other:  # parameters outside the named parts (none in today's model): still counted, never hidden
        counts["other"] = other
    counts["vision_tower"] = counts["vision_embeddings"] + counts["vision_encoder"] + counts["vision_heads"]
    counts["total"] = _numel(model)
    return counts


def block_description(config: Any) -> str:
    """EVA family of a vision config, from its flags."""
    if getattr(config, "use_rms_norm", False):
        family = "EVA-CLIP-8B/18B (RMSNorm" + (", post-norm blocks)" if config.post_layernorm else ")")
    elif config.use_rope and config.use_swiglu and config.use_sub_layernorm:
        family = "EVA02 (2D RoPE on patch tokens, SwiGLU MLP, sub-LayerNorm)"
    elif config.post_layernorm:
        family = "EVA02-bigE style (post-norm blocks)"
    elif config.layer_scale_init_value is not None:
        family = "EVA01 with layer scale"
    else:
        family = "EVA01 (pre-norm ViT)"
    extras = [name for flag, name in ((config.use_rope, "rope"), (config.use_swiglu, "swiglu"),
                                       (config.use_sub_layernorm, "sub-ln"), (config.post_layernorm, "post-norm"),
                                       (config.layer_scale_init_value is not None, "layer-scale"),
                                       (getattr(config, "use_rms_norm", False), "rms-norm")) if flag]
    biases = "".join(name for flag, name in ((config.q_bias, "q"), (config.k_bias, "k"), (config.v_bias, "v"))
                     if flag)
    return f"{family}; flags: {', '.join(extras) or 'none'}; qkv bias: {biases or 'none'}"


def safetensors_dtypes(path: str) -> set[str]:
    """The dtypes a .safetensors file stores, from its header (`read_safetensors_header`: Python's own file functions,
    where the safetensors library refuses paths that are not valid UTF-8, a folder named in Latin-1, and calls such a
    file unreadable). A header that does not describe the file exactly is a CLIError naming the file."""
    try:
        tensors = read_safetensors_header(path)[0]
    except OSError as error:
        raise CLIError(f"cannot read {path}: {error.strerror or _common.one_line(error)}.") from None
    except ValueError as error:
        raise CLIError(f"cannot read {path}: {_common.one_line(error)} (a damaged or incomplete weights file; convert "
                       "or download it again).") from None
    return {SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]) for entry in tensors.values()}


def weights_summary(path: str) -> str:
    """Stored weight files, dtypes and bytes, read from the safetensors headers only."""
    files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        others = sorted(name for name in os.listdir(path) if name.endswith((".bin", ".pt", ".pth")))
        return f"no .safetensors file ({', '.join(others) or 'no weights found'})"
    dtypes = set().union(*(safetensors_dtypes(os.path.join(path, name)) for name in files))
    size = sum(os.path.getsize(os.path.join(path, name)) for name in files)
    return f"{len(files)} safetensors file(s), {_human_bytes(size)}, dtype {', '.join(sorted(dtypes))}"


def _human_bytes(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


def _millions(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.3f} B"
    if count >= 1e6:
        return f"{count / 1e6:.2f} M"
    if count >= 1e3:
        return f"{count / 1e3:.1f} K"
    return str(count)


def describe(source: ModelSource, select_layer: Any, select_feature: str) -> dict[str, Any]:
    vision = source.vision_config
    layers = list(_common.selected_layers(select_layer, vision.num_hidden_layers))
    side = vision.num_patches_per_side
    info: dict[str, Any] = {
        "model": source.label,
        "source": "preset: random weights if used to compute features" if source.random_weights else "checkpoint dir",
        "model_class": model_class(source).__name__,
        "vision": {
            "blocks": block_description(vision),
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "grid": [side, side],
            "num_patches": side * side,
            "num_layers": vision.num_hidden_layers,
            "hidden_size": vision.hidden_size,
            "num_heads": vision.num_attention_heads,
            "head_dim": vision.head_dim,
            "intermediate_size": vision.intermediate_size,
            "activation": vision.hidden_act,
        },
        "parameters": count_parameters(source),
        "llava": {
            "select_layer": _common.format_select_layer(select_layer),
            "select_feature": select_feature,
            "hidden_states_indices": layers,
            "tokens_per_image": _common.tokens_per_image(side * side, select_feature),
            "feature_size": vision.hidden_size * len(layers),
            "layers_run": max(layers),
        },
    }
    if source.has_text_tower:
        text = source.config.text_config
        info["text"] = {"num_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
                        "num_heads": text.num_attention_heads, "context_length": text.max_position_embeddings,
                        "vocab_size": text.vocab_size}
        info["projection_dim"] = source.config.projection_dim
    if source.path is not None:
        info["weights"] = weights_summary(source.path)
    return info


def render(info: dict[str, Any]) -> str:
    vision, params, llava = info["vision"], info["parameters"], info["llava"]
    lines = [
        f"model            {info['model']} [{info['source']}]",
        f"class            {info['model_class']}",
        f"vision blocks    {vision['blocks']}",
        f"image            {vision['image_size']}x{vision['image_size']}, patch {vision['patch_size']}, "
        f"grid {vision['grid'][0]}x{vision['grid'][1]} = {vision['num_patches']} patches (+1 CLS)",
        f"vision layers    {vision['num_layers']} x (width {vision['hidden_size']}, {vision['num_heads']} heads of "
        f"{vision['head_dim']}, MLP {vision['intermediate_size']} {vision['activation']})",
    ]
    if "text" in info:
        text = info["text"]
        lines.append(f"text layers      {text['num_layers']} x (width {text['hidden_size']}, {text['num_heads']} "
                     f"heads), context {text['context_length']}, vocab {text['vocab_size']}")
        lines.append(f"projection dim   {info['projection_dim']}")
    if "weights" in info:
        lines.append(f"weights          {info['weights']}")
    lines.append("parameters")
    labels = (("vision_embeddings", "vision embeddings (patch conv, CLS, positions)"),
              ("vision_encoder", "vision encoder"),
              ("vision_heads", "vision heads (post-LayerNorm, projection)"),
              ("vision_tower", "vision tower (with projection)"),
              ("text_tower", "text tower (with projection)"),
              ("logit_scale", "logit scale"),
              ("other", "other"),
              ("total", "total"))
    for key, label in labels:
        if key not in params or (key in ("text_tower", "logit_scale") and "text" not in info):
            continue
        lines.append(f"  {label:<48} {_millions(params[key]):>10}  ({params[key]:,})")
    lines.append(
        f"LLaVA            {llava['tokens_per_image']} visual tokens per image of width {llava['feature_size']} "
        f"(--select-layer {llava['select_layer']} = hidden_states{llava['hidden_states_indices']}, "
        f"--select-feature {llava['select_feature']}; runs {llava['layers_run']} of {vision['num_layers']} layers)"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    source = _common.resolve_model(args.model, option="DIR_OR_PRESET")
    info = describe(source, args.select_layer, args.select_feature)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0

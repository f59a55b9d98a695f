"""Released EVA-CLIP architectures, by BAAI's names, and the mapping from BAAI's model-config schema to our fields.

The numbers are BAAI's (their `model_configs/*.json`, schema: embed_dim, vision_cfg, text_cfg); they are kept here as
data so presets need no network and no reference package. Plain Python on purpose: this module imports nothing from
the package (nor torch / transformers), so listing presets is cheap and `configuration_evaclip` builds its configs
from these fields without an import cycle. A new preset is one entry in `BAAI_MODEL_CONFIGS`.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

_TEXT_B = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_TEXT_L = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
_TEXT_H = {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
_TEXT_BIGG = {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20, "layers": 32}
_EVA02_VISION = {"head_width": 64, "mlp_ratio": 2.6667, "rope": True, "pt_hw_seq_len": 16, "intp_freq": True,
                 "naiveswiglu": True, "subln": True}
_EVA01_G_VISION = {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88, "mlp_ratio": 4.3637,
                   "patch_size": 14}
_BIGE_VISION = {"image_size": 224, "layers": 64, "width": 1792, "head_width": 112,
                "mlp_ratio": 8.571428571428571, "patch_size": 14, "postnorm": True}
# EVA-CLIP-8B / 18B (BAAI's EVA-CLIP-18B release): RMSNorm, no q/k/v (nor head) bias, head width 128, MLP ratio 5.
_8B_VISION = {"image_size": 224, "layers": 32, "width": 4096, "head_width": 128, "mlp_ratio": 5, "patch_size": 14,
              "qkv_bias": False, "postnorm": False, "use_rms_norm": True}

BAAI_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "EVA01-CLIP-B-16": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16, "ls_init_value": 0.1},
        "text_cfg": _TEXT_B,
    },
    "EVA01-CLIP-g-14": {"embed_dim": 1024, "vision_cfg": _EVA01_G_VISION, "text_cfg": _TEXT_L},
    "EVA01-CLIP-g-14-plus": {"embed_dim": 1024, "vision_cfg": _EVA01_G_VISION, "text_cfg": _TEXT_H},
    "EVA02-CLIP-B-16": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16, **_EVA02_VISION},
        "text_cfg": _TEXT_B,
    },
    "EVA02-CLIP-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14, **_EVA02_VISION},
        "text_cfg": _TEXT_L,
    },
    "EVA02-CLIP-L-14-336": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14, **_EVA02_VISION},
        "text_cfg": _TEXT_L,
    },
    "EVA02-CLIP-bigE-14": {"embed_dim": 1024, "vision_cfg": _BIGE_VISION, "text_cfg": _TEXT_H},
    "EVA02-CLIP-bigE-14-plus": {"embed_dim": 1024, "vision_cfg": _BIGE_VISION, "text_cfg": _TEXT_BIGG},
    "EVA-CLIP-8B": {"embed_dim": 1280, "vision_cfg": _8B_VISION, "text_cfg": _TEXT_BIGG},
    "EVA-CLIP-8B-448": {"embed_dim": 1280, "vision_cfg": {**_8B_VISION, "image_size": 448}, "text_cfg": _TEXT_BIGG},
    "EVA-CLIP-18B": {
        "embed_dim": 1536,
        "vision_cfg": {**_8B_VISION, "layers": 48, "width": 5120, "postnorm": True},
        "text_cfg": _TEXT_BIGG,
    },
}

# BAAI's vision_cfg keys that change the computation and that we model; anything else that changes it is refused.
_IGNORED_VISION_KEYS = {"eva_model_name", "drop_path_rate", "xattn", "fusedLN", "patch_dropout", "timm_model_name",
                        "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias"}
_IGNORED_TEXT_KEYS = {"xattn", "fusedLN", "hf_model_name", "hf_tokenizer_name", "hf_model_pretrained", "proj",
                      "pooler_type", "masked_language_modeling", "attn_mask"}


def list_presets() -> list[str]:
    """Names accepted by `EvaCLIPConfig.from_preset`, `--arch` and `--model`."""
    return list(BAAI_MODEL_CONFIGS)


def vision_shape(name: str) -> dict[str, int]:
    """A preset vision tower's image size, patch size, layers and width (what `llava-evaclip presets -v` prints)."""
    vision = preset_fields(name)["vision_config"]
    return {"image_size": vision["image_size"], "patch_size": vision["patch_size"],
            "layers": vision["num_hidden_layers"], "width": vision["hidden_size"]}


def _check_keys(section: str, cfg: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"Unsupported keys in BAAI {section}: {unknown}; supported: {sorted(known)}.")


def _integer(section: str, cfg: dict[str, Any], key: str, default: int) -> int:
    """`cfg[key]` as a positive integer (an integral JSON number), or a ValueError naming the field: a string or a
    zero would otherwise fail later as a bare int() or division error that names nothing."""
    value = cfg.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
            or value in (float("inf"), float("-inf")) or value != int(value) or value <= 0):
        raise ValueError(f"{section}.{key} must be a positive integer, got {value!r}.")
    return int(value)


def _number(section: str, cfg: dict[str, Any], key: str, default: Any, layer_scale: bool = False) -> Any:
    """`cfg[key]` as a positive finite number, or a ValueError naming the field; a layer-scale init value may also
    be null (no layer scale) or zero."""
    value = cfg.get(key, default)
    if layer_scale and value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value < float("inf")
            or not (value >= 0 if layer_scale else value > 0)):
        expected = "a non-negative number or null" if layer_scale else "a positive number"
        raise ValueError(f"{section}.{key} must be {expected}, got {value!r}.")
    return value


def _flag(section: str, cfg: dict[str, Any], key: str, default: bool) -> bool:
    """`cfg[key]` as a boolean: JSON true/false (0/1 accepted); a string such as "false" would otherwise read as
    true."""
    value = cfg.get(key, default)
    if value not in (True, False) or not isinstance(value, (bool, int)):
        raise ValueError(f"{section}.{key} must be true or false, got {value!r}.")
    return bool(value)


def baai_config_fields(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Translate a BAAI model config (embed_dim, vision_cfg, text_cfg) into `EvaCLIPConfig`'s arguments; a field of
    the wrong type or out of range is a ValueError naming it and what is expected."""
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
    if missing:
        raise ValueError(f"A BAAI model config needs the keys embed_dim, vision_cfg and text_cfg; missing {missing}.")
    for section in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg[section], dict):
            raise ValueError(f"{section} must be a JSON object, got {type(model_cfg[section]).__name__}.")
    # `custom_text` only picks BAAI's module layout, which conversion reads from the checkpoint's names.
    _check_keys("model config", model_cfg, {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text"})
    embed_dim = _integer("model config", model_cfg, "embed_dim", 0)
    vision = dict(model_cfg["vision_cfg"])
    text = dict(model_cfg["text_cfg"])
    vision_known = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                    "qkv_bias", "postnorm", "rope", "pt_hw_seq_len", "intp_freq", "naiveswiglu", "subln",
                    "global_average_pool", "use_rms_norm"} | _IGNORED_VISION_KEYS
    _check_keys("vision_cfg", vision, vision_known)
    _check_keys("text_cfg", text, {"context_length", "vocab_size", "width", "heads", "layers", "ls_init_value",
                                   "mlp_ratio"} | _IGNORED_TEXT_KEYS)
    if vision.get("global_average_pool") is not None and _flag("vision_cfg", vision, "global_average_pool", False):
        raise ValueError("vision_cfg.global_average_pool=True (mean pooling) is not an EVA-CLIP release layout.")
    if text.get("hf_model_name"):
        raise ValueError("text_cfg.hf_model_name (a Hugging Face text encoder) is not supported; EVA-CLIP releases "
                         "use the CLIP text transformer.")
    width = _integer("vision_cfg", vision, "width", 768)
    head_width = _integer("vision_cfg", vision, "head_width", 64)
    if width % head_width:
        raise ValueError(f"vision_cfg.width ({width}) must be a multiple of vision_cfg.head_width ({head_width}), the "
                         "width of one attention head.")
    qkv_bias = _flag("vision_cfg", vision, "qkv_bias", True)
    swiglu = _flag("vision_cfg", vision, "naiveswiglu", False)
    if _flag("vision_cfg", vision, "subln", False) and not swiglu:
        # BAAI then builds the plain MLP's sub-LN as nn.LayerNorm(eps=1e-5), not the tower's norm: no release does.
        raise ValueError("vision_cfg.subln=True needs vision_cfg.naiveswiglu=True (as in every EVA02 release); BAAI's "
                         "sub-LN in the plain GELU MLP is not supported.")
    if not _flag("text_cfg", text, "attn_mask", True):
        raise ValueError("text_cfg.attn_mask=False (bidirectional text attention) is not supported: EVA-CLIP's text "
                         "tower is causal.")
    vision_config = dict(
        hidden_size=width,
        intermediate_size=int(width * float(_number("vision_cfg", vision, "mlp_ratio", 4.0))),
        projection_dim=embed_dim,
        num_hidden_layers=_integer("vision_cfg", vision, "layers", 12),
        num_attention_heads=width // head_width,
        image_size=_integer("vision_cfg", vision, "image_size", 224),
        patch_size=_integer("vision_cfg", vision, "patch_size", 16),
        hidden_act="silu" if swiglu else "gelu",
        layer_norm_eps=1e-6,
        q_bias=qkv_bias,
        k_bias=False,
        v_bias=qkv_bias,
        post_layernorm=_flag("vision_cfg", vision, "postnorm", False),
        layer_scale_init_value=_number("vision_cfg", vision, "ls_init_value", None, layer_scale=True),
        use_rope=_flag("vision_cfg", vision, "rope", False),
        rope_pt_grid_size=_integer("vision_cfg", vision, "pt_hw_seq_len", 16),
        rope_interpolate_freq=_flag("vision_cfg", vision, "intp_freq", False),
        use_swiglu=swiglu,
        use_sub_layernorm=_flag("vision_cfg", vision, "subln", False),
        use_rms_norm=_flag("vision_cfg", vision, "use_rms_norm", False),
        projection_bias=qkv_bias,  # BAAI's head: nn.Linear(width, embed_dim, bias=qkv_bias)
    )
    text_width = _integer("text_cfg", text, "width", 512)
    text_heads = _integer("text_cfg", text, "heads", 8)
    if text_width % text_heads:
        raise ValueError(f"text_cfg.width ({text_width}) must be a multiple of text_cfg.heads ({text_heads}).")
    text_config = dict(
        vocab_size=_integer("text_cfg", text, "vocab_size", 49408),
        hidden_size=text_width,
        intermediate_size=int(text_width * float(_number("text_cfg", text, "mlp_ratio", 4.0))),
        projection_dim=embed_dim,
        num_hidden_layers=_integer("text_cfg", text, "layers", 12),
        num_attention_heads=text_heads,
        max_position_embeddings=_integer("text_cfg", text, "context_length", 77),
        hidden_act="quick_gelu" if _flag("model config", model_cfg, "quick_gelu", False) else "gelu",  # text only
        layer_norm_eps=1e-5,
        layer_scale_init_value=_number("text_cfg", text, "ls_init_value", None, layer_scale=True),
    )
    return {"text_config": text_config, "vision_config": vision_config, "projection_dim": embed_dim}


def preset_fields(name: str) -> dict[str, Any]:
    """`EvaCLIPConfig`'s arguments for a released model; unknown names raise a ValueError listing the known ones."""
    if name not in BAAI_MODEL_CONFIGS:
        raise ValueError(f"Unknown EVA-CLIP preset {name!r}; known presets: {', '.join(list_presets())}.")
    return baai_config_fields(copy.deepcopy(BAAI_MODEL_CONFIGS[name]))


def arch_fields(arch: str | os.PathLike) -> dict[str, Any]:
    """`EvaCLIPConfig`'s arguments for a preset name, or for the path of a JSON model config in BAAI's schema."""
    arch = str(arch)
    if arch in BAAI_MODEL_CONFIGS:
        return preset_fields(arch)
    if os.path.isfile(arch):
        try:
            with open(arch, encoding="utf-8") as handle:
                model_cfg = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read model config {arch!r}: {error}") from error
        if not isinstance(model_cfg, dict):
            raise ValueError(f"Model config {arch!r} must hold a JSON object with embed_dim, vision_cfg, text_cfg.")
        try:
            return baai_config_fields(model_cfg)
        except ValueError as error:  # name the file as well as the field
            raise ValueError(f"Model config {arch!r}: {error}") from None
    raise ValueError(
        f"--arch {arch!r} is neither a preset ({', '.join(list_presets())}) nor an existing JSON model config file."
    )


__all__ = ["BAAI_MODEL_CONFIGS", "arch_fields", "baai_config_fields", "list_presets", "preset_fields", "vision_shape"]

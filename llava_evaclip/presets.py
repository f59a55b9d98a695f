"""Released EVA-CLIP architectures, by BAAI's names, and the mapping from BAAI's model-config schema to ours.

The numbers are BAAI's (their `model_configs/*.json`, schema: embed_dim, vision_cfg, text_cfg); they are kept here as
data so presets need no network and no reference package.
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the data and `list_presets` stay importable without torch / transformers (`llava-evaclip presets`)
    from .configuration_evaclip import EvaCLIPConfig

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
    """A preset vision tower's image size, patch size, layers and width, read from the data alone (what
    `llava-evaclip presets -v` prints without importing torch); the defaults are `config_from_baai`'s."""
    vision = BAAI_MODEL_CONFIGS[name]["vision_cfg"]
    return {"image_size": int(vision.get("image_size", 224)), "patch_size": int(vision.get("patch_size", 16)),
            "layers": int(vision.get("layers", 12)), "width": int(vision.get("width", 768))}


def _check_keys(section: str, cfg: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"Unsupported keys in BAAI {section}: {unknown}; supported: {sorted(known)}.")


def config_from_baai(model_cfg: dict[str, Any], **extra: Any) -> EvaCLIPConfig:
    """Translate a BAAI model config (embed_dim, vision_cfg, text_cfg) into an `EvaCLIPConfig`."""
    from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig

    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in model_cfg]
    if missing:
        raise ValueError(f"A BAAI model config needs the keys embed_dim, vision_cfg and text_cfg; missing {missing}.")
    embed_dim = int(model_cfg["embed_dim"])
    vision = dict(model_cfg["vision_cfg"])
    text = dict(model_cfg["text_cfg"])
    vision_known = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                    "qkv_bias", "postnorm", "rope", "pt_hw_seq_len", "intp_freq", "naiveswiglu", "subln",
                    "global_average_pool"} | _IGNORED_VISION_KEYS
    _check_keys("vision_cfg", vision, vision_known)
    _check_keys("text_cfg", text, {"context_length", "vocab_size", "width", "heads", "layers", "ls_init_value",
                                   "mlp_ratio"} | _IGNORED_TEXT_KEYS)
    if vision.get("global_average_pool"):
        raise ValueError("vision_cfg.global_average_pool=True (mean pooling) is not an EVA-CLIP release layout.")
    if text.get("hf_model_name"):
        raise ValueError("text_cfg.hf_model_name (a Hugging Face text encoder) is not supported; EVA-CLIP releases "
                         "use the CLIP text transformer.")
    width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    qkv_bias = bool(vision.get("qkv_bias", True))
    vision_config = EvaCLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
        projection_dim=embed_dim,
        num_hidden_layers=int(vision.get("layers", 12)),
        num_attention_heads=width // head_width,
        image_size=int(vision.get("image_size", 224)),
        patch_size=int(vision.get("patch_size", 16)),
        hidden_act="silu" if vision.get("naiveswiglu") else "gelu",
        layer_norm_eps=1e-6,
        q_bias=qkv_bias,
        k_bias=False,
        v_bias=qkv_bias,
        post_layernorm=bool(vision.get("postnorm", False)),
        layer_scale_init_value=vision.get("ls_init_value"),
        use_rope=bool(vision.get("rope", False)),
        rope_pt_grid_size=int(vision.get("pt_hw_seq_len", 16)),
        rope_interpolate_freq=bool(vision.get("intp_freq", False)),
        use_swiglu=bool(vision.get("naiveswiglu", False)),
        use_sub_layernorm=bool(vision.get("subln", False)),
    )
    text_width = int(text.get("width", 512))
    text_config = EvaCLIPTextConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=text_width,
        intermediate_size=int(text_width * float(text.get("mlp_ratio", 4.0))),
        projection_dim=embed_dim,
        num_hidden_layers=int(text.get("layers", 12)),
        num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        layer_scale_init_value=text.get("ls_init_value"),
    )
    return EvaCLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=embed_dim, **extra
    )


def preset_config(name: str) -> EvaCLIPConfig:
    """The `EvaCLIPConfig` of a released model; unknown names raise a ValueError listing the known ones."""
    if name not in BAAI_MODEL_CONFIGS:
        raise ValueError(f"Unknown EVA-CLIP preset {name!r}; known presets: {', '.join(list_presets())}.")
    config = config_from_baai(copy.deepcopy(BAAI_MODEL_CONFIGS[name]))
    config.preset_name = name
    return config


def resolve_arch(arch: str | os.PathLike) -> EvaCLIPConfig:
    """A preset name, or the path of a JSON model config in BAAI's schema."""
    arch = str(arch)
    if arch in BAAI_MODEL_CONFIGS:
        return preset_config(arch)
    if os.path.isfile(arch):
        try:
            with open(arch, encoding="utf-8") as handle:
                model_cfg = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read model config {arch!r}: {error}") from error
        if not isinstance(model_cfg, dict):
            raise ValueError(f"Model config {arch!r} must hold a JSON object with embed_dim, vision_cfg, text_cfg.")
        return config_from_baai(model_cfg)
    raise ValueError(
        f"--arch {arch!r} is neither a preset ({', '.join(list_presets())}) nor an existing JSON model config file."
    )


__all__ = ["BAAI_MODEL_CONFIGS", "config_from_baai", "list_presets", "preset_config", "resolve_arch"]

"""Configurations of the EVA-CLIP model family (EVA01 / EVA02 / EVA02-bigE vision towers and their CLIP text towers)."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Callable, NamedTuple

from transformers.activations import ACT2FN
from transformers.utils import logging

from . import presets
from ._compat import CONFIG_DTYPE_KEY, PretrainedConfig

logger = logging.get_logger(__name__)

# Model types written by the InternVL port of EVA-CLIP; their config.json files load into our classes unchanged.
INTERNVL_VISION_MODEL_TYPES = ("clip_vision_model",)
INTERNVL_TEXT_MODEL_TYPES = ("clip_text_model",)
INTERNVL_MODEL_TYPES = ("clip",)
# Fields the port writes into its CLIP-typed tower configs; transformers' own (OpenAI) CLIP configs have none of them.
INTERNVL_EVA_FIELDS = ("q_bias", "k_bias", "v_bias", "post_layernorm")


def _reconcile_dtype_keys(kwargs: dict[str, Any]) -> None:
    """One checkpoint dtype, read the same on both transformers lines.

    A config written by transformers 5 holds `dtype`, which 4.x does not know: it kept it as an attribute next to its
    own `torch_dtype` and wrote both back, the `dtype` stale (e.g. "bfloat16" beside "float32" weights). 5.x lets
    `dtype` win, so it loaded such fp32 weights as bf16, silently. Where both are set the file came from 4.x, whose
    `torch_dtype` describes the weights; a lone `dtype` is 5.x's and means what `torch_dtype` means on 4.x."""
    if kwargs.get("torch_dtype") is not None:
        kwargs.pop("dtype", None)
    if CONFIG_DTYPE_KEY == "torch_dtype" and "dtype" in kwargs:
        kwargs["torch_dtype"] = kwargs.pop("dtype")


# Read-only properties of the tower configs: a config dict written by other code may carry them; they are checked.
DERIVED_FIELDS = ("head_dim", "num_patches_per_side")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _refuse_plain_clip(config_dict: dict[str, Any]) -> None:
    """A CLIP-typed tower config without the port's EVA fields is transformers' own CLIP (QuickGELU, a pre-LayerNorm,
    a k bias): its weights would load into the EVA-CLIP tower by name and give wrong features, so it is refused."""
    model_type = config_dict.get("model_type")
    if model_type not in (*INTERNVL_VISION_MODEL_TYPES, *INTERNVL_TEXT_MODEL_TYPES):
        return
    if not any(field in config_dict for field in INTERNVL_EVA_FIELDS):
        model = "CLIPVisionModel" if model_type in INTERNVL_VISION_MODEL_TYPES else "CLIPTextModel"
        raise ValueError(
            f"This is a plain CLIP config (model_type {model_type!r} without any of {', '.join(INTERNVL_EVA_FIELDS)}, "
            "which InternVL's EVA-CLIP port writes), not EVA-CLIP: its weights would load into the EVA-CLIP tower "
            f"with the wrong architecture. Load it with transformers' {model} / CLIPModel; convert BAAI's EVA-CLIP "
            "checkpoints with `llava-evaclip convert`."
        )


def _pop_derived(config_class: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `DERIVED_FIELDS` that are properties of `config_class`, removed from `kwargs` (transformers would try to
    set them) and checked against the other fields afterwards (`_check_derived`)."""
    return {
        name: kwargs.pop(name)
        for name in DERIVED_FIELDS
        if name in kwargs and isinstance(getattr(config_class, name, None), property)
    }


def _check_derived(config: PretrainedConfig, derived: dict[str, Any]) -> None:
    for name, value in derived.items():
        actual = getattr(config, name)
        _require(
            value == actual,
            f"{type(config).__name__}.{name} is derived from the other fields (here {actual}), got {value!r}; "
            f"drop it or make it consistent.",
        )


# Size bounds far above the largest released EVA-CLIP (EVA-CLIP-18B: width 5120, 48 layers, MLP 25600, text width 1280;
# images up to 448 px): a value past one is a typo or a hostile config.json, refused before any weight is allocated.
MAX_WIDTH = 65536
MAX_LAYERS = 1024
MAX_MLP_WIDTH = 4 * MAX_WIDTH
MAX_IMAGE_SIZE = 16384
MAX_PATCH_GRID = 1024  # patches per side
MAX_CHANNELS = 64
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 16


class _Field(NamedTuple):
    """What one config field accepts: `accepts(value)` and the words for it in the error message."""

    expected: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond float range (JSON allows any number of digits)
        return False


def _integer(low: int = 1, high: int | None = None) -> _Field:
    expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    return _Field(expected, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def _positive(high: float | None = None, high_open: bool = False) -> _Field:
    """A finite number > 0 (and below `high`)."""
    if high is None:
        return _Field("a finite number > 0", lambda v: _is_number(v) and v > 0)
    bracket = ")" if high_open else "]"
    return _Field(f"a number in (0, {high}{bracket}",
                  lambda v: _is_number(v) and 0 < v and (v < high if high_open else v <= high))


def _optional(field: _Field) -> _Field:
    return _Field(f"None or {field.expected}", lambda v: v is None or field.accepts(v))


BOOL = _Field("a boolean (true / false)", lambda v: isinstance(v, bool))
ACTIVATION = _Field("the name of an activation", lambda v: isinstance(v, str))
DROPOUT = _Field("a probability in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1)

# Fields both towers share; each tower adds its own below (one line per field).
_TOWER_FIELDS: dict[str, _Field] = {
    "hidden_size": _integer(1, MAX_WIDTH),
    "intermediate_size": _integer(1, MAX_MLP_WIDTH),
    "projection_dim": _integer(1, MAX_WIDTH),
    "num_hidden_layers": _integer(1, MAX_LAYERS),
    "num_attention_heads": _integer(1, MAX_WIDTH),
    "hidden_act": ACTIVATION,
    "layer_norm_eps": _positive(1.0, high_open=True),
    "attention_dropout": DROPOUT,
    "initializer_range": _positive(10.0),  # std of the initial weights (CLIP: 0.02); larger would overflow
    "initializer_factor": _positive(1000.0),
    "q_bias": BOOL,
    "k_bias": BOOL,
    "v_bias": BOOL,
    "post_layernorm": BOOL,
    "use_rms_norm": BOOL,
    "layer_scale_init_value": _optional(_positive()),
}
_VISION_FIELDS: dict[str, _Field] = {
    **_TOWER_FIELDS,
    "num_channels": _integer(1, MAX_CHANNELS),
    "image_size": _integer(1, MAX_IMAGE_SIZE),
    "patch_size": _integer(1, MAX_IMAGE_SIZE),
    "use_rope": BOOL,
    "rope_pt_grid_size": _integer(1, MAX_PATCH_GRID),
    "rope_interpolate_freq": BOOL,
    "rope_theta": _positive(),
    "use_swiglu": BOOL,
    "use_sub_layernorm": BOOL,
    "projection_bias": BOOL,
}
_TOKEN_ID = _optional(_integer(0, MAX_VOCAB))
_TEXT_FIELDS: dict[str, _Field] = {
    **_TOWER_FIELDS,
    "vocab_size": _integer(1, MAX_VOCAB),
    "max_position_embeddings": _integer(1, MAX_POSITIONS),
    "pad_token_id": _TOKEN_ID,
    "bos_token_id": _TOKEN_ID,
    "eos_token_id": _TOKEN_ID,
}
_MODEL_FIELDS: dict[str, _Field] = {
    "projection_dim": _integer(1, MAX_WIDTH),
    # log of the initial logit scale (CLIP: ln(1 / 0.07) = 2.6592); exp() of it must stay finite in float16/32
    "logit_scale_init_value": _Field("a number in [-10, 10]", lambda v: _is_number(v) and -10 <= v <= 10),
    "initializer_factor": _positive(1000.0),
}


def _check_fields(config: PretrainedConfig, fields: dict[str, _Field]) -> None:
    """Type and range of every field, first of all (so later checks may do arithmetic on them)."""
    for name, field in fields.items():
        value = getattr(config, name)
        if not field.accepts(value):
            shown = f"{value!r} ({type(value).__name__})" if isinstance(value, (str, bool, float)) else repr(value)
            raise ValueError(f"{type(config).__name__}.{name} must be {field.expected}, got {shown}.")


def _validate_tower(config: "_EvaCLIPTowerConfig", fields: dict[str, _Field]) -> None:
    """Checks shared by both towers; each message says what is wrong and what would be right."""
    name = type(config).__name__
    _check_fields(config, fields)
    _require(
        config.hidden_size % config.num_attention_heads == 0,
        f"{name}.hidden_size ({config.hidden_size}) must be divisible by num_attention_heads "
        f"({config.num_attention_heads}); e.g. use {config.hidden_size // 64 or 1} heads of 64 channels.",
    )
    _require(
        config.hidden_act in ACT2FN,
        f"{name}.hidden_act {config.hidden_act!r} is unknown; expected one of {sorted(ACT2FN)}.",
    )


# transformers 4.47 records in the config whether the model has picked its attention kernel, and `to_dict` writes that
# flag into config.json; a file with it loads there with eager attention instead of sdpa (transformers' own
# save_pretrained unsets it, but convert and LLaVA write configs directly). Never written, and dropped when read.
_RUNTIME_STATE = ("_attn_implementation_autoset",)


def _without_runtime_state(config_dict: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config_dict.items() if key not in _RUNTIME_STATE}


class _EvaCLIPTowerConfig(PretrainedConfig):
    """Fields both towers share; `from_pretrained` also reads a tower out of a full EvaCLIPConfig (as LLaVA does)."""

    base_config_key = ""  # set by subclasses; transformers 5 uses it, our from_pretrained does the same on 4.x

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "PretrainedConfig":
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if cls.base_config_key in config_dict:
            config_dict = config_dict[cls.base_config_key]
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Overrides (`from_pretrained(dir, field=value)`) are set after `__init__`: checked again here."""
        _refuse_plain_clip(config_dict)
        derived = _pop_derived(cls, kwargs)
        result = super().from_dict(_without_runtime_state(config_dict), **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config._validate()
        _check_derived(config, derived)
        return result

    def to_dict(self) -> dict[str, Any]:
        return _without_runtime_state(super().to_dict())

    def _validate(self) -> None:
        raise NotImplementedError


class EvaCLIPVisionConfig(_EvaCLIPTowerConfig):
    r"""
    Configuration of an EVA-CLIP vision tower.

    Beyond CLIP's fields, each architectural feature of the EVA family is one flag whose default keeps the plain
    (EVA01-style) ViT: independent q/k/v biases (EVA has no k bias), post-norm blocks (bigE), layer scale (EVA01-B),
    and the EVA-02 trio of 2D rotary embeddings, SwiGLU MLP and sub-LayerNorms.

    Args:
        use_rope: apply EVA-02's 2D rotary position embedding to the patch tokens (never to CLS).
        rope_pt_grid_size: the grid side the rotary frequencies were defined for (BAAI's `pt_hw_seq_len`, 16).
        rope_interpolate_freq: stretch the rotary positions to span `rope_pt_grid_size` at any grid (BAAI's
            `intp_freq`).
        rope_theta: rotary base frequency.
        use_swiglu: SwiGLU MLP (`silu(fc1(x)) * fc1_up(x)`) instead of `act(fc1(x))`.
        use_sub_layernorm: LayerNorm on the attention output before `out_proj` and on the MLP hidden before `fc2`.
        layer_scale_init_value: per-channel residual scales, created only when set.
        post_layernorm: post-norm blocks (`x + norm(f(x))`) instead of pre-norm (`x + f(norm(x))`).
        use_rms_norm: RMSNorm (weight only, eps `layer_norm_eps`, statistics in fp32) instead of LayerNorm for every
            norm of the tower, as EVA-CLIP-8B / 18B.
        projection_bias: whether `visual_projection` has a bias (BAAI ties it to `qkv_bias`: none on 8B / 18B).
    """

    model_type = "evaclip_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        q_bias: bool = True,
        k_bias: bool = False,
        v_bias: bool = True,
        post_layernorm: bool = False,
        layer_scale_init_value: float | None = None,
        use_rope: bool = False,
        rope_pt_grid_size: int = 16,
        rope_interpolate_freq: bool = True,
        rope_theta: float = 10000.0,
        use_swiglu: bool = False,
        use_sub_layernorm: bool = False,
        use_rms_norm: bool = False,
        projection_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        derived = _pop_derived(type(self), kwargs)
        _reconcile_dtype_keys(kwargs)
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.projection_dim = projection_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.q_bias = q_bias
        self.k_bias = k_bias
        self.v_bias = v_bias
        self.post_layernorm = False if post_layernorm is None else post_layernorm  # the port may write null
        self.layer_scale_init_value = layer_scale_init_value
        self.use_rope = use_rope
        self.rope_pt_grid_size = rope_pt_grid_size
        self.rope_interpolate_freq = rope_interpolate_freq
        self.rope_theta = rope_theta
        self.use_swiglu = use_swiglu
        self.use_sub_layernorm = use_sub_layernorm
        self.use_rms_norm = use_rms_norm
        self.projection_bias = projection_bias
        self._validate()
        _check_derived(self, derived)

    def _validate(self) -> None:
        _validate_tower(self, _VISION_FIELDS)
        _require(
            self.patch_size <= self.image_size,
            f"EvaCLIPVisionConfig.patch_size ({self.patch_size}) must not exceed image_size ({self.image_size}).",
        )
        _require(
            self.image_size % self.patch_size == 0,
            f"EvaCLIPVisionConfig.image_size ({self.image_size}) must be a multiple of patch_size "
            f"({self.patch_size}), e.g. {self.image_size // self.patch_size * self.patch_size}.",
        )
        _require(
            self.image_size // self.patch_size <= MAX_PATCH_GRID,
            f"EvaCLIPVisionConfig.image_size / patch_size ({self.image_size // self.patch_size} patches per side) "
            f"must be at most {MAX_PATCH_GRID}.",
        )
        if self.use_rope:
            _require(
                self.head_dim % 4 == 0,
                f"2D rotary embedding needs a head dim divisible by 4 (hidden_size / num_attention_heads = "
                f"{self.head_dim}); change num_attention_heads or set use_rope=False.",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EvaCLIPVisionConfig":
        """The vision tower of a released EVA-CLIP model, e.g. ``"EVA02-CLIP-L-14-336"`` (see `list_presets()`)."""
        config = preset_config(name).vision_config
        return cls.from_dict({**config.to_dict(), **overrides}) if overrides else config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "EvaCLIPVisionConfig":
        model_type = config_dict.get("model_type")
        if model_type in (EvaCLIPTextConfig.model_type, *INTERNVL_TEXT_MODEL_TYPES):
            raise ValueError(
                f"Expected a vision tower config, got one of model_type {model_type!r} (a text tower)."
            )
        return super().from_dict(config_dict, **kwargs)


class EvaCLIPTextConfig(_EvaCLIPTowerConfig):
    r"""
    Configuration of an EVA-CLIP text tower: OpenAI-CLIP's causal text transformer (GELU, LayerNorm eps 1e-5, EOS
    pooling at `input_ids.argmax(-1)`), with the same block flags as the vision tower where they apply.

    Args:
        use_rms_norm: RMSNorm instead of LayerNorm for every norm of the tower (no BAAI release uses it in text).
    """

    model_type = "evaclip_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        projection_dim: int = 512,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 77,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        initializer_factor: float = 1.0,
        q_bias: bool = True,
        k_bias: bool = True,
        v_bias: bool = True,
        post_layernorm: bool = False,
        layer_scale_init_value: float | None = None,
        use_rms_norm: bool = False,
        pad_token_id: int = 0,
        bos_token_id: int = 49406,
        eos_token_id: int = 49407,
        **kwargs: Any,
    ) -> None:
        derived = _pop_derived(type(self), kwargs)
        _reconcile_dtype_keys(kwargs)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.projection_dim = projection_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.q_bias = q_bias
        self.k_bias = k_bias
        self.v_bias = v_bias
        self.post_layernorm = False if post_layernorm is None else post_layernorm  # the port may write null
        self.layer_scale_init_value = layer_scale_init_value
        self.use_rms_norm = use_rms_norm
        self._validate()
        _check_derived(self, derived)

    def _validate(self) -> None:
        _validate_tower(self, _TEXT_FIELDS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EvaCLIPTextConfig":
        """The text tower of a released EVA-CLIP model (see `list_presets()`)."""
        config = preset_config(name).text_config
        return cls.from_dict({**config.to_dict(), **overrides}) if overrides else config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> "EvaCLIPTextConfig":
        model_type = config_dict.get("model_type")
        if model_type in (EvaCLIPVisionConfig.model_type, *INTERNVL_VISION_MODEL_TYPES):
            raise ValueError(
                f"Expected a text tower config, got one of model_type {model_type!r} (a vision tower)."
            )
        return super().from_dict(config_dict, **kwargs)


def _sub_config(value: Any, config_class: type, key: str, legacy: dict | None = None) -> Any:
    """Build one tower's config from None, a dict, or a config object, rejecting the other tower's config.

    `legacy` is the `text_config_dict` / `vision_config_dict` that configs saved by transformers < 4.27 (and ports
    copied from them) carry: its fields win, as in `CLIPConfig`."""
    if legacy is not None and (value is None or isinstance(value, (dict, config_class))):
        base = value.to_dict() if isinstance(value, config_class) else dict(value or {})
        value = {**base, **_sub_config(legacy, config_class, key).to_dict()}
    if value is None:
        return config_class()
    if isinstance(value, dict):
        _refuse_plain_clip(value)
        value = {k: v for k, v in value.items() if k != "model_type" or v == config_class.model_type}
        return config_class(**_without_runtime_state(value))
    if isinstance(value, config_class):
        return value
    raise ValueError(
        f"EvaCLIPConfig.{key} must be an {config_class.__name__} (or a dict of its fields), "
        f"got {type(value).__name__}."
    )


class EvaCLIPConfig(PretrainedConfig):
    r"""Configuration of a full EVA-CLIP model: a text tower, a vision tower and their projections to a shared space."""

    model_type = "evaclip"
    sub_configs = {"text_config": EvaCLIPTextConfig, "vision_config": EvaCLIPVisionConfig}

    def __init__(
        self,
        text_config: dict | EvaCLIPTextConfig | None = None,
        vision_config: dict | EvaCLIPVisionConfig | None = None,
        projection_dim: int = 512,
        logit_scale_init_value: float = 2.6592,
        **kwargs: Any,
    ) -> None:
        text_config_dict = kwargs.pop("text_config_dict", None)
        vision_config_dict = kwargs.pop("vision_config_dict", None)
        _reconcile_dtype_keys(kwargs)
        super().__init__(**kwargs)
        if isinstance(text_config, dict) and text_config.get("model_type") in (
            EvaCLIPVisionConfig.model_type,
            *INTERNVL_VISION_MODEL_TYPES,
        ):
            raise ValueError("EvaCLIPConfig.text_config holds a vision tower config (model_type "
                             f"{text_config['model_type']!r}); pass the text tower's config there.")
        if isinstance(vision_config, dict) and vision_config.get("model_type") in (
            EvaCLIPTextConfig.model_type,
            *INTERNVL_TEXT_MODEL_TYPES,
        ):
            raise ValueError("EvaCLIPConfig.vision_config holds a text tower config (model_type "
                             f"{vision_config['model_type']!r}); pass the vision tower's config there.")
        self.text_config = _sub_config(text_config, EvaCLIPTextConfig, "text_config", text_config_dict)
        self.vision_config = _sub_config(vision_config, EvaCLIPVisionConfig, "vision_config", vision_config_dict)
        # As in CLIPConfig: this governs the two-tower model's projections; each tower's own `projection_dim`
        # governs its `*WithProjection` model, so the values may differ.
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        self.initializer_factor = kwargs.pop("initializer_factor", 1.0)
        _check_fields(self, _MODEL_FIELDS)

    @classmethod
    def from_text_vision_configs(
        cls, text_config: EvaCLIPTextConfig, vision_config: EvaCLIPVisionConfig, **kwargs: Any
    ) -> "EvaCLIPConfig":
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    @classmethod
    def from_preset(cls, name: str) -> "EvaCLIPConfig":
        """A released EVA-CLIP architecture by BAAI's name, e.g. ``"EVA02-CLIP-L-14-336"`` (see `list_presets()`)."""
        return preset_config(name)

    @staticmethod
    def list_presets() -> list[str]:
        return presets.list_presets()

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Overrides (`from_pretrained(dir, field=value)`) are set after `__init__`: checked again here."""
        result = super().from_dict(_without_runtime_state(config_dict), **kwargs)
        _check_fields(result[0] if isinstance(result, tuple) else result, _MODEL_FIELDS)
        return result

    def to_dict(self) -> dict[str, Any]:
        output = _without_runtime_state(super().to_dict())
        for key in ("text_config", "vision_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if hasattr(value, "to_dict") else value
        return output


EvaCLIPVisionConfig.list_presets = EvaCLIPConfig.list_presets  # type: ignore[attr-defined]
EvaCLIPTextConfig.list_presets = EvaCLIPConfig.list_presets  # type: ignore[attr-defined]


def config_from_baai(model_cfg: dict[str, Any], **extra: Any) -> EvaCLIPConfig:
    """An `EvaCLIPConfig` from a BAAI model config (embed_dim, vision_cfg, text_cfg)."""
    return EvaCLIPConfig(**presets.baai_config_fields(model_cfg), **extra)


def preset_config(name: str) -> EvaCLIPConfig:
    """The `EvaCLIPConfig` of a released model; unknown names raise a ValueError listing the known ones."""
    config = EvaCLIPConfig(**presets.preset_fields(name))
    config.preset_name = name
    return config


def resolve_arch(arch: str | os.PathLike) -> EvaCLIPConfig:
    """`--arch`: a preset name, or the path of a JSON model config in BAAI's schema."""
    if str(arch) in presets.BAAI_MODEL_CONFIGS:
        return preset_config(str(arch))
    return EvaCLIPConfig(**presets.arch_fields(arch))


__all__ = ["EvaCLIPConfig", "EvaCLIPTextConfig", "EvaCLIPVisionConfig"]

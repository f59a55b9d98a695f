"""EVA-CLIP as a Hugging Face transformers model family and a plug-in vision tower for LLaVA."""

from transformers import AutoConfig, AutoModel

from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig
from .modeling_evaclip import (
    EvaCLIPAttention,
    EvaCLIPEncoder,
    EvaCLIPEncoderLayer,
    EvaCLIPMLP,
    EvaCLIPModel,
    EvaCLIPOutput,
    EvaCLIPPreTrainedModel,
    EvaCLIPRotaryEmbedding,
    EvaCLIPTextAttention,
    EvaCLIPTextEmbeddings,
    EvaCLIPTextModel,
    EvaCLIPTextModelOutput,
    EvaCLIPTextModelWithProjection,
    EvaCLIPTextTransformer,
    EvaCLIPVisionEmbeddings,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelOutput,
    EvaCLIPVisionModelWithProjection,
    EvaCLIPVisionTransformer,
)
from .presets import list_presets

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Make AutoConfig / AutoModel resolve our model types, so no `trust_remote_code` is ever needed."""
    for config_class, model_class in (
        (EvaCLIPConfig, EvaCLIPModel),
        (EvaCLIPVisionConfig, EvaCLIPVisionModel),
        (EvaCLIPTextConfig, EvaCLIPTextModel),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)


_register_auto_classes()

# The LLaVA integration is imported on first use, so `import llava_evaclip` stays light.
_LAZY_EXPORTS = {
    "EvaCLIPVisionTower": "tower",
    "FeatureStore": "features",
    "register_vision_tower": "llava_registry",
    "register_with_llava": "llava_registry",
    "unregister_from_llava": "llava_registry",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvaCLIPVisionTower",
    "FeatureStore",
    "register_vision_tower",
    "register_with_llava",
    "unregister_from_llava",
    "EvaCLIPAttention",
    "EvaCLIPConfig",
    "EvaCLIPEncoder",
    "EvaCLIPEncoderLayer",
    "EvaCLIPMLP",
    "EvaCLIPModel",
    "EvaCLIPOutput",
    "EvaCLIPPreTrainedModel",
    "EvaCLIPRotaryEmbedding",
    "EvaCLIPTextAttention",
    "EvaCLIPTextConfig",
    "EvaCLIPTextEmbeddings",
    "EvaCLIPTextModel",
    "EvaCLIPTextModelOutput",
    "EvaCLIPTextModelWithProjection",
    "EvaCLIPTextTransformer",
    "EvaCLIPVisionConfig",
    "EvaCLIPVisionEmbeddings",
    "EvaCLIPVisionModel",
    "EvaCLIPVisionModelOutput",
    "EvaCLIPVisionModelWithProjection",
    "EvaCLIPVisionTransformer",
    "list_presets",
]

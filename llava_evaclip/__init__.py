"""EVA-CLIP as a Hugging Face transformers model family and a plug-in vision tower for LLaVA."""

import importlib
import os
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names by the submodule that defines them, imported on first use (PEP 562): the `llava-evaclip` console
# script parses its arguments without importing torch or transformers.
_EXPORTS = {
    **dict.fromkeys(("EvaCLIPConfig", "EvaCLIPTextConfig", "EvaCLIPVisionConfig"), "configuration_evaclip"),
    **dict.fromkeys((
        "EvaCLIPAttention", "EvaCLIPEncoder", "EvaCLIPEncoderLayer", "EvaCLIPMLP", "EvaCLIPModel", "EvaCLIPOutput",
        "EvaCLIPPreTrainedModel", "EvaCLIPRotaryEmbedding", "EvaCLIPTextAttention", "EvaCLIPTextEmbeddings",
        "EvaCLIPTextModel", "EvaCLIPTextModelOutput", "EvaCLIPTextModelWithProjection", "EvaCLIPTextTransformer",
        "EvaCLIPVisionEmbeddings", "EvaCLIPVisionModel", "EvaCLIPVisionModelOutput",
        "EvaCLIPVisionModelWithProjection", "EvaCLIPVisionTransformer",
    ), "modeling_evaclip"),
    "list_presets": "presets",
    "EvaCLIPVisionTower": "tower",
    **dict.fromkeys(("register_vision_tower", "register_with_llava", "unregister_from_llava"), "llava_registry"),
}
# Set by the console script (`llava_evaclip_cli`) while it imports the package; its commands register on demand.
DEFER_REGISTRATION_ENV = "LLAVA_EVACLIP_DEFER_AUTO_REGISTRATION"

if TYPE_CHECKING:  # pragma: no cover
    from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig
    from .modeling_evaclip import EvaCLIPModel, EvaCLIPTextModel, EvaCLIPVisionModel


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def _register_auto_classes() -> None:
    """Make AutoConfig / AutoModel resolve our model types, so no `trust_remote_code` is ever needed."""
    from transformers import AutoConfig, AutoModel

    from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig
    from .modeling_evaclip import EvaCLIPModel, EvaCLIPTextModel, EvaCLIPVisionModel

    for config_class, model_class in (
        (EvaCLIPConfig, EvaCLIPModel),
        (EvaCLIPVisionConfig, EvaCLIPVisionModel),
        (EvaCLIPTextConfig, EvaCLIPTextModel),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)


if not os.environ.get(DEFER_REGISTRATION_ENV):
    _register_auto_classes()

__all__ = [
    "EvaCLIPVisionTower",
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

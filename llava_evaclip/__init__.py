"""EVA-CLIP as a Hugging Face transformers model family and a plug-in vision tower for LLaVA."""

import importlib
import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public names by the submodule that defines them, imported on first use (PEP 562): the `llava-evaclip` console
# script parses its arguments without importing torch or transformers.
_EXPORTS = {
    **dict.fromkeys(("EvaCLIPConfig", "EvaCLIPTextConfig", "EvaCLIPVisionConfig"), "configuration_evaclip"),
    **dict.fromkeys((
        "EvaCLIPAttention", "EvaCLIPEncoder", "EvaCLIPEncoderLayer", "EvaCLIPForImageClassification", "EvaCLIPMLP",
        "EvaCLIPModel", "EvaCLIPOutput", "EvaCLIPPreTrainedModel", "EvaCLIPRotaryEmbedding", "EvaCLIPTextAttention", "EvaCLIPTextEmbeddings",
        "EvaCLIPTextModel", "EvaCLIPTextModelOutput", "EvaCLIPTextModelWithProjection", "EvaCLIPTextTransformer",
        "EvaCLIPVisionEmbeddings", "EvaCLIPVisionModel", "EvaCLIPVisionModelOutput",
        "EvaCLIPVisionModelWithProjection", "EvaCLIPVisionTransformer",
    ), "modeling_evaclip"),
    "list_presets": "presets",
    "EvaCLIPVisionTower": "tower",
    "FeatureStore": "features",
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
    """Make the Auto classes and pipelines resolve our model types as they resolve CLIP's, so no
    `trust_remote_code` is ever needed: every Auto class transformers registers CLIP with on 4.37 or 5.x (those the
    installed version lacks are skipped; like CLIP's, the `*WithProjection` models have none), and CLIP's tokenizer /
    image processor / processor for a full model (the 4.x pipelines look those up by config class)."""
    import transformers
    from transformers import AutoConfig, CLIPConfig
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig
    from .modeling_evaclip import EvaCLIPForImageClassification, EvaCLIPModel, EvaCLIPTextModel, EvaCLIPVisionModel

    auto_models = {
        "AutoModel": {EvaCLIPConfig: EvaCLIPModel, EvaCLIPVisionConfig: EvaCLIPVisionModel,
                      EvaCLIPTextConfig: EvaCLIPTextModel},
        "AutoModelForZeroShotImageClassification": {EvaCLIPConfig: EvaCLIPModel},
        "AutoModelForImageClassification": {EvaCLIPConfig: EvaCLIPForImageClassification},
        "AutoModelForTextEncoding": {EvaCLIPTextConfig: EvaCLIPTextModel},
    }
    for config_class in (EvaCLIPConfig, EvaCLIPVisionConfig, EvaCLIPTextConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_name, models in auto_models.items():
        auto_class = getattr(transformers, auto_name, None)
        for config_class, model_class in models.items() if auto_class is not None else ():
            auto_class.register(config_class, model_class, exist_ok=True)
    for mapping in (TOKENIZER_MAPPING, IMAGE_PROCESSOR_MAPPING, PROCESSOR_MAPPING):
        if CLIPConfig in mapping:
            mapping.register(EvaCLIPConfig, mapping[CLIPConfig], exist_ok=True)
    # A tower dir: 4.x's pipelines load a tokenizer / image processor for mapped configs only (without it
    # "image-feature-extraction" got no image processor on 4.40-4.53 and failed on the first image, as CLIP's does).
    for mapping, tower_config in ((TOKENIZER_MAPPING, EvaCLIPTextConfig), (IMAGE_PROCESSOR_MAPPING, EvaCLIPVisionConfig)):
        if CLIPConfig in mapping:
            mapping.register(tower_config, mapping[CLIPConfig], exist_ok=True)


def _imported_by_python_m() -> bool:
    """Whether this import is `python -m llava_evaclip` locating its `__main__` (sys.argv[0] is "-m" until then).
    Its CLI then registers when a command needs a model, inside its Ctrl-C / SIGTERM handling, as the console script
    does: registered here, a Ctrl-C in the first seconds printed a traceback. Unusual spellings (`-Bm`) register here."""
    if sys.argv[:1] != ["-m"]:
        return False
    for index, arg in enumerate(sys.orig_argv[1:], 1):
        if arg == "-m":
            return sys.orig_argv[index + 1: index + 2] == [__name__]
        if arg.startswith("-m"):
            return arg == f"-m{__name__}"
    return False


if not (os.environ.get(DEFER_REGISTRATION_ENV) or _imported_by_python_m()):
    _register_auto_classes()

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
    "EvaCLIPForImageClassification",
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

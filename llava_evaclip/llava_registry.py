"""A hook into LLaVA's `build_vision_tower`: EVA-CLIP towers (and any other registered type) without editing LLaVA.

LLaVA builds its tower with `llava.model.multimodal_encoder.builder.build_vision_tower`, which other modules import
by name (`llava.model.llava_arch` does), so `register_with_llava()` rebinds it in every loaded `llava.*` module.
Towers are matched by a small registry of (matcher, factory) pairs; the first match wins, and anything unmatched goes
to LLaVA's own builder unchanged.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import sys
from typing import Any, Callable, Optional

from transformers.utils import logging

from .configuration_evaclip import (
    INTERNVL_EVA_FIELDS,
    INTERNVL_MODEL_TYPES,
    INTERNVL_VISION_MODEL_TYPES,
    EvaCLIPConfig,
    EvaCLIPVisionConfig,
)

logger = logging.get_logger(__name__)

Matcher = Callable[[str], bool]
Factory = Callable[..., Any]  # factory(vision_tower_name, args=vision_tower_cfg, **kwargs), like CLIPVisionTower

LLAVA_BUILDER_MODULE = "llava.model.multimodal_encoder.builder"
EVACLIP_MODEL_TYPES = (EvaCLIPConfig.model_type, EvaCLIPVisionConfig.model_type)
# Tower names LLaVA-NeXT's builder routes by prefix to its own loaders (timm / Hugging Face Hub, open_clip), also for
# EVA models such as "open_clip_hub:EVA02-L-14": never ours.
FOREIGN_TOWER_PREFIXES = ("hf:", "open_clip_hub:")

# Arguments of LLaVA's (and LLaVA-NeXT's) forward that the language model itself does not take.
LLAVA_ONLY_ARGUMENTS = ("images", "image_sizes", "modalities", "dpo_forward")

_registry: list[tuple[Matcher, Factory]] = []
_original_builder: Optional[Callable[..., Any]] = None


def register_vision_tower(matcher: Matcher, factory: Factory) -> None:
    """Route towers for which `matcher(name)` is true to `factory(name, args=cfg, **kwargs)`. Later registrations
    are tried first, so a project can override the defaults; registering the same pair twice is a no-op."""
    if not callable(matcher) or not callable(factory):
        raise ValueError(
            "register_vision_tower needs two callables: matcher(name) -> bool and factory(name, args, **kwargs)."
        )
    if (matcher, factory) not in _registry:
        _registry.insert(0, (matcher, factory))


def unregister_vision_tower(matcher: Matcher) -> None:
    """Forget every registration made with `matcher`."""
    _registry[:] = [(m, f) for m, f in _registry if m is not matcher]


def find_factory(name: Any) -> Optional[Factory]:
    """The factory of the first registered tower type that claims `name`, or None (LLaVA's own builder)."""
    if not isinstance(name, (str, os.PathLike)):
        return None
    name = os.fspath(name)
    for matcher, factory in _registry:
        if matcher(name):
            return factory
    return None


def _read_config(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_evaclip_tower(name: str) -> bool:
    """A local dir is judged by its config.json: one of our model types, or a CLIP-typed config carrying the
    InternVL port's EVA fields. Anything else (a hub id, a dir without config.json) by a name containing "eva", except
    names LLaVA-NeXT loads through its own prefixed loaders (`hf:`, `open_clip_hub:`)."""
    if name.startswith(FOREIGN_TOWER_PREFIXES) and not os.path.isdir(name):
        return False
    config = _read_config(name) if os.path.isdir(name) else None
    if config is None:
        return "eva" in name.lower()
    if config.get("model_type") in EVACLIP_MODEL_TYPES:
        return True
    vision = config.get("vision_config") if config.get("model_type") in INTERNVL_MODEL_TYPES else config
    if not isinstance(vision, dict):
        return False
    vision_type = vision.get("model_type", INTERNVL_VISION_MODEL_TYPES[0])
    if vision_type not in INTERNVL_VISION_MODEL_TYPES + EVACLIP_MODEL_TYPES:
        return False
    return any(field in vision for field in INTERNVL_EVA_FIELDS)


def _build_evaclip_tower(vision_tower: str, args: Any, **kwargs: Any) -> Any:
    from .tower import EvaCLIPVisionTower

    return EvaCLIPVisionTower(vision_tower, args=args, **kwargs)


register_vision_tower(is_evaclip_tower, _build_evaclip_tower)


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> Any:
    """LLaVA's `build_vision_tower`, with registered tower types tried first."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    factory = find_factory(name)
    if factory is None:
        if _original_builder is None:
            raise RuntimeError("LLaVA's build_vision_tower is not hooked; call register_with_llava() first.")
        return _original_builder(vision_tower_cfg, **kwargs)
    return factory(os.fspath(name), args=vision_tower_cfg, **kwargs)


def patch_llava_forward() -> None:
    """LLaVA's `LlavaLlamaForCausalLM.forward` names the arguments transformers 4.3x passed and rejects any other;
    transformers 5's `generate` also passes `cache` (and more). Accept those and hand them to the language model, after
    LLaVA's own multimodal preparation; calls without them run LLaVA's forward unchanged. `register_with_llava()`
    applies it, so code that loads and serves LLaVA models itself needs no other call."""
    try:
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    except ImportError:  # a LLaVA without the Llama model: nothing to bridge
        return

    original = LlavaLlamaForCausalLM.forward
    signature = inspect.signature(original)
    if getattr(original, "_evaclip_wrapped", False) or any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in signature.parameters.values()
    ):
        return
    language_model_forward = super(LlavaLlamaForCausalLM, LlavaLlamaForCausalLM).forward

    @functools.wraps(original)
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        extra = {key: kwargs.pop(key) for key in list(kwargs) if key not in signature.parameters}
        if not extra:
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        named = dict(bound.arguments)
        if named["inputs_embeds"] is None:
            (named["input_ids"], named["position_ids"], named["attention_mask"], named["past_key_values"],
             named["inputs_embeds"], named["labels"]) = self.prepare_inputs_labels_for_multimodal(
                named["input_ids"], named["position_ids"], named["attention_mask"], named["past_key_values"],
                named["labels"], named["images"], image_sizes=named["image_sizes"],  # LLaVA-NeXT has `modalities` first
                **({"modalities": named["modalities"]} if "modalities" in named else {}))
        named = {key: value for key, value in named.items()
                 if key not in ("self", *LLAVA_ONLY_ARGUMENTS) and value is not None}
        return language_model_forward(self, **named, **extra)

    forward._evaclip_wrapped = True  # type: ignore[attr-defined]
    LlavaLlamaForCausalLM.forward = forward


LLAVA_LOADER_MODULE = "llava.model.builder"


def patch_llava_loader() -> None:
    """LLaVA's `load_pretrained_model(model_path, model_base, ...)` with a `model_base` (a LoRA or a projector-only
    checkpoint) builds the LLaVA model from the base language model, whose checkpoint has no tower weights; LLaVA-NeXT
    builds the tower inside that `from_pretrained` (delay_load False), so a frozen tower would keep random weights (its
    own CLIPVisionTower does), and both LLaVAs build a tower whose config says it was trained there (an mm_projector.bin
    never holds its weights; LLaVA 1.5's --tune_mm_mlp_adapter freezes the tower whatever --unfreeze_mm_vision_tower
    says). Around such a call, the EVA-CLIP tower waits for the builder's `load_model()`, which loads it from its
    directory, except a trained tower in a LoRA checkpoint (its non_lora_trainables.bin holds it). Rebinds every
    module-level name bound to it; idempotent."""
    import importlib

    try:
        loader = importlib.import_module(LLAVA_LOADER_MODULE)
    except Exception:  # an older or partial LLaVA without the builder: nothing to patch
        return
    original = getattr(loader, "load_pretrained_model", None)
    if original is None or getattr(original, "_evaclip_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_pretrained_model(*args: Any, **kwargs: Any) -> Any:
        from .tower import loading_onto_a_base_model

        try:
            arguments = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # let LLaVA report its own usage error
            arguments = {}
        if arguments.get("model_base") is None:
            return original(*args, **kwargs)
        # LLaVA's (and LLaVA-NeXT's) builder takes its LoRA branch for a model name containing "lora".
        kind = "lora" if "lora" in str(arguments.get("model_name", "")).lower() else "projector"
        with loading_onto_a_base_model(kind):
            return original(*args, **kwargs)

    load_pretrained_model._evaclip_wrapped = True  # type: ignore[attr-defined]
    load_pretrained_model._evaclip_original = original  # type: ignore[attr-defined]
    # Every module-level binding, the caller's too (`from llava.model.builder import load_pretrained_model` written
    # before `register_with_llava()`); read through __dict__ so that no lazy module imports anything.
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and namespace.get("load_pretrained_model") is original:
            module.load_pretrained_model = load_pretrained_model


def _llava_modules() -> list[Any]:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "llava" or name.startswith("llava."))
    ]


def is_llava_next() -> bool:
    """Whether the importable `llava` package is LLaVA-NeXT / OneVision's (it has the resampler package that LLaVA 1.5
    lacks), judged from its files so that nothing is imported."""
    try:
        spec = importlib.util.find_spec("llava")
    except (ImportError, ValueError):
        return False
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    return any(os.path.isdir(os.path.join(location, "model", "multimodal_resampler")) for location in locations)


# What LLaVA-NeXT's Q-Former (imported by its model package, so by every `import llava`) takes from
# `transformers.modeling_utils`; transformers moved them to `pytorch_utils`, and 4.5x stopped re-exporting them.
LLAVA_NEXT_MODELING_UTILS_NAMES = (
    "apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer",
)


def provide_llava_next_model_imports() -> None:
    """Give back, where this transformers lacks them, the `transformers.modeling_utils` names LLaVA-NeXT's model package
    imports (the same functions, from `transformers.pytorch_utils`). Without them its `llava/model/__init__.py` prints
    the ImportError and goes on without `LlavaLlamaForCausalLM`, and every LLaVA-NeXT entry point fails on import."""
    if not is_llava_next():
        return
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in LLAVA_NEXT_MODELING_UTILS_NAMES:
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))


def register_with_llava() -> None:
    """Make every binding of LLaVA's `build_vision_tower` use the registry, and bridge LLaVA's forward to the installed
    transformers' `generate` (`patch_llava_forward`). Idempotent; `unregister_from_llava()` restores LLaVA's builder."""
    global _original_builder
    provide_llava_next_model_imports()  # before the import below, which imports LLaVA-NeXT's model package
    try:
        builder = importlib.import_module(LLAVA_BUILDER_MODULE)  # imports llava.model (and llava_arch) too
    except ImportError as error:
        raise ImportError(
            f"register_with_llava() needs LLaVA's code (module `llava`: pip install --no-deps llava-torch, or LLaVA's "
            f"repo): {error}"
        ) from error
    current = builder.build_vision_tower
    if _original_builder is None:
        if current is build_vision_tower:
            raise RuntimeError(f"{LLAVA_BUILDER_MODULE}.build_vision_tower is already ours but the original is lost.")
        _original_builder = current
    patched = []
    for module in _llava_modules():
        if getattr(module, "build_vision_tower", None) is _original_builder:
            module.build_vision_tower = build_vision_tower
            patched.append(module.__name__)
    patch_llava_forward()
    patch_llava_loader()
    if patched:
        logger.info(f"EVA-CLIP towers registered with LLaVA's build_vision_tower in {', '.join(sorted(patched))}.")


def unregister_from_llava() -> None:
    """Restore LLaVA's own `build_vision_tower` everywhere `register_with_llava()` put ours."""
    global _original_builder
    if _original_builder is None:
        return
    for module in _llava_modules():
        if getattr(module, "build_vision_tower", None) is build_vision_tower:
            module.build_vision_tower = _original_builder
    _original_builder = None


def is_registered_with_llava() -> bool:
    builder = sys.modules.get(LLAVA_BUILDER_MODULE)
    return builder is not None and getattr(builder, "build_vision_tower", None) is build_vision_tower


__all__ = [
    "build_vision_tower",
    "find_factory",
    "is_evaclip_tower",
    "is_registered_with_llava",
    "patch_llava_forward",
    "patch_llava_loader",
    "register_vision_tower",
    "register_with_llava",
    "unregister_from_llava",
    "unregister_vision_tower",
]

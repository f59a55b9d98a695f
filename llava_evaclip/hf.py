"""EVA-CLIP as the vision tower of transformers' own LLaVA models (`LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`).

Those models build their tower with `AutoModel.from_config(config.vision_config)`; importing `llava_evaclip` registers
our config and model types with the Auto classes, so an EVA-CLIP tower drops in without `trust_remote_code`. The same
import is needed before `from_pretrained` of a saved model, or transformers cannot resolve `evaclip_vision_model`.

`build_llava` assembles a model from an EVA-CLIP dir (or config) and a language model dir (or config);
`build_llava_processor` pairs our image processor with the language model's tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
from transformers import LlavaProcessor
from transformers.utils import logging

from ._compat import CONFIG_DTYPE_KEY, PretrainedConfig
from .configuration_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig
from .modeling_evaclip import EvaCLIPVisionModel, resolve_attn_implementation
from .processing import IMAGE_PROCESSOR_FIELDS, build_image_processor, load_image_processor

try:  # LLaVA-NeXT arrived in transformers 4.39
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
except ImportError:  # transformers 4.37.2 (LLaVA's pin)
    LlavaNextConfig = LlavaNextForConditionalGeneration = LlavaNextProcessor = None

logger = logging.get_logger(__name__)

PathLike = Union[str, os.PathLike]
SELECT_STRATEGIES = ("default", "full")
DEFAULT_IMAGE_TOKEN = "<image>"


def is_llava_next_available() -> bool:
    """True when the installed transformers has LLaVA-NeXT (4.39 and later)."""
    return LlavaNextForConditionalGeneration is not None


def supports_feature_layer_lists() -> bool:
    """True when the installed LLaVA concatenates several `vision_feature_layer`s (4.37.2 reads a single int)."""
    annotation = inspect.signature(LlavaForConditionalGeneration.forward).parameters["vision_feature_layer"].annotation
    return "list" in str(annotation).lower()


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def _is_dir(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.path.isdir(value)


def _vision_config(vision: Union[PathLike, EvaCLIPConfig, EvaCLIPVisionConfig]) -> EvaCLIPVisionConfig:
    """The tower config from a dir (a vision-only or a full EVA-CLIP checkpoint) or a config object."""
    if isinstance(vision, EvaCLIPVisionConfig):
        return vision
    if isinstance(vision, EvaCLIPConfig):
        return vision.vision_config
    if _is_dir(vision):
        return EvaCLIPVisionConfig.from_pretrained(vision)
    raise ValueError(
        f"vision must be an EVA-CLIP checkpoint dir (e.g. one written by `llava-evaclip convert`), an "
        f"EvaCLIPVisionConfig or an EvaCLIPConfig; got {vision!r}."
    )


def _text_config(language_model: Union[PathLike, PretrainedConfig]) -> PretrainedConfig:
    if isinstance(language_model, PretrainedConfig):
        return language_model
    if _is_dir(language_model):
        return AutoConfig.from_pretrained(language_model)
    raise ValueError(
        f"language_model must be a causal language model dir (config.json + weights, e.g. a Vicuna or Llama "
        f"checkpoint) or its config (e.g. a LlamaConfig); got {language_model!r}."
    )


def _check_feature_selection(
    config: EvaCLIPVisionConfig, vision_feature_layer: Union[int, Sequence[int]], strategy: str
) -> Union[int, list[int]]:
    """Validate the layer(s) against the tower depth: `hidden_states` has num_hidden_layers + 1 entries."""
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES} ('default' drops the CLS token, "
            f"'full' keeps it); got {strategy!r}."
        )
    count = config.num_hidden_layers + 1
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and -count <= i < count for i in layers):
        raise ValueError(
            f"vision_feature_layer must be an int or a non-empty list of ints in [{-count}, {count - 1}] (the tower "
            f"has {config.num_hidden_layers} layers; -2 is LLaVA's penultimate layer); got {vision_feature_layer!r}."
        )
    if isinstance(vision_feature_layer, int):
        return vision_feature_layer
    if not supports_feature_layer_lists():
        import transformers

        raise ValueError(
            f"transformers {transformers.__version__}'s LLaVA reads a single vision_feature_layer; a list "
            f"({layers}) needs a newer transformers (lists arrived with Granite Vision support, 4.49)."
        )
    return layers


def default_image_grid_pinpoints(image_size: int) -> list[list[int]]:
    """LLaVA-NeXT's anyres resolutions (1x2, 2x1, 2x2, 3x1, 1x3 tiles) scaled to the tower's input size."""
    return [[image_size * h, image_size * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]


def num_image_tokens(config: EvaCLIPVisionConfig, vision_feature_select_strategy: str = "default") -> int:
    """Tokens one tile yields in LLaVA: the patch grid, plus CLS under the "full" strategy."""
    return config.num_patches_per_side**2 + (1 if vision_feature_select_strategy == "full" else 0)


def _add_image_token(tokenizer: Any, image_token: str) -> int:
    """The image token's id, adding it as a special token when the tokenizer lacks it (Vicuna / Llama do)."""
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        token_id = tokenizer.convert_tokens_to_ids(image_token)
    return token_id


def _load_tokenizer(language_model: Any) -> Optional[Any]:
    """The tokenizer saved with a language model dir, or None when there is none."""
    if not _is_dir(language_model):
        return None
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(language_model, name)) for name in names):
        return None
    return AutoTokenizer.from_pretrained(language_model)


def _llava_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """`vision_tower` / `multi_modal_projector` on transformers 5 (under `.model`) and 4.x (top level)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, name):
        return getattr(inner, name)
    return getattr(model, name)


def get_vision_tower(model: torch.nn.Module) -> EvaCLIPVisionModel:
    """The vision tower of a LLaVA model on any transformers version."""
    return _llava_module(model, "vision_tower")


def get_multi_modal_projector(model: torch.nn.Module) -> torch.nn.Module:
    """The projector of a LLaVA model on any transformers version."""
    return _llava_module(model, "multi_modal_projector")


def set_vision_attn_implementation(model: torch.nn.Module, implementation: str) -> None:
    """Choose the tower's attention kernel ("eager", "sdpa", "flash_attention_2") on a built or loaded LLaVA model.

    transformers 5 hands `attn_implementation` of the LLaVA config / `from_pretrained` down to the tower itself;
    4.x keeps it on the top config and builds the tower with its own default (sdpa), so set it here there. The
    tower reads the choice at every forward, so this takes effect at once."""
    tower_config = get_vision_tower(model).config
    previous = getattr(tower_config, "_attn_implementation_internal", None)
    tower_config._attn_implementation_internal = implementation
    try:
        resolve_attn_implementation(tower_config)  # ValueError for unknown / unavailable kernels
    except ValueError:
        tower_config._attn_implementation_internal = previous
        raise


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def _check_next_options(vision_feature_select_strategy: str) -> None:
    """What LLaVA-NeXT needs, checked alike by the config and the processor builders."""
    if not is_llava_next_available():
        import transformers

        raise ValueError(
            f"LLaVA-NeXT needs transformers >= 4.39; this is {transformers.__version__}. Use next=False (LLaVA-1.5)."
        )
    if vision_feature_select_strategy != "default":
        raise ValueError(
            "LLaVA-NeXT reshapes each tile's features into the patch grid, so the CLS token must be dropped: use "
            "vision_feature_select_strategy='default' with next=True."
        )


def build_llava_config(
    vision_config: Union[EvaCLIPVisionConfig, EvaCLIPConfig],
    text_config: PretrainedConfig,
    *,
    image_token_index: int,
    vision_feature_layer: Union[int, Sequence[int]] = -2,
    vision_feature_select_strategy: str = "default",
    next: bool = False,
    image_grid_pinpoints: Optional[Sequence[Sequence[int]]] = None,
    projector_hidden_act: str = "gelu",
    pad_token_id: Optional[int] = None,
    attn_implementation: Optional[str] = None,
) -> PretrainedConfig:
    """A `LlavaConfig` (or `LlavaNextConfig`) with an EVA-CLIP vision config."""
    vision_config = _vision_config(vision_config)
    layers = _check_feature_selection(vision_config, vision_feature_layer, vision_feature_select_strategy)
    if not isinstance(image_token_index, int) or not 0 <= image_token_index < text_config.vocab_size:
        raise ValueError(
            f"image_token_index must be a token id of the language model (0 <= id < vocab_size "
            f"{text_config.vocab_size}); got {image_token_index!r}. Add the image token to the tokenizer and resize "
            f"the embeddings, or pass a tokenizer so that build_llava does it."
        )
    kwargs: dict[str, Any] = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=layers,
        vocab_size=text_config.vocab_size,  # 4.x LLaVA keeps its own copy (default 32000)
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        image_seq_length=num_image_tokens(vision_config, vision_feature_select_strategy),
    )
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if next:
        _check_next_options(vision_feature_select_strategy)
        pinpoints = image_grid_pinpoints or default_image_grid_pinpoints(vision_config.image_size)
        bad = [p for p in pinpoints if len(p) != 2 or any(int(s) % vision_config.image_size for s in p)]
        if bad:
            raise ValueError(
                f"image_grid_pinpoints must be [height, width] pairs that are multiples of the tower's image size "
                f"({vision_config.image_size}); got {bad}."
            )
        return LlavaNextConfig(image_grid_pinpoints=[[int(h), int(w)] for h, w in pinpoints], **kwargs)
    if image_grid_pinpoints is not None:
        raise ValueError("image_grid_pinpoints applies to LLaVA-NeXT only; pass next=True or leave it out.")
    return LlavaConfig(**kwargs)


@contextlib.contextmanager
def _default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Build modules in `dtype` as `from_pretrained(..., dtype=...)` does, so every buffer a model computes at init
    (the language model's rotary tables) gets the dtype the installed transformers gives a loaded model."""
    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """`model.get_decoder()`; transformers 4.53's LlavaForConditionalGeneration (seen on 4.53.3) returns the bound
    method `self.model.get_decoder` instead of calling it, so a callable that is no module is called."""
    decoder = model.get_decoder()
    if callable(decoder) and not isinstance(decoder, torch.nn.Module):
        decoder = decoder()
    return decoder


def _forget_checkpoint_dtype(config: PretrainedConfig) -> None:
    """Drop the dtype a part's checkpoint was saved in from its config, so that `dtype` alone decides what is built.

    transformers 5 builds each part of a LLaVA in its sub-config's `dtype`: a bf16 tower dir gave a bf16 tower beside an
    fp32 projector (forward failed: "mat1 and mat2 must have the same dtype"), and the saved model then reloaded
    entirely in bf16; 4.37 ignores the field and built fp32, so the two lines built different models."""
    setattr(config, CONFIG_DTYPE_KEY, None)


def _cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast what the state dict holds (floating parameters and persistent buffers) to `dtype`, as `from_pretrained`
    loads it; the buffers a model computes for itself keep the dtype they were built with (`_default_dtype`), where
    `model.to(dtype)` would round them too (transformers 5's fp32 rotary `inv_freq`) and the built model would not
    give the logits its saved copy gives."""
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(dtype)
    return model


def build_llava(
    vision: Union[PathLike, EvaCLIPVisionConfig, EvaCLIPConfig],
    language_model: Union[PathLike, PretrainedConfig],
    *,
    vision_feature_layer: Union[int, Sequence[int]] = -2,
    vision_feature_select_strategy: str = "default",
    next: bool = False,
    image_grid_pinpoints: Optional[Sequence[Sequence[int]]] = None,
    tokenizer: Optional[Any] = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    image_token_index: Optional[int] = None,
    projector_hidden_act: str = "gelu",
    attn_implementation: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
):
    """A `LlavaForConditionalGeneration` (or, with `next=True`, a `LlavaNextForConditionalGeneration`) whose vision
    tower is our `EvaCLIPVisionModel`.

    `vision` is an EVA-CLIP checkpoint dir (vision-only or full; its tower weights are loaded) or a config (random
    tower); `language_model` a causal LM dir (weights loaded) or its config. The projector (and NeXT's
    `image_newline`) start random: that is what LLaVA's stage-1 training learns. The image token id comes from
    `image_token_index`, else from `tokenizer` (default: the one saved with the LM dir), which gains `image_token`
    when it lacks it; the embeddings then grow to `len(tokenizer)`. Pass the processor's tokenizer
    (`build_llava_processor(...).tokenizer`) so that model and processor agree.
    """
    # Copies: the model gets its own configs (the vocab grows, the attention choice is set), never the caller's.
    vision_config = copy.deepcopy(_vision_config(vision))
    text_config = copy.deepcopy(_text_config(language_model))
    _check_feature_selection(vision_config, vision_feature_layer, vision_feature_select_strategy)  # fail before loading
    tower = None
    if _is_dir(vision):
        tower, info = EvaCLIPVisionModel.from_pretrained(vision, output_loading_info=True)
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{vision} does not hold a full EVA-CLIP vision tower; {len(missing)} weights are missing, e.g. "
                f"{missing[:5]}. Point vision at a dir written by `llava-evaclip convert` or `save_pretrained`."
            )
    if tokenizer is None and image_token_index is None:
        tokenizer = _load_tokenizer(language_model)
    if image_token_index is None:
        if tokenizer is None:
            raise ValueError(
                "build_llava needs the image token's id: pass image_token_index, a tokenizer, or a language model "
                "dir that holds its tokenizer."
            )
        image_token_index = _add_image_token(tokenizer, image_token)

    language = None
    if _is_dir(language_model):
        language = AutoModelForCausalLM.from_pretrained(language_model)
        text_config = language.config
    vocab_size = max(text_config.vocab_size, len(tokenizer) if tokenizer is not None else 0)
    if vocab_size != text_config.vocab_size:
        if language is not None:
            language.resize_token_embeddings(vocab_size)  # updates language.config.vocab_size
        else:
            text_config.vocab_size = vocab_size
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(text_config, "pad_token_id", None)
    if language is not None:
        text_config = copy.deepcopy(text_config)  # the loaded LM keeps its own config
    for part_config in (vision_config, text_config):
        _forget_checkpoint_dtype(part_config)

    config = build_llava_config(
        vision_config,
        text_config,
        image_token_index=image_token_index,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        next=next,
        image_grid_pinpoints=image_grid_pinpoints,
        projector_hidden_act=projector_hidden_act,
        pad_token_id=pad_token_id,
        attn_implementation=attn_implementation,
    )
    model_class = LlavaNextForConditionalGeneration if next else LlavaForConditionalGeneration
    with _default_dtype(dtype):
        model = model_class(config)
    if attn_implementation is not None:
        set_vision_attn_implementation(model, attn_implementation)

    if tower is not None:
        get_vision_tower(model).load_state_dict(tower.state_dict(), strict=True)
        del tower
    if language is not None:
        _decoder(model).load_state_dict(_decoder(language).state_dict(), strict=True)
        output_embeddings = language.get_output_embeddings()
        if output_embeddings is not None:
            model.get_output_embeddings().load_state_dict(output_embeddings.state_dict(), strict=True)
        del language
    if dtype is not None:
        _cast_weights(model, dtype)
    logger.info(
        "Built %s: EVA-CLIP tower (%d layers, %dpx) -> projector -> %s; image token id %d.",
        type(model).__name__, vision_config.num_hidden_layers, vision_config.image_size,
        getattr(text_config, "model_type", "?"), image_token_index,
    )
    return model


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------


def _next_image_processor(clip_processor: Any, image_grid_pinpoints: Sequence[Sequence[int]]) -> Any:
    """LLaVA-NeXT's anyres image processor with the same resize / crop / normalisation as the EVA-CLIP one."""
    from transformers import LlavaNextImageProcessor

    settings = clip_processor.to_dict()
    fields = {key: settings[key] for key in IMAGE_PROCESSOR_FIELDS if settings.get(key) is not None}
    return LlavaNextImageProcessor(
        image_grid_pinpoints=[[int(h), int(w)] for h, w in image_grid_pinpoints], do_pad=True, **fields
    )


def build_llava_processor(
    vision: Union[PathLike, EvaCLIPVisionConfig, EvaCLIPConfig],
    tokenizer: Union[PathLike, Any],
    *,
    vision_feature_select_strategy: str = "default",
    next: bool = False,
    image_grid_pinpoints: Optional[Sequence[Sequence[int]]] = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
    chat_template: Optional[str] = None,
):
    """A `LlavaProcessor` (or `LlavaNextProcessor`): the EVA-CLIP image processor (the one saved in the vision dir,
    else one built from the config) and the language model's tokenizer (a dir or a tokenizer object), which gains
    `image_token` when it lacks it. On transformers 5 the processor expands each image token to the number of
    features the model inserts, so it needs the same strategy (and pinpoints) as the model."""
    vision_config = _vision_config(vision)
    if vision_feature_select_strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"vision_feature_select_strategy must be one of {SELECT_STRATEGIES}; "
            f"got {vision_feature_select_strategy!r}."
        )
    image_processor = (
        load_image_processor(vision, vision_config) if _is_dir(vision) else build_image_processor(vision_config)
    )
    if _is_dir(tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    elif isinstance(tokenizer, (str, os.PathLike)) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise ValueError(
            f"tokenizer must be a tokenizer or a dir that holds one (the language model's); got {tokenizer!r}."
        )
    _add_image_token(tokenizer, image_token)
    # Decoder-only batches pad on the left for generation, and 4.37.2's LLaVA places image features correctly in a
    # padded batch only then (llava-hf's own processors ship with left padding too).
    tokenizer.padding_side = "left"
    # Saved with it: transformers 5.5's save_pretrained writes the tokenizer's init kwargs, not the attribute, and a
    # processor reloaded there (pipelines, AutoProcessor) padded on the right and generated from the pad tokens.
    if isinstance(getattr(tokenizer, "init_kwargs", None), dict):
        tokenizer.init_kwargs["padding_side"] = "left"

    if next:
        _check_next_options(vision_feature_select_strategy)
        pinpoints = image_grid_pinpoints or default_image_grid_pinpoints(vision_config.image_size)
        image_processor = _next_image_processor(image_processor, pinpoints)
        processor_class = LlavaNextProcessor
    else:
        processor_class = LlavaProcessor
    # transformers >= 4.45 processors count the image tokens themselves; 4.37.2's take only the two parts.
    options = dict(
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,  # EVA-CLIP's CLS token
        image_token=image_token,
        chat_template=chat_template,
    )
    accepted = inspect.signature(processor_class.__init__).parameters
    if chat_template is not None and "chat_template" not in accepted:
        logger.warning("This transformers' %s takes no chat_template; it is ignored.", processor_class.__name__)
    options = {key: value for key, value in options.items() if key in accepted}
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, **options)


__all__ = [
    "build_llava",
    "build_llava_config",
    "build_llava_processor",
    "default_image_grid_pinpoints",
    "get_multi_modal_projector",
    "get_vision_tower",
    "is_llava_next_available",
    "num_image_tokens",
    "set_vision_attn_implementation",
    "supports_feature_layer_lists",
]

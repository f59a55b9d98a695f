"""Image preprocessing for EVA-CLIP: OpenAI CLIP's mean/std, bicubic resize of the shortest edge, centre crop."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from transformers import CLIPImageProcessor
from transformers.utils import logging

from .configuration_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig

# The normalisation every EVA-CLIP release was trained with (BAAI's OPENAI_DATASET_MEAN / _STD).
EVA_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"  # transformers 4.x's layout, and an image processor saved alone
PROCESSOR_FILE = "processor_config.json"  # transformers 5's processor.save_pretrained nests the image processor here
# The settings that decide an image processor's output.
IMAGE_PROCESSOR_FIELDS = (
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std", "do_convert_rgb",
)

logger = logging.get_logger(__name__)


def build_image_processor(config: Union[EvaCLIPConfig, EvaCLIPVisionConfig, int]) -> CLIPImageProcessor:
    """The image processor matching a config (or an image size): resize the shortest edge, centre crop, normalise."""
    if isinstance(config, EvaCLIPConfig):
        config = config.vision_config
    image_size = config if isinstance(config, int) else config.image_size
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(EVA_CLIP_MEAN),
        image_std=list(EVA_CLIP_STD),
        do_convert_rgb=True,
    )


def takes_tensors(processor: Any) -> bool:
    """Whether `processor` works on torch tensors (transformers 5's torchvision backend, 4.x's `*ImageProcessorFast`):
    it turns a PIL image into a [C, H, W] tensor itself and resizes with torchvision; the others (transformers 4's
    `CLIPImageProcessor`) work on numpy arrays and resize with PIL."""
    bases: tuple[type, ...] = ()
    try:
        from transformers.image_processing_backends import TorchvisionBackend

        bases += (TorchvisionBackend,)
    except ImportError:
        pass
    try:
        from transformers.image_processing_utils_fast import BaseImageProcessorFast

        bases += (BaseImageProcessorFast,)
    except ImportError:
        pass
    return isinstance(processor, bases)


def rgb_image_kwargs(processor: Any) -> dict[str, str]:
    """What to pass `processor` with RGB PIL images so that none is misread. A numpy processor takes the height of an
    image 1 or 3 pixels high for its channels unless told `input_data_format="channels_last"`; a tensor processor
    converts the PIL image to [C, H, W] itself, and some releases (4.56's fast processors, 5.5's) then apply that
    argument to the converted tensor and fail with a shape error, so it gets none."""
    return {} if takes_tensors(processor) else {"input_data_format": "channels_last"}


def _processor_config_file(path: Union[str, os.PathLike]) -> Optional[str]:
    """processor_config.json of a local dir or of a Hub repo (downloaded or already cached), None where there is
    none: transformers 5's `from_pretrained` reads it from both, 4.x from neither."""
    if os.path.isdir(path):
        file = os.path.join(path, PROCESSOR_FILE)
        return file if os.path.isfile(file) else None
    from transformers.utils import cached_file

    try:
        return cached_file(str(path), PROCESSOR_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):  # not a repo id, a gated or missing repo: no processor there either
        return None


def _nested_image_processor(path: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The image processor a transformers 5 `processor.save_pretrained` nested in processor_config.json, if any."""
    file = _processor_config_file(path)
    if file is None:
        return None
    with open(file, encoding="utf-8") as handle:
        try:
            saved = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # UTF-8 JSON is what transformers writes
            raise ValueError(f"{file} is not valid UTF-8 JSON ({error}).") from None
    nested = saved.get("image_processor") if isinstance(saved, dict) else None
    if nested is not None and not isinstance(nested, dict):
        raise ValueError(f"{file}: 'image_processor' must be an object, not {type(nested).__name__}.")
    return nested


def image_processor_settings(processor: Any) -> dict[str, Any]:
    """The settings that decide `processor`'s output, JSON-normalised (tuples as lists), so two processors compare."""
    values = processor.to_dict()
    return {key: json.loads(json.dumps(values.get(key), default=str)) for key in IMAGE_PROCESSOR_FIELDS}


def image_processor_file(path: Union[str, os.PathLike]) -> Optional[str]:
    """The file of `path` that `load_image_processor` reads, for messages that tell the user which file to fix."""
    if _nested_image_processor(path) is not None:
        return PROCESSOR_FILE
    return IMAGE_PROCESSOR_FILE if os.path.isfile(os.path.join(path, IMAGE_PROCESSOR_FILE)) else None


def _warn_if_files_differ(path: Union[str, os.PathLike], used: CLIPImageProcessor) -> None:
    """A dir can hold both files with different settings: a processor re-saved on transformers 4.x (which writes
    only preprocessor_config.json) after 5.x wrote processor_config.json, or the reverse. Only one rule can hold on
    both lines; the user's newer edit may be the one it ignores, so that must not pass silently."""
    file = os.path.join(path, IMAGE_PROCESSOR_FILE)
    try:
        with open(file, encoding="utf-8") as handle:
            other = CLIPImageProcessor.from_dict(json.load(handle))
    except FileNotFoundError:
        return
    except (OSError, ValueError, TypeError):  # an unreadable stale file: the nested processor is used all the same
        other = None
    ours = image_processor_settings(used)
    theirs = image_processor_settings(other) if other is not None else {}
    differing = [key for key in IMAGE_PROCESSOR_FIELDS if ours[key] != theirs.get(key)]
    if differing:
        logger.warning(
            f"{path}: {PROCESSOR_FILE} and {IMAGE_PROCESSOR_FILE} hold different image processors "
            f"({', '.join(differing)}); the one in {PROCESSOR_FILE} is used, as transformers 5 does (transformers 4.x "
            f"reads {IMAGE_PROCESSOR_FILE}). If {IMAGE_PROCESSOR_FILE} is the one you meant, remove the "
            f"'image_processor' entry of {PROCESSOR_FILE} (or re-save the processor on transformers 5)."
        )


def load_image_processor(path: Union[str, os.PathLike],
                         config: Union[EvaCLIPConfig, EvaCLIPVisionConfig]) -> CLIPImageProcessor:
    """The processor saved in a checkpoint dir or Hub repo, or one built from the config when it has none.

    Read as transformers 5 reads it, on every line: the image processor nested in processor_config.json (what 5.x's
    `processor.save_pretrained` writes) comes before preprocessor_config.json. transformers 4.37 knows only the latter,
    so a dir whose processor was re-saved on 5.x would otherwise be preprocessed with a stale or default processor
    there, silently, while 5.x uses the saved one. Where both files exist and differ, a warning says which is used."""
    nested = _nested_image_processor(path)
    if nested is not None:
        processor = CLIPImageProcessor.from_dict(nested)
        _warn_if_files_differ(path, processor)
        return processor
    if os.path.isfile(os.path.join(path, IMAGE_PROCESSOR_FILE)):
        return CLIPImageProcessor.from_pretrained(path)
    if not os.path.isdir(path):  # a Hub repo id (LLaVA's --vision_tower may name one)
        try:
            return CLIPImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            pass
    return build_image_processor(config)


__all__ = [
    "EVA_CLIP_MEAN",
    "EVA_CLIP_STD",
    "IMAGE_PROCESSOR_FIELDS",
    "build_image_processor",
    "image_processor_file",
    "image_processor_settings",
    "load_image_processor",
]

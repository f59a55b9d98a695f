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


def _nested_image_processor(path: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The image processor a transformers 5 `processor.save_pretrained` nested in processor_config.json, if any."""
    file = os.path.join(path, PROCESSOR_FILE)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as handle:
        try:
            saved = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON ({error}).") from None
    nested = saved.get("image_processor") if isinstance(saved, dict) else None
    if nested is not None and not isinstance(nested, dict):
        raise ValueError(f"{file}: 'image_processor' must be an object, not {type(nested).__name__}.")
    return nested


def load_image_processor(path: Union[str, os.PathLike],
                         config: Union[EvaCLIPConfig, EvaCLIPVisionConfig]) -> CLIPImageProcessor:
    """The processor saved in a checkpoint dir, or one built from the config when the dir has none.

    Read as transformers 5 reads it, on every line: the image processor nested in processor_config.json (what 5.x's
    `processor.save_pretrained` writes) comes before preprocessor_config.json. transformers 4.37 knows only the latter,
    so a dir whose processor was re-saved on 5.x would otherwise be preprocessed with a stale or default processor
    there, silently, while 5.x uses the saved one."""
    nested = _nested_image_processor(path)
    if nested is not None:
        if os.path.isfile(os.path.join(path, IMAGE_PROCESSOR_FILE)):
            logger.info(f"{path}: using the image processor in {PROCESSOR_FILE} over {IMAGE_PROCESSOR_FILE}, "
                        "as transformers 5 does.")
        return CLIPImageProcessor.from_dict(nested)
    if os.path.isfile(os.path.join(path, IMAGE_PROCESSOR_FILE)):
        return CLIPImageProcessor.from_pretrained(path)
    return build_image_processor(config)


__all__ = ["EVA_CLIP_MEAN", "EVA_CLIP_STD", "build_image_processor", "load_image_processor"]

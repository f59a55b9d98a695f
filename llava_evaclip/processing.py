"""Image preprocessing for EVA-CLIP: OpenAI CLIP's mean/std, bicubic resize of the shortest edge, centre crop."""

from __future__ import annotations

import os
from typing import Union

from transformers import CLIPImageProcessor

from .configuration_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig

# The normalisation every EVA-CLIP release was trained with (BAAI's OPENAI_DATASET_MEAN / _STD).
EVA_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.BICUBIC


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


def load_image_processor(path: Union[str, os.PathLike], config: Union[EvaCLIPConfig, EvaCLIPVisionConfig]):
    """The processor saved in a checkpoint dir, or one built from the config when the dir has none."""
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        return CLIPImageProcessor.from_pretrained(path)
    return build_image_processor(config)


__all__ = ["EVA_CLIP_MEAN", "EVA_CLIP_STD", "build_image_processor", "load_image_processor"]

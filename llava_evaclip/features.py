"""Feature extraction at dataset scale: images -> LLaVA's visual tokens, written one file per image or into
safetensors shards with an index, resumable, over many processes (torchrun / accelerate / deepspeed env vars), and
read back with `FeatureStore`.

    from llava_evaclip.features import FeatureStore, extract_features, load_tower
    tower = load_tower("eva02-l-336/", select_layer="-2", select_feature="patch")
    for result in iter_features(tower, find_images(["images/"])[0], workers=4):
        result.item.key, result.features           # [tokens, channels], on the CPU
    extract_features(tower, ["images/"], "features/", format="shards")
    store = FeatureStore("features/"); store["cat/001.jpg"]

An output is current when its settings (model, weights fingerprint, layers, tokens, image size, dtype) equal the
run's; only missing outputs are computed, by whichever ranks run now.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import itertools
import json
import operator
import os
import pickle
import re
import signal
import stat
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from transformers.utils import logging

from ._safetensors import read_safetensors_header

logger = logging.get_logger(__name__)

FILES_FORMAT = "llava-evaclip.features/1"
SHARDS_FORMAT = "llava-evaclip.feature-shards/1"
OUTPUT_SUFFIX = ".safetensors"
INDEX_NAME = "index.json"
SHARDS_DIR = "shards"
FORMATS = ("files", "shards")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# What must agree before an existing output is accepted as this run's result (resume) or a store feeds training.
SETTING_KEYS = ("model", "weights_fingerprint", "random_weights", "select_layer", "select_feature", "image_size",
                "dtype", "image_resize")
# What must agree between a store and a LLaVA tower for the store to stand in for it (paths and dtype may differ).
TOWER_SETTING_KEYS = ("weights_fingerprint", "select_layer", "select_feature", "image_size", "image_resize")
# Recorded since outputs carry it; outputs made before lack it and are not refused for that alone.
LATER_SETTING_KEYS = ("image_resize",)
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# processor_config.json: where transformers 5 saves a processor's image processor (read before preprocessor_config.json)
FINGERPRINTED_CONFIGS = ("config.json", "preprocessor_config.json", "processor_config.json")
# The output folder takes no more data: a full disk, a quota, a file-size limit (ulimit -f, the file system's maximum).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# One image's output file cannot have its name here (too long, or characters the file system refuses): that image fails.
NAME_ERRNOS = (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ)
NAME_MAX = 255  # bytes in one path component on Linux / macOS file systems
# What this package writes in shards/ (`ShardWriter`) and the hidden temp names of every atomic write (`_temp_name`):
# only names of these shapes are ever removed.
SHARD_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}-r\d+-\d{5,}\.(safetensors|json)")
TEMP_TAIL = re.compile(r"\.\d+\.[0-9a-f]{8}\.tmp")
# Tensors per shard at most, whatever their size: each takes ~70 bytes of the shard's header, which safetensors
# refuses beyond 100 MB (a tiny tower's ~100-byte features would reach that within a default-size shard).
MAX_SHARD_TENSORS = 200_000
# Batches each decoding worker keeps ready: results arrive in order, so a worker that was descheduled for a moment
# must not leave the others idle with their queue full (2, torch's default, measurably starves a 2-core machine).
PREFETCH_BATCHES = 4


class OutputError(OSError):
    """The output folder cannot take more data (full disk, quota, unwritable): the run stops, finished outputs stay."""


class OutputNameError(OSError):
    """One image's output file cannot be created under its name (too long for the file system, refused characters):
    that image fails with this reason, the run goes on."""


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def display_path(path: str) -> str:
    """A path as valid text: bytes that are not UTF-8 (kept by Python as surrogates) are written `\\xff`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_key(path: str) -> str:
    """The key an image is stored under: its path relative to the input it came from, '/'-separated, as valid text."""
    return display_path(os.path.normpath(path)).replace(os.sep, "/")


@dataclass(frozen=True)
class ImageItem:
    """An image to process: where it is, and its key (path relative to its input; names its output)."""

    path: str
    key: str


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


NOT_A_REGULAR_FILE = "not a regular file (a named pipe, socket or device: reading it could wait forever)"


def _is_special_file(entry: Union[os.DirEntry, str]) -> bool:
    """Whether an image path names a named pipe, socket or device (symlinks followed): a FIFO in a downloaded dataset
    must not stall every rank. A regular file is told by the directory listing's file type, so a folder walk costs no
    stat per image; a path that cannot be stat'ed (a dangling symlink) is not special: opening it fails, per image."""
    try:
        if isinstance(entry, os.DirEntry) and entry.is_file():
            return False
        return not stat.S_ISREG(os.stat(entry).st_mode)
    except OSError:
        return False


def _walk(root: str, top: str, ancestors: tuple[tuple[int, int], ...], found: list[ImageItem],
          skipped: list[tuple[str, str]]) -> None:
    """Depth-first, sorted; directory symlinks are followed unless they lead back into their own ancestors."""
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as error:
        skipped.append((display_path(root), f"cannot list folder ({error.strerror or error})"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            is_dir = False
        if is_dir:
            info = os.stat(entry.path)
            identity = (info.st_dev, info.st_ino)
            if identity in ancestors:
                skipped.append((display_path(entry.path), "directory symlink loop (points to a folder above it)"))
                continue
            _walk(entry.path, top, ancestors + (identity,), found, skipped)
        elif _is_image_name(entry.name):
            if _is_special_file(entry):  # opening a FIFO named x.jpg would wait for a writer forever
                skipped.append((display_path(entry.path), NOT_A_REGULAR_FILE))
                continue
            found.append(ImageItem(entry.path, path_key(os.path.relpath(entry.path, top))))


def find_images(inputs: Iterable[str]) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """(images, skipped): files as given, folders searched recursively (directory symlinks followed, loops reported
    in `skipped`). A missing input or a folder without images is a ValueError; so are two files with one key."""
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    for entry in inputs:
        entry = os.fspath(entry)
        if not os.path.exists(entry):
            raise ValueError(f"{display_path(entry)}: no such file or directory.")
        if os.path.isdir(entry):
            found: list[ImageItem] = []
            info = os.stat(entry)
            _walk(entry, entry, ((info.st_dev, info.st_ino),), found, skipped)
            if not found:
                raise ValueError(f"{display_path(entry)}: no images found in this folder or below "
                                 f"(looked for {', '.join(IMAGE_EXTENSIONS)}).")
            items.extend(found)
        elif _is_special_file(entry):
            skipped.append((display_path(entry), NOT_A_REGULAR_FILE))
        else:
            items.append(ImageItem(entry, path_key(os.path.basename(entry))))
    return _deduplicate(items), skipped


def _deduplicate(items: list[ImageItem]) -> list[ImageItem]:
    """Drop repeats of one file under one key; two different files under one key are an error."""
    by_key: dict[str, ImageItem] = {}
    unique = []
    for item in items:
        previous = by_key.get(item.key)
        if previous is None:
            by_key[item.key] = item
            unique.append(item)
        elif os.path.realpath(previous.path) != os.path.realpath(item.path):
            raise ValueError(
                f"{display_path(previous.path)} and {display_path(item.path)} would both be saved as {item.key!r} "
                "(features are keyed by the path relative to their input); process them in separate runs with "
                "different outputs."
            )
    return unique


def open_rgb(path: str) -> Any:
    """A fully decoded RGB image, as LLaVA's `Image.open(...).convert("RGB")` gives it (transparent pixels keep their
    colour, alpha is dropped); any decoding problem becomes an OSError naming what went wrong."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise OSError(f"cannot read image ({_one_line(error)})") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Model: a tower, a converted dir or a preset
# ---------------------------------------------------------------------------------------------------------------------


def weights_fingerprint(model_dir: str) -> str:
    """A content hash of a checkpoint dir's weights and configs: equal for copies of one checkpoint, different as soon
    as any weight, the config or the preprocessing differs (mtimes and paths do not count)."""
    digest = hashlib.blake2b(digest_size=16)
    names = sorted(name for name in os.listdir(model_dir)
                   if name.endswith(WEIGHT_FILE_SUFFIXES) or name.endswith(".index.json")
                   or name in FINGERPRINTED_CONFIGS)
    for name in names:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        digest.update(f"{name}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return "blake2b:" + digest.hexdigest()


def preset_fingerprint(preset: str, config: Any, seed: int) -> str:
    """Random weights are a function of the preset's config, the seed and torch's initialisation."""
    text = f"{preset}\0{seed}\0{torch.__version__.split('+')[0]}\0{config.to_json_string(use_diff=False)}"
    return "preset:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def build_random_vision_model(config: Any, device: Union[str, torch.device] = "cpu", seed: int = 0) -> Any:
    """A vision model with reproducible random weights (never a download), created on `device` so a large preset is
    never materialised twice."""
    from .modeling_evaclip import EvaCLIPVisionModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = EvaCLIPVisionModel(config)
    return model.eval()


def load_tower(model: str, select_layer: Union[str, int] = -2, select_feature: str = "patch",
               dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu", seed: int = 0) -> Any:
    """The `EvaCLIPVisionTower` LLaVA builds from `model` (a converted dir, or a preset name: random weights from
    `seed`), ready for inference, with `feature_settings` recorded on it."""
    import argparse
    import tempfile

    from .configuration_evaclip import EvaCLIPVisionConfig
    from .presets import list_presets
    from .processing import build_image_processor
    from .tower import EvaCLIPVisionTower

    args = argparse.Namespace(mm_vision_select_layer=select_layer, mm_vision_select_feature=select_feature)
    if os.path.isdir(model):
        tower = EvaCLIPVisionTower(model, args)
        label, fingerprint, random_weights = os.path.abspath(model), weights_fingerprint(model), False
    elif model in list_presets():
        config = EvaCLIPVisionConfig.from_preset(model)
        with tempfile.TemporaryDirectory(prefix="llava-evaclip-preset-") as config_dir:
            config.save_pretrained(config_dir)
            tower = EvaCLIPVisionTower(config_dir, args, delay_load=True)
        tower.vision_tower_name = model
        tower.image_processor = build_image_processor(config)
        tower.vision_tower = build_random_vision_model(config, device, seed).requires_grad_(False)
        tower.is_loaded = True
        label, fingerprint, random_weights = model, preset_fingerprint(model, config, seed), True
    else:
        raise ValueError(f"{model!r} is neither a checkpoint directory nor a preset name ({', '.join(list_presets())}).")
    tower = tower.to(device=device, dtype=dtype).eval()
    tower.feature_settings = {"model": label, "weights_fingerprint": fingerprint,
                              "random_weights": "true" if random_weights else "false"}
    return tower


def tower_settings(tower: Any) -> dict[str, str]:
    """The settings an output made by `tower` records (and resume / training compare): see SETTING_KEYS."""
    from .processing import takes_tensors

    recorded = dict(getattr(tower, "feature_settings", None) or {})
    if "weights_fingerprint" not in recorded:
        name = getattr(tower, "vision_tower_name", "")
        recorded.update(model=os.path.abspath(name) if os.path.isdir(name) else name,
                        weights_fingerprint=weights_fingerprint(name) if os.path.isdir(name) else "unknown",
                        random_weights="false")
    return {
        **recorded,
        "select_layer": _layer_text(tower),
        "select_feature": tower.select_feature,
        "image_size": str(tower.input_size),
        "dtype": str(tower.dtype).replace("torch.", ""),
        # transformers 5's CLIPImageProcessor (and 4.x's *Fast) resize with torchvision, transformers 4's (LLaVA's pin)
        # with PIL: up to ~30 grey levels apart at sharp edges (text, line art), so a store made with one is not the
        # other's.
        "image_resize": "torchvision" if takes_tensors(getattr(tower, "image_processor", None))
        else "pil",
    }


def _layer_text(tower: Any) -> str:
    """`select_layer` as written: "-2", or "-2,-5" for several."""
    value = tower.select_layer
    if isinstance(value, (list, tuple)):
        return ",".join(str(int(part)) for part in value)
    return ",".join(part.strip() for part in str(value).split(","))


def settings_differences(recorded: dict[str, str], expected: dict[str, str],
                         keys: Sequence[str] = SETTING_KEYS, label: str = "now") -> list[str]:
    """What differs between two settings, as "key 'recorded' (now 'expected')". The model's path is informational
    once both record one known weights fingerprint: a copy or a symlink of one checkpoint makes the same features."""
    same_weights = (recorded.get("weights_fingerprint") not in (None, "unknown")
                    and recorded.get("weights_fingerprint") == expected.get("weights_fingerprint"))
    return [f"{key} {recorded.get(key)!r} ({label} {expected.get(key)!r})" for key in keys
            if recorded.get(key) != expected.get(key) and not (key == "model" and same_weights)
            and not (key in LATER_SETTING_KEYS and (key not in recorded or key not in expected))]


def _adopt_later_settings(settings: dict[str, str], other: dict[str, str]) -> bool:
    """Copy into a store's `settings` the LATER_SETTING_KEYS it lacks and `other` records (True if any): outputs made
    before a key existed are checked against neither value, so without this a store whose first outputs lack it takes
    later ones of both values (a pre-image_resize store resumed on each transformers line mixes the two resizes)."""
    added = {key: other[key] for key in LATER_SETTING_KEYS if key in other and key not in settings}
    settings.update(added)
    return bool(added)


def _log_model_path(recorded: dict[str, str], expected: dict[str, str], where: str) -> None:
    """Say so when existing outputs are resumed with the same weights loaded from another path."""
    if recorded.get("model") != expected.get("model") and not settings_differences(recorded, expected, ("model",)):
        logger.warning("%s was made from %s; this run loads %s, which has the same weights fingerprint (%s): resuming.",
                       where, recorded.get("model"), expected.get("model"), expected.get("weights_fingerprint"))


# ---------------------------------------------------------------------------------------------------------------------
# Decoding in DataLoader workers and the forward pass
# ---------------------------------------------------------------------------------------------------------------------


def _channel_first(image: Any) -> torch.Tensor:
    """An RGB PIL image as a [3, H, W] uint8 tensor: PIL's band split is half the cost of the processor's own strided
    HWC -> CHW copy, the bytes are the same."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


def _tensor_equivalent(image: Any) -> bool:
    """Whether the processor sees the same pixels in `image` as in its bytes alone: a plain RGB image. PIL keeps a
    palette or grey image's transparent colour in `info["transparency"]` through `convert("RGB")`, and transformers
    5's `convert_to_rgb` composites that colour onto white when handed the PIL image (transformers 4 ignores it), so
    such an image must reach the processor as the PIL image LLaVA hands it."""
    return image.mode == "RGB" and image.info.get("transparency") is None


# The most pixels an image may have after the processor's shortest-edge resize (before its crop): a 1 x 20000 strip
# resized to a 224 px short side holds 10^9 pixels, several GiB in each decoding worker, enough to get a long run
# killed for lack of memory. 2^28 allows aspect ratios up to ~5,000:1 at 224 px, ~1,300:1 at 448 px.
MAX_RESIZED_PIXELS = 2**28


def _check_resized_size(processor: Any, image: Any) -> None:
    """Refuse (OSError: that image fails, the run goes on) an image the shortest-edge resize would blow up past
    `MAX_RESIZED_PIXELS`."""
    size = getattr(processor, "size", None)
    short_side = size.get("shortest_edge") if hasattr(size, "get") else None  # a dict, or transformers 5's SizeDict
    if not short_side or not getattr(processor, "do_resize", True):
        return
    short, long = sorted((image.width, image.height))
    resized = short_side * short_side * long / max(short, 1)
    if resized > MAX_RESIZED_PIXELS:
        raise OSError(
            f"image too elongated ({image.width}x{image.height}): resizing its short side to {short_side} px would "
            f"give {resized / 1e6:.0f} million pixels before the crop (at most {MAX_RESIZED_PIXELS / 1e6:.0f} "
            "million); crop or pad it first"
        )


def _run_processor(processor: Any, image: Any, tensor_input: bool, **overrides: Any) -> torch.Tensor:
    """The processor's `pixel_values[0]` for one decoded RGB image (`overrides` switch steps off)."""
    _check_resized_size(processor, image)
    if tensor_input and _tensor_equivalent(image):
        batch = processor([_channel_first(image)], input_data_format="channels_first", return_tensors="pt",
                          **overrides)
    else:
        batch = processor([image], return_tensors="pt", **overrides)  # as LLaVA's dataset calls it
    return batch["pixel_values"][0]


# Steps the workers leave to `_BatchNormaliser`: they then ship uint8 crops, a quarter of the float32 bytes.
_BATCH_STEPS_OFF = {"do_rescale": False, "do_normalize": False}


def _probe_image() -> Any:
    """A 16x16 RGB image holding every byte value once in each channel (in a different order per channel)."""
    import numpy as np
    from PIL import Image

    values = np.arange(256, dtype=np.uint8)
    channels = [np.roll(values, 85 * channel).reshape(16, 16) for channel in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1), mode="RGB")


class _BatchNormaliser:
    """The processor's rescale + normalize, run on a whole batch of uint8 crops in the main process.

    Only for processors whose two steps are per-pixel functions of (channel, value) in a known order: transformers
    4's numpy CLIPImageProcessor (uint8 * factor in float64, cast to float32, then (x - mean) / std in float32) and
    transformers 5's CLIPImageProcessor (its own fused `rescale_and_normalize`) and CLIPImageProcessorPil (numpy, as
    transformers 4). Exactness is proved rather than assumed: every (channel, value) pair is run through the processor
    per image and through this batch path (`exact_on`, on each device used); any difference and it is not used.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        from .processing import takes_tensors

        self.tensor_input = takes_tensors(processor)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(-1, 1, 1)
        # float32 division by 1 / factor equals numpy's float64 product cast to float32 for 1/255 (and is 10x
        # cheaper); the float64 product itself is the fallback.
        self.float64_rescale = False
        self._exact: dict[str, bool] = {}

    @classmethod
    def for_processor(cls, processor: Any) -> Optional["_BatchNormaliser"]:
        """A normaliser equal to `processor`'s own steps on the CPU, or None (the workers then run the processor
        whole)."""
        import transformers

        supported = tuple(getattr(transformers, name) for name in ("CLIPImageProcessor", "CLIPImageProcessorPil")
                          if hasattr(transformers, name))
        if type(processor) not in supported or not (processor.do_rescale or processor.do_normalize):
            return None
        try:
            normaliser = cls(processor)
            for float64_rescale in ((False, True) if not normaliser.tensor_input and processor.do_rescale
                                    else (False,)):
                normaliser.float64_rescale = float64_rescale
                normaliser._exact.clear()
                if normaliser.exact_on(torch.device("cpu")):
                    return normaliser
        except Exception as error:  # an unusual configuration (mean of another length, ...): the per-image path
            logger.debug("Images are normalised one by one: %s", _one_line(error))
        return None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] uint8 crops -> float32 pixel values, on the crops' device."""
        processor = self.processor
        if self.tensor_input:
            return processor.rescale_and_normalize(pixels, processor.do_rescale, processor.rescale_factor,
                                                   processor.do_normalize, _hashable(processor.image_mean),
                                                   _hashable(processor.image_std))
        device = pixels.device
        if processor.do_rescale and self.float64_rescale:
            pixels = pixels.to(torch.float64).mul_(processor.rescale_factor).to(torch.float32)
        elif processor.do_rescale:  # a divisor on the device: CUDA multiplies by the reciprocal of a CPU scalar
            pixels = pixels.to(torch.float32).div_(torch.tensor([1 / processor.rescale_factor], device=device))
        else:
            pixels = pixels.to(torch.float32)
        if processor.do_normalize:
            pixels = pixels.sub_(self.mean.to(device)).div_(self.std.to(device))
        return pixels

    def exact_on(self, device: torch.device) -> bool:
        """Whether this batch path gives the processor's bits for every (channel, value) on `device`."""
        key = str(device)
        if key not in self._exact:
            image = _probe_image()
            steps = {"do_resize": False, "do_center_crop": False}
            expected = _run_processor(self.processor, image, self.tensor_input, **steps)
            crops = _run_processor(self.processor, image, self.tensor_input, **steps, **_BATCH_STEPS_OFF)
            got = self(crops[None].to(device)).cpu()[0] if crops.dtype == torch.uint8 else None
            self._exact[key] = got is not None and got.dtype == expected.dtype and torch.equal(got, expected)
        return self._exact[key]


def _hashable(value: Any) -> Any:
    """Lists as tuples: transformers 5 caches the fused mean and std per argument."""
    return tuple(value) if isinstance(value, list) else value


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses one image per item; a broken image yields its reason instead of raising, so it never
    kills a worker. Each item also carries the CPU seconds it took, which `iter_features` uses to leave the decoding
    workers their cores.

    With a processor `_BatchNormaliser` supports, an item is the uint8 crop (resize and centre crop only) and
    `finish` rescales and normalises the whole batch at once in the main process: a quarter of the bytes to move
    between processes, and one vectorised pass instead of one per image, with the processor's bits."""

    def __init__(self, items: Sequence[ImageItem], processor: Any) -> None:
        self.items = list(items)
        self.processor = processor
        from .processing import takes_tensors

        self.tensor_input = takes_tensors(processor)
        self.normaliser = _BatchNormaliser.for_processor(processor)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Optional[torch.Tensor], str, float]:
        started = time.process_time()
        try:
            image = open_rgb(self.items[index].path)
            pixels = self.preprocess(image)
            return index, pixels, f"{image.width}x{image.height}", time.process_time() - started
        except Exception as error:  # PIL and the processor raise many types for broken inputs
            reason = str(error) if isinstance(error, OSError) else f"cannot preprocess ({_one_line(error)})"
            return index, None, reason, time.process_time() - started

    def preprocess(self, image: Any) -> torch.Tensor:
        """LLaVA's preprocessing of one decoded RGB image, the processor's `pixel_values[0]`; only up to the crop
        (uint8) when `finish` does the rest.

        A result without 3 channels fails that image: transformers 4's processor takes an image 1 pixel high
        (a 1x1 spacer, a 640x1 rule) for channels-first with one channel, where LLaVA's dataset then fails in its
        normalize; with normalisation left to `finish`, that crop would instead end the whole run in the collate."""
        pixels = _run_processor(self.processor, image, self.tensor_input,
                                **(_BATCH_STEPS_OFF if self.normaliser is not None else {}))
        if pixels.ndim != 3 or pixels.shape[0] != 3:  # `open_rgb`'s three bands
            raise ValueError(
                f"the image processor gives a {pixels.shape[0] if pixels.ndim == 3 else '?'}-channel result, not 3, "
                f"for this {image.width}x{image.height} image (transformers 4 reads an image 1 pixel high as "
                "channels-first; LLaVA's dataset fails on it too)")
        return pixels

    def finish(self, pixels: torch.Tensor, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """A collated batch of `preprocess` results as the processor's pixel values, on `device` (normalised there
        when that is exact on it, so a GPU is sent the uint8 crops)."""
        device = torch.device(device)
        if self.normaliser is None:
            return pixels.to(device, non_blocking=True)
        if self.normaliser.exact_on(device):
            return self.normaliser(pixels.to(device, non_blocking=True))
        return self.normaliser(pixels).to(device, non_blocking=True)


def _collate(samples: list[tuple[int, Optional[torch.Tensor], str, float]]) -> dict[str, Any]:
    good = [sample for sample in samples if sample[1] is not None]
    return {
        "indices": [sample[0] for sample in good],
        # default_collate stacks straight into shared memory inside a worker: the batch is not copied again to cross
        # to the main process (uint8 crops when `ImageDataset.finish` normalises).
        "pixel_values": torch.utils.data.default_collate([sample[1] for sample in good]) if good else None,
        "sizes": [sample[2] for sample in good],
        "failed": [(sample[0], sample[2]) for sample in samples if sample[1] is None],
        "decode_seconds": sum(sample[3] for sample in samples),
    }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # each worker decodes on one core
    # A SIGTERM sent to the whole process group (Slurm's scancel, `kill -TERM -- -PGID`) reaches the decoding workers
    # too: by default it kills them, and torch's SIGCHLD handler then raises "DataLoader worker ... is killed by
    # signal" in the main process, over its own orderly stop (a traceback and exit 1 instead of one line and 143).
    # The main process ends its workers itself when it stops (and they exit when it is gone). SIGHUP (the terminal
    # went away) reaches the whole group too.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.excepthook = functools.partial(_quiet_handover_errors, sys.excepthook)


def _quiet_handover_errors(previous: Callable[..., None], kind: type, error: BaseException, trace: Any) -> None:
    """A worker's `sys.excepthook`: a worker hands each batch's shared memory to the main process through
    multiprocessing's resource sharer thread, which reports through `sys.excepthook` the ConnectionResetError of a
    main process that stopped (Ctrl-C, SIGTERM) in the middle of a handover; that is the expected end of the run,
    not an error to print as a traceback."""
    frames, step = [], trace
    while step is not None:
        frames.append(os.path.basename(step.tb_frame.f_code.co_filename))
        step = step.tb_next
    if issubclass(kind, (ConnectionError, EOFError)) and "resource_sharer.py" in frames:
        return
    previous(kind, error, trace)


class _ThreadShare:
    """The main process's intra-op threads while workers decode: the cores the workers are not using.

    With the model in the main process at its usual thread count, its OpenMP threads and the decoding workers
    oversubscribe the cores (and idle OpenMP threads spin), so a model faster than decoding waits on its own threads
    while the workers lose their cores. Every `WINDOW_S` the workers' CPU seconds per wall second (the cores decoding
    takes) are subtracted from the thread count the caller had; a model slower than decoding (workers mostly idle)
    keeps all its threads. The caller's count is restored at the end. Thread counts do not change the features.
    """

    WINDOW_S = 0.25

    def __init__(self, workers: int) -> None:
        self.initial = torch.get_num_threads()
        self.active = workers > 0 and self.initial > 1
        self.window_start, self.decode_seconds = time.perf_counter(), 0.0

    def update(self, decode_seconds: float) -> None:
        if not self.active:
            return
        self.decode_seconds += decode_seconds
        elapsed = time.perf_counter() - self.window_start
        if elapsed < self.WINDOW_S:
            return
        threads = self.threads_for(self.decode_seconds / elapsed)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        self.window_start, self.decode_seconds = time.perf_counter(), 0.0

    def threads_for(self, decode_cores: float) -> int:
        """The caller's threads less the cores decoding takes, rounded, at least 1."""
        return min(self.initial, max(1, int(self.initial - decode_cores + 0.5)))

    def restore(self) -> None:
        if self.active and torch.get_num_threads() != self.initial:
            torch.set_num_threads(self.initial)


@dataclass
class Extracted:
    """One image's result: `features` [tokens, channels] on the CPU, or `error` saying why it was skipped."""

    item: ImageItem
    features: Optional[torch.Tensor] = None
    original_size: str = ""
    error: Optional[str] = None


def iter_features(tower: Any, items: Sequence[ImageItem], batch_size: int = 8, workers: int = 0) -> Iterator[Extracted]:
    """Run `tower` over `items` in batches, decoding in `workers` DataLoader processes (pinned memory on CUDA), and
    yield each image's features in order (failures included, never raised). While workers decode, the main process
    uses only the intra-op threads they leave free (see `_ThreadShare`); the caller's thread count is restored."""
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}.")
    if not items:
        return
    device, dtype = tower.device, tower.dtype
    dataset = ImageDataset(items, tower.image_processor)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None,
        prefetch_factor=PREFETCH_BATCHES if workers else None,
    )
    threads = _ThreadShare(workers)
    try:
        for batch in loader:
            threads.update(batch["decode_seconds"])
            for index, reason in batch["failed"]:
                yield Extracted(items[index], error=reason)
            if batch["pixel_values"] is None:
                continue
            with torch.no_grad():
                features = tower(dataset.finish(batch["pixel_values"], device).to(dtype=dtype))
            features = features.to("cpu")
            for position, index in enumerate(batch["indices"]):
                yield Extracted(items[index], features[position].clone(), batch["sizes"][position])
    finally:
        threads.restore()


# ---------------------------------------------------------------------------------------------------------------------
# Writing: umask-following atomic files, one file per image or shards with index fragments
# ---------------------------------------------------------------------------------------------------------------------


def _fsync_folder(directory: str) -> None:
    """Make a rename in `directory` durable, where the system lets a folder be synced (not on file systems that refuse
    (EINVAL), nor in a folder this user may write but not read)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except PermissionError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(descriptor)


def _write_file(path: str, data: bytes, made_folders: Optional[set[str]] = None, durable: bool = False) -> None:
    """Write `data` to `path` through a hidden temp file and a rename; permissions follow the umask (0644 under
    umask 022). A full disk or quota raises OutputError; the temp file is removed and `path` is left as it was.
    `made_folders` (the folders this writer made or found already) spares a mkdir and a stat per file: on a network
    file system, two of the six round trips of each image's output; a folder removed meanwhile is made again.
    `durable` syncs the data before the rename and the folder after it, for the files other files point to (a shard
    before the fragment that names it): after a machine crash a name then never points to data the disk lost. Per-image
    files are not synced (one sync per image; a file cut short is refused on resume by its header's length)."""
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, _temp_name(os.path.basename(path)))
    try:
        if made_folders is None or directory not in made_folders:
            os.makedirs(directory, exist_ok=True)
        try:
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileNotFoundError:
            if made_folders is None or directory not in made_folders:
                raise
            os.makedirs(directory, exist_ok=True)  # removed since this writer made it
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        if made_folders is not None:
            made_folders.add(directory)
        try:
            view = memoryview(data)
            while view:
                view = view[_write_chunk(descriptor, view):]
            if durable:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temp, path)
        if durable:
            _fsync_folder(directory)
    except BaseException as error:
        if os.path.exists(temp):
            os.remove(temp)
        if isinstance(error, OSError) and not isinstance(error, OutputError) and (
                error.errno in NO_SPACE_ERRNOS or error.errno in (errno.EACCES, errno.EROFS)):
            hint = (" (a file-size limit: `ulimit -f` or the file system's maximum; a smaller --shard-size may fit)"
                    if error.errno == errno.EFBIG else "")
            raise OutputError(error.errno, f"cannot write {display_path(path)}: {os.strerror(error.errno)}{hint}"
                              ) from None
        raise


def _temp_name(name: str) -> str:
    """The hidden temp name `.<name>.<pid>.<8 hex>.tmp` an atomic write of `name` goes through, with `name` cut short
    so the whole stays within NAME_MAX bytes (a name that fits must not fail because of its temp name)."""
    tail = f".{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    stem = os.fsencode(name)[: NAME_MAX - 1 - len(tail)].decode("utf-8", "ignore")
    return f".{stem}{tail}"


def _temp_stem(name: str) -> Optional[tuple[str, bool]]:
    """(the name a `_temp_name` stands for, whether it was cut short), or None for any other name."""
    match = TEMP_TAIL.search(name)
    if not name.startswith(".") or match is None or match.end() != len(name):
        return None
    stem = name[1: match.start()]
    return stem, len(os.fsencode(stem)) >= NAME_MAX - 1 - len(match.group()) - 3  # cut maybe mid-character


def _is_temp_of(name: str, final_names: Any) -> bool:
    """Whether `name` is a `_temp_name` of one of `final_names` (a set of file names in the same folder)."""
    found = _temp_stem(name)
    if found is None:
        return False
    stem, cut = found
    return stem in final_names or (cut and any(final.startswith(stem) for final in final_names))


def remove_stale_temp_files(out_dir: str, items: Sequence[ImageItem]) -> int:
    """Remove the temp files a killed `--format files` run left beside the outputs of `items` (only temp names of
    those outputs, never anything else); returns how many. Run before any rank writes."""
    by_folder: dict[str, set[str]] = {}
    for item in items:
        path = output_path(out_dir, item.key)
        by_folder.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    removed = 0
    for folder, names in by_folder.items():
        try:
            entries = [name for name in os.listdir(folder) if name.startswith(".") and name.endswith(".tmp")]
        except OSError:  # not created yet
            continue
        for name in entries:
            if _is_temp_of(name, names):
                try:
                    os.remove(os.path.join(folder, name))
                    removed += 1
                except OSError:
                    pass
    if removed:
        logger.warning("Removed %d temp file(s) an interrupted run left in %s.", removed, display_path(out_dir))
    return removed


def _write_chunk(descriptor: int, view: memoryview) -> int:
    return os.write(descriptor, view[: 1 << 26])


def check_writable(out_dir: str) -> None:
    """Create `out_dir` if needed and prove a file can be created in it, before any model is loaded."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{display_path(out_dir)} exists and is not a directory.")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise ValueError(f"{display_path(out_dir)} is a symlink to {display_path(os.readlink(out_dir))}, which does "
                         "not exist; create that folder or use another output folder.")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"cannot write to {display_path(out_dir)}: {error.strerror or error}.") from None


def output_path(out_dir: str, key: str) -> str:
    return os.path.join(out_dir, *key.split("/")) + OUTPUT_SUFFIX


def _metadata(settings: dict[str, str], result: Extracted) -> dict[str, str]:
    from . import __version__

    metadata = {
        "format": FILES_FORMAT,
        **settings,
        "source": display_path(os.path.abspath(result.item.path)),
        "relative_path": result.item.key,
        "original_size": result.original_size,
        "num_tokens": str(result.features.shape[0]),
        "hidden_size": str(result.features.shape[-1]),
        "llava_evaclip_version": __version__,
    }
    if settings.get("random_weights") == "true":
        metadata["warning"] = "RANDOM weights from a preset: not a trained model"
    return metadata


class FileWriter:
    """One `<key>.safetensors` per image, each with its settings and image metadata."""

    def __init__(self, out_dir: str, settings: dict[str, str]) -> None:
        self.out_dir, self.settings = out_dir, settings
        self.written = 0  # images whose file is complete
        self.folders: set[str] = set()  # made or found: not made again for every image (see `_write_file`)

    def add(self, result: Extracted) -> None:
        from safetensors.torch import save

        data = save({"features": result.features.contiguous()}, _metadata(self.settings, result))
        path = output_path(self.out_dir, result.item.key)
        try:
            _write_file(path, data, self.folders)
        except OSError as error:
            if isinstance(error, OutputError) or error.errno not in NAME_ERRNOS:
                raise
            name = os.path.basename(path)
            size = f"{len(os.fsencode(name))}-byte " if error.errno == errno.ENAMETOOLONG else ""
            raise OutputNameError(error.errno, f"cannot write its features as {size}file name {name!r} "
                                  f"({os.strerror(error.errno)}; --format shards keeps names in its index)") from None
        self.written += 1

    def close(self) -> None:
        pass


class ShardWriter:
    """Buffers features and writes a shard of about `shard_size_mb` at a time: the shard file first, then its index
    fragment (which is what makes its entries count), both atomically; a killed rank loses only its open buffer."""

    def __init__(self, out_dir: str, settings: dict[str, str], shard_size_mb: float, rank: int = 0) -> None:
        self.directory = os.path.join(out_dir, SHARDS_DIR)
        self.settings = settings
        self.limit = max(1, int(shard_size_mb * 1e6))
        self.prefix = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-r{rank}"
        self.count = 0
        self.written = 0  # images in shards whose fragment is written (they count; the buffer does not yet)
        self.buffer: list[Extracted] = []
        self.size = 0

    def add(self, result: Extracted) -> None:
        self.buffer.append(result)
        self.size += result.features.numel() * result.features.element_size()
        if self.size >= self.limit or len(self.buffer) >= MAX_SHARD_TENSORS:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save

        if not self.buffer:
            return
        name = f"{self.prefix}-{self.count:05d}{OUTPUT_SUFFIX}"
        tensors = {f"t{position}": result.features.contiguous() for position, result in enumerate(self.buffer)}
        entries = {
            result.item.key: {"shard": name, "tensor": f"t{position}", "shape": list(result.features.shape),
                              "dtype": str(result.features.dtype).replace("torch.", ""),
                              "original_size": result.original_size,
                              "source": display_path(os.path.abspath(result.item.path))}
            for position, result in enumerate(self.buffer)
        }
        _write_file(os.path.join(self.directory, name), save(tensors, {"format": SHARDS_FORMAT}), durable=True)
        fragment = {"format": SHARDS_FORMAT, "settings": self.settings, "shard": name, "entries": entries}
        _write_file(os.path.join(self.directory, name[: -len(OUTPUT_SUFFIX)] + ".json"),
                    json.dumps(fragment, separators=(",", ":")).encode(), durable=True)
        self.count += 1
        self.written += len(self.buffer)
        self.buffer, self.size = [], 0

    def close(self) -> None:
        self.flush()


def merge_index(out_dir: str) -> None:
    """Fold every index fragment into `index.json` (atomically) and drop shards no fragment names (a killed run's).

    The index of a 600K-image store is ~130 MB of JSON: it is rewritten only when there is a fragment to fold in (a
    resumed run with nothing to compute leaves it as it is), with json's C encoder (`indent` selects the pure-Python
    one, 2.5x slower; readers parse either)."""
    from . import __version__

    store, entries = FeatureStore._unpacked(out_dir)
    if store._unmerged or not store._indexed:
        index = {"format": SHARDS_FORMAT, "settings": store.settings, "llava_evaclip_version": __version__,
                 "fragments": sorted(store._fragments), "entries": dict(sorted(entries.items()))}
        _write_file(os.path.join(out_dir, INDEX_NAME), json.dumps(index, separators=(",", ":")).encode(),
                    durable=True)
    directory = os.path.join(out_dir, SHARDS_DIR)
    used = {entry["shard"] for entry in entries.values()} | {
        name[: -len(".json")] + OUTPUT_SUFFIX for name in store._fragments}
    for name in os.listdir(directory):  # only what ShardWriter writes: a user's own files stay
        temp = _temp_stem(name)
        if (SHARD_NAME.fullmatch(name) and name.endswith(OUTPUT_SUFFIX) and name not in used) or (
                temp is not None and SHARD_NAME.fullmatch(temp[0])):
            os.remove(os.path.join(directory, name))
    for name in os.listdir(out_dir):  # an index write that was interrupted
        if _is_temp_of(name, {INDEX_NAME}):
            os.remove(os.path.join(out_dir, name))


# ---------------------------------------------------------------------------------------------------------------------
# Reading: FeatureStore
# ---------------------------------------------------------------------------------------------------------------------


_NO_FIELD = object()  # what an entry without a field has in its column while the table is built


class EntryTable:
    """A feature store's index entries (key -> dict of fields) packed into a few flat buffers: the keys as one sorted
    UTF-8 blob with offsets (looked up by bisection), each field as one id per entry into a blob of that field's
    distinct values.

    Why not a dict of dicts: that takes ~800 bytes and seven Python objects per entry (~500 MB for a 600K-image store)
    in every process that opens the store, and each forked DataLoader worker reading it copies the pages it touches (a
    read writes the entry's reference count, the cyclic GC writes every dict's header): a training rank with 4 workers
    held 5 copies. A buffer is one object whatever its length, and reads leave its pages shared."""

    _ABSENT = -1

    def __init__(self, entries: dict[str, dict[str, Any]]) -> None:
        """Built with C-level passes (map, dict.fromkeys, str.join): a Python loop per entry and field would double
        the time a 600K-entry index takes to open."""
        keys = sorted(entries)  # str order is the UTF-8 byte order `row` bisects in
        self._keys, self._key_offsets = _pack_text(keys)
        rows = list(map(entries.__getitem__, keys))
        # field -> (value id per row, its distinct values packed, their offsets, whether they are all strings)
        self._fields: dict[str, tuple[array.array, bytes, array.array, bool]] = {}
        for name in sorted(set().union(*rows)):
            values = list(map(operator.methodcaller("get", name, _NO_FIELD), rows))
            is_text = set(map(type, values)) <= {str, type(_NO_FIELD)}
            # Equal tokens for equal values only: a string stands for itself, another JSON value for its repr (1, 1.0
            # and true differ; no JSON value's repr is the sentinel's).
            tokens = values if is_text else list(map(repr, values))
            absent = _NO_FIELD if is_text else repr(_NO_FIELD)
            distinct = dict.fromkeys(tokens)
            distinct.pop(absent, None)
            if is_text:
                value_blob, value_offsets = _pack_text(list(distinct))
            else:
                value_of = dict(zip(tokens, values))
                value_blob, value_offsets = _pack_text([json.dumps(value_of[token]) for token in distinct])
            for position, token in enumerate(distinct):
                distinct[token] = position
            distinct[absent] = self._ABSENT
            code = "i" if len(distinct) < 2**31 else "q"  # 4 bytes a row
            self._fields[name] = (array.array(code, map(distinct.__getitem__, tokens)), value_blob, value_offsets,
                                  is_text)

    def __len__(self) -> int:
        return len(self._key_offsets) - 1

    def key(self, row: int) -> str:
        return self._keys[self._key_offsets[row] : self._key_offsets[row + 1]].decode("utf-8", "surrogatepass")

    def keys(self) -> Iterator[str]:
        """Every key, in sorted order."""
        return (self.key(row) for row in range(len(self)))

    def row(self, key: str) -> Optional[int]:
        """The row of `key`, or None (bisection over the sorted key blob)."""
        target, keys, offsets = _encode_text(key), self._keys, self._key_offsets
        low, high = 0, len(self)
        while low < high:
            middle = (low + high) // 2
            if keys[offsets[middle] : offsets[middle + 1]] < target:
                low = middle + 1
            else:
                high = middle
        if low < len(self) and keys[offsets[low] : offsets[low + 1]] == target:
            return low
        return None

    def rows(self, keys: Iterable[str]) -> list[Optional[int]]:
        """`row` of each key: by bisection (~6 us a key) for fewer than an eighth of the entries, else through one
        transient dict of all keys (~1 us an entry to build: 0.5 s at 600K, too much for a `missing([key])`)."""
        keys = list(keys)
        if len(keys) * 8 < len(self):
            return list(map(self.row, keys))
        lookup = dict(zip(self.keys(), itertools.count()))
        return list(map(lookup.get, keys))

    def value(self, row: int, name: str, default: Any = None) -> Any:
        field = self._fields.get(name)
        if field is None or field[0][row] == self._ABSENT:
            return default
        return self._decode(field, field[0][row])

    @staticmethod
    def _decode(field: tuple[array.array, bytes, array.array, bool], value_id: int) -> Any:
        _, blob, offsets, is_text = field
        data = blob[offsets[value_id] : offsets[value_id + 1]]
        return data.decode("utf-8", "surrogatepass") if is_text else json.loads(data)

    def entry(self, row: int) -> dict[str, Any]:
        """The fields of `row`'s entry, as they were given."""
        return {name: self._decode(field, field[0][row])
                for name, field in self._fields.items() if field[0][row] != self._ABSENT}

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return ((self.key(row), self.entry(row)) for row in range(len(self)))

    def distinct(self, name: str) -> set[Any]:
        """The values field `name` takes over all entries (hashable ones: strings, numbers, None)."""
        field = self._fields.get(name)
        if field is None:
            return set()
        return {self._decode(field, value_id) for value_id in set(field[0]) if value_id != self._ABSENT}


def _encode_text(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # json reads a "\udcff" escape as a lone surrogate


def _pack_text(texts: list[str]) -> tuple[bytes, array.array]:
    """`texts` as one UTF-8 blob, and the len(texts) + 1 offsets that cut it apart again (ASCII, the usual case, is
    encoded in one call)."""
    joined = "".join(texts)
    if joined.isascii():
        return joined.encode("ascii"), array.array("q", itertools.accumulate(map(len, texts), initial=0))
    encoded = [_encode_text(text) for text in texts]
    return b"".join(encoded), array.array("q", itertools.accumulate(map(len, encoded), initial=0))


def is_shard_store(directory: str) -> bool:
    """Whether `directory` holds a shard store, told by what only the shard writer makes: an index.json of its format,
    or shards/ holding a shard or fragment name of its pattern (a run that never merged its index). A user's folder
    named `shards` in a `--format files` store holds neither."""
    try:
        with open(os.path.join(directory, INDEX_NAME), "rb") as handle:
            if SHARDS_FORMAT.encode() in handle.read(4096):  # "format" is the index's first key
                return True
    except OSError:
        pass
    try:
        names = os.listdir(os.path.join(directory, SHARDS_DIR))
    except OSError:
        return False
    return any(SHARD_NAME.fullmatch(name) for name in names)


class FeatureStore:
    """Features written by `llava-evaclip features` (either format), by image key: `store[key]`, `len(store)`,
    iteration over keys, `missing(keys)`, `settings`, `verify()`. Shards are memory-mapped (safetensors `safe_open`).

    A files store holds the .safetensors files whose metadata says `llava-evaclip features` wrote them (others in the
    folder, a checkpoint or an adapter, are ignored with a warning) and they must agree on their settings: a folder
    mixing two models is a ValueError, as a shard store's fragments of other settings are."""

    def __init__(self, directory: Union[str, os.PathLike]) -> None:
        self._entries = EntryTable(self._read(directory))

    @classmethod
    def _unpacked(cls, directory: Union[str, os.PathLike]) -> tuple["FeatureStore", dict[str, dict[str, Any]]]:
        """The store's settings and fragments, and its entries as json read them, without building the table (what
        `merge_index` writes back as they are)."""
        store = cls.__new__(cls)
        return store, store._read(directory)

    def _read(self, directory: Union[str, os.PathLike]) -> dict[str, dict[str, Any]]:
        # absolute (symlinks kept): shards and files are opened on first read, which may come after a chdir
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise ValueError(f"{display_path(self.directory)} is not a feature store directory.")
        self.format = "shards" if is_shard_store(self.directory) else "files"
        self.unreadable: list[tuple[str, str]] = []  # .safetensors files of a files store that cannot be read
        self._fragments: list[str] = []
        self._indexed = False  # an index.json was read
        self._unmerged = 0  # fragments in shards/ that index.json does not hold yet
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()
        self.settings: dict[str, str] = {}
        return self._read_index() if self.format == "shards" else self._scan_files()

    def _read_index(self) -> dict[str, dict[str, Any]]:
        """The entries of index.json, then of the fragments it does not hold yet (a later one replaces a key's)."""
        entries: dict[str, dict[str, Any]] = {}
        merged: set[str] = set()
        index_path = os.path.join(self.directory, INDEX_NAME)
        if os.path.isfile(index_path):
            remedy = "remove it and rerun: the index is rebuilt from the shards' fragments (shards/*.json)"
            index = self._load_json(index_path, remedy)
            self._check_format(index, index_path, remedy)
            self.settings = index["settings"]
            entries = index["entries"]
            # none listed (as `_check_format` lets pass): every fragment is read again, as without an index
            merged = set(index.get("fragments", []))
            self._fragments.extend(index.get("fragments", []))
            self._indexed = True
        directory = os.path.join(self.directory, SHARDS_DIR)
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for name in names:  # fragments of runs not merged yet (a killed run's finished shards count)
            if not name.endswith(".json") or name.startswith(".") or name in merged:
                continue
            path = os.path.join(directory, name)
            remedy = "remove it and the shard of the same name to recompute their images"
            fragment = self._load_json(path, remedy)
            self._check_format(fragment, path, remedy)
            differences = settings_differences(fragment["settings"], self.settings) if self.settings else []
            if differences:
                raise ValueError(f"{display_path(path)} was made with other settings than the rest of the store: "
                                 f"{', '.join(differences)}.")
            self.settings = self.settings or fragment["settings"]
            _adopt_later_settings(self.settings, fragment["settings"])
            entries.update(fragment["entries"])
            self._fragments.append(name)
            self._unmerged += 1
        return entries

    @staticmethod
    def _load_json(path: str, remedy: str) -> Any:
        """A JSON file of the store, or a ValueError naming it and what to do (its own writes are atomic: a damaged
        one was damaged by something else)."""
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{display_path(path)} is damaged (not valid JSON: {error}); {remedy}.") from None

    @staticmethod
    def _check_format(data: Any, path: str, remedy: str) -> None:
        """An index or fragment of this format whose parts have the types its writer gives them: an edited one is a
        ValueError naming it, not a KeyError or AttributeError from a later read."""
        if not isinstance(data, dict) or data.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{display_path(path)} is not a llava-evaclip feature index ({SHARDS_FORMAT}).")
        entries, fragments = data.get("entries"), data.get("fragments", [])  # an index lists its fragments
        if not (isinstance(data.get("settings"), dict) and isinstance(fragments, list)
                and set(map(type, fragments)) <= {str}
                and isinstance(entries, dict) and set(map(type, entries.values())) <= {dict}
                and all(set(map(type, map(operator.methodcaller("get", name), entries.values()))) <= {str}
                        for name in ("shard", "tensor"))):
            raise ValueError(f"{display_path(path)} is damaged (its settings, fragments or entries are not what "
                             f"`llava-evaclip features` writes); {remedy}.")
        # A shard is a file in the store's shards/ folder: an edited or downloaded index must not make the store
        # read a file elsewhere on disk (an absolute path, `..`), as convert refuses such shard names in an index.
        outside = next((shard for shard in {entry["shard"] for entry in entries.values()}
                        if os.path.basename(shard) != shard or shard in ("", ".", "..")), None)
        if outside is not None:
            raise ValueError(f"{display_path(path)} names a shard outside the store's {SHARDS_DIR}/ folder "
                             f"({outside!r}); only file names in that folder are read; {remedy}.")

    def _scan_files(self) -> dict[str, dict[str, Any]]:
        """Every features file below the folder (one header read each), checked to share one set of settings."""
        entries: dict[str, dict[str, Any]] = {}
        foreign: list[str] = []
        first_key, conflicts = "", []
        for root, dirs, files in os.walk(self.directory):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith(OUTPUT_SUFFIX) or name.startswith("."):
                    continue
                path = os.path.join(root, name)
                try:
                    metadata = self._file_metadata(path)
                except Exception as error:  # damaged, or not safetensors at all
                    self.unreadable.append((path, _one_line(error)))
                    continue
                if metadata.get("format") != FILES_FORMAT:
                    foreign.append(path)
                    continue
                key = path_key(os.path.relpath(path, self.directory)[: -len(OUTPUT_SUFFIX)])
                entries[key] = {"file": path, "source": metadata.get("source"),
                                "original_size": metadata.get("original_size")}
                settings = {setting: metadata[setting] for setting in SETTING_KEYS if setting in metadata}
                if not self.settings:
                    self.settings, first_key = settings, key
                else:
                    differences = settings_differences(settings, self.settings, label=f"{first_key!r} has")
                    if differences:
                        conflicts.append((key, differences))
                    elif _adopt_later_settings(self.settings, settings):
                        first_key = key  # the reference from now on: it agrees with the first on all else
        ignored = [display_path(path) for path in foreign] + [
            f"{display_path(path)} (unreadable: {reason})" for path, reason in self.unreadable]
        if ignored:
            logger.warning("%s: ignoring %d .safetensors file(s) that are not features written by `llava-evaclip "
                           "features`, e.g. %s", display_path(self.directory), len(ignored), ignored[0])
        if conflicts:
            key, differences = conflicts[0]
            raise ValueError(
                f"{display_path(self.directory)} mixes features made with different settings: {len(conflicts)} of "
                f"{len(entries)} files differ from {first_key!r}, e.g. {key!r}: "
                f"{', '.join(differences)}; recompute them with `llava-evaclip features "
                "... --overwrite` and one model, or use another folder.")
        return entries

    @staticmethod
    def _file_metadata(path: str) -> dict[str, str]:
        """A .safetensors file's metadata from its header alone (`read_safetensors_header`: one open, checked as
        safe_open checks it). safe_open opens and maps the file twice; a resume or a store of 600K files reads every
        header (on every training rank for a files store)."""
        return read_safetensors_header(path)[1]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return self._entries.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._entries.row(path_key(key)) is not None

    def __getitem__(self, key: str) -> torch.Tensor:
        row = self._entries.row(path_key(key))
        if row is None:
            raise KeyError(f"{key!r} is not in the feature store {display_path(self.directory)}")
        return self._tensor(row)

    def _tensor(self, row: int) -> torch.Tensor:
        path = self._entries.value(row, "file")
        if path is not None:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor("features")
        return self._shard(self._entries.value(row, "shard")).get_tensor(self._entries.value(row, "tensor"))

    def _shard(self, name: str) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked DataLoader worker opens its own maps
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = safe_open(os.path.join(self.directory, SHARDS_DIR, name), framework="pt")
        return handle

    def entry(self, key: str) -> dict[str, Any]:
        """Where a key's features are (shard and tensor, or file) and what was recorded about its image."""
        row = self._entries.row(path_key(key))
        if row is None:
            raise KeyError(f"{key!r} is not in the feature store {display_path(self.directory)}")
        return self._entries.entry(row)

    def missing(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        return [key for key, row in zip(keys, self._entries.rows(path_key(key) for key in keys)) if row is None]

    def close(self) -> None:
        self._handles.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Without the open shard maps, which cannot be pickled: a spawn or forkserver DataLoader worker gets a store
        the main process has read from, and opens its own."""
        return {**self.__dict__, "_handles": {}}

    def verify(self) -> list[str]:
        """Problems found (empty when consistent): every entry's tensor exists with its recorded shape and dtype and
        finite values, every shard is named by a fragment, per-file settings agree."""
        problems = []
        for row, (key, entry) in enumerate(self._entries.items()):
            try:
                tensor = self._tensor(row)
            except Exception as error:  # a missing or damaged shard/file
                problems.append(f"{key}: cannot read its features ({_one_line(error)})")
                continue
            if "file" in entry:
                metadata = self._file_metadata(entry["file"])
                differences = settings_differences(metadata, self.settings)
                if differences:
                    problems.append(f"{key}: other settings than the store: {', '.join(differences)}")
            elif list(tensor.shape) != entry.get("shape") or str(tensor.dtype).replace("torch.", "") != entry.get(
                    "dtype"):
                problems.append(f"{key}: stored {list(tensor.shape)} {tensor.dtype}, index says {entry.get('shape')} "
                                f"{entry.get('dtype')}")
            if not torch.isfinite(tensor).all():
                problems.append(f"{key}: non-finite values")
        problems += [f"{display_path(path)}: cannot read this .safetensors file ({reason})"
                     for path, reason in self.unreadable]
        if self.format == "shards":
            directory = os.path.join(self.directory, SHARDS_DIR)
            named = self._entries.distinct("shard")
            for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
                if SHARD_NAME.fullmatch(name) and name.endswith(OUTPUT_SUFFIX) and name not in named:
                    problems.append(f"{SHARDS_DIR}/{name}: no index entry names this shard (an unfinished run's; "
                                    "the next run removes it)")
        return problems


# ---------------------------------------------------------------------------------------------------------------------
# Many processes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class DistributedContext:
    """This process's place among the ranks torchrun / accelerate / deepspeed started (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    _held_by_group: list[torch.Tensor] = field(default_factory=list, repr=False)  # see `gather`

    @classmethod
    def from_env(cls) -> "DistributedContext":
        def number(name: str, default: int) -> int:
            value = os.environ.get(name, str(default))
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer.") from None

        context = cls(number("RANK", 0), number("WORLD_SIZE", 1), number("LOCAL_RANK", 0))
        if not 0 <= context.rank < context.world_size:
            raise ValueError(f"RANK={context.rank} is not within WORLD_SIZE={context.world_size}.")
        import torch.distributed as dist

        if context.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
            # A WORLD_SIZE left in the environment (a job script's export), not a launcher's: every process would
            # take rank 0's share, or env:// would fail with a traceback after the model is loaded.
            missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
            if missing:
                raise ValueError(f"WORLD_SIZE={context.world_size} is set but {', '.join(missing)} "
                                 f"{'is' if len(missing) == 1 else 'are'} not: start the ranks with torchrun, "
                                 "accelerate launch or deepspeed, or unset WORLD_SIZE for one process.")
        return context

    def device(self, requested: str = "auto") -> torch.device:
        """cuda:LOCAL_RANK on a GPU machine (or when `requested` is plain "cuda"), else what was asked for."""
        if requested in ("auto", "cuda"):
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank % torch.cuda.device_count())
            if requested == "cuda":
                raise ValueError("--device cuda was asked for but CUDA is not available here; use --device cpu.")
            return torch.device("cpu")
        return torch.device(requested)

    def start(self, device: torch.device) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA) when there is more than one rank."""
        import torch.distributed as dist

        if self.world_size > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            timeout = datetime.timedelta(seconds=float(os.environ.get("LLAVA_EVACLIP_DIST_TIMEOUT_S", "7200")))
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
            self.owns_group = True

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        backend = torch.distributed.get_backend()
        if backend not in ("gloo", "nccl"):
            values: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(values, value)
            return values
        # torch < 2.8 joins a group's worker threads in `destroy_process_group` holding the GIL, while a worker may
        # still be freeing the last tensors of a collective whose Python objects are gone, which needs the GIL: with
        # `all_gather_object`, one gloo run in four hung there (torch 2.1 and 2.5). So the tensors handed to the
        # group are kept until `stop()` has destroyed it, and no worker ever frees them.
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, size)
        longest = max(int(each) for each in sizes)
        padded = torch.cat([payload, payload.new_zeros(longest - payload.numel())])
        buffers = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        torch.distributed.all_gather(buffers, padded)
        self._held_by_group.extend([payload, size, *sizes, padded, *buffers])
        return [pickle.loads(buffer[:int(each)].cpu().numpy().tobytes()) for buffer, each in zip(buffers, sizes)]

    def first_error(self, error: Optional[str]) -> Optional[str]:
        """Collective: the first rank's error (None when no rank has one), the same on every rank, naming the rank
        when it is another's. A check that fails on one node only (an input or a checkpoint missing there) must stop
        every rank, not leave the others waiting for it in the next collective."""
        import socket

        errors = self.gather((socket.gethostname(), error))
        for rank, (host, message) in enumerate(errors):
            if message is not None:
                same = all(other == message for _, other in errors)
                return message if same or rank == self.rank else f"on rank {rank} ({host}): {message}"
        return None

    def stop(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False
        self._held_by_group.clear()


# ---------------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ExtractionReport:
    """What a run did (summed over ranks on rank 0): counts, failures (image, reason), skipped inputs."""

    total: int = 0
    written: int = 0
    kept: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_inputs: list[tuple[str, str]] = field(default_factory=list)
    shape: Optional[list[int]] = None
    elapsed: float = 0.0
    stopped: Optional[str] = None  # why the run stopped early (full disk), or None
    world_size: int = 1

    def merge(self, other: "ExtractionReport") -> None:
        self.written += other.written
        self.failures += other.failures
        self.shape = self.shape or other.shape
        self.elapsed = max(self.elapsed, other.elapsed)
        self.stopped = self.stopped or other.stopped


def plan(items: Sequence[ImageItem], out_dir: str, settings: dict[str, str], format: str = "files",
         overwrite: bool = False, share: tuple[int, int] = (0, 1), listing: Optional["_OutputListing"] = None
         ) -> tuple[list[ImageItem], int, list[tuple[str, str]]]:
    """(to compute, kept, failures): which images already have a current output. Reads only, so every rank can run
    it before any rank writes; a store or file made with other settings (the model's path aside: its weights
    fingerprint counts) or from another image under the same key is refused, never silently reused.

    For --format files, what exists is read from one listing per output folder (not a stat per image), and `share`
    (rank, world_size) opens only every world_size-th existing file, from the rank-th: kept and failures are then that
    rank's share (the caller gathers them), so resuming a store of N files costs N header reads over all ranks, not
    N per rank. The images to compute are the same on every rank. `listing` is `_check_planned_outputs`'s, when it
    ran just before (the folders are then listed once)."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}.")
    is_shards = os.path.isdir(out_dir) and is_shard_store(out_dir)
    if is_shards != (format == "shards") and os.path.isdir(out_dir) and (is_shards or _has_files(out_dir)):
        found = "a shard store" if is_shards else "per-image feature files"
        raise ValueError(f"{display_path(out_dir)} holds {found}; use the same --format to resume it, or another "
                         "output folder.")
    if format == "shards":
        store = FeatureStore(out_dir) if is_shards else None
        if store is not None and store.settings:
            differences = settings_differences(store.settings, settings)
            if differences:
                raise ValueError(f"the feature store {display_path(out_dir)} was made with other settings: "
                                 f"{', '.join(differences)}; use another output folder.")
            _log_model_path(store.settings, settings, f"the feature store {display_path(out_dir)}")
            _warn_unrecorded_resize(len(store) if "image_resize" not in store.settings else 0, settings,
                                    f"the feature store {display_path(out_dir)}")
        entries = store._entries if store is not None else EntryTable({})
        missing = sorted(shard for shard in entries.distinct("shard")
                         if not os.path.isfile(os.path.join(out_dir, SHARDS_DIR, shard)))
        if missing:  # resuming would count their images as done and leave them without features
            raise ValueError(f"the feature store {display_path(out_dir)} names {len(missing)} shard(s) that are "
                             f"missing, e.g. {SHARDS_DIR}/{missing[0]}; restore them, or use another output folder.")
        rows = entries.rows(item.key for item in items)
        recorded_sources = ((item, entries.value(row, "source")) for item, row in zip(items, rows) if row is not None)
        others = [(item, source) for item, source in recorded_sources if not _same_source(source, item.path)]
        if others:
            item, recorded = others[0]
            raise ValueError(f"the feature store {display_path(out_dir)} holds features of other images under "
                             f"{len(others)} of these keys, e.g. {item.key!r} from {recorded} (now "
                             f"{display_path(os.path.abspath(item.path))}); use another output folder.")
        todo = [item for item, row in zip(items, rows) if row is None]
        return todo, len(items) - len(todo), []
    todo, existing, failures = [], [], []
    listing = None if overwrite else listing or _OutputListing(out_dir, items)
    for item in items:
        path = output_path(out_dir, item.key)
        if listing is not None and listing.exists(path):
            existing.append((item, path))
        else:
            todo.append(item)
    rank, world_size = share
    other_models: set[str] = set()
    unrecorded: list[str] = []
    for item, path in existing[rank::world_size]:
        problem = _existing_mismatch(path, settings, item.path, other_models, unrecorded)
        if problem is not None:
            failures.append((display_path(item.path),
                             problem + "; pass --overwrite to replace it or use another --out"))
    kept = len(existing[rank::world_size]) - len(failures)
    for recorded in sorted(other_models):
        _log_model_path({**settings, "model": recorded}, settings, f"existing output in {display_path(out_dir)}")
    _warn_unrecorded_resize(len(unrecorded), settings, display_path(out_dir))
    return todo, kept, failures


def _warn_unrecorded_resize(count: int, settings: dict[str, str], where: str) -> None:
    """Outputs made before outputs recorded `image_resize` are kept on either line (they cannot be told apart), so
    say once that they may hold the other line's resize: a silent resume would mix PIL and torchvision pixels."""
    if count and settings.get("image_resize"):
        logger.warning("%s: %d existing output(s) predate the recorded image resize and are kept as made with this "
                       "run's (%s); if they were made on the other transformers line (4.37: pil, 5.x: torchvision), "
                       "recompute them (a files store: --overwrite; a shard store: another --out).",
                       where, count, settings["image_resize"])


def _same_source(recorded: Optional[str], path: str) -> bool:
    """Whether an output recorded as made from `recorded` holds the image at `path`: the same absolute path, or the
    same file reached another way (a symlink, another spelling of a mount)."""
    if not recorded or recorded == display_path(os.path.abspath(path)):
        return True
    try:
        return os.path.samefile(recorded, path)
    except (OSError, ValueError):
        return False


def _has_files(out_dir: str) -> bool:
    """Whether `out_dir` holds a features file (a .safetensors whose metadata says this package wrote it)."""
    for root, _, files in os.walk(out_dir):
        for name in files:
            if name.endswith(OUTPUT_SUFFIX) and not name.startswith("."):
                try:
                    if FeatureStore._file_metadata(os.path.join(root, name)).get("format") == FILES_FORMAT:
                        return True
                except Exception:  # not safetensors: not ours
                    continue
    return False


class _OutputListing:
    """What exists at the output paths of `items`, from one directory listing per output folder: a stat per image
    (hundreds of thousands, each a round trip on a network file system, on every rank) would dominate the start of a
    large run. Folders that cannot be listed (a file in their path, no permission) are answered per path, as before,
    and so is a name listed only in another case or Unicode normalisation (on a case- or normalisation-insensitive
    file system, macOS's or Windows', it may be the same file)."""

    def __init__(self, out_dir: str, items: Sequence[ImageItem]) -> None:
        self.out_dir = out_dir
        self.folders: dict[str, Optional[tuple[dict[str, os.DirEntry], set[str]]]] = {}
        for item in items:
            folder = os.path.dirname(output_path(out_dir, item.key))
            if folder not in self.folders:
                self.folders[folder] = self._list(folder)

    @staticmethod
    def _loose(name: str) -> str:
        return unicodedata.normalize("NFC", name).casefold()

    @classmethod
    def _list(cls, folder: str) -> Optional[tuple[dict[str, os.DirEntry], set[str]]]:
        """({name: entry}, the names' loose forms); empty for a folder not created yet (nothing in it exists), None
        when it cannot be listed."""
        try:
            with os.scandir(folder) as listing:
                entries = {entry.name: entry for entry in listing}
        except FileNotFoundError:  # a missing component, never a file in the way (that is ENOTDIR)
            return {}, set()
        except OSError:
            return None
        return entries, {cls._loose(name) for name in entries}

    def _entry(self, path: str) -> tuple[bool, Optional[os.DirEntry]]:
        """(answered by the listing, the entry at `path` or None)."""
        folder, name = os.path.split(path)
        listed = self.folders.get(folder)
        if listed is None:
            return False, None
        entries, loose = listed
        entry = entries.get(name)
        if entry is None and loose and self._loose(name) in loose:
            return False, None
        return True, entry

    def exists(self, path: str) -> bool:
        """`os.path.exists(path)` (a symlink counts when its target exists)."""
        listed, entry = self._entry(path)
        if listed and entry is None:
            return False
        if listed:
            with contextlib.suppress(OSError):
                if not entry.is_symlink():
                    return True
        return os.path.exists(path)

    def conflict(self, path: str) -> Optional[str]:
        """`_path_conflict(out_dir, path)`: a listable folder has only folders in its path."""
        listed, entry = self._entry(path)
        if not listed:
            return _path_conflict(self.out_dir, path)
        try:
            in_the_way = entry is not None and entry.is_dir()  # follows a symlink, as os.path.isdir
        except OSError:
            in_the_way = False
        return f"{display_path(path)} is a folder" if in_the_way else None


def _path_conflict(out_dir: str, path: str) -> Optional[str]:
    """Why `path` cannot become a file (a folder sits there, or a file where a parent folder must be), or None."""
    if os.path.isdir(path):
        return f"{display_path(path)} is a folder"
    parent = os.path.dirname(path)
    while len(parent) > len(out_dir.rstrip(os.sep)):
        if os.path.exists(parent) and not os.path.isdir(parent):
            return f"{display_path(parent)} is a file, not a folder"
        parent = os.path.dirname(parent)
    return None


def _existing_mismatch(path: str, settings: dict[str, str], image_path: str,
                       other_models: Optional[set[str]] = None,
                       unrecorded: Optional[list[str]] = None) -> Optional[str]:
    """None when the file at `path` holds the features of the image at `image_path` made with these settings;
    otherwise why it cannot be reused. A model path other than this run's (same weights) goes into `other_models`."""
    try:
        metadata = FeatureStore._file_metadata(path)
    except Exception as error:  # a foreign or damaged file
        return f"{display_path(path)} exists but is not a readable features file ({_one_line(error)})"
    if metadata.get("format") != FILES_FORMAT:
        return f"{display_path(path)} exists but is not a features file written by `llava-evaclip features`"
    differences = settings_differences(metadata, settings)
    if differences:
        return f"{display_path(path)} exists but was made with other settings: {', '.join(differences)}"
    if not _same_source(metadata.get("source"), image_path):
        return (f"{display_path(path)} exists but holds the features of another image: {metadata['source']} "
                f"(now {display_path(os.path.abspath(image_path))})")
    if other_models is not None and metadata.get("model") != settings.get("model"):
        other_models.add(str(metadata.get("model")))
    if unrecorded is not None and any(key not in metadata for key in LATER_SETTING_KEYS):
        unrecorded.append(path)
    return None


def _check_planned_outputs(items: Sequence[ImageItem], out_dir: str) -> "_OutputListing":
    """Outputs that cannot be files: a folder is in the way, or two inputs would make a file and a folder of one name
    (x.jpg beside x.jpg.safetensors/y.jpg). Returns the output folders' listing, for `plan`."""
    outputs = {item.key + OUTPUT_SUFFIX: item for item in items}
    listing = _OutputListing(out_dir, items)
    for item in items:
        path = output_path(out_dir, item.key)
        conflict = listing.conflict(path)
        if conflict:
            raise ValueError(f"{display_path(item.path)}: its features would go to {display_path(path)}, but "
                             f"{conflict}; move it away or use another output folder.")
        parts = item.key.split("/")
        for depth in range(1, len(parts)):
            other = outputs.get("/".join(parts[:depth]))
            if other is not None:
                raise ValueError(f"{display_path(other.path)} and {display_path(item.path)} cannot both be saved: "
                                 f"the features of the first would be a file named like the folder of the second; "
                                 "use --format shards or process them in separate runs.")
    return listing


LOCK_NAME = ".llava-evaclip-features.lock"


def _try_lock(out_dir: str) -> tuple[Optional[int], Optional[str]]:
    """(descriptor holding an exclusive flock on OUT/LOCK_NAME, None), or (None, who holds it) when another run does,
    or (None, None) where no lock can be taken (a file system without flock, an unwritable folder: the run's own
    checks report those). The lock file is removed when released, so a lock taken on a file that was removed or
    replaced meanwhile is retried."""
    import fcntl

    path = os.path.join(out_dir, LOCK_NAME)
    for _ in range(20):
        try:
            os.makedirs(out_dir, exist_ok=True)
            # O_NOFOLLOW: a symlink planted under the lock's name must not make the holder line overwrite its target
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except OSError:
            return None, None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = None
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                try:
                    holder = os.pread(descriptor, 512, 0).decode("utf-8", "replace").strip() or "another process"
                except OSError:
                    holder = "another process"
            os.close(descriptor)
            return None, holder
        try:
            current = os.stat(path)
        except OSError:
            current = None
        opened = os.fstat(descriptor)
        if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            os.close(descriptor)  # the previous holder removed it between our open and our lock: take the new one
            continue
        if not stat.S_ISREG(opened.st_mode) or opened.st_nlink != 1:  # not a lock file this package made
            os.close(descriptor)
            return None, None
        try:
            import socket

            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same
            pass
        return descriptor, None
    return None, None


# Rank 0 writes a file of this name (and a random tail) into OUT; every other rank must read it back there, or OUT is
# not one folder shared by every node (node-local disks), and rank 0's index would miss the other nodes' shards.
PROBE_PREFIX = ".llava-evaclip-features.probe."
PROBE_NAME = re.compile(re.escape(PROBE_PREFIX) + r"[0-9a-f]{32}")


def _write_probe(out_dir: str) -> Optional[str]:
    """Rank 0 (holding the lock): remove the probes of killed runs, write a new one; its name, or None (no space)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(out_dir):
            if PROBE_NAME.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
    name = PROBE_PREFIX + uuid.uuid4().hex
    try:
        descriptor = os.open(os.path.join(out_dir, name),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.write(descriptor, name.encode())
        finally:
            os.close(descriptor)
    except OSError:
        return None
    return name


def _sees_probe(out_dir: str, name: str) -> bool:
    try:  # open + read, not a stat: NFS's close-to-open consistency makes rank 0's write visible to an open
        with open(os.path.join(out_dir, name), "rb") as handle:
            return handle.read(len(name) + 1) == name.encode()
    except OSError:
        return False


@contextlib.contextmanager
def _output_lock(out_dir: str, context: "DistributedContext") -> Iterator[Optional[str]]:
    """One run at a time per output folder: rank 0 holds an exclusive lock on OUT/LOCK_NAME for the whole run (the
    kernel drops it when the process ends, however it ends), and every rank refuses, with a ValueError, an output
    folder another run is writing. Two runs into one folder would otherwise remove each other's temp files (the
    resume cleanup of a `--format files` run) and shards (the index merge of a `--format shards` run), leaving an
    index naming a shard that is gone."""
    descriptor, holder = _try_lock(out_dir) if context.rank == 0 else (None, None)
    probe = _write_probe(out_dir) if context.rank == 0 and context.world_size > 1 and holder is None else None
    holder, probe = context.gather((holder, probe))[0]
    try:
        if holder is not None:
            raise ValueError(f"another `llava-evaclip features` run is writing to {display_path(out_dir)} "
                             f"({holder}); wait for it to end, or use another output folder.")
        yield probe
    finally:
        if probe is not None and context.rank == 0:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, probe))
        if descriptor is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, LOCK_NAME))  # while still held: see `_try_lock`
            os.close(descriptor)


def _gather_plan_shares(context: "DistributedContext", items: Sequence[ImageItem], kept: int,
                        failures: list[tuple[str, str]]) -> tuple[int, list[tuple[str, str]]]:
    """Collective: every rank's share of `plan` summed, the same on every rank, failures in the order of `items`."""
    shares = context.gather((kept, failures))
    merged = [failure for _, share_failures in shares for failure in share_failures]
    if merged:
        order = {display_path(item.path): position for position, item in reversed(list(enumerate(items)))}
        merged.sort(key=lambda failure: order.get(failure[0], 0))
    return sum(share_kept for share_kept, _ in shares), merged


def _digest(parts: Iterable[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _agree(context: "DistributedContext", out_dir: str, probe: Optional[str], error: Optional[str],
           options: dict[str, Any], settings: dict[str, str], items: Sequence[ImageItem],
           todo: Sequence[ImageItem]) -> None:
    """Collective, before any rank writes: every rank must see rank 0's OUT (one shared folder), run the same options
    and settings, list the same images at the same paths and read the same state of OUT; otherwise every rank raises
    the same ValueError. Ranks that disagree would split the work differently (images computed twice or never, a run
    reported complete), mix dtypes into one store (unreadable afterwards) or record sources that no later run on one
    node can resume."""
    import socket

    keyed = sorted(items, key=lambda item: item.key)
    view = {
        "host": socket.gethostname(), "error": error, "options": options, "settings": settings,
        "sees_out": None if probe is None or context.rank == 0 else _sees_probe(out_dir, probe),
        "images": (len(keyed), _digest(item.key for item in keyed)),
        "sources": _digest(display_path(os.path.abspath(item.path)) for item in keyed),
        "example": (keyed[0].key, display_path(os.path.abspath(keyed[0].path))) if keyed else None,
        "todo": (len(todo), _digest(sorted(item.key for item in todo))),
    }
    views = context.gather(view)
    message = _disagreement(views, display_path(out_dir))
    if message is not None:
        raise ValueError(message)


def _disagreement(views: list[dict[str, Any]], out: str) -> Optional[str]:
    """What makes the ranks' views (`_agree`) unfit for one run, most basic first, or None."""
    first = views[0]
    others = list(enumerate(views))[1:]

    def who(rank: int) -> str:
        return f"rank {rank} ({views[rank]['host']})"

    same_command = "every rank must run the same command"
    for rank, view in others:
        if view["sees_out"] is False:
            return (f"--out {out} is not one folder shared by every rank: {who(rank)} does not see the file rank 0 "
                    f"({first['host']}) wrote there (a node-local disk, or a relative path from another working "
                    "directory); use a folder on a shared file system.")
    errors = [(rank, view["error"]) for rank, view in enumerate(views) if view["error"] is not None]
    if errors:
        rank, message = errors[0]
        return message if all(view["error"] == message for view in views) else f"on {who(rank)}: {message}"
    for rank, view in others:
        for name, value in view["options"].items():
            if value != first["options"][name]:
                return (f"{who(rank)} runs with {name} {value!r}, rank 0 with {first['options'][name]!r}; "
                        f"{same_command}.")
        differences = settings_differences(view["settings"], first["settings"], label="rank 0")
        if differences:
            return f"{who(rank)} runs with other settings than rank 0: {', '.join(differences)}; {same_command}."
    for rank, view in others:
        if view["images"] != first["images"]:
            return (f"{who(rank)} finds other images than rank 0 ({view['images'][0]} vs {first['images'][0]} under "
                    "the inputs given); the inputs must hold the same files on every node.")
        if view["sources"] != first["sources"]:
            example = (f"e.g. {view['example'][1]} vs {first['example'][1]}"
                       if view["example"] != first["example"] else "paths differ")
            return (f"{who(rank)} finds the images under other paths than rank 0 ({example}); the stored source paths "
                    "would differ by node and later runs would refuse them: give the inputs by the same absolute "
                    "paths on every node.")
    for rank, view in others:
        if view["todo"] != first["todo"]:
            return (f"{who(rank)} reads another state of {out} than rank 0 ({view['todo'][0]} vs "
                    f"{first['todo'][0]} images to compute); {out} must be one shared folder that no other program "
                    "changes during the run.")
    return None


def extract_features(tower: Any, inputs: Union[Sequence[str], Sequence[ImageItem]], out_dir: str,
                     format: str = "files", batch_size: int = 8, workers: int = 0, shard_size_mb: float = 1024,
                     overwrite: bool = False, context: Optional[DistributedContext] = None,
                     progress: Optional[Callable[[int], None]] = None,
                     on_failure: Optional[Callable[[str, str], None]] = None) -> ExtractionReport:
    """Write the features of every image in `inputs` (paths or ImageItems) that has no current output to `out_dir`.

    Under several ranks (`context`, default from the environment), each computes an equal share of what is missing
    (sorted keys, round-robin) and rank 0 returns the summed report and, for shards, merges the index. Before any rank
    writes, every rank must see rank 0's `out_dir` (one shared folder), run the same format, batch size and settings,
    list the same images at the same absolute paths and read the same state of `out_dir`; otherwise, or when a check
    fails on any rank, every rank raises the same ValueError. A full disk stops the run (report.stopped) with every
    finished output kept."""
    context = context or DistributedContext.from_env()
    with _output_lock(out_dir, context) as probe:
        return _extract_features(tower, inputs, out_dir, format, batch_size, workers, shard_size_mb, overwrite,
                                 context, progress, on_failure, probe)


def _extract_features(tower: Any, inputs: Union[Sequence[str], Sequence[ImageItem]], out_dir: str, format: str,
                      batch_size: int, workers: int, shard_size_mb: float, overwrite: bool,
                      context: DistributedContext, progress: Optional[Callable[[int], None]],
                      on_failure: Optional[Callable[[str, str], None]], probe: Optional[str] = None
                      ) -> ExtractionReport:
    started = time.perf_counter()
    report = ExtractionReport(world_size=context.world_size)
    items: list[ImageItem] = []
    todo: list[ImageItem] = []
    planned_failures: list[tuple[str, str]] = []
    settings: dict[str, str] = {}
    error = None
    try:  # every rank's checks: one rank's refusal must reach the others (see `_agree`)
        if inputs and isinstance(inputs[0], ImageItem):
            items = list(inputs)  # type: ignore[arg-type]
        else:
            items, report.skipped_inputs = find_images(inputs)  # type: ignore[arg-type]
        report.total = len(items)
        listing = _check_planned_outputs(items, out_dir) if format == "files" else None
        settings = tower_settings(tower)
        todo, report.kept, planned_failures = plan(items, out_dir, settings, format, overwrite,
                                                   share=(context.rank, context.world_size), listing=listing)
    except ValueError as raised:
        if context.world_size == 1:
            raise
        error = str(raised)
    if context.world_size > 1:
        _agree(context, out_dir, probe, error, {"--format": format, "--batch-size": batch_size,
                                               "--overwrite": overwrite}, settings, items, todo)
        if format == "files":  # each rank read its share of the existing files (see `plan`)
            report.kept, planned_failures = _gather_plan_shares(context, items, report.kept, planned_failures)
    report.failures = list(planned_failures)
    if format == "files" and context.rank == 0:
        remove_stale_temp_files(out_dir, items)
    context.barrier()  # every rank has read the state (and rank 0 removed stale temp files) before any rank writes
    todo = sorted(todo, key=lambda item: item.key)[context.rank::context.world_size]
    writer: Any = (ShardWriter(out_dir, settings, shard_size_mb, context.rank) if format == "shards"
                   else FileWriter(out_dir, settings))
    try:
        for result in iter_features(tower, todo, batch_size, workers):
            error = result.error
            if error is None:
                try:
                    writer.add(result)
                    report.shape = list(result.features.shape)
                except OutputNameError as name_error:  # this image's output name only: the others go on
                    error = name_error.strerror
            if error is not None:
                report.failures.append((display_path(result.item.path), error))
                if on_failure is not None:
                    on_failure(display_path(result.item.path), error)
            if progress is not None:
                progress(1)
        writer.close()
    except OutputError as error:
        report.stopped = str(error)
    report.written = writer.written  # an unwritten shard's buffered features do not count
    report.elapsed = time.perf_counter() - started
    # `plan`'s counts and failures are the same on every rank: rank 0's, and not sent (a store of 600K files made
    # with another model is 600K failures); the rest is summed.
    reports = context.gather(dataclasses.asdict(
        dataclasses.replace(report, failures=report.failures[len(planned_failures):])))
    if context.rank != 0:
        return report
    total = ExtractionReport(**reports[0])
    total.failures = list(planned_failures) + total.failures
    for other in reports[1:]:
        total.merge(ExtractionReport(**other))
    if format == "shards" and os.path.isdir(os.path.join(out_dir, SHARDS_DIR)) and not total.stopped:
        try:
            merge_index(out_dir)
        except OutputError as error:  # every shard and fragment is written: the next run merges them
            total.stopped = str(error)
    return total


__all__ = [
    "DistributedContext",
    "ExtractionReport",
    "Extracted",
    "FeatureStore",
    "ImageItem",
    "OutputError",
    "OutputNameError",
    "check_writable",
    "extract_features",
    "find_images",
    "iter_features",
    "load_tower",
    "open_rgb",
    "tower_settings",
    "weights_fingerprint",
]

"""Helpers shared by the CLI commands: model resolution (checkpoint dir or preset), image discovery and decoding,
dtype/device parsing and atomic file writes. Heavy imports (torch, transformers) stay inside functions so that
`llava-evaclip --help` and `presets` start quickly."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import stat
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from ..cli import CLIError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from ..configuration_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
SELECT_FEATURES = ("patch", "cls_patch", "cls")
# Presets get reproducible random weights, so a rerun (resume) continues with the same model.
PRESET_SEED = 0
FULL_MODEL_TYPES = ("evaclip", "clip")
VISION_MODEL_TYPES = ("evaclip_vision_model", "clip_vision_model")


def samples_dir() -> str:
    """The sample images shipped inside the package (used by `features --samples`)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples")


def warn(message: str) -> None:
    """A warning line on stderr that does not break a running tqdm bar."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def random_weights_banner(preset: str) -> str:
    return (
        f"WARNING: {preset!r} is a preset name, not a checkpoint: the model has RANDOM weights (seed {PRESET_SEED}), "
        "so its features only exercise the pipeline. For real features convert a released checkpoint "
        "(llava-evaclip convert SRC OUT_DIR --arch " + preset + ") and pass --model OUT_DIR."
    )


# ----------------------------------------------------------------------------------------------------------------
# Argument helpers
# ----------------------------------------------------------------------------------------------------------------


def format_select_layer(select_layer: str) -> str:
    """`--select-layer` as recorded in outputs: "-2", or "-2,-5" for several layers."""
    return ",".join(part.strip() for part in str(select_layer).split(","))


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--select-layer", default="-2", metavar="INDEX",
                        help="hidden state LLaVA reads (mm_vision_select_layer): 0 = embeddings, negative counts "
                             "from the end; several, as --select-layer=-2,-5, are concatenated on channels (default: -2)")
    parser.add_argument("--select-feature", choices=SELECT_FEATURES, default="patch",
                        help="tokens LLaVA keeps (mm_vision_select_feature): patch drops CLS (default: patch)")


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="compute and storage dtype (default: float32)")
    parser.add_argument("--device", default="auto",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")


def resolve_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[name])


def resolve_device(name: str) -> "torch.device":
    """`--device` as a usable torch device; anything else (meta, mps where absent, cuda:N past the last GPU, other
    backends) is one CLIError line, before any model is loaded."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CLIError(f"--device {name} was asked for but CUDA is not available here; use --device cpu.")
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}.")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {name}: Apple's MPS backend is not available here; use --device cpu.")
    elif device.type != "cpu" or device.index not in (None, 0):
        reason = "the meta device holds no data" if device.type == "meta" else "not supported"
        raise CLIError(f"--device {name}: {reason}; use cpu, cuda, cuda:N (or mps on Apple silicon).")
    return device


def selected_layers(select_layer: str, num_layers: int) -> tuple[int, ...]:
    """The `hidden_states` indices `--select-layer` names, validated by the tower's own parser (one rule for LLaVA
    and the CLI); a bad value becomes one CLIError line naming the valid range."""
    from ..tower import parse_select_layer

    try:
        return parse_select_layer(select_layer, num_layers)
    except ValueError as error:
        raise CLIError(f"--select-layer: {one_line(error)}") from None


def tokens_per_image(num_patches: int, select_feature: str) -> int:
    return {"patch": num_patches, "cls_patch": num_patches + 1, "cls": 1}[select_feature]


# ----------------------------------------------------------------------------------------------------------------
# Models: a converted checkpoint dir or a preset name
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    """What `--model` named: a checkpoint dir (`path`) or a preset (`preset`, random weights)."""

    spec: str
    config: Any  # EvaCLIPConfig or EvaCLIPVisionConfig
    path: Optional[str] = None
    preset: Optional[str] = None

    @property
    def random_weights(self) -> bool:
        return self.preset is not None

    @property
    def has_text_tower(self) -> bool:
        return hasattr(self.config, "text_config")

    @property
    def vision_config(self) -> "EvaCLIPVisionConfig":
        return self.config.vision_config if self.has_text_tower else self.config

    @property
    def label(self) -> str:
        """How the model is recorded in outputs: the preset name, or the dir's absolute path."""
        return self.preset if self.preset is not None else self.path


def resolve_model(spec: str, option: str = "--model") -> ModelSource:
    """Turn `--model` into a config without loading weights; every user mistake becomes one CLIError line."""
    from ..configuration_evaclip import preset_config
    from ..presets import list_presets

    presets = ", ".join(list_presets())
    if os.path.isdir(spec):
        config_path = os.path.join(spec, "config.json")
        if os.path.lexists(config_path) and not os.path.isfile(config_path):  # a folder, a dangling symlink
            raise CLIError(f"{option} {spec}: {config_path} is not a readable file; expected the config.json of a "
                           "converted EVA-CLIP checkpoint dir (made by `llava-evaclip convert`).")
        if not os.path.isfile(config_path):
            raise CLIError(
                f"{option} {spec}: the directory has no config.json; expected a converted EVA-CLIP checkpoint dir "
                f"(made by `llava-evaclip convert`) or a preset name ({presets})."
            )
        return ModelSource(spec=spec, config=read_config(spec), path=os.path.abspath(spec))
    if spec in list_presets():
        return ModelSource(spec=spec, config=preset_config(spec), preset=spec)
    if os.path.exists(spec):
        raise CLIError(f"{option} {spec} is a file; expected a converted checkpoint directory or a preset name "
                       f"({presets}).")
    raise CLIError(f"{option} {spec!r} is neither an existing checkpoint directory nor a preset name; "
                   f"presets: {presets}.")


def read_config(path: str) -> Any:
    """The EvaCLIPConfig / EvaCLIPVisionConfig stored in a checkpoint dir."""
    from ..configuration_evaclip import EvaCLIPConfig, EvaCLIPVisionConfig

    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise CLIError(f"cannot read {config_path}: {one_line(error)}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    try:
        if model_type in FULL_MODEL_TYPES:
            return EvaCLIPConfig.from_pretrained(path)
        if model_type in VISION_MODEL_TYPES:
            return EvaCLIPVisionConfig.from_pretrained(path)
    except (ValueError, TypeError, OSError) as error:
        raise CLIError(f"{config_path} is not a valid EVA-CLIP config: {one_line(error)}") from None
    raise CLIError(
        f"{config_path} has model_type {model_type!r}; expected an EVA-CLIP checkpoint "
        f"({', '.join(FULL_MODEL_TYPES + VISION_MODEL_TYPES)})."
    )


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' own weight-loading bars, so the CLI's output stays its progress bar and summary."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_tower(source: ModelSource, select_layer: str, select_feature: str, dtype: "torch.dtype",
               device: "torch.device") -> Any:
    """The same `EvaCLIPVisionTower` LLaVA builds (so CLI features equal LLaVA's), ready for inference; a preset gets
    reproducible random weights (`llava_evaclip.features.load_tower`)."""
    from ..features import load_tower as build_tower

    try:
        with quiet_loading():
            return build_tower(source.label, select_layer, select_feature, dtype, device, seed=PRESET_SEED)
    except (ValueError, OSError) as error:
        raise CLIError(f"cannot load the vision tower from {source.spec}: {one_line(error)}") from None


def image_processor_for(source: ModelSource) -> Any:
    from ..processing import build_image_processor, load_image_processor

    if source.path is None:
        return build_image_processor(source.vision_config)
    return load_image_processor(source.path, source.vision_config)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (multi-line library messages would break the one-line contract)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------


def collect_images(inputs: Iterable[str]) -> list[Any]:
    """Files as given, folders searched recursively (`llava_evaclip.features.find_images`: directory symlinks
    followed, loops warned about); missing or empty inputs are one CLIError line."""
    from ..features import find_images

    try:
        items, skipped = find_images(inputs)
    except ValueError as error:
        raise CLIError(str(error)) from None
    for path, reason in skipped:
        warn(f"skipping {path}: {reason}")
    return items


def open_rgb(path: str) -> "Image.Image":
    """A fully decoded RGB image (LLaVA's `convert("RGB")`); any decoding problem becomes an OSError."""
    from ..features import open_rgb as decode

    return decode(path)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def _new_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (0644 under umask 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_NO_SPACE_HINTS = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (the disk quota is used up)",
                   errno.EFBIG: " (a file size limit was reached: see `ulimit -f`)"}


# A temp file younger than this is never taken for stale, whatever its pid says: a writer on another machine (or in
# another pid namespace) sharing the folder has a pid this machine does not know.
STALE_TEMP_SECONDS = 600


def remove_stale_temp_files(path: str) -> int:
    """Remove the hidden temp files earlier writes of `path` left when they were killed outright (SIGKILL, OOM
    killer, power loss), so killed runs do not pile up `.x.png.<pid>.<hex>.tmp` files. Only names of exactly that
    pattern for `path`'s name, regular files owned by this user, whose writer pid is not running here and which
    nobody touched for STALE_TEMP_SECONDS; anything else is left alone. Returns how many were removed."""
    from .._processes import process_exists
    from ..features import _is_temp_of

    directory = os.path.dirname(os.path.abspath(path))
    try:
        names = [name for name in os.listdir(directory) if _is_temp_of(name, {os.path.basename(path)})]
    except OSError:  # no folder yet, or one we cannot list: nothing of ours can be there
        return 0
    removed = 0
    for name in names:
        temp = os.path.join(directory, name)
        try:
            info = os.lstat(temp)
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                    or time.time() - info.st_mtime < STALE_TEMP_SECONDS or process_exists(int(name.split(".")[-3]))):
                continue
            os.remove(temp)
            removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _publish(temp: str, path: str, replace: bool) -> None:
    """Move the finished `temp` to `path`. Without `replace`, a `path` that appeared since the command checked
    (another run writing the same --out) is kept: a hard link never replaces, so there is no window between a check
    and the rename; a file system without hard links falls back to a check just before the rename."""
    if replace:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)
    except FileExistsError:
        raise CLIError(f"{path} appeared while this command ran (another run writing it?); it was left as it was "
                       "and nothing was written (pass --overwrite to replace it).") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise CLIError(f"{path} appeared while this command ran; it was left as it was (pass --overwrite to "
                           "replace it).") from None
        os.replace(temp, path)
        return
    os.remove(temp)


def atomic_write(path: str, write: Callable[[str], None], replace: bool = True) -> None:
    """Write through `write(tmp_path)` to a hidden temp name beside `path`, then rename: a crash or Ctrl-C never
    leaves a truncated `path`. The file gets the umask's mode, whatever `write` created it with (safetensors: 0600),
    so another user's job can read it where the umask allows. A write the system refuses (full disk, file size
    limit, I/O error) is one CLIError line; the temp file is removed and an existing `path` is left as it was.
    `replace=False` (no --overwrite) never replaces a `path` that appeared meanwhile (`_publish`)."""
    from ..features import _temp_name  # `.<name>.<pid>.<hex>.tmp`, cut to fit NAME_MAX

    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, _temp_name(os.path.basename(path)))
    stale = remove_stale_temp_files(path)
    if stale:
        warn(f"removed {stale} temp file(s) that killed writes of {path} had left")
    try:
        os.makedirs(directory, exist_ok=True)
        write(temp)
        os.chmod(temp, _new_file_mode())
        _publish(temp, path, replace)
    except BaseException as error:
        if os.path.lexists(temp):
            os.remove(temp)
        if not isinstance(error, OSError):
            raise
        reason = error.strerror or one_line(error)
        state = "was left as it was" if os.path.lexists(path) else "was not written"
        raise CLIError(f"cannot write {path}: {reason}{_NO_SPACE_HINTS.get(error.errno, '')}; {path} {state}."
                       ) from None


def check_output_file(path: str, overwrite: bool, option: str = "--out") -> None:
    """Everything that would stop the final write, found before any work: a folder in the way, an existing file
    without --overwrite, a parent that is a file or a folder we cannot write to."""
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a directory; give a file name.")
    if os.path.lexists(path) and not overwrite:  # a dangling symlink is something the user made, too
        raise CLIError(f"{option} {path} already exists; pass --overwrite to replace it.")
    problem = unwritable_folder(os.path.dirname(os.path.abspath(path)))
    if problem is not None:
        raise CLIError(f"{option} {path}: {problem}.")


def unwritable_folder(folder: str) -> Optional[str]:
    """Why nothing could be written into `folder` (created on write, so its nearest existing ancestor decides: a file,
    or a folder we may not write into), or None."""
    parent = os.path.abspath(folder)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write into {parent} (permission denied)"
    return None


__all__ = [
    "IMAGE_EXTENSIONS",
    "ModelSource",
    "atomic_write",
    "collect_images",
    "load_tower",
    "open_rgb",
    "remove_stale_temp_files",
    "resolve_model",
    "samples_dir",
    "unwritable_folder",
]

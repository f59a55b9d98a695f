"""EVA-CLIP as a LLaVA vision tower: a drop-in for LLaVA's `CLIPVisionTower` (and its S2 multi-scale variant)."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import os
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPImageProcessor
from transformers.utils import logging

from . import zero
from ._compat import CHECKPOINT_DTYPE
from .configuration_evaclip import EvaCLIPVisionConfig
from .modeling_evaclip import _LOADING, EvaCLIPVisionModel
from .processing import image_processor_file, load_image_processor

logger = logging.get_logger(__name__)

SELECT_FEATURES = ("patch", "cls_patch", "cls")
# LLaVA-NeXT's multi-layer selections (its CLIPVisionTower.feature_select): the prefix picks the layers, the rest of the
# name is one of the token selections above.
SLICE_FOUR = "slicefour_"  # every (L+1)//4-th hidden state, starting at (L+1)//4 + mm_vision_select_layer
SLICE_M25811_F6 = "slice_m25811_f6_"  # hidden states -2, -5, -8, -11 and 6
SLICE_M25811_F6_LAYERS = (-2, -5, -8, -11, 6)
NEXT_SELECT_FEATURES = tuple(
    prefix + feature for prefix in (SLICE_FOUR, SLICE_M25811_F6) for feature in ("patch", "cls_patch")
)
DEFAULT_SELECT_LAYER = -1  # LLaVA's ModelArguments default; LLaVA-1.5 scripts pass -2
DEFAULT_S2_SCALES = "336,672,1008"  # LLaVA's default for CLIPVisionTowerS2


def parse_select_layer(value: Any, num_hidden_layers: int) -> tuple[int, ...]:
    """`mm_vision_select_layer` as indices into `hidden_states` (0 = embeddings, L = last layer), in the order given.

    Accepts an int, a string such as "-2" or "-2,-5,-8", or a list/tuple of ints; None means LLaVA's default (-1).
    Raises ValueError naming the valid range for anything else."""
    num_states = num_hidden_layers + 1
    valid = (
        f"valid indices are {-num_states}..{num_hidden_layers} (hidden_states of a {num_hidden_layers}-layer tower: "
        f"0 = embeddings, negative counts from the end), as an int, a comma-separated string like \"-2,-5,-8\" "
        f"or a list"
    )
    if value is None:
        value = DEFAULT_SELECT_LAYER
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if not value.strip() or any(not part for part in parts):
            raise ValueError(f"mm_vision_select_layer {value!r} is not a layer index; {valid}.")
        try:
            items: list[Any] = [int(part) for part in parts]
        except ValueError:
            raise ValueError(f"mm_vision_select_layer {value!r} is not a layer index; {valid}.") from None
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise ValueError(f"mm_vision_select_layer is empty; {valid}.")
    indices: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"mm_vision_select_layer {value!r} contains {item!r}, which is not an int; {valid}.")
        if not -num_states <= item <= num_hidden_layers:
            raise ValueError(f"mm_vision_select_layer {item} is out of range; {valid}.")
        index = item % num_states
        if index in indices:
            raise ValueError(f"mm_vision_select_layer {value!r} selects hidden state {index} twice; {valid}.")
        indices.append(index)
    return tuple(indices)


def parse_select_feature(select_feature: Any, select_layer: Any, num_hidden_layers: int) -> tuple[str, Any]:
    """(token selection, layer selection) for `mm_vision_select_feature` and `mm_vision_select_layer`.

    LLaVA-NeXT's `slicefour_*` / `slice_m25811_f6_*` values choose several hidden states themselves; they are turned
    into the explicit list of indices its `CLIPVisionTower.feature_select` reads, in its order (normalised, so
    `parse_select_layer` checks the range)."""
    select_feature = select_feature or "patch"
    if select_feature in SELECT_FEATURES:
        return select_feature, select_layer
    if select_feature not in NEXT_SELECT_FEATURES:
        raise ValueError(
            f"mm_vision_select_feature {select_feature!r} is not supported; choose one of "
            f"{SELECT_FEATURES + NEXT_SELECT_FEATURES}."
        )
    num_states = num_hidden_layers + 1
    if select_feature.startswith(SLICE_FOUR):
        step = num_states // 4
        if step == 0:  # LLaVA-NeXT's own range() would fail with "arg 3 must not be zero"
            raise ValueError(
                f"mm_vision_select_feature {select_feature!r} reads every (L+1)//4-th hidden state, which needs at least "
                f"3 layers; this tower has {num_hidden_layers}. Use a deeper tower or another selection."
            )
        offset = DEFAULT_SELECT_LAYER if select_layer is None else select_layer
        if isinstance(offset, str):
            try:
                offset = int(offset)
            except ValueError:
                offset = None
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ValueError(
                f"mm_vision_select_feature {select_feature!r} needs one int mm_vision_select_layer (the offset of "
                f"the first of every {step}th hidden state), got {select_layer!r}."
            )
        layers = list(range(step + offset, num_states, step))
        prefix = SLICE_FOUR
    else:
        layers = list(SLICE_M25811_F6_LAYERS)
        prefix = SLICE_M25811_F6
    if not layers or any(not -num_states <= layer < num_states for layer in layers):
        raise ValueError(
            f"mm_vision_select_feature {select_feature!r} selects hidden states {layers} of a {num_hidden_layers}-layer "
            f"tower, which has {num_states} (0 = embeddings); use a deeper tower or another selection."
        )
    return select_feature[len(prefix):], [layer % num_states for layer in layers]


def parse_s2_scales(value: Any, image_size: int) -> list[int]:
    """S2 scales (image sides) as a sorted list; the smallest must be the tower's own image size (the tile size)."""
    expected = f"comma-separated image sides starting at the tower's image size, e.g. \"{image_size},{2 * image_size}\""
    if isinstance(value, str):
        try:
            scales = [int(part) for part in value.split(",")]
        except ValueError:
            raise ValueError(f"s2_scales {value!r} is not valid; expected {expected}.") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        scales = list(value)
    else:
        raise ValueError(f"s2_scales {value!r} is not valid; expected {expected}.")
    scales = sorted(scales)
    if not scales or scales[0] <= 0 or len(set(scales)) != len(scales):
        raise ValueError(f"s2_scales {value!r} is not valid; expected {expected} (positive, distinct).")
    if scales[0] != image_size:
        raise ValueError(
            f"s2_scales {value!r} must start at the tower's image size {image_size}: the smallest scale is the tile "
            f"size each crop is run at; expected {expected}."
        )
    return scales


def _processor_output_size(processor: Any) -> Optional[tuple[int, int]]:
    """The (height, width) a CLIP-style processor produces, or None when it does not crop to a fixed size."""
    if not getattr(processor, "do_center_crop", False):
        return None
    crop = processor.crop_size
    if isinstance(crop, int):
        return crop, crop
    try:
        return int(crop["height"]), int(crop["width"])
    except (KeyError, TypeError):
        return None


def _relative_path_hint(name: str) -> str:
    """Why a tower path that loaded at training fails now: LLaVA records `--vision_tower` in the model's config.json
    (`mm_vision_tower`) exactly as given, so `./checkpoints/...` is looked up from the current directory, and a `~`
    that no shell expanded (a quoted argument, a JSON config) names a directory called "~" there."""
    if os.path.isabs(name) or os.path.exists(name):
        return ""
    if name.startswith("~"):
        expanded = os.path.expanduser(name)
        found = "is a directory" if os.path.isdir(expanded) else "does not exist either"
        return (f" Only a shell expands `~`, so it was looked up as a folder named {name.split('/')[0]!r} in the "
                f"current directory ({os.getcwd()}); {expanded} {found}: set `mm_vision_tower` in the LLaVA model's "
                f"config.json (or --vision_tower) to the absolute path.")
    relative = (
        f"a relative path is looked up from the current directory ({os.getcwd()}); a LLaVA model's config.json "
        f"records the tower (`mm_vision_tower`) as given at training: run from that directory or set "
        f"`mm_vision_tower` to the tower's absolute path."
    )
    if not name.startswith(".") and name.count("/") == 1:  # also the shape of a Hub id ("BAAI/EVA-CLIP-8B")
        return f" If it is a local path (`checkpoints/tower`), not a Hub repo id: {relative}"
    return f" {relative[0].upper()}{relative[1:]}"


# Set while LLaVA's `load_pretrained_model` builds a LLaVA model from a base language model (`model_base`): "lora" for a
# LoRA checkpoint (LLaVA's branch for a model name containing "lora"), "projector" for a projector-only one. The base
# checkpoint has no tower weights, so a tower built on the meta device inside its `from_pretrained` would be filled
# with random values; it is left unloaded instead, for the builder's own `vision_tower.load_model()` to load from the
# tower's directory. Only a trained tower under "lora" is still built there: its weights come from the checkpoint's
# non_lora_trainables.bin (an mm_projector.bin never holds them). `llava_registry` sets it.
_loading_onto_a_base_model: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "evaclip_loading_onto_a_base_model", default=None)
BASE_MODEL_LOADS = ("lora", "projector")


@contextlib.contextmanager
def loading_onto_a_base_model(kind: str):
    """While active, a tower built on the meta device waits for `load_model()` (see above)."""
    if kind not in BASE_MODEL_LOADS:
        raise ValueError(f"kind must be one of {BASE_MODEL_LOADS}, got {kind!r}.")
    token = _loading_onto_a_base_model.set(kind)
    try:
        yield
    finally:
        _loading_onto_a_base_model.reset(token)


def _building_on_meta_device() -> bool:
    """True while modules are being built on the meta device, as a parent model's `from_pretrained` does before it
    fills in the weights: transformers 5 opens a `torch.device("meta")` context (tensors created without a device
    land there; `from_pretrained` refuses to run inside it), and 4.x's `low_cpu_mem_usage` opens accelerate's
    `init_empty_weights`, which moves each registered parameter there. Never under ZeRO-3, which builds for real."""
    if zero.is_zero3_enabled():
        return False
    if torch.empty(0).device.type == "meta":
        return True
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0), requires_grad=False))
    return probe.probe.device.type == "meta"


def _split_tiles(images: torch.Tensor, num_split: int) -> torch.Tensor:
    """[B, C, n*s, n*s] -> [n*n*B, C, s, s], tiles in row-major order, each tile's batch contiguous."""
    tiles = images.unflatten(2, (num_split, -1)).unflatten(4, (num_split, -1))  # B C n s n s
    return tiles.permute(2, 4, 0, 1, 3, 5).flatten(0, 2)


def _merge_tiles(features: torch.Tensor, num_split: int) -> torch.Tensor:
    """Inverse of `_split_tiles` on feature maps: [n*n*B, C, g, g] -> [B, C, n*g, n*g]."""
    grid = features.unflatten(0, (num_split, num_split, -1))  # n n B C g g
    return grid.permute(2, 3, 0, 4, 1, 5).flatten(4, 5).flatten(2, 3)


class EvaCLIPVisionTower(nn.Module):
    """An EVA-CLIP vision tower with the interface LLaVA's `build_vision_tower` returns.

    Reads `mm_vision_select_layer` (one index or several, concatenated on channels), `mm_vision_select_feature`
    ("patch", "cls_patch" or "cls", and LLaVA-NeXT's `slicefour_*` / `slice_m25811_f6_*`), `unfreeze_mm_vision_tower`
    or LLaVA-NeXT's `mm_tunable_parts`, and LLaVA's S2 options (`s2`, `s2_scales`) from `args`. Only the layers up to the deepest selected one run, and only the selected hidden states are kept.
    Everything is validated at construction, from the config alone, so a delay-loaded tower fails early too.
    """

    def __init__(self, vision_tower: Union[str, os.PathLike], args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = os.fspath(vision_tower)
        self.cfg_only = self._load_config(self.vision_tower_name)
        self.select_layer = getattr(args, "mm_vision_select_layer", DEFAULT_SELECT_LAYER)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch") or "patch"
        self.token_selection, layers = parse_select_feature(
            self.select_feature, self.select_layer, self.cfg_only.num_hidden_layers
        )
        if self.token_selection == self.select_feature:
            self.select_layers = parse_select_layer(layers, self.cfg_only.num_hidden_layers)
        else:  # LLaVA-NeXT's slices may repeat a hidden state (a short tower); its features repeat it too
            self.select_layers = tuple(layers)
        self.s2 = bool(getattr(args, "s2", False))
        if self.s2:
            self.s2_scales = parse_s2_scales(getattr(args, "s2_scales", DEFAULT_S2_SCALES), self.cfg_only.image_size)
            self.s2_split_size = self.s2_scales[0]
            self.s2_image_size = self.s2_scales[-1]
        else:
            self.s2_scales = None
        # A tower whose weights are trained lives in the LLaVA checkpoint, so it is built eagerly (LLaVA 1.5's flag, or
        # LLaVA-NeXT's `mm_tunable_parts` naming it).
        trained = getattr(args, "unfreeze_mm_vision_tower", False) or "mm_vision_tower" in (
            getattr(args, "mm_tunable_parts", None) or ""
        )
        # LLaVA-NeXT builds the tower inside the LLaVA model's `from_pretrained` (its delay_load defaults to False), and
        # both LLaVAs build a trained one there; when that model comes from a base language model, the tower's weights
        # are not in what it loads (unless a LoRA checkpoint trained it): wait for the builder's load_model() (from the
        # tower's directory) rather than take random ones.
        base_load = _loading_onto_a_base_model.get()
        waits_for_builder = (base_load == "projector" or (base_load == "lora" and not trained)) and (
            _building_on_meta_device())
        if not waits_for_builder and (trained or not delay_load):
            self.load_model()

    @staticmethod
    def _load_config(name: str) -> EvaCLIPVisionConfig:
        """The vision config of a checkpoint (a full EvaCLIPModel dir works too), with an error that says what was
        tried when nothing loads."""
        try:
            if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
                raise OSError(f"no config.json in {name!r}")  # transformers 5 would fall back to a default config
            return EvaCLIPVisionConfig.from_pretrained(name)
        except (OSError, ValueError) as error:
            if os.path.isdir(name):
                tried = f"the local directory {name!r} (its config.json is missing or not an EVA-CLIP config)"
            elif os.path.exists(name):
                tried = f"the local path {name!r}, which is a file, not a model directory"
            else:
                tried = f"{name!r} as a local directory (it does not exist) and as a Hugging Face Hub repo id"
            from .presets import list_presets

            if name.rstrip("/") in list_presets():  # "./checkpoints/EVA02-CLIP-L-14-336" is a path, not the preset
                hint = " It names an architecture preset, which has no weights."
            else:
                hint = _relative_path_hint(name)
            raise ValueError(
                f"Cannot load the EVA-CLIP vision tower {name!r}: tried {tried} ({error}).{hint} Pass a directory "
                f"written by `llava-evaclip convert` (or EvaCLIPModel/EvaCLIPVisionModel.save_pretrained)."
            ) from error

    def load_model(self, device_map: Optional[Any] = None) -> None:
        """Load the weights and the image processor (once; later calls are no-ops), frozen as LLaVA's tower is.

        A checkpoint that lacks any of the tower's weights is refused (a ValueError listing them, on every rank under
        ZeRO-3) instead of leaving them randomly initialised. Built on the meta device, the tower is only constructed
        from its config: that happens when a LLaVA checkpoint whose tower was trained is reloaded (the tower is built
        eagerly inside the LLaVA model's `from_pretrained`), and the trained weights then come from that checkpoint."""
        if self.is_loaded:
            logger.warning(f"{self.vision_tower_name} is already loaded, `load_model` called again, skipping.")
            return
        self.image_processor = self._load_image_processor()
        with _LOADING:  # another thread's load would look like a parent's meta build (see `_LOADING`)
            if _building_on_meta_device():
                self.vision_tower = EvaCLIPVisionModel(copy.deepcopy(self.cfg_only))
            else:
                self.vision_tower = zero.from_pretrained(EvaCLIPVisionModel, self.vision_tower_name,
                                                         device_map=device_map, **CHECKPOINT_DTYPE)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def _load_image_processor(self) -> CLIPImageProcessor:
        name, config = self.vision_tower_name, self.cfg_only
        processor = load_image_processor(name, config)
        if self.s2:  # LLaVA's S2 tower preprocesses at the largest scale and resizes down for the others
            processor = copy.deepcopy(processor)
            processor.size = {"shortest_edge": self.s2_image_size}
            processor.crop_size = {"height": self.s2_image_size, "width": self.s2_image_size}
        output_size = _processor_output_size(processor)
        if output_size is not None and output_size != (self.input_size, self.input_size):
            source = image_processor_file(name) or "image processor"  # the file to fix, where it has one
            raise ValueError(
                f"The image processor of {name!r} produces {output_size[0]}x{output_size[1]} images but the tower "
                f"takes {self.input_size}x{self.input_size}; fix crop_size in its {source}."
            )
        return processor

    @property
    def input_size(self) -> int:
        """The side of the images `forward` takes: the processor's output size."""
        return self.s2_image_size if self.s2 else self.config.image_size

    # ---------------------------------------------------------------------------------------------------------------
    # Forward
    # ---------------------------------------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> None:
        size, channels = self.input_size, self.config.num_channels
        expected = f"[batch, {channels}, {size}, {size}] (the image processor's output size, {size}x{size})"
        if not images.is_floating_point():  # uint8 pixels would be cast, not normalised: silently wrong features
            raise ValueError(f"Images must be a floating-point tensor (the image processor's normalised output), got "
                             f"dtype {images.dtype}; pass image_processor(images, return_tensors='pt')['pixel_values'].")
        if images.ndim != 4 or images.shape[1] != channels or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"Images of shape {tuple(images.shape)} do not fit the tower: expected {expected}.")
        if images.shape[0] == 0:
            raise ValueError(f"Got an empty batch of images; expected {expected} with batch >= 1.")

    def _layer_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """All tokens (CLS first) of the selected hidden states, concatenated on channels, in the tower's dtype."""
        states = self.vision_tower.vision_model.select_hidden_states(pixel_values, self.select_layers)
        return torch.cat([states[index] for index in self.select_layers], dim=-1)

    def _select(self, cls_token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """cls_token [B, 1, C] and patches [B, N, C] -> the requested tokens."""
        if self.token_selection == "patch":
            return patches
        if self.token_selection == "cls":
            return cls_token
        return torch.cat((cls_token, patches), dim=1)

    def _forward_single_scale(self, images: torch.Tensor) -> torch.Tensor:
        features = self._layer_features(images.to(device=self.device, dtype=self.dtype))
        return self._select(features[:, :1], features[:, 1:]).to(images.dtype)

    def _forward_s2(self, images: torch.Tensor) -> torch.Tensor:
        """LLaVA's S2: per scale, resize, cut into tiles of the base size, run each tile, stitch the patch grids back,
        area-downsample to the base grid, and concatenate the scales on channels (CLS: mean over tiles)."""
        base, dtype = self.s2_split_size, images.dtype
        grid = self.num_patches_per_side
        patch_maps, cls_tokens = [], []
        for scale in self.s2_scales:
            num_split = math.ceil(scale / base)
            tiled_size = num_split * base
            scaled = images
            for size in (scale, tiled_size):
                if scaled.shape[-1] != size:
                    scaled = F.interpolate(scaled.float(), size=(size, size), mode="bicubic").to(dtype)
            features = self._layer_features(_split_tiles(scaled, num_split).to(device=self.device, dtype=self.dtype))
            features = features.to(dtype)
            cls_tokens.append(features[:, 0].unflatten(0, (num_split * num_split, -1)).mean(dim=0))
            patch_map = features[:, 1:].transpose(1, 2).unflatten(2, (grid, grid))
            patch_map = _merge_tiles(patch_map, num_split)
            kept = math.ceil(scale / tiled_size * patch_map.shape[-1])  # drop what resizing to whole tiles added
            for size in (kept, grid):
                if patch_map.shape[-1] != size:
                    patch_map = F.interpolate(patch_map.float(), size=(size, size), mode="area").to(dtype)
            patch_maps.append(patch_map)
        patches = torch.cat(patch_maps, dim=1).flatten(2).transpose(1, 2)
        return self._select(torch.cat(cls_tokens, dim=-1).unsqueeze(1), patches)

    def _forward_batch(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return self._forward_s2(images) if self.s2 else self._forward_single_scale(images)

    def forward(self, images: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Union[torch.Tensor, list[torch.Tensor]]:
        """Features [B, tokens, hidden_size] in the input dtype; a list of [3, H, W] gives a list of [1, tokens, C].

        Runs under `no_grad` when the tower is frozen and keeps the autograd graph when its parameters are trained."""
        if not self.is_loaded:
            raise RuntimeError(f"The vision tower {self.vision_tower_name!r} is not loaded; call load_model() first.")
        track_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(track_grad):
            if isinstance(images, torch.Tensor):
                return self._forward_batch(images)
            if not isinstance(images, (list, tuple)) or len(images) == 0:
                raise ValueError(
                    f"images must be a tensor [batch, 3, H, W] or a non-empty list of [3, H, W] tensors, got "
                    f"{'an empty list' if isinstance(images, (list, tuple)) else type(images).__name__}."
                )
            for image in images:
                if not isinstance(image, torch.Tensor) or image.ndim != 3:
                    shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                    raise ValueError(f"Each image in a list must be a [3, H, W] tensor, got {shape}.")
            if all(image.shape == images[0].shape and image.dtype == images[0].dtype for image in images):
                return list(self._forward_batch(torch.stack(list(images))).split(1))
            return [self._forward_batch(image.unsqueeze(0)) for image in images]

    # ---------------------------------------------------------------------------------------------------------------
    # LLaVA's properties
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> EvaCLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        """Channels of each output token: the tower width times the number of selected layers (and S2 scales)."""
        width = self.config.hidden_size * len(self.select_layers)
        return width * len(self.s2_scales) if self.s2 else width

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image (S2 merges every scale onto the base grid): the patches, plus CLS when it is selected (as
        LLaVA-NeXT counts), or just CLS."""
        if self.token_selection == "cls":
            return 1
        return self.num_patches_per_side**2 + (self.token_selection == "cls_patch")

    @property
    def image_size(self) -> int:
        """The side of one tile the tower runs at (LLaVA-NeXT's anyres grid unit)."""
        return self.config.image_size


__all__ = ["EvaCLIPVisionTower", "SELECT_FEATURES", "parse_select_layer", "parse_s2_scales"]

"""Lossless conversion of released EVA-CLIP checkpoints into this package's Hugging Face format.

Source kinds, detected from the state-dict keys:

- ``baai``: BAAI's release files (``EVA02_CLIP_L_336_psz14_s6B.pt`` ...), in either of BAAI's layouts: ``CLIP`` (text
  tower at the top level: ``transformer.resblocks.*``, ``token_embedding``, ...) or ``CustomCLIP`` (the same under
  ``text.``); vision under ``visual.`` with a fused ``qkv`` plus ``q_bias``/``v_bias`` (EVA01, bigE) or separate
  ``q_proj``/``k_proj``/``v_proj`` (EVA02).
- ``open_clip``: open_clip's EVA models: a timm trunk under ``visual.trunk.`` (its ``head`` is the image projection)
  and the text tower under ``text.``.
- ``timm``: a timm ``Eva`` vision state dict (``eva02_*_clip_*``, ``eva_giant_patch14_clip_224``) or a bare BAAI
  ``visual`` state dict; always converted to a vision tower.
- ``hf``: a Hugging Face dir of InternVL's port (``model_type`` "clip") or of this package, rewritten in our format.

Every source weight must land on exactly one model weight and every model weight must come from the source: anything
left over on either side, or any shape that differs, is a `ConversionError` that lists the keys — never a silent
random init. ``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)`` (memory-mapped when possible), so a
checkpoint cannot run code. The model is built on the meta device and the checkpoint tensors are assigned to it
(copied only to split a fused q/k/v or to change dtype), and the output is written to a temporary dir beside OUT that
is renamed only when complete.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from transformers.utils import logging

from .configuration_evaclip import EvaCLIPConfig, EvaCLIPTextConfig, EvaCLIPVisionConfig, resolve_arch
from .modeling_evaclip import (
    EvaCLIPModel,
    EvaCLIPPreTrainedModel,
    EvaCLIPRotaryEmbedding,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from .processing import build_image_processor
from .tokenization import PAD_TOKEN_ID, VOCAB_SIZE, write_tokenizer_files

logger = logging.get_logger(__name__)

SOURCE_KINDS = ("baai", "open_clip", "timm", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Shards above this size are split (save_pretrained's max_shard_size): one file for B/L models, several for g/bigE.
DEFAULT_MAX_SHARD_SIZE = "5GB"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_STATE_DICT_WRAPPERS = ("state_dict", "module", "model")
_MAX_LISTED_KEYS = 25
# fp16 release files store the rotary tables in half precision; a wrong grid or frequency is off by far more.
_ROPE_TABLE_ATOL = 2e-3


class ConversionError(ValueError):
    """A checkpoint that cannot be converted losslessly; the message says what is wrong and what is expected."""


@dataclass
class SourceCheckpoint:
    """A loaded source: its kind, its flat state dict and, for Hugging Face dirs, the config.json it came with."""

    path: str
    kind: str
    state_dict: dict[str, torch.Tensor]
    hf_config: Optional[dict[str, Any]] = None

    @property
    def text_prefix(self) -> Optional[str]:
        """Where the CLIP-layout text tower lives: "" (BAAI `CLIP`), "text." (`CustomCLIP`, open_clip) or None."""
        if self.kind not in ("baai", "open_clip"):
            return None
        if any(key.startswith("text.") for key in self.state_dict):
            return "text."
        if any(key.startswith(("transformer.resblocks.", "token_embedding.")) for key in self.state_dict):
            return ""
        return None


@dataclass
class ConversionResult:
    """What `convert_checkpoint` wrote."""

    output_dir: str
    source_kind: str
    model_class: str
    num_parameters: int
    dtype: str
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------------------------


def _list_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


def _refusal_reason(message: str) -> str:
    """The part of torch's weights_only error that names what was refused, without its advice to load the file with
    weights_only=False (not advice a converter of untrusted downloads should pass on)."""
    paragraphs = [part.strip() for part in message.split("\n\n") if part.strip()]
    useful = [part for part in paragraphs
              if not part.startswith(("Weights only load failed", "Check the documentation"))]
    reason = (useful or paragraphs or ["unknown"])[0]
    return reason.replace("WeightsUnpickler error:", "").strip()


def _torch_load(path: str) -> Any:
    """torch.load that never unpickles code; memory-mapped for zip checkpoints so tensors are not read twice."""
    use_mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        reason = _refusal_reason(str(error))
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) refused this file because it holds Python objects other than "
            f"tensors and plain containers (loading them could run arbitrary code, so nothing was executed). Expected "
            f"a state dict of tensors as BAAI, timm and open_clip release them. Refused: {reason}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error}).") from None


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error}).") from None


def _unwrap_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The flat name -> tensor dict inside a checkpoint: unwraps {"state_dict"/"module"/"model": ...} and strips
    DistributedDataParallel's `module.` prefixes."""
    for _ in range(len(_STATE_DICT_WRAPPERS) + 1):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
            break
        inner = next((obj[key] for key in _STATE_DICT_WRAPPERS if isinstance(obj.get(key), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(
            f"{path}: expected a state dict (a mapping of names to tensors, optionally under 'state_dict', 'module' "
            f"or 'model'), found {type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}."
        )
    not_tensors = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ConversionError(
            f"{path}: the state dict holds entries that are not tensors: {_list_keys(map(str, not_tensors))}."
        )
    return {(key[len("module."):] if key.startswith("module.") else key): value for key, value in obj.items()}


def load_weights_file(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """A flat state dict from a .safetensors file or a (wrapped) torch checkpoint, read safely."""
    path = str(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return _unwrap_state_dict(_torch_load(path), path)


def _load_index(directory: Path, index_name: str) -> dict[str, torch.Tensor]:
    with open(directory / index_name, encoding="utf-8") as handle:
        weight_map = json.load(handle).get("weight_map", {})
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:  # an index must name files in its own dir, never elsewhere on disk
            raise ConversionError(f"{directory / index_name}: shard {shard!r} is not a file name in that directory.")
        state_dict.update(load_weights_file(directory / shard))
    if not state_dict:
        raise ConversionError(f"{directory / index_name} lists no weight files.")
    return state_dict


def detect_source_kind(keys: Iterable[str]) -> str:
    """One of `SOURCE_KINDS`, from the key names alone."""
    keys = list(keys)
    if any(key.startswith(("vision_model.", "text_model.")) for key in keys):
        return "hf"
    if any(key.startswith("visual.trunk.") for key in keys):
        return "open_clip"
    if any(key.startswith("visual.") for key in keys):
        return "baai"
    if any(key.startswith("blocks.") for key in keys) or "cls_token" in keys or "patch_embed.proj.weight" in keys:
        return "timm"
    raise ConversionError(
        "Unrecognised checkpoint layout: expected BAAI EVA-CLIP keys ('visual.blocks.*'), open_clip "
        "('visual.trunk.*'), timm ('blocks.*', 'cls_token') or Hugging Face ('vision_model.*'); "
        f"found {_list_keys(keys)}."
    )


def load_source(src: Union[str, os.PathLike]) -> SourceCheckpoint:
    """Read SRC (a checkpoint file or a Hugging Face / open_clip dir) and detect its kind."""
    path = Path(src)
    hf_config = None
    if path.is_dir():
        config_file = path / "config.json"
        hf_files = [name for name in HF_WEIGHT_FILES if (path / name).is_file()]
        open_clip_files = [name for name in OPEN_CLIP_WEIGHT_FILES if (path / name).is_file()]
        if config_file.is_file() and hf_files:
            with open(config_file, encoding="utf-8") as handle:
                hf_config = json.load(handle)
            name = hf_files[0]
            state_dict = _load_index(path, name) if name.endswith(".index.json") else load_weights_file(path / name)
        elif open_clip_files:
            state_dict = load_weights_file(path / open_clip_files[0])
        else:
            raise ConversionError(
                f"{path} is a directory without a checkpoint: expected a Hugging Face dir (config.json with "
                f"{' or '.join(HF_WEIGHT_FILES)}) or an open_clip dir ({' or '.join(OPEN_CLIP_WEIGHT_FILES)})."
            )
    elif path.is_file():
        state_dict = load_weights_file(path)
    else:
        raise ConversionError(f"SRC {str(path)!r} does not exist; expected a checkpoint file (.pt, .bin, .pth, "
                              ".safetensors) or a Hugging Face checkpoint dir.")
    kind = detect_source_kind(state_dict)
    if hf_config is not None and kind != "hf":
        raise ConversionError(f"{path}: config.json is present but the weights are not in Hugging Face layout "
                              f"(they look like a {kind} state dict); pass the weights file itself as SRC.")
    return SourceCheckpoint(path=str(path), kind=kind, state_dict=state_dict, hf_config=hf_config)


# ----------------------------------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------------------------------

# Sub-modules of one vision block: BAAI names, timm names -> ours (under vision_model.encoder.layers.N.).
_VISION_BLOCK_MODULES = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.proj": "self_attn.out_proj",
    "attn.inner_attn_ln": "self_attn.inner_attn_ln",  # BAAI sub-LN
    "attn.norm": "self_attn.inner_attn_ln",  # timm scale_attn_inner
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w1": "mlp.fc1",  # BAAI SwiGLU: silu(w1 x) * w2 x -> w3
    "mlp.w2": "mlp.fc1_up",
    "mlp.w3": "mlp.fc2",
    "mlp.fc1_g": "mlp.fc1",  # timm SwiGLU: silu(fc1_g x) * fc1_x x -> fc2
    "mlp.fc1_x": "mlp.fc1_up",
    "mlp.ffn_ln": "mlp.ffn_ln",  # BAAI sub-LN
    "mlp.norm": "mlp.ffn_ln",  # timm scale_mlp
}
_VISION_BLOCK_PARAMS = {
    "gamma_1": "layer_scale1",
    "gamma_2": "layer_scale2",
    "attn.q_bias": "self_attn.q_proj.bias",
    "attn.v_bias": "self_attn.v_proj.bias",
}
_TEXT_BLOCK_MODULES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TEXT_BLOCK_PARAMS = {"ls_1.gamma": "layer_scale1", "ls_2.gamma": "layer_scale2"}
_BLOCK_PATTERN = re.compile(r"(\d+)\.(.+)")


def _split_qkv(tensor: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v of a fused projection, as separate tensors: views of one storage would be dropped as "shared" by
    save_pretrained, so each part gets its own memory."""
    if tensor.shape[0] % 3:
        raise ConversionError(f"A fused q/k/v tensor must have a first dim divisible by 3, got {tuple(tensor.shape)}.")
    return [part.clone() for part in tensor.chunk(3, dim=0)]


class _Mapper:
    """Collects target tensors with the source key each came from, and the source keys it could not place."""

    def __init__(self, vision_config: EvaCLIPVisionConfig) -> None:
        self.vision_config = vision_config
        self.tensors: dict[str, torch.Tensor] = {}
        self.origin: dict[str, str] = {}
        self.unexpected: list[str] = []
        self._rope_table: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def put(self, source_key: str, target_key: str, tensor: torch.Tensor) -> None:
        if target_key in self.tensors:
            raise ConversionError(
                f"Both {self.origin[target_key]!r} and {source_key!r} map to {target_key!r}; the checkpoint mixes "
                "two layouts of the same weight."
            )
        self.tensors[target_key] = tensor
        self.origin[target_key] = source_key

    # -- vision --------------------------------------------------------------------------------------------------------

    def _expected_rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_table is None:
            rotary = EvaCLIPRotaryEmbedding(self.vision_config)
            cos, sin = rotary.compute_table(rotary.grid_size, rotary.grid_size)
            self._rope_table = (cos[1:], sin[1:])  # row 0 is our identity row for CLS; BAAI stores patches only
        return self._rope_table

    def check_rope_table(self, source_key: str, tensor: torch.Tensor) -> None:
        """BAAI stores its 2D RoPE tables as buffers (which its loader restores): they must equal ours, or the
        --arch config (image_size, pt_hw_seq_len, intp_freq, head width) is not the checkpoint's."""
        if not self.vision_config.use_rope:
            raise ConversionError(
                f"{source_key!r} is a rotary position table, but the --arch config has no RoPE (vision_cfg.rope); "
                "this checkpoint is an EVA-02 model, pick an EVA02 preset."
            )
        cos, sin = self._expected_rope()
        expected = cos if source_key.endswith("cos") else sin
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ConversionError(
                f"Shape mismatch for {source_key!r}: checkpoint {list(tensor.shape)} vs --arch {list(expected.shape)} "
                "(patch grid x head_dim); check image_size, patch_size and head_width."
            )
        error = (tensor.float() - expected).abs().max().item()
        if error > _ROPE_TABLE_ATOL:
            raise ConversionError(
                f"The rotary table {source_key!r} differs from the one the --arch config defines (max abs diff "
                f"{error:.3g}); check vision_cfg.pt_hw_seq_len and intp_freq."
            )

    def map_vision(self, source_key: str, name: str, tensor: torch.Tensor) -> None:
        """`name` is relative to the vision tower (timm / BAAI `visual` naming)."""
        prefix = "vision_model."
        if name == "cls_token":
            self.put(source_key, prefix + "embeddings.class_embedding", tensor.reshape(-1))
        elif name == "pos_embed":
            self.put(source_key, prefix + "embeddings.position_embedding.weight",
                     tensor[0] if tensor.ndim == 3 else tensor)
        elif name in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
            self.put(source_key, prefix + "embeddings.patch_embedding." + name.rsplit(".", 1)[1], tensor)
        elif name in ("norm.weight", "norm.bias"):
            self.put(source_key, prefix + "post_layernorm." + name.rsplit(".", 1)[1], tensor)
        elif name in ("head.weight", "head.bias"):
            self.put(source_key, "visual_projection." + name.rsplit(".", 1)[1], tensor)
        elif name in ("rope.freqs_cos", "rope.freqs_sin"):
            self.check_rope_table(source_key, tensor)
        elif name.startswith("blocks."):
            self._map_vision_block(source_key, name[len("blocks."):], tensor)
        else:
            self.unexpected.append(source_key)

    def _map_vision_block(self, source_key: str, name: str, tensor: torch.Tensor) -> None:
        match = _BLOCK_PATTERN.fullmatch(name)
        if match is None:
            self.unexpected.append(source_key)
            return
        index, rest = match.groups()
        prefix = f"vision_model.encoder.layers.{index}."
        module, _, leaf = rest.rpartition(".")
        if rest in _VISION_BLOCK_PARAMS:
            self.put(source_key, prefix + _VISION_BLOCK_PARAMS[rest], tensor)
        elif rest == "attn.qkv.weight":
            for part, tensor_part in zip("qkv", _split_qkv(tensor)):
                self.put(source_key, prefix + f"self_attn.{part}_proj.weight", tensor_part)
        elif rest in ("attn.rope.freqs_cos", "attn.rope.freqs_sin"):
            self.check_rope_table(source_key, tensor)
        elif rest == "attn.k_bias":  # timm keeps a zero k bias buffer next to q_bias / v_bias
            if tensor.count_nonzero().item():
                raise ConversionError(f"{source_key!r} is a non-zero k bias; EVA-CLIP attention has no k bias.")
        elif module in _VISION_BLOCK_MODULES and leaf in ("weight", "bias"):
            self.put(source_key, prefix + f"{_VISION_BLOCK_MODULES[module]}.{leaf}", tensor)
        else:
            self.unexpected.append(source_key)

    # -- text ----------------------------------------------------------------------------------------------------------

    def map_text(self, source_key: str, name: str, tensor: torch.Tensor) -> None:
        """`name` is relative to the CLIP-layout text tower."""
        prefix = "text_model."
        if name == "token_embedding.weight":
            self.put(source_key, prefix + "embeddings.token_embedding.weight", tensor)
        elif name == "positional_embedding":
            self.put(source_key, prefix + "embeddings.position_embedding.weight", tensor)
        elif name in ("ln_final.weight", "ln_final.bias"):
            self.put(source_key, prefix + "final_layer_norm." + name.rsplit(".", 1)[1], tensor)
        elif name == "text_projection":  # a [width, embed_dim] matrix used as `x @ proj`
            self.put(source_key, "text_projection.weight", tensor.t().contiguous())
        elif name == "text_projection.weight":  # open_clip's nn.Linear variant
            self.put(source_key, "text_projection.weight", tensor)
        elif name == "logit_scale":
            self.put(source_key, "logit_scale", tensor)
        elif name == "attn_mask":  # the causal mask buffer; ours is built on the fly
            return
        elif name.startswith("transformer.resblocks."):
            self._map_text_block(source_key, name[len("transformer.resblocks."):], tensor)
        else:
            self.unexpected.append(source_key)

    def _map_text_block(self, source_key: str, name: str, tensor: torch.Tensor) -> None:
        match = _BLOCK_PATTERN.fullmatch(name)
        if match is None:
            self.unexpected.append(source_key)
            return
        index, rest = match.groups()
        prefix = f"text_model.encoder.layers.{index}."
        module, _, leaf = rest.rpartition(".")
        if rest in _TEXT_BLOCK_PARAMS:
            self.put(source_key, prefix + _TEXT_BLOCK_PARAMS[rest], tensor)
        elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = "weight" if rest.endswith("weight") else "bias"
            for part, tensor_part in zip("qkv", _split_qkv(tensor)):
                self.put(source_key, prefix + f"self_attn.{part}_proj.{leaf}", tensor_part)
        elif module in _TEXT_BLOCK_MODULES and leaf in ("weight", "bias"):
            self.put(source_key, prefix + f"{_TEXT_BLOCK_MODULES[module]}.{leaf}", tensor)
        else:
            self.unexpected.append(source_key)


def _is_text_key(key: str, text_prefix: Optional[str]) -> bool:
    if key in ("logit_scale", "text.logit_scale"):
        return True
    if text_prefix is None:
        return False
    if text_prefix:
        return key.startswith(text_prefix)
    return not key.startswith("visual.")


def map_state_dict(
    source: SourceCheckpoint, vision_config: EvaCLIPVisionConfig, vision_only: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename (and split / transpose where the layouts differ) every source tensor into our key names.

    Returns the new state dict and, for each new key, the source key it came from. Text weights are skipped when
    `vision_only`; any source key that has no place raises a `ConversionError` listing them.
    """
    mapper = _Mapper(vision_config)
    state_dict = source.state_dict
    kind = source.kind
    if kind == "hf":
        for key, tensor in state_dict.items():
            if key.endswith("position_ids"):  # an index buffer older transformers versions saved
                continue
            if vision_only and key.startswith(("text_model.", "text_projection.", "logit_scale")):
                continue
            mapper.put(key, key, tensor)
        return mapper.tensors, mapper.origin

    text_prefix = source.text_prefix
    vision_prefix = {"baai": "visual.", "open_clip": "visual.trunk.", "timm": ""}[kind]
    for key, tensor in state_dict.items():
        if kind != "timm" and _is_text_key(key, text_prefix):
            if vision_only:
                continue
            name = "logit_scale" if key in ("logit_scale", "text.logit_scale") else key[len(text_prefix or ""):]
            mapper.map_text(key, name, tensor)
        elif key.startswith(vision_prefix):
            mapper.map_vision(key, key[len(vision_prefix):], tensor)
        else:
            mapper.unexpected.append(key)
    if mapper.unexpected:
        raise ConversionError(
            f"The {kind} checkpoint has weights this converter does not know where to put (unexpected keys): "
            f"{_list_keys(mapper.unexpected)}. They belong to an architecture EVA-CLIP does not use (e.g. mean pooling "
            "'fc_norm', relative position bias, an MLP text projection); nothing was written."
        )
    return mapper.tensors, mapper.origin


# ----------------------------------------------------------------------------------------------------------------------
# Configs and model
# ----------------------------------------------------------------------------------------------------------------------


def _config_fields(config_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a foreign config dict that our config class takes (its constructor's own arguments)."""
    accepted = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    return {key: value for key, value in values.items() if key in accepted}


_VISION_MODEL_TYPES = ("evaclip_vision_model", "clip_vision_model")
_TEXT_MODEL_TYPES = ("evaclip_text_model", "clip_text_model")


def config_from_hf_dict(config_dict: Mapping[str, Any]) -> Union[EvaCLIPConfig, EvaCLIPVisionConfig]:
    """Our config from a config.json of the InternVL port (model_type "clip" / "clip_vision_model") or of this
    package, keeping only the fields our configs define (the port's generic transformers fields are dropped)."""
    model_type = config_dict.get("model_type")
    if model_type in _VISION_MODEL_TYPES:
        return EvaCLIPVisionConfig(**_config_fields(EvaCLIPVisionConfig, config_dict))
    if model_type in _TEXT_MODEL_TYPES:
        raise ConversionError(f"config.json describes a text tower only (model_type {model_type!r}); the converter "
                              "writes full models or vision towers.")
    if model_type not in ("evaclip", "clip") or "vision_config" not in config_dict:
        raise ConversionError(f"config.json has model_type {model_type!r}; expected an EVA-CLIP config ('evaclip', or "
                              "'clip' from the InternVL port) with vision_config and text_config.")
    projection_dim = config_dict.get("projection_dim", 512)
    towers = {}
    for key, config_class in (("vision_config", EvaCLIPVisionConfig), ("text_config", EvaCLIPTextConfig)):
        fields = _config_fields(config_class, config_dict.get(key) or {})
        fields.setdefault("projection_dim", projection_dim)
        towers[key] = config_class(**fields).to_dict()
    top = _config_fields(EvaCLIPConfig, config_dict)
    top.pop("text_config", None)
    top.pop("vision_config", None)
    return EvaCLIPConfig(**towers, **top)


def _resolve_config(source: SourceCheckpoint, arch: Optional[str]) -> Union[EvaCLIPConfig, EvaCLIPVisionConfig]:
    if arch:
        return resolve_arch(arch)
    if source.hf_config is not None:
        return config_from_hf_dict(source.hf_config)
    raise ConversionError(
        f"--arch is required for a {source.kind} checkpoint (its file does not record the architecture): pass a preset "
        "name (see `llava-evaclip presets`) or the path of a BAAI model-config JSON (embed_dim, vision_cfg, text_cfg)."
    )


def _empty_model(model_class: type, config: Any) -> EvaCLIPPreTrainedModel:
    """The model with its parameters on the meta device: no memory and no random init for weights we overwrite."""
    with torch.device("meta"):
        return model_class(config)


def _materialize(model: EvaCLIPPreTrainedModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Assign the converted tensors as the model's parameters (no copy), then compute the non-persistent buffers."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    for module in model.modules():
        if isinstance(module, EvaCLIPRotaryEmbedding):
            cos, sin = module.compute_table(module.grid_size, module.grid_size)
            module.cos, module.sin = cos, sin
            module.reset_cache()
    left_on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise RuntimeError(f"Tensors left uninitialised after conversion (a converter bug): {left_on_meta}.")


def _validate(
    model: EvaCLIPPreTrainedModel, state_dict: dict[str, torch.Tensor], origin: dict[str, str], arch_name: str
) -> None:
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint (the model needs them): {_list_keys(missing)}")
    if unexpected:
        problems.append("in the checkpoint but not in the model: "
                        + _list_keys(f"{origin[key]} -> {key}" for key in unexpected))
    if problems:
        raise ConversionError(f"The checkpoint does not match {arch_name}: " + "; ".join(problems) + ". Nothing was "
                              "written; check --arch (and --vision-only for vision-only checkpoints).")
    mismatched = [
        f"{origin[key]} -> {key}: checkpoint {list(state_dict[key].shape)} vs {arch_name} {list(shape)}"
        for key, shape in expected.items()
        if tuple(state_dict[key].shape) != shape
    ]
    if mismatched:
        raise ConversionError(f"Shape mismatch between the checkpoint and {arch_name}: " + "; ".join(mismatched[:10])
                              + (f" (and {len(mismatched) - 10} more)" if len(mismatched) > 10 else "")
                              + ". Check --arch.")


def build_converted_model(
    source: SourceCheckpoint,
    arch: Optional[str] = None,
    vision_only: bool = False,
    dtype: Union[str, torch.dtype] = "float32",
) -> EvaCLIPPreTrainedModel:
    """Our model holding the source checkpoint's weights (in `dtype`): `EvaCLIPModel`, or for a vision tower
    `EvaCLIPVisionModelWithProjection` when the source has an image projection and `EvaCLIPVisionModel` otherwise."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = _resolve_config(source, arch)
    if source.kind == "timm" or isinstance(config, EvaCLIPVisionConfig):
        vision_only = True  # a timm state dict or a vision config holds no text tower
    if source.kind in ("baai", "open_clip") and source.text_prefix is None and not vision_only:
        raise ConversionError(
            f"{source.path} holds only a vision tower (no text weights); pass --vision-only to convert it."
        )
    vision_config = config if isinstance(config, EvaCLIPVisionConfig) else config.vision_config
    state_dict, origin = map_state_dict(source, vision_config, vision_only)
    if vision_only:
        if isinstance(config, EvaCLIPConfig):  # the image projection in the weights is the two-tower model's
            vision_config.projection_dim = config.projection_dim
        config = vision_config
        model_class = (EvaCLIPVisionModelWithProjection if "visual_projection.weight" in state_dict
                       else EvaCLIPVisionModel)
    else:
        model_class = EvaCLIPModel
    arch_name = f"--arch {arch!r}" if arch else "the source config.json"
    model = _empty_model(model_class, config)
    _validate(model, state_dict, origin, arch_name)
    converted = {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)  # drop the source reference as we go: at most one copy of each weight is alive
        converted[key] = tensor.to(torch_dtype).contiguous() if tensor.is_floating_point() else tensor
    _materialize(model, converted)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


def _check_output(out: Path, src: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ConversionError(f"OUT {str(out)!r} is SRC; write the converted model to a new directory.")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ConversionError(f"OUT {str(out)!r} already exists; choose a new directory or pass --overwrite to "
                              "replace it.")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging dir to OUT; an existing OUT (with `overwrite`) is swapped out, then removed."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConversionError(f"OUT {str(out)!r} appeared while converting; nothing was replaced.")
        backup = staging.with_name(staging.name + "-replaced")
        os.rename(out, backup)
        try:
            os.rename(staging, out)
        except BaseException:
            os.rename(backup, out)
            raise
        _remove(backup)
    else:
        os.rename(staging, out)


def save_converted(
    model: EvaCLIPPreTrainedModel,
    out: Union[str, os.PathLike],
    overwrite: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> list[str]:
    """Write a complete Hugging Face dir atomically: weights (safetensors, sharded above `max_shard_size`),
    config.json, preprocessor_config.json and, for a full model, the CLIP tokenizer files."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    text_config = model.config.text_config if isinstance(model.config, EvaCLIPConfig) else None
    with_tokenizer = text_config is not None and text_config.vocab_size == VOCAB_SIZE
    if with_tokenizer:
        text_config.pad_token_id = PAD_TOKEN_ID  # what the written tokenizer pads with
    elif text_config is not None:
        logger.warning(
            f"The text tower has {text_config.vocab_size} tokens, not CLIP's {VOCAB_SIZE}: no tokenizer files are "
            "written (the CLIP BPE vocabulary would not match its embeddings)."
        )
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        build_image_processor(model.config).save_pretrained(staging)
        if with_tokenizer:
            write_tokenizer_files(staging, model_max_length=text_config.max_position_embeddings)
        files = sorted(path.name for path in staging.iterdir())
        _move_into_place(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [str(out / name) for name in files]


def convert_checkpoint(
    src: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    arch: Optional[str] = None,
    vision_only: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> ConversionResult:
    """Convert SRC (BAAI .pt/.bin, timm or open_clip state dict, InternVL-port dir) into a Hugging Face dir OUT.

    `arch` is a preset name or a BAAI model-config JSON path (optional only for Hugging Face dirs, whose config.json
    is used). Raises `ConversionError` (a ValueError) for anything that would not be a lossless conversion.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}.")
    src_path, out_path = Path(src), Path(out)
    _check_output(out_path, src_path, overwrite)  # fail before the (slow) load, and again before the rename
    source = load_source(src_path)
    model = build_converted_model(source, arch=arch, vision_only=vision_only, dtype=dtype)
    files = save_converted(model, out_path, overwrite=overwrite, max_shard_size=max_shard_size)
    return ConversionResult(
        output_dir=str(out_path.absolute()),
        source_kind=source.kind,
        model_class=type(model).__name__,
        num_parameters=sum(parameter.numel() for parameter in model.parameters()),
        dtype=dtype,
        files=files,
    )


__all__ = [
    "ConversionError",
    "ConversionResult",
    "DEFAULT_MAX_SHARD_SIZE",
    "DTYPES",
    "SOURCE_KINDS",
    "SourceCheckpoint",
    "build_converted_model",
    "config_from_hf_dict",
    "convert_checkpoint",
    "detect_source_kind",
    "load_source",
    "load_weights_file",
    "map_state_dict",
    "save_converted",
]

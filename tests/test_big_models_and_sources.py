"""EVA-CLIP-8B / 18B checkpoint sources against BAAI's code, and hostile checkpoint layouts.

- BAAI's Hugging Face-format releases of EVA-CLIP-8B / 18B (config.json of model_type "clip" whose towers carry
  q/k/v-bias, post_layernorm and use_rms_norm flags; fp16 weights in `pytorch_model-*.bin` shards with an index),
  written here from a toy BAAI `eva_clip` model with an independent key mapping, convert to BAAI's numbers.
- Sharded sources: a weight in two shards, an index placing a weight in a shard that lacks it.
- Wrapped state dicts: two candidate state dicts are refused; an EMA copy next to the converted weights is named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_evaclip import EvaCLIPModel
from llava_evaclip.convert import ConversionError, convert_checkpoint, load_source

from conftest import features, tiny_config
from test_convert import CONTEXT, VOCAB_SIZE, Capture, assert_close, randomize_, sample_inputs

TOY_TEXT = {"context_length": CONTEXT, "vocab_size": VOCAB_SIZE, "width": 32, "heads": 4, "layers": 2,
            "xattn": False, "fusedLN": False}
TOY_VISION = {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 5, "patch_size": 14,
              "eva_model_name": "eva-clip-toy", "drop_path_rate": 0, "qkv_bias": False, "xattn": False,
              "fusedLN": False, "use_rms_norm": True}


# --------------------------------------------------------------------------------------------------------------------
# BAAI's Hugging Face-format release of EVA-CLIP-8B / 18B
# --------------------------------------------------------------------------------------------------------------------


def _baai_to_hf_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BAAI `CustomCLIP` weights under the key names of BAAI's HF release (InternVL's EVA-CLIP module tree): q/k/v
    split, text projection as a Linear, and the release's always-present visual projection bias (zero: BAAI's 8B /
    18B head has none)."""
    out: dict[str, torch.Tensor] = {}
    vision_block = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    text_block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in state.items():
        if key.startswith("visual.blocks."):
            index, rest = key[len("visual.blocks."):].split(".", 1)
            prefix = f"vision_model.encoder.layers.{index}."
            if rest == "attn.qkv.weight":
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{part}_proj.weight"] = chunk
            else:
                module, leaf = rest.rsplit(".", 1)
                out[f"{prefix}{vision_block[module]}.{leaf}"] = value
        elif key.startswith("text.transformer.resblocks."):
            index, rest = key[len("text.transformer.resblocks."):].split(".", 1)
            prefix = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                leaf = rest[len("attn.in_proj_"):]
                for part, chunk in zip("qkv", value.chunk(3)):
                    out[f"{prefix}self_attn.{part}_proj.{leaf}"] = chunk
            else:
                module, leaf = rest.rsplit(".", 1)
                out[f"{prefix}{text_block[module]}.{leaf}"] = value
        else:
            name = {"visual.cls_token": "vision_model.embeddings.class_embedding",
                    "visual.pos_embed": "vision_model.embeddings.position_embedding.weight",
                    "visual.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
                    "visual.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
                    "visual.norm.weight": "vision_model.post_layernorm.weight",
                    "visual.head.weight": "visual_projection.weight",
                    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
                    "text.ln_final.weight": "text_model.final_layer_norm.weight",
                    "text.ln_final.bias": "text_model.final_layer_norm.bias",
                    "text.text_projection": "text_projection.weight",
                    "logit_scale": "logit_scale"}[key]
            value = value.reshape(-1) if key == "visual.cls_token" else value
            value = value[0] if key == "visual.pos_embed" else value
            out[name] = value.t() if key == "text.text_projection" else value
    out["visual_projection.bias"] = torch.zeros(out["visual_projection.weight"].shape[0], dtype=value.dtype)
    for tower in ("vision", "text"):  # the index buffers transformers 4.3x saved
        positions = out[f"{tower}_model.embeddings.position_embedding.weight"].shape[0]
        out[f"{tower}_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return {key: value.contiguous() for key, value in out.items()}


def _hf_release_config(model_cfg: dict) -> dict:
    """config.json as BAAI's HF release writes it: model_type "clip", CLIP-typed towers with the EVA flags."""
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    return {
        "architectures": ["EvaCLIPModel"], "model_type": "clip", "projection_dim": model_cfg["embed_dim"],
        "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float16",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision["width"],
            "intermediate_size": int(vision["width"] * vision["mlp_ratio"]), "hidden_act": "gelu",
            "num_attention_heads": vision["width"] // vision["head_width"], "num_hidden_layers": vision["layers"],
            "image_size": vision["image_size"], "patch_size": vision["patch_size"], "layer_norm_eps": 1e-6,
            "projection_dim": model_cfg["embed_dim"], "q_bias": False, "k_bias": False, "v_bias": False,
            "post_layernorm": vision["postnorm"], "use_rms_norm": True},
        "text_config": {
            "model_type": "clip_text_model", "hidden_size": text["width"], "intermediate_size": 4 * text["width"],
            "hidden_act": "gelu", "num_attention_heads": text["heads"], "num_hidden_layers": text["layers"],
            "vocab_size": text["vocab_size"], "max_position_embeddings": text["context_length"],
            "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"], "q_bias": True, "k_bias": True,
            "v_bias": True, "post_layernorm": False},
    }


@pytest.fixture(scope="module", params=["8B", "18B"])
def hf_release(request, eva_clip, tmp_path_factory):
    """(dir in BAAI's HF-release layout with fp16 shards, BAAI's model on the fp16-rounded weights in fp32)."""
    model_cfg = {"embed_dim": 16, "vision_cfg": {**TOY_VISION, "postnorm": request.param == "18B"},
                 "text_cfg": TOY_TEXT}
    baai = randomize_(eva_clip.model.CustomCLIP(**json.loads(json.dumps(model_cfg))), seed=7)
    state = {key: value.half() for key, value in baai.state_dict().items() if key != "text.attn_mask"}
    baai.load_state_dict({key: value.float() for key, value in state.items()}, strict=False)
    hf_state = _baai_to_hf_release(state)
    directory = tmp_path_factory.mktemp(f"hf_release_{request.param}")
    keys = sorted(hf_state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, shard_keys in shards.items():
        torch.save({key: hf_state[key] for key in shard_keys}, directory / name)
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(_hf_release_config(model_cfg)))
    return directory, baai.eval(), hf_state, model_cfg


def test_baai_hf_release_converts_to_baai_numbers(hf_release, tmp_path):
    directory, baai, _, model_cfg = hf_release
    out = tmp_path / "converted"
    convert_checkpoint(directory, out)
    model = EvaCLIPModel.from_pretrained(out).eval()
    vision = model.config.vision_config
    assert vision.use_rms_norm and vision.post_layernorm is model_cfg["vision_cfg"]["postnorm"]
    images, ids = sample_inputs(model_cfg["vision_cfg"]["image_size"])
    capture = Capture(baai.visual.blocks)
    with torch.no_grad():
        image_normed, text_normed, scale = baai(images, ids)
        capture.remove()
        image_features, text_features = baai.encode_image(images), baai.encode_text(ids)
        output = model(input_ids=ids, pixel_values=images, output_hidden_states=True)
        ours_image = features(model.get_image_features(pixel_values=images))
        ours_text = features(model.get_text_features(input_ids=ids))
    for index, (actual, expected) in enumerate(zip(output.vision_model_output.hidden_states, capture.states,
                                                   strict=True)):
        assert_close(actual, expected, f"hidden_states[{index}]")
    assert_close(ours_image, image_features, "image features")
    assert_close(ours_text, text_features, "text features")
    assert_close(output.logits_per_image, scale * image_normed @ text_normed.t(), "logits")


def test_baai_hf_release_fp16_casts_exactly(hf_release, tmp_path):
    """fp16 release weights: to float32 and to bfloat16, each value the one cast of the stored fp16 value."""
    directory, _, hf_state, _ = hf_release
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        convert_checkpoint(directory, out, dtype=dtype)
        written = load_file(out / "model.safetensors")
        weights = {key: value for key, value in hf_state.items() if not key.endswith("position_ids")}
        assert set(written) == set(weights)
        for key, value in weights.items():
            assert torch.equal(written[key], value.to(getattr(torch, dtype))), (dtype, key)


def test_release_dir_without_the_rms_norm_flag_names_the_norm(hf_release, tmp_path):
    """A config.json that does not say RMSNorm (an older port's) was refused with a list of missing norm-bias keys;
    the architecture difference is named instead."""
    import shutil

    directory, *_ = hf_release
    copy = tmp_path / "no_flag"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["vision_config"]["use_rms_norm"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"source config\.json.*: RMSNorm yes \(from the norms' biases\) vs no"):
        convert_checkpoint(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------------------
# Sharded sources
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def sharded_dir(tmp_path):
    """A converted EVA-CLIP-18B-style toy as a 2-shard Hugging Face dir; returns (dir, state, shard of each key)."""
    torch.manual_seed(0)
    directory = tmp_path / "src"
    EvaCLIPModel(tiny_config("eva18b")).save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    keys = sorted(state)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    where = {key: names[index % 2] for index, key in enumerate(keys)}
    return directory, state, where


def _write_shards(directory: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]) -> None:
    for name, tensors in shards.items():
        save_file(tensors, directory / name, metadata={"format": "pt"})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _write_with_a_stale_copy(sharded_dir, key: str) -> tuple[Path, dict[str, str]]:
    """The shards as the index places them, plus a second copy of `key` (other values) in the other shard."""
    directory, state, where = sharded_dir
    shards = {name: {k: v for k, v in state.items() if where[k] == name} for name in set(where.values())}
    other = next(name for name in shards if name != where[key])
    shards[other][key] = torch.full_like(state[key], 7.0)
    _write_shards(directory, shards, where)
    return directory, where


def test_weight_in_two_shards_is_refused(sharded_dir, tmp_path):
    """A stale second copy of a weight in another shard: converting took whichever shard sorted last (here the
    stale one, against the index), silently."""
    directory, where = _write_with_a_stale_copy(sharded_dir, "vision_model.post_layernorm.weight")
    with pytest.raises(ConversionError, match=r"in two shards.*post_layernorm\.weight"):
        convert_checkpoint(directory, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_placing_a_weight_in_a_shard_without_it_is_refused(sharded_dir, tmp_path):
    directory, state, where = sharded_dir
    key = "logit_scale"
    shards = {name: {k: v for k, v in state.items() if where[k] == name} for name in set(where.values())}
    weight_map = dict(where)
    weight_map[key] = next(name for name in shards if name != where[key])
    _write_shards(directory, shards, weight_map)
    with pytest.raises(ConversionError, match=r"places weights in shards that do not hold them: logit_scale \(in "
                                              r"'model-0000\d-of-00002\.safetensors', not 'model-0000\d"):
        load_source(directory)


def test_index_without_a_weight_map_names_what_it_holds(sharded_dir):
    """An index with `metadata` only was refused as "expected a JSON object ..., found dict", a JSON object."""
    directory, _, _ = sharded_dir
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(ConversionError, match=r"'weight_map' maps weight names to shard file names, found an object "
                                              r"with keys metadata\."):
        load_source(directory)


def test_index_entries_of_shared_tensors_dropped_from_the_shards_are_not_refused(sharded_dir):
    """safetensors' convert script (the SFconvertbot's) drops a shared tensor's alias from its shard but keeps the
    index entry: no shard holds it, so no stale copy can be taken; that was refused as a mismatched index."""
    directory, state, where = sharded_dir
    shards = {name: {k: v for k, v in state.items() if where[k] == name} for name in set(where.values())}
    alias = "vision_model.head.weight_alias"
    _write_shards(directory, shards, {**where, alias: next(iter(shards))})
    source = load_source(directory)
    assert alias not in source.readers and set(source.readers) == set(state)


# --------------------------------------------------------------------------------------------------------------------
# Wrapped state dicts
# --------------------------------------------------------------------------------------------------------------------

_TOY_KEYS = {"visual.cls_token": torch.zeros(1, 1, 4), "visual.blocks.0.norm1.weight": torch.ones(4)}


def test_two_candidate_state_dicts_are_refused(tmp_path):
    """{"module": A, "model": B}: A was converted and B ignored, silently, while BAAI's own loader
    (`eva_clip.factory.load_state_dict`, keys tried in the order model|module|state_dict) takes B."""
    path = tmp_path / "two.pt"
    torch.save({"module": _TOY_KEYS, "model": {key: value + 1 for key, value in _TOY_KEYS.items()}}, path)
    with pytest.raises(ConversionError, match=r"several different state dicts \('module', 'model'\)"):
        load_source(path)


@pytest.mark.parametrize("beside", ["config", "empty", "same_dict", "second_state_dict_call"])
def test_a_config_or_the_same_weights_beside_the_state_dict_is_not_a_second_candidate(beside, tmp_path, caplog):
    """Only a second state dict with other tensors is ambiguous: a config dict or an empty one under "model", or the
    same weights saved twice (`{"state_dict": sd, "model": sd}`, two `model.state_dict()` calls sharing storages),
    converted before and were refused as "several state dicts"."""
    module = torch.nn.Linear(4, 4)
    state = {f"visual.{key}": value for key, value in module.state_dict().items()}
    state["visual.cls_token"] = torch.zeros(1, 1, 4)
    second = {"config": {"arch": "EVA02-CLIP-B-16", "embed_dim": 4}, "empty": {}, "same_dict": state,
              "second_state_dict_call": {f"visual.{key}": value for key, value in module.state_dict().items()}
              | {"visual.cls_token": state["visual.cls_token"]}}[beside]
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": state, "model": second}, path)
    with caplog.at_level(logging.WARNING, logger="llava_evaclip.convert"):
        source = load_source(path)
    assert torch.equal(source.load("visual.weight"), module.weight.detach()) and "not converted" not in caplog.text


def test_deepspeed_model_states_convert_without_naming_its_frozen_parameters(tmp_path, caplog):
    """DeepSpeed's mp_rank_00_model_states.pt (ZeRO-2, a frozen tower): `frozen_param_fragments` holds the frozen
    parameters that `module` holds too; it was named as weights "not converted"."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _TOY_KEYS, "buffer_names": [], "optimizer": None,
                "param_shapes": [{"visual.cls_token": torch.Size([1, 1, 4])}],
                "frozen_param_fragments": {"visual.blocks.0.norm1.weight": torch.ones(4)}, "shared_params": {},
                "global_steps": 10, "dp_world_size": 2, "ds_config": {"zero_optimization": {"stage": 2}}}, path)
    with caplog.at_level(logging.WARNING, logger="llava_evaclip.convert"):
        source = load_source(path)
    assert set(source.readers) == set(_TOY_KEYS) and "not converted" not in caplog.text


def test_ema_weights_next_to_the_converted_ones_are_named(tmp_path, caplog):
    """timm / open_clip training checkpoints: `state_dict` is converted (timm's and open_clip's default), and the
    `state_dict_ema` beside it is named as not converted."""
    path = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": _TOY_KEYS,
                "state_dict_ema": {key: value + 1 for key, value in _TOY_KEYS.items()}}, path)
    with caplog.at_level(logging.WARNING, logger="llava_evaclip.convert"):
        source = load_source(path)
    assert torch.equal(source.load("visual.blocks.0.norm1.weight"), torch.ones(4))
    assert "under 'state_dict'; not converted: 'state_dict_ema'" in caplog.text


def test_zero3_streamed_load_refuses_the_same_shards(sharded_dir):
    """The ZeRO-3 streaming loader reads the shard headers itself: a weight in two shards took the last one, and an
    index naming a file outside its folder was followed."""
    from llava_evaclip import zero

    directory, where = _write_with_a_stale_copy(sharded_dir, "vision_model.post_layernorm.weight")
    with pytest.raises(ValueError, match=r"post_layernorm\.weight' is stored in two shards"):
        zero._safetensors_header(zero._safetensors_files(directory))
    outside = {key: "../" + name for key, name in where.items()}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": outside}))
    with pytest.raises(ValueError, match=r"names shards outside its directory: \.\./model-00001"):
        zero._safetensors_files(directory)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"logit_scale": ".."}}))
    with pytest.raises(ValueError, match=r"names shards outside its directory: \.\."):  # the parent dir itself
        zero._safetensors_files(directory)

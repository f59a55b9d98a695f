"""Autograd, torch.func and training numerics against BAAI's own code (`consisid_eva_clip`; EVA-CLIP-8B / 18B's
`eva_clip`), whose attention is plain matmuls and a softmax (xattn off) and so supports every AD mode.

- Forward-mode AD (`torch.func.jvp` / `jacfwd` / `hessian`, `torch.autograd.forward_ad`) through the default (sdpa)
  attention: torch's fused kernels have no forward-AD rule, so it used to fail with NotImplementedError where BAAI's
  runs; the tangents and Hessian-vector products must be BAAI's (fp64).
- Reverse mode in fp64: the gradient of every parameter and of the pixels, from LLaVA's `hidden_states[-2]` and from
  the contrastive loss against BAAI's ClipLoss written out, in train mode with and without gradient checkpointing.
- Double backward (a gradient penalty) with `attn_implementation="eager"`, the kernel that supports it.
- fp64 stays fp64: the eager kernel's softmax and the interpolated position table were computed in fp32.
- Train mode: BAAI's training-only `drop_path_rate` / `patch_dropout` are not converted; train gives eval's features.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from llava_evaclip import EvaCLIPModel
from llava_evaclip.convert import convert_checkpoint, load_source, map_state_dict

TEXT_CFG = {"context_length": 8, "vocab_size": 120, "width": 32, "heads": 4, "layers": 1, "xattn": False,
            "fusedLN": False}
VISION_BASE = {"eva_model_name": "eva-clip-autograd", "drop_path_rate": 0.0, "xattn": False, "fusedLN": False,
               "image_size": 12, "patch_size": 4, "layers": 3, "width": 32, "head_width": 8, "mlp_ratio": 2.0}
FAMILIES = {  # BAAI vision_cfg flags of each released family, at toy width
    "eva01": {},
    "eva01_layer_scale": {"ls_init_value": 0.1},
    "eva02": {"rope": True, "pt_hw_seq_len": 4, "intp_freq": True, "naiveswiglu": True, "subln": True,
              "mlp_ratio": 2.6667},
    "bige": {"postnorm": True},
    "eva8b": {"use_rms_norm": True, "qkv_bias": False},
    "eva18b": {"use_rms_norm": True, "qkv_bias": False, "postnorm": True},
}
BIG = ("eva8b", "eva18b")  # built with BAAI's 8B / 18B release code (`eva_clip` fixture)


@pytest.fixture(scope="module")
def baai_modules(request):
    """family -> BAAI's model module: consisid's, or the 8B / 18B release's (skipped where that code is absent)."""
    consisid = pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")

    def module_for(family: str):
        return request.getfixturevalue("eva_clip").model if family in BIG else consisid

    return module_for


def _pair(family: str, baai_modules, tmp_path, **load_kwargs):
    """BAAI's CustomCLIP of `family` with random weights, and ours converted from its checkpoint (both fp32, eval)."""
    cfg = {"embed_dim": 16, "vision_cfg": {**VISION_BASE, **FAMILIES[family]}, "text_cfg": dict(TEXT_CFG)}
    torch.manual_seed(3)
    reference = baai_modules(family).CustomCLIP(**copy.deepcopy(cfg)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    checkpoint, arch = tmp_path / "baai.pt", tmp_path / "arch.json"
    torch.save(reference.state_dict(), checkpoint)
    arch.write_text(json.dumps(cfg))
    convert_checkpoint(checkpoint, tmp_path / "converted", arch=str(arch))
    return reference, EvaCLIPModel.from_pretrained(tmp_path / "converted", **load_kwargs).eval(), cfg


def _inputs(cfg: dict, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    size, context, vocab = cfg["vision_cfg"]["image_size"], TEXT_CFG["context_length"], TEXT_CFG["vocab_size"]
    images = torch.randn(batch, 3, size, size, generator=generator)
    ids = torch.zeros(batch, context, dtype=torch.long)
    rng = random.Random(7)
    for row in range(batch):
        length = rng.randint(3, context)
        ids[row, : length - 1] = torch.randint(1, vocab - 1, (length - 1,), generator=generator)
        ids[row, length - 1] = vocab - 1
    return images, ids


def _ours_in_baai_names(model: EvaCLIPModel, tensors: dict[str, torch.Tensor], tmp_path) -> dict[str, torch.Tensor]:
    """BAAI-named tensors (gradients, tangents) mapped onto our parameter names by the converter's own key mapping
    (views only: q/k/v split, text projection transposed), so that they compare entry by entry."""
    path = tmp_path / "mapped.pt"
    torch.save(tensors, path)
    mapped, _ = map_state_dict(load_source(path), model.config.vision_config, vision_only=False)
    return mapped


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


# --------------------------------------------------------------------------------------------------------------------
# Forward-mode AD through the default attention kernel
# --------------------------------------------------------------------------------------------------------------------


def _image_features(model: EvaCLIPModel, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """`get_image_features` as a tensor on both transformers lines (5.x returns a model output)."""
    output = model.get_image_features(pixel_values=pixel_values, **kwargs)
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("tool", ["func_jvp", "forward_ad", "jacfwd"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_mode_ad_through_sdpa_gives_baais_tangent(family, tool, baai_modules, tmp_path) -> None:
    """Under `torch.no_grad()` (forward AD needs no backward graph) with the default attention kernel: before, torch's
    CPU flash kernel raised "Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu"."""
    reference, model, cfg = _pair(family, baai_modules, tmp_path)
    assert model.config.vision_config._attn_implementation == "sdpa"
    images, _ = _inputs(cfg, batch=2)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(8))
    reference = reference.double()
    _, expected = torch.func.jvp(lambda x: reference.encode_image(x), (images.double(),), (direction.double(),))
    with torch.no_grad():
        if tool == "func_jvp":
            _, actual = torch.func.jvp(lambda x: _image_features(model, x), (images,), (direction,))
        elif tool == "forward_ad":
            with fwAD.dual_level():
                actual = fwAD.unpack_dual(_image_features(model, fwAD.make_dual(images, direction))).tangent
        else:  # the Jacobian of one image's features, applied to the direction
            jacobian = torch.func.jacfwd(lambda x: _image_features(model, x))(images[:1])
            actual = torch.einsum("bfcij,cij->bf", jacobian[:, :, 0], direction[0])
            expected = expected[:1]
    assert _rel(actual, expected) < 1e-5


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's vmap fallback (jacrev)
def test_forward_ad_on_text_weights_through_sdpa_gives_baais_tangent(baai_modules, tmp_path) -> None:
    """A tangent on the token embeddings reaches the text tower's masked sdpa attention (the same failure before)."""
    reference, model, cfg = _pair("eva02", baai_modules, tmp_path)
    _, ids = _inputs(cfg)
    weight = model.text_model.embeddings.token_embedding.weight.detach()
    tangent = torch.randn(weight.shape, generator=torch.Generator().manual_seed(9))
    # BAAI's text tower (which returns the projected features) runs nn.MultiheadAttention, whose fused kernel has no
    # forward-AD rule either: its Jacobian, by reverse mode, applied to the tangent.
    text = reference.double().text
    jacobian = torch.func.jacrev(lambda w: torch.func.functional_call(text, {"token_embedding.weight": w}, (ids,)))(
        text.token_embedding.weight.detach())
    expected = torch.einsum("bfvc,vc->bf", jacobian, tangent.double())
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(weight, tangent)
        pooled = torch.func.functional_call(model.text_model, {"embeddings.token_embedding.weight": dual},
                                            (ids,)).pooler_output
        actual = fwAD.unpack_dual(model.text_projection(pooled)).tangent
    assert _rel(actual, expected) < 1e-5


@pytest.mark.parametrize("family", ["eva02", "eva18b"])
def test_hessian_vector_product_through_sdpa_equals_baais(family, baai_modules, tmp_path) -> None:
    """`torch.func.jvp` of `torch.func.grad` (forward-over-reverse, how `torch.func.hessian` works) with the default
    kernel, against BAAI's fp64 `hvp` (reverse-over-reverse through its plain attention)."""
    reference, model, cfg = _pair(family, baai_modules, tmp_path)
    images, _ = _inputs(cfg, batch=1)
    direction = torch.randn(images.shape, generator=torch.Generator().manual_seed(10))
    reference = reference.double()
    _, expected = torch.autograd.functional.hvp(lambda x: reference.encode_image(x).square().sum(), images.double(),
                                                direction.double())
    objective = lambda x: _image_features(model, x).square().sum()  # noqa: E731
    _, actual = torch.func.jvp(torch.func.grad(objective), (images,), (direction,))
    assert _rel(actual, expected) < 1e-5


# --------------------------------------------------------------------------------------------------------------------
# Reverse mode: every gradient is BAAI's
# --------------------------------------------------------------------------------------------------------------------


def _baai_objective(reference, images: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """BAAI's ClipLoss (one process, no label smoothing) written out, plus a weighted sum of the output of its
    second-to-last block (LLaVA's `hidden_states[-2]`, hooked)."""
    states = []
    blocks = reference.visual.blocks
    handle = blocks[len(blocks) - 2].register_forward_hook(lambda module, args, output: states.append(output))
    try:
        image_features, text_features, logit_scale = reference(images, ids)
    finally:
        handle.remove()
    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits_per_image.shape[0])
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
    return loss + (states[0] * weights).sum()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_gradient_in_train_mode_equals_baais_in_fp64(family, checkpointing, baai_modules, tmp_path) -> None:
    reference, model, cfg = _pair(family, baai_modules, tmp_path)
    reference, model = reference.double().train(), model.double().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    images, ids = _inputs(cfg)
    pixels_baai, pixels_ours = images.double().requires_grad_(), images.double().requires_grad_()
    output = model(input_ids=ids, pixel_values=pixels_ours, return_loss=True, output_hidden_states=True)
    weights = torch.randn(output.vision_model_output.hidden_states[-2].shape, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(11))
    (output.loss + (output.vision_model_output.hidden_states[-2] * weights).sum()).backward()
    _baai_objective(reference, pixels_baai, ids, weights).backward()

    assert _rel(pixels_ours.grad, pixels_baai.grad) < 1e-10
    expected = _ours_in_baai_names(model, {k: p.grad for k, p in reference.named_parameters()}, tmp_path)
    ours = dict(model.named_parameters())
    assert set(expected) == {name for name, parameter in ours.items() if parameter.grad is not None} == set(ours)
    scale = max(grad.abs().max().item() for grad in expected.values())
    for name, grad in expected.items():  # absolute against the largest gradient: k biases' are zero up to rounding
        error = (ours[name].grad - grad).abs().max().item()
        assert error <= 1e-10 * scale, f"{name}: {error:.3g} off BAAI's gradient (largest gradient {scale:.3g})"


def test_double_backward_with_eager_attention_equals_baais_gradient_penalty(baai_modules, tmp_path) -> None:
    """A gradient penalty (`create_graph=True`, as R1 / WGAN-GP on CLIP features) needs the attention's backward to be
    differentiable: torch's fused sdpa kernels' backward is not (as in transformers' CLIP and timm), eager's is."""
    reference, model, cfg = _pair("eva02", baai_modules, tmp_path, attn_implementation="eager")
    reference, model = reference.double().train(), model.double().train()
    assert model.config.vision_config._attn_implementation == "eager"
    images, _ = _inputs(cfg, batch=2)
    for features in (reference.encode_image, lambda x: _image_features(model, x)):
        pixels = images.double().requires_grad_()
        (gradient,) = torch.autograd.grad(features(pixels).square().sum(), pixels, create_graph=True)
        gradient.square().sum().backward()
    expected = _ours_in_baai_names(model, {k: p.grad for k, p in reference.named_parameters() if p.grad is not None},
                                   tmp_path)
    ours = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert set(ours) == set(expected)
    scale = max(grad.abs().max().item() for grad in expected.values())
    for name, grad in expected.items():
        assert (ours[name] - grad).abs().max().item() <= 1e-10 * scale, name


@pytest.mark.parametrize("family", ["eva02", "eva8b"])
def test_fp64_eager_attention_and_forward_ad_keep_fp64_precision(family, baai_modules, tmp_path) -> None:
    """The eager kernel (attention weights asked for, `attn_implementation="eager"`, forward-mode AD) took its softmax in
    fp32 whatever the dtype, so an fp64 model (gradcheck, fp64 references) was only fp32-accurate: 3.6e-7 off."""
    reference, model, cfg = _pair(family, baai_modules, tmp_path)
    reference, model = reference.double(), model.double()
    images, _ = _inputs(cfg, batch=2)
    images = images.double()
    direction = torch.randn(images.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    expected, expected_tangent = torch.func.jvp(reference.encode_image, (images,), (direction,))
    with torch.no_grad():
        output = model.vision_model(images, output_attentions=True)
        _, tangent = torch.func.jvp(lambda x: _image_features(model, x), (images,), (direction,))
    assert _rel(model.visual_projection(output.pooler_output), expected) < 1e-12
    assert _rel(tangent, expected_tangent) < 1e-12


# --------------------------------------------------------------------------------------------------------------------
# Train mode
# --------------------------------------------------------------------------------------------------------------------


def test_baais_training_only_regularisers_are_not_converted_so_train_mode_gives_eval_features(baai_modules,
                                                                                             tmp_path) -> None:
    """BAAI's `drop_path_rate` (0.4 in the EVA01-g, EVA02-L and bigE configs) and `patch_dropout` act in train mode
    only and are not converted: LLaVA keeps a frozen tower in train mode, which must give eval's features, with grad
    enabled or not (BAAI's own model drops paths there)."""
    cfg = {"embed_dim": 16, "vision_cfg": {**VISION_BASE, **FAMILIES["eva02"], "drop_path_rate": 0.4},
           "text_cfg": dict(TEXT_CFG)}
    reference = baai_modules("eva02").CustomCLIP(**copy.deepcopy(cfg))  # its train-mode RoPE breaks on patch_dropout
    checkpoint, arch = tmp_path / "baai.pt", tmp_path / "arch.json"
    torch.save(reference.state_dict(), checkpoint)
    arch.write_text(json.dumps({**cfg, "vision_cfg": {**cfg["vision_cfg"], "patch_dropout": 0.5}}))
    convert_checkpoint(checkpoint, tmp_path / "converted", arch=str(arch))
    model = EvaCLIPModel.from_pretrained(tmp_path / "converted").eval()
    images, _ = _inputs(cfg)
    with torch.no_grad():
        assert not torch.equal(reference.train().encode_image(images), reference.eval().encode_image(images))
    model.requires_grad_(False)
    for context in (torch.no_grad, torch.enable_grad):  # the inference paths, then the module calls
        with context():
            expected = model.eval().vision_model.select_hidden_states(images, [2])[2]
            assert torch.equal(model.train().vision_model.select_hidden_states(images, [2])[2], expected)


def test_fp64_interpolated_positions_keep_fp64_precision(baai_modules, tmp_path) -> None:
    """`interpolate_pos_encoding=True` resized the position table in fp32 whatever the dtype (6e-8 relative off in
    fp64); BAAI's `resize_evaclip_pos_embed` keeps the table's dtype. Against BAAI's fp64 model built at that size."""
    utils = pytest.importorskip("consisid_eva_clip.utils")
    reference, model, cfg = _pair("eva02", baai_modules, tmp_path)
    patch = cfg["vision_cfg"]["patch_size"]
    resized_cfg = copy.deepcopy(cfg)
    resized_cfg["vision_cfg"]["image_size"] = 5 * patch
    resized = baai_modules("eva02").CustomCLIP(**copy.deepcopy(resized_cfg)).double().eval()
    state_dict = {k: v.clone() for k, v in reference.double().state_dict().items() if "freqs_" not in k}
    with contextlib.redirect_stdout(io.StringIO()):
        utils.resize_evaclip_pos_embed(state_dict, resized)
    assert not resized.load_state_dict(state_dict, strict=False).unexpected_keys
    images = torch.randn(2, 3, 5 * patch, 5 * patch, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        expected = resized.encode_image(images)
        actual = _image_features(model.double(), images, interpolate_pos_encoding=True)
    assert _rel(actual, expected) < 1e-12

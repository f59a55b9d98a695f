"""transformers model methods a CLIP user calls that no other test reaches: `enable_input_require_grads` /
`disable_input_require_grads` on the full model (PEFT's recipe for a frozen base) under a reentrant checkpoint set
from outside transformers, and `set_input_embeddings` on the vision models."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers
from torch import nn

from llava_evaclip import EvaCLIPModel, EvaCLIPVisionModel, EvaCLIPVisionModelWithProjection
from llava_evaclip.modeling_evaclip import EvaCLIPEncoderLayer

from conftest import randomize, tiny_config, tiny_vision_config

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 97, (2, 7))
    ids[:, -1] = 98
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 28, 28)}


def _frozen_base_with_trainable_attention() -> nn.Module:
    """EvaCLIPModel in train mode with every parameter frozen but the q / v projections of both towers: what PEFT's
    LoRA on a frozen base trains (its import takes seconds on transformers 4.x; the gradient path is the same)."""
    model = randomize(EvaCLIPModel(tiny_config("eva02", num_hidden_layers=2))).requires_grad_(False)
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            module.requires_grad_(True)
    return model.train()


def _trainable_gradients(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters by name, without the wrapper's `_checkpoint_wrapped_module.` in it."""
    model(**inputs, return_loss=True).loss.backward()
    return {name.replace("_checkpoint_wrapped_module.", ""): p.grad for name, p in model.named_parameters()
            if p.requires_grad}


def test_enable_input_require_grads_reaches_the_vision_tower_under_an_outside_reentrant_checkpoint() -> None:
    """A frozen base with trainable attention projections (as under LoRA), `enable_input_require_grads()` (PEFT
    calls it), and reentrant activation checkpointing applied from outside transformers (torch's
    `checkpoint_wrapper`; DeepSpeed's is reentrant too), which `_set_gradient_checkpointing` cannot make
    non-reentrant. transformers hooks only `get_input_embeddings()`,
    the text tower's (transformers 5's CLIPModel hooks each of its tower models), so every trainable vision parameter
    got no gradient. Reference: the same model without checkpointing."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    reference = _frozen_base_with_trainable_attention()
    checkpointed = copy.deepcopy(reference)
    checkpointed.enable_input_require_grads()
    apply_activation_checkpointing(
        checkpointed,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
        check_fn=lambda module: isinstance(module, EvaCLIPEncoderLayer),
    )
    inputs = _inputs()
    expected = _trainable_gradients(reference, inputs)
    actual = _trainable_gradients(checkpointed, inputs)
    assert any("vision_model" in name for name in expected) and any("text_model" in name for name in expected)
    for name, grad in expected.items():
        assert grad is not None, name
        assert actual[name] is not None, f"{name} got no gradient under a reentrant checkpoint"
        # a reentrant checkpoint runs the first forward under no_grad, through the inference kernels: fp32 rounding
        torch.testing.assert_close(actual[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_disable_input_require_grads_removes_the_hooks_of_both_towers() -> None:
    """After enable (twice) and disable, a frozen model's outputs need no gradient again and no hook is left on
    either embedding (transformers 4.x's `disable_input_require_grads` removes one hook only). With them enabled, the
    image and text embeddings need a gradient, as transformers 5's CLIPModel's do."""
    model = EvaCLIPModel(tiny_config("eva02", num_hidden_layers=1)).requires_grad_(False)
    embeddings = (model.get_input_embeddings(), model.vision_model.embeddings.patch_embedding)
    inputs = _inputs()
    model.enable_input_require_grads()
    model.enable_input_require_grads()
    output = model(**inputs)
    assert output.image_embeds.requires_grad and output.text_embeds.requires_grad
    assert [len(module._forward_hooks) for module in embeddings] == [1, 1]
    model.disable_input_require_grads()
    output = model(**inputs)
    assert not (output.image_embeds.requires_grad or output.text_embeds.requires_grad)
    assert [len(module._forward_hooks) for module in embeddings] == [0, 0]


@pytest.mark.parametrize("cls", [EvaCLIPVisionModel, EvaCLIPVisionModelWithProjection])
def test_set_input_embeddings_swaps_the_patch_convolution(cls) -> None:
    """transformers 5's CLIPVisionModel takes a new patch convolution with `set_input_embeddings`; its generic setter
    raised NotImplementedError for ours. The model then runs the new convolution."""
    if TRANSFORMERS_5:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, image_size=28, patch_size=7))
        try:  # the reference behaviour on the 5.x releases whose generic setter handles CLIP's: no error
            clip.set_input_embeddings(copy.deepcopy(clip.get_input_embeddings()))
        except NotImplementedError:  # early 5.x (5.5.4): not for CLIP's either; ours takes it all the same
            pass
    model = cls(tiny_vision_config("eva02", num_hidden_layers=1)).eval()
    old = model.get_input_embeddings()
    new = nn.Conv2d(3, 32, kernel_size=7, stride=7, bias=True)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.vision_model.embeddings.patch_embedding is new
    pixel_values = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        actual = model(pixel_values).last_hidden_state
        old.load_state_dict(new.state_dict())
        model.set_input_embeddings(old)
        torch.testing.assert_close(model(pixel_values).last_hidden_state, actual, atol=0, rtol=0)

"""A full-size EVA02-CLIP-L-14-336 vision tower (304M parameters, BAAI's real config) through `convert --vision-only`.

The toy-size parity tests cover every layout; this one checks that nothing depends on toy sizes (head width 64, the
24x24 grid with RoPE interpolated from pt_hw_seq_len 16, 1024-wide SwiGLU) on one image. About a minute and ~4 GB.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

consisid_model = pytest.importorskip("consisid_eva_clip.model", reason="BAAI's reference code (consisid-eva-clip)")
consisid_vit = pytest.importorskip("consisid_eva_clip.eva_vit_model")

from llava_evaclip import EvaCLIPVisionModelWithProjection  # noqa: E402
from llava_evaclip.cli import main as cli_main  # noqa: E402
from llava_evaclip.presets import BAAI_MODEL_CONFIGS  # noqa: E402

ARCH = "EVA02-CLIP-L-14-336"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 2e-5) -> None:
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"{what}: max abs diff {error:.3g} > {rel} x {scale:.3g}"


def test_full_size_eva02_l_336_vision_tower(tmp_path, monkeypatch):
    # BAAI's truncated-normal init costs several passes over 304M weights; any random values do for parity.
    monkeypatch.setattr(consisid_vit, "trunc_normal_",
                        lambda tensor, std=1.0, **_: torch.nn.init.normal_(tensor, std=std))
    model_cfg = copy.deepcopy(BAAI_MODEL_CONFIGS[ARCH])
    vision_cfg = {**model_cfg["vision_cfg"], "eva_model_name": "eva-clip-l-14-336", "xattn": False, "fusedLN": False,
                  "drop_path_rate": 0.0}
    torch.manual_seed(0)
    visual = consisid_model._build_vision_tower(model_cfg["embed_dim"], vision_cfg).eval()
    assert sum(p.numel() for p in visual.parameters()) > 300e6
    with torch.no_grad():  # BAAI's init leaves biases at 0 and norms at 1: make them non-trivial
        for name, parameter in visual.named_parameters():
            if parameter.ndim == 1 or name in ("cls_token", "pos_embed"):
                parameter.add_(torch.randn_like(parameter) * 0.05)

    image = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    captured = {}
    hooks = [visual.blocks[-1].register_forward_hook(lambda m, a, out: captured.__setitem__("last", out)),
             visual.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("norm", out))]
    with torch.no_grad():
        features = visual(image)
    for hook in hooks:
        hook.remove()

    checkpoint = tmp_path / "EVA02_CLIP_L_336_psz14_s6B_visual.pt"
    torch.save({f"visual.{key}": value for key, value in visual.state_dict().items()}, checkpoint)
    del visual, hooks
    gc.collect()

    out = tmp_path / "eva02-l-336-vision"
    assert cli_main(["convert", str(checkpoint), str(out), "--arch", ARCH, "--vision-only"]) == 0
    checkpoint.unlink()
    model = EvaCLIPVisionModelWithProjection.from_pretrained(out).eval()
    assert model.config.image_size == 336 and model.config.use_rope and model.config.num_hidden_layers == 24
    with torch.no_grad():
        output = model(pixel_values=image)
    assert_close(output.last_hidden_state, captured["last"], "last hidden state")
    assert_close(model.vision_model.post_layernorm(output.last_hidden_state), captured["norm"], "after final norm")
    assert_close(output.image_embeds, features, "image features")

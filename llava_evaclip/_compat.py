"""Small shims so one code base runs on transformers 4.37.2 (LLaVA's pin) and 5.x."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

try:  # transformers >= 5: init helpers that skip tensors already loaded from a checkpoint
    from transformers import initialization as init
except ImportError:  # transformers 4.x: plain torch initialisers are safe there

    class _TorchInit:
        """The subset of `transformers.initialization` this package uses, on torch.nn.init."""

        @staticmethod
        def normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
            return torch.nn.init.normal_(tensor, mean=mean, std=std)

        @staticmethod
        def zeros_(tensor: torch.Tensor) -> torch.Tensor:
            return torch.nn.init.zeros_(tensor)

        @staticmethod
        def ones_(tensor: torch.Tensor) -> torch.Tensor:
            return torch.nn.init.ones_(tensor)

        @staticmethod
        def constant_(tensor: torch.Tensor, val: float) -> torch.Tensor:
            return torch.nn.init.constant_(tensor, val)

        @staticmethod
        def copy_(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return tensor.copy_(other)

    init = _TorchInit()

try:
    from transformers import PreTrainedConfig as PretrainedConfig  # 5.x name
except ImportError:
    from transformers import PretrainedConfig  # 4.x name


def is_flash_attn_available() -> bool:
    """True when the flash-attn package (and a CUDA device) can serve `flash_attention_2`."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True



# Streaming ZeRO-3 loader for the models' `from_pretrained`: it lives in `zero.py`, a layer above the models, which
# sets it here when imported (the tower, the launcher and `llava_evaclip.zero` users do); None leaves transformers'
# own loader in charge.
zero3_from_pretrained: Optional[Callable[..., Any]] = None

__all__ = ["init", "PretrainedConfig", "is_flash_attn_available"]

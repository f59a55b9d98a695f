"""Put on PYTHONPATH only for the LLaVA training runs of tests/test_zero3_training.py (CPU ranks).

LLaVA's train.py calls `torch.cuda.synchronize()` before its final DeepSpeed save; on a machine without an NVIDIA
driver that raises. There is nothing to synchronise without CUDA, so it becomes a no-op there; nothing else changes.
"""

import torch

if not torch.cuda.is_available():
    torch.cuda.synchronize = lambda device=None: None

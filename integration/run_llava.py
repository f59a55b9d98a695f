#!/usr/bin/env python
"""Run a LLaVA entry module with EVA-CLIP vision towers registered (see `llava_evaclip.launch`).

    python integration/run_llava.py llava.train.train_mem --vision_tower /ckpt/EVA02-CLIP-L-14-336 ...
    deepspeed integration/run_llava.py llava.train.train_mem --deepspeed integration/zero3.json ...
    torchrun --nproc_per_node 8 integration/run_llava.py llava.train.train ...
"""

import os
import sys

try:
    import llava_evaclip  # noqa: F401
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llava_evaclip.launch import main

if __name__ == "__main__":
    sys.exit(main())

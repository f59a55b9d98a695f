"""What the launcher patches at run time for LLaVA-NeXT's trainer (its files stay unchanged), each shown to be needed:
trl's DPO classes and transformers 4.38's `AcceleratorConfig` that `llava.train.llava_trainer` imports but supervised
training never uses, and the MeZO training-loop override that fails on every transformers version."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import transformers
from transformers import Trainer

from next_common import NEXT_PATH  # noqa: F401  (asserts that `llava` is LLaVA-NeXT's)

from llava_evaclip import launch

TRL_INSTALLED = "trl" not in sys.modules and importlib.util.find_spec("trl") is not None  # before any stand-in


def test_llava_nexts_trainer_module_does_not_import_without_the_launcher():
    """In a fresh process (the stand-ins below are process-wide), LLaVA-NeXT's trainer module alone fails to import
    here: trl is missing, or (transformers 4.37) AcceleratorConfig is."""
    import transformers.trainer_pt_utils as trainer_pt_utils

    if TRL_INSTALLED and hasattr(trainer_pt_utils, "AcceleratorConfig"):
        pytest.skip("trl and AcceleratorConfig are both installed: nothing for the launcher to provide")
    result = subprocess.run([sys.executable, "-c", "import llava.train.llava_trainer"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert re.match(r"(ModuleNotFoundError|ImportError): .*(trl|AcceleratorConfig)", result.stderr.splitlines()[-1])


def test_stand_ins_let_the_trainer_module_import_and_refuse_dpo():
    launch.provide_llava_next_trainer_imports()
    launch.provide_llava_next_trainer_imports()  # idempotent
    import llava.train.llava_trainer as llava_trainer
    import transformers.trainer_pt_utils as trainer_pt_utils

    assert hasattr(trainer_pt_utils, "AcceleratorConfig")
    if not TRL_INSTALLED:
        from trl.trainer import DPOTrainer
        from trl.trainer.utils import DPODataCollatorWithPadding

        assert issubclass(llava_trainer.LLaVADPOTrainer, DPOTrainer) and issubclass(DPOTrainer, Trainer)
        for part in (DPOTrainer, DPODataCollatorWithPadding, llava_trainer.LLaVADPOTrainer):
            with pytest.raises(ImportError, match="DPO training .* needs trl: pip install trl"):
                part()


def test_regular_training_runs_transformers_loop_and_zo_keeps_llava_nexts(monkeypatch):
    train_module = launch.prepare_llava("llava.train.train")
    next_trainer = next(cls for cls in train_module.LLaVATrainer.__mro__ if cls.__module__ == "llava.train.llava_trainer")
    assert next_trainer.__name__ == "LLaVATrainer"
    assert "get_model_param_count" in next_trainer._inner_training_loop.__code__.co_names
    assert not hasattr(sys.modules["llava.train.llava_trainer"], "get_model_param_count")  # the NameError it hits
    calls = []
    monkeypatch.setattr(Trainer, "_inner_training_loop", lambda self, *a, **k: calls.append("transformers"))
    monkeypatch.setattr(next_trainer, "_inner_training_loop", lambda self, *a, **k: calls.append("llava-next"))
    trainer = object.__new__(train_module.LLaVATrainer)
    for mode in ("regular", "zo"):
        trainer.trainer_mode = mode
        trainer._inner_training_loop(batch_size=1)
    assert calls == ["transformers", "llava-next"]
    patched = train_module.LLaVATrainer
    launch.patch_llava_next_trainer(train_module)  # idempotent
    assert train_module.LLaVATrainer is patched


def test_llava_next_is_recognised():
    assert launch.is_llava_next()
    assert int(transformers.__version__.split(".")[0]) < 5
    launch.check_llava_next_transformers()  # 4.x: no complaint

"""Run any LLaVA entry module with EVA-CLIP vision towers available, without editing LLaVA.

    python integration/run_llava.py llava.train.train_mem --vision_tower /ckpt/EVA02-CLIP-L-14-336 ...
    deepspeed integration/run_llava.py llava.train.train_mem --deepspeed integration/zero3.json ...
    torchrun --nproc_per_node 8 integration/run_llava.py llava.train.train ...
    python -m llava_evaclip.launch llava.serve.cli --model-path ... --image-file ...

Before handing over, the launcher
- hooks LLaVA's `build_vision_tower` (`register_with_llava()`);
- for LLaVA's training modules, adds the tower options LLaVA 1.2's `ModelArguments` lacks (`--unfreeze_mm_vision_tower`,
  `--s2`, `--s2_scales`, and several layers in `--mm_vision_select_layer "-2,-5,-8"`), records them in the model config
  so a saved model rebuilds the same tower, and unfreezes the tower when asked (and keeps it frozen otherwise);
- keeps `--lora_enable`'s adapters off the vision tower and the projector (LLaVA's `find_all_linear_names` returns
  bare layer names that peft also matches inside an already loaded tower; also LLaVA-NeXT's `llava.train.train_dpo`,
  which the launcher then runs as the patched module);
- lets transformers 4.37 resume under torch >= 2.6 (the checkpoint's numpy RNG state) and resume a LoRA run from its
  DeepSpeed checkpoint (non-strict module load, as later transformers do);
- bridges the transformers APIs LLaVA's trainer was written against (renamed `TrainingArguments` flags, the Trainer's
  `tokenizer` argument and method signatures changed in transformers 5) and rounds the ZeRO bucket sizes transformers
  4.x fills in for "auto" as floats, which current DeepSpeed refuses;
- without CUDA (DeepSpeed on CPU ranks), makes `torch.cuda.synchronize`, which LLaVA's train.py calls before its final
  save, a no-op in this process, and lets CPU ranks leave together so none aborts at exit;
- for LLaVA-NeXT / OneVision's `llava` (transformers 4.x only; on 5.x it stops with a one-line error), provides the
  trl / `AcceleratorConfig` names its trainer module imports but supervised training never uses, and runs
  transformers' own training loop in place of its broken MeZO copy. Nothing in LLaVA's files is changed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import inspect
import os
import re
import runpy
import sys
import time
from typing import Any, Optional, Sequence

from .llava_registry import find_factory, is_llava_next, provide_llava_next_model_imports, register_with_llava

PROG = "run_llava.py"
USAGE = (
    f"usage: {PROG} MODULE [ARGS...]\n"
    "  MODULE: a LLaVA entry module (llava.train.train_mem, llava.train.train, llava.serve.cli, llava.eval.model_vqa, "
    "...) or the path of its .py file; ARGS go to it unchanged."
)
TRAIN_PACKAGE = "llava.train"
TRAIN_MODULE = "llava.train.train"
DPO_MODULE = "llava.train.train_dpo"  # LLaVA-NeXT's DPO training: its own copy of find_all_linear_names


class LaunchError(Exception):
    """A usage error: reported in one line, exit status 2."""


class ArgumentError(LaunchError, ValueError):
    """A training argument this launcher checks itself (a ValueError, as HfArgumentParser's own checks raise)."""


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def split_command(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(module, its arguments). The `--local_rank` that `deepspeed` puts before the module is passed on to it."""
    rest = list(argv)
    launcher_args: list[str] = []
    while rest and rest[0].startswith("--local_rank"):
        launcher_args.append(rest.pop(0))
        if launcher_args[-1] == "--local_rank" and rest:
            launcher_args.append(rest.pop(0))
    if not rest or rest[0].startswith("-"):
        raise LaunchError("expected a LLaVA module to run, e.g. llava.train.train_mem")
    return resolve_module(rest[0]), rest[1:] + launcher_args


def resolve_module(target: str) -> str:
    """A module name, also for LLaVA's own spelling `llava/train/train_mem.py` (a file of the importable package)."""
    if target.endswith(".py"):
        parts = os.path.normpath(os.path.abspath(target))[: -len(".py")].split(os.sep)
        if "llava" in parts:
            start = len(parts) - 1 - parts[::-1].index("llava")
            candidate = ".".join(parts[start:])
            spec = _find_spec(candidate)
            if spec is not None and spec.origin and os.path.isfile(target) and os.path.samefile(spec.origin, target):
                return candidate
        raise LaunchError(f"{target} is not a module of the installed `llava` package; pass a module name instead")
    if _find_spec(target) is None:
        raise LaunchError(f"no module named {target!r} (is LLaVA installed? pip install --no-deps llava-torch)")
    return target


def _find_spec(name: str) -> Optional[Any]:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# transformers compatibility for LLaVA's trainer
# ---------------------------------------------------------------------------------------------------------------------


def patch_transformers_for_llava() -> None:
    """`llava.train.llava_trainer` imports `ALL_LAYERNORM_LAYERS` from `transformers.trainer`, which transformers 5
    keeps only in `transformers.pytorch_utils`."""
    import transformers.trainer as trainer_module

    if not hasattr(trainer_module, "ALL_LAYERNORM_LAYERS"):
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

        trainer_module.ALL_LAYERNORM_LAYERS = ALL_LAYERNORM_LAYERS


def check_llava_next_transformers() -> None:
    """LLaVA-NeXT's model package imports BERT helpers that transformers 5 removed (its Q-Former) and its trainer
    overrides the 4.x training loop, so it runs on transformers 4.x only: say so instead of failing deep inside."""
    import transformers

    if is_llava_next() and int(transformers.__version__.split(".")[0]) >= 5:
        raise LaunchError(
            f"LLaVA-NeXT's code needs transformers 4.x (it was written for 4.40; 4.37.2 works through this launcher), "
            f"found {transformers.__version__}: pip install transformers==4.37.2"
        )


def llava_next_trainer_problems() -> list[str]:
    """Why LLaVA-NeXT's `LLaVATrainer.create_accelerator_and_postprocess` cannot run here (empty where it can): it
    builds its Accelerator with `dispatch_batches=self.args.dispatch_batches, split_batches=self.args.split_batches`;
    accelerate 1.0 removed those arguments and transformers 4.5x those TrainingArguments fields, and every LLaVA-NeXT
    training run would stop with a TypeError / AttributeError as the Trainer starts."""
    import accelerate
    import transformers
    from accelerate import Accelerator
    from transformers import TrainingArguments

    problems = []
    if "dispatch_batches" not in inspect.signature(Accelerator.__init__).parameters:
        problems.append(
            f"accelerate's Accelerator, which accelerate 1.0 removed; found accelerate {accelerate.__version__}: "
            f"pip install 'accelerate<1.0' (LLaVA-NeXT pins 0.29.3)"
        )
    fields = TrainingArguments.__dataclass_fields__
    missing = [name for name in ("dispatch_batches", "split_batches") if name not in fields]
    if missing:
        problems.append(
            f"its Accelerator from TrainingArguments.{' and .'.join(missing)}, which this transformers "
            f"({transformers.__version__}) no longer has: pip install transformers==4.37.2 (4.47.1 works too)"
        )
    return problems


def check_llava_next_accelerate() -> None:
    """Say in one line why LLaVA-NeXT's trainer cannot run here (both reasons, where both apply)."""
    problems = llava_next_trainer_problems()
    if problems:
        raise LaunchError("LLaVA-NeXT's trainer passes `dispatch_batches` to " + "; and ".join(problems))


def check_trainer_accelerate() -> None:
    """transformers 4.52+'s Trainer unwraps the model with `Accelerator.unwrap_model(model, keep_torch_compile=False)`
    as training starts, an argument accelerate added in 1.3, while transformers still asks for accelerate >= 0.26
    only. With an older accelerate (LLaVA pins 0.21) every run would load the model and then stop with a TypeError."""
    import accelerate
    import transformers
    from accelerate import Accelerator
    from transformers import trainer

    if "keep_torch_compile" in inspect.signature(Accelerator.unwrap_model).parameters:
        return
    try:
        trainer_source = inspect.getsource(trainer)
    except (OSError, TypeError):  # installed without its sources: nothing to tell
        return
    if "keep_torch_compile" in trainer_source:
        raise LaunchError(
            f"transformers {transformers.__version__}'s Trainer calls Accelerator.unwrap_model(keep_torch_compile=...), "
            f"which accelerate {accelerate.__version__} lacks (it came in accelerate 1.3): "
            f"pip install 'accelerate>=1.3' (or transformers==4.37.2, LLaVA's pin)"
        )


class _MissingTrlPart:
    """Stands in for a trl class LLaVA-NeXT's trainer module imports for its DPO trainer only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ImportError("LLaVA-NeXT's DPO training (llava.train.train_dpo) needs trl: pip install trl")


def provide_llava_next_trainer_imports() -> None:
    """`llava.train.llava_trainer` (LLaVA-NeXT) imports trl's DPO classes and, from transformers 4.38+,
    `trainer_pt_utils.AcceleratorConfig`, none of which its supervised training uses. Where they are missing
    (trl not installed; transformers 4.37), put stand-ins in their place, so that only DPO needs trl. It also imports
    accelerate's `GradientAccumulationPlugin` through `transformers.trainer`, which stopped re-exporting it in 4.47:
    that name is given back (the same class)."""
    import types

    import transformers.trainer as trainer_module
    import transformers.trainer_pt_utils as trainer_pt_utils
    from transformers import Trainer

    if not hasattr(trainer_module, "GradientAccumulationPlugin"):
        from accelerate.utils import GradientAccumulationPlugin

        trainer_module.GradientAccumulationPlugin = GradientAccumulationPlugin
    if not hasattr(trainer_pt_utils, "AcceleratorConfig"):
        trainer_pt_utils.AcceleratorConfig = type(
            "AcceleratorConfig", (), {"__doc__": "Stand-in set by llava_evaclip.launch (transformers < 4.38)."}
        )
    if "trl" in sys.modules or _find_spec("trl") is not None:  # installed, or our stand-ins already in place
        return
    trl, trl_trainer, trl_utils = (types.ModuleType(name) for name in ("trl", "trl.trainer", "trl.trainer.utils"))
    for module in (trl, trl_trainer, trl_utils):
        module.__doc__ = "Stand-in set by llava_evaclip.launch: trl is not installed (needed only for DPO)."
    trl_trainer.DPOTrainer = type("DPOTrainer", (_MissingTrlPart, Trainer), {})
    trl_utils.DPODataCollatorWithPadding = type("DPODataCollatorWithPadding", (_MissingTrlPart,), {})
    trl.trainer, trl_trainer.utils = trl_trainer, trl_utils
    sys.modules.update({"trl": trl, "trl.trainer": trl_trainer, "trl.trainer.utils": trl_utils})


# ZeRO settings the Trainer derives from the model's hidden size when the DeepSpeed config says "auto"; DeepSpeed
# types them int.
_HIDDEN_SIZE_ZERO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def patch_deepspeed_auto_fill() -> None:
    """transformers 4.x fills ZeRO-3's `"stage3_prefetch_bucket_size": "auto"` with 0.9 * hidden_size**2, a float
    (15099494.4 for a 7B Llama) that DeepSpeed's config, typed int, refuses since pydantic 2; transformers 5 fills
    `int(...)`. Round what `trainer_config_finalize` filled in the same way, so the configs keep LLaVA's "auto"."""
    try:
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    except ImportError:  # pragma: no cover - both supported transformers lines have it
        return
    original = HfTrainerDeepSpeedConfig.trainer_config_finalize
    if getattr(original, "_evaclip_wrapped", False):
        return

    @functools.wraps(original)
    def trainer_config_finalize(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        zero = self.config.get("zero_optimization")
        if isinstance(zero, dict):
            for key in _HIDDEN_SIZE_ZERO_KEYS:
                if isinstance(zero.get(key), float):
                    zero[key] = int(zero[key])
        return result

    trainer_config_finalize._evaclip_wrapped = True  # type: ignore[attr-defined]
    HfTrainerDeepSpeedConfig.trainer_config_finalize = trainer_config_finalize


def numpy_rng_globals() -> list:
    """The numpy types a Trainer checkpoint's `rng_state*.pth` holds (numpy's RNG state), for `weights_only` loading."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def patch_trainer_rng_state_loading() -> None:
    """Resuming (LLaVA's train() resumes by itself when `--output_dir` holds a `checkpoint-*`) reads the checkpoint's
    RNG states with a bare `torch.load`; since torch 2.6 that means `weights_only=True`, which refuses the numpy RNG
    state in the file, so transformers 4.37 cannot resume any run ("Weights only load failed ...
    numpy._core.multiarray._reconstruct"). Allow just those numpy types while the Trainer reads that file, as later
    transformers do (`trainer_pt_utils.safe_globals`)."""
    import torch
    import transformers.trainer_pt_utils as trainer_pt_utils
    from transformers import Trainer

    serialization = torch.serialization
    original = Trainer._load_rng_state
    if hasattr(trainer_pt_utils, "safe_globals") or not hasattr(serialization, "safe_globals") \
            or getattr(original, "_evaclip_wrapped", False):
        return

    @functools.wraps(original)
    def _load_rng_state(self: Any, *args: Any, **kwargs: Any) -> Any:
        with serialization.safe_globals(numpy_rng_globals()):
            return original(self, *args, **kwargs)

    _load_rng_state._evaclip_wrapped = True  # type: ignore[attr-defined]
    Trainer._load_rng_state = _load_rng_state


def patch_deepspeed_resume_for_lora() -> None:
    """transformers 4.37 resumes a DeepSpeed run with `engine.load_checkpoint(...)` and a strict module load, but the
    checkpoint of a LoRA run (LLaVA's finetune_lora scripts: ZeRO-3 and `--lora_enable True`) holds only what trains,
    so every resume fails with "Missing key(s) in state_dict: base_model.model.model.embed_tokens.weight, ...". Later
    transformers load a peft model non-strictly (`load_module_strict`); do the same where that argument is missing."""
    import transformers.trainer as trainer_module

    original = getattr(trainer_module, "deepspeed_load_checkpoint", None)
    if original is None or getattr(original, "_evaclip_wrapped", False) \
            or "load_module_strict" in inspect.signature(original).parameters:
        return

    @functools.wraps(original)
    def deepspeed_load_checkpoint(deepspeed_engine: Any, *args: Any, **kwargs: Any) -> Any:
        if not hasattr(getattr(deepspeed_engine, "module", None), "peft_config"):
            return original(deepspeed_engine, *args, **kwargs)
        load_checkpoint = deepspeed_engine.load_checkpoint
        deepspeed_engine.load_checkpoint = functools.partial(load_checkpoint, load_module_strict=False)
        try:
            return original(deepspeed_engine, *args, **kwargs)
        finally:
            del deepspeed_engine.load_checkpoint  # the engine's own method again

    deepspeed_load_checkpoint._evaclip_wrapped = True  # type: ignore[attr-defined]
    trainer_module.deepspeed_load_checkpoint = deepspeed_load_checkpoint


def patch_cuda_synchronize() -> None:
    """LLaVA's train.py calls `torch.cuda.synchronize()` before its final DeepSpeed save, which raises without an
    NVIDIA driver (DeepSpeed on CPU ranks, `DS_ACCELERATOR=cpu`). With no CUDA device there is nothing to wait for, so
    it becomes a no-op; only `main` calls this, so only the launcher's own process is affected."""
    import torch

    if torch.cuda.is_available() or getattr(torch.cuda.synchronize, "_evaclip_noop", False):
        return

    def synchronize(device: Any = None) -> None:
        """No CUDA device in this process: nothing to synchronise (set by llava_evaclip.launch)."""

    synchronize._evaclip_noop = True  # type: ignore[attr-defined]
    torch.cuda.synchronize = synchronize


def _training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {field.name for field in dataclasses.fields(TrainingArguments)}


def translate_training_args(args: Sequence[str]) -> list[str]:
    """LLaVA's scripts use TrainingArguments flags renamed across transformers versions; map them to this version's
    names (`--evaluation_strategy`/`--eval_strategy`; transformers 5 takes `--warmup_ratio` as `--warmup_steps`).
    Also joins `--mm_vision_select_layer -2,-5,-8` into one argument, which argparse would otherwise reject."""
    names = _training_argument_names()
    renames = {}
    if "evaluation_strategy" not in names:
        renames["evaluation_strategy"] = "eval_strategy"
    if "eval_strategy" not in names:
        renames["eval_strategy"] = "evaluation_strategy"
    if "warmup_ratio" not in names:
        renames["warmup_ratio"] = "warmup_steps"  # a float in [0, 1) is a ratio there
    translated: list[str] = []
    for arg in args:
        flag, sep, value = arg.partition("=")
        if flag.startswith("--") and flag[2:] in renames:
            arg = f"--{renames[flag[2:]]}{sep}{value}"
        if translated and translated[-1] == "--mm_vision_select_layer" and re.fullmatch(r"-?\d+(,-?\d+)+", arg):
            translated[-1] = f"--mm_vision_select_layer={arg}"  # argparse would take "-2,-5" for an option
            continue
        translated.append(arg)
    return translated


def _compat_trainer_class(llava_trainer: type) -> type:
    """LLaVATrainer adapted to the transformers 5 Trainer: `tokenizer=` becomes `processing_class=`, and the
    overridden methods accept the arguments the new Trainer passes (and pass on only the ones it takes)."""
    from transformers import Trainer

    class _TrainerSignatures(Trainer):
        """Sits between LLaVATrainer and Trainer in the MRO, for LLaVA's `super()` calls."""

        def _save_checkpoint(self, model: Any, trial: Any, metrics: Any = None) -> None:
            return Trainer._save_checkpoint(self, model, trial)

    class LLaVATrainer(llava_trainer, _TrainerSignatures):
        _evaclip_compat = True

        def __init__(self, *args: Any, tokenizer: Any = None, **kwargs: Any) -> None:
            if tokenizer is not None and kwargs.get("processing_class") is None:
                kwargs["processing_class"] = tokenizer
            super().__init__(*args, **kwargs)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            if train_dataset is not None and train_dataset is not self.train_dataset:
                return _TrainerSignatures._get_train_sampler(self, train_dataset)
            return llava_trainer._get_train_sampler(self)

        def create_optimizer(self, model: Any = None) -> Any:
            return llava_trainer.create_optimizer(self)

    LLaVATrainer.__qualname__ = LLaVATrainer.__name__ = llava_trainer.__name__
    LLaVATrainer.__module__ = __name__
    return LLaVATrainer


def patch_llava_trainer(train_module: Any) -> None:
    """Use the adapted trainer class in `llava.train.train` when the installed Trainer no longer takes `tokenizer`."""
    from transformers import Trainer

    trainer_class = train_module.LLaVATrainer
    if getattr(trainer_class, "_evaclip_compat", False):
        return
    if "tokenizer" not in inspect.signature(Trainer.__init__).parameters:
        train_module.LLaVATrainer = _compat_trainer_class(trainer_class)


def patch_llava_next_trainer(train_module: Any) -> None:
    """LLaVA-NeXT's `LLaVATrainer` overrides `Trainer._inner_training_loop` for its zeroth-order (MeZO) mode with a copy
    of transformers 4.40's loop that calls names its module never imports (`get_model_param_count`, `speed_metrics`,
    `TrainOutput`) and 4.40-only Trainer attributes, so it fails on every transformers version. For the default
    `--trainer_mode regular` run transformers' own loop (what that copy reproduces); "zo" keeps LLaVA-NeXT's. The
    override is looked up through the class's bases: on transformers 4.46+ `patch_llava_trainer` has already put its
    signature adapter above LLaVA-NeXT's class."""
    from transformers import Trainer

    next_trainer = train_module.LLaVATrainer
    if getattr(next_trainer, "_evaclip_next", False) or next_trainer._inner_training_loop is Trainer._inner_training_loop:
        return

    class LLaVATrainer(next_trainer):
        _evaclip_next = True

        def _inner_training_loop(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(self, "trainer_mode", "regular") == "regular":
                return Trainer._inner_training_loop(self, *args, **kwargs)
            return next_trainer._inner_training_loop(self, *args, **kwargs)

    LLaVATrainer.__qualname__ = LLaVATrainer.__name__ = next_trainer.__name__
    LLaVATrainer.__module__ = __name__
    train_module.LLaVATrainer = LLaVATrainer


# ---------------------------------------------------------------------------------------------------------------------
# LoRA: keep the adapters off the vision tower and the projector
# ---------------------------------------------------------------------------------------------------------------------

# The modules LLaVA's `find_all_linear_names` leaves out of LoRA (LLaVA 1.5 and LLaVA-NeXT use the same list).
LORA_EXCLUDED_MODULES = ("mm_projector", "vision_tower", "vision_resampler")


def lora_target_pattern(leaf_names: Sequence[str]) -> str:
    """A `target_modules` regex (peft full-matches it against each module path) for the Linear layers named
    `leaf_names` outside the multimodal modules."""
    excluded = "|".join(re.escape(name) for name in LORA_EXCLUDED_MODULES)
    leaves = "|".join(re.escape(name) for name in sorted(set(leaf_names)))
    return rf"(?!.*(?:{excluded}))(?:.*\.)?(?:{leaves})"


def patch_lora_targets(train_module: Any) -> None:
    """LLaVA's `find_all_linear_names` skips the projector and the vision tower but returns bare leaf names ("q_proj",
    "v_proj", ...), which peft matches as suffixes of every module path, the tower's included. When the tower is
    already loaded as LoRA is added (training from a LLaVA checkpoint whose tower was trained: its config makes LLaVA
    build the tower eagerly) its attention projections get adapters too. The EVA-CLIP tower then trains them (it keeps
    the graph when any of its parameters takes gradients) although the tower was not to be trained, and with
    `--unfreeze_mm_vision_tower True` the fully trained q/k/v weights are saved in `non_lora_trainables.bin` under
    peft's `base_layer` names, which LLaVA's loader (`load_pretrained_model(path, base, "...lora...")`) drops silently:
    the reloaded tower has the base checkpoint's q/k/v. Return the same layers as a regex that excludes the
    multimodal modules, which is what LLaVA's function means."""
    original = getattr(train_module, "find_all_linear_names", None)
    if original is None or getattr(original, "_evaclip_wrapped", False):
        return

    @functools.wraps(original)
    def find_all_linear_names(model: Any) -> Any:
        names = original(model)
        if isinstance(names, str) or not names:
            return names
        return lora_target_pattern(names)

    find_all_linear_names._evaclip_wrapped = True  # type: ignore[attr-defined]
    train_module.find_all_linear_names = find_all_linear_names


# ---------------------------------------------------------------------------------------------------------------------
# Tower options for LLaVA's training script
# ---------------------------------------------------------------------------------------------------------------------


def _parse_select_layer(value: Any) -> Any:
    """'-2' -> -2 (what LLaVA's own tower expects); several layers stay a string for the EVA-CLIP tower."""
    if isinstance(value, str) and "," not in value:
        try:
            return int(value)
        except ValueError:
            return value  # the tower names the valid choices
    return value


def extend_model_arguments(train_module: Any) -> None:
    """Add the tower options LLaVA's `ModelArguments` lacks, so `HfArgumentParser` accepts them."""
    base = train_module.ModelArguments
    if getattr(base, "_evaclip_extended", False):
        return
    existing = {field.name: field for field in dataclasses.fields(base)}
    extra: list[tuple[str, Any, Any]] = []
    if "unfreeze_mm_vision_tower" not in existing:
        extra.append(("unfreeze_mm_vision_tower", bool, dataclasses.field(
            default=False, metadata={"help": "Train the vision tower too (it is loaded eagerly, and saved)."})))
    if "s2" not in existing:
        extra.append(("s2", bool, dataclasses.field(
            default=False, metadata={"help": "LLaVA's S2 multi-scale features (EVA-CLIP towers)."})))
    if "s2_scales" not in existing:
        extra.append(("s2_scales", Optional[str], dataclasses.field(
            default="336,672,1008", metadata={"help": "S2 image sides, smallest = the tower's image size."})))
    select_default = existing["mm_vision_select_layer"].default if "mm_vision_select_layer" in existing else -1
    extra.append(("mm_vision_select_layer", Optional[str], dataclasses.field(
        default=select_default,
        metadata={"help": "hidden_states index of the tower, or several (\"-2,-5,-8\", EVA-CLIP towers) concatenated."},
    )))

    def __post_init__(self: Any) -> None:
        if hasattr(base, "__post_init__"):
            base.__post_init__(self)
        self.mm_vision_select_layer = _parse_select_layer(self.mm_vision_select_layer)
        several = isinstance(self.mm_vision_select_layer, str)
        if several and self.vision_tower and find_factory(self.vision_tower) is None:
            raise ArgumentError(
                f"--mm_vision_select_layer {self.mm_vision_select_layer!r}: several layers need an EVA-CLIP tower; "
                f"{self.vision_tower!r} is handled by LLaVA's own CLIPVisionTower, which takes one int."
            )
        # Where LLaVA has no S2 of its own (the flag is ours), only our towers read it: LLaVA's CLIP tower would train
        # without S2 while the saved config says s2=True.
        if "s2" not in existing and getattr(self, "s2", False) and self.vision_tower \
                and find_factory(self.vision_tower) is None:
            raise ArgumentError(
                f"--s2 True: S2 multi-scale features need an EVA-CLIP tower here; {self.vision_tower!r} is handled by "
                "LLaVA's own CLIPVisionTower, which has no S2 in this LLaVA."
            )

    extended = dataclasses.make_dataclass(
        base.__name__, extra, bases=(base,), namespace={"__post_init__": __post_init__, "_evaclip_extended": True}
    )
    extended.__module__ = base.__module__
    train_module.ModelArguments = extended


def record_tower_options() -> None:
    """After LLaVA's `initialize_vision_modules`, copy the tower options into the model config (so reloading the
    saved model builds the same tower: S2 changes the feature width, and an unfrozen tower's trained weights live in
    the LLaVA checkpoint, so it must be built eagerly) and unfreeze the tower when asked (freeze it otherwise)."""
    from llava.model.llava_arch import LlavaMetaModel

    original = LlavaMetaModel.initialize_vision_modules
    if getattr(original, "_evaclip_wrapped", False):
        return

    @functools.wraps(original)
    def initialize_vision_modules(self: Any, model_args: Any, fsdp: Any = None) -> Any:
        result = original(self, model_args, fsdp=fsdp)
        if getattr(model_args, "s2", False):
            self.config.s2, self.config.s2_scales = True, model_args.s2_scales
        if getattr(model_args, "unfreeze_mm_vision_tower", False):
            self.config.unfreeze_mm_vision_tower = True
            self.get_vision_tower().requires_grad_(True)
        else:
            # Frozen unless asked, as LLaVA's own tower is. A tower built eagerly inside `from_pretrained` (the model
            # this run starts from trained it, so its config says unfreeze_mm_vision_tower) comes back from
            # transformers 5's loading with every parameter requiring grad, and the EVA-CLIP tower would train.
            self.get_vision_tower().requires_grad_(False)
        # Under ZeRO-3 the projector LLaVA just built is fp32 beside bf16/fp16 partitions; DeepSpeed no longer casts it.
        from .zero import align_unpartitioned_dtypes

        align_unpartitioned_dtypes(self)
        return result

    initialize_vision_modules._evaclip_wrapped = True  # type: ignore[attr-defined]
    LlavaMetaModel.initialize_vision_modules = initialize_vision_modules


# ---------------------------------------------------------------------------------------------------------------------
# Cached tower features (--vision_feature_cache): the frozen tower's work done once by `llava-evaclip features`
# ---------------------------------------------------------------------------------------------------------------------


class FeatureCacheError(LaunchError):
    """--vision_feature_cache cannot stand in for the tower: reported in one line, exit status 2."""


LLAVA_NEXT_FEATURE_CACHE = (
    "--vision_feature_cache works with LLaVA 1.5's training only: LLaVA-NeXT's dataset hands its model (image, size, "
    "modality) tuples, anyres tiles and video frames, for which the store's one square image per sample cannot stand "
    "in; train without the cache.")


def check_feature_cache(args: Sequence[str]) -> None:
    """Refuse `--vision_feature_cache` with LLaVA-NeXT's training before anything loads (it would fail in the first
    training step, inside LLaVA-NeXT's model, after the language model has loaded)."""
    if _argument_value(args, "vision_feature_cache") and is_llava_next():
        raise FeatureCacheError(LLAVA_NEXT_FEATURE_CACHE)


_feature_cache: dict[str, Any] = {}  # "store" and the tower it stands in for, once training set them up


def add_feature_cache_argument(train_module: Any) -> None:
    """`--vision_feature_cache DIR` in LLaVA's ModelArguments."""
    base = train_module.ModelArguments
    if getattr(base, "_evaclip_feature_cache", False):
        return
    extra = [("vision_feature_cache", Optional[str], dataclasses.field(default=None, metadata={
        "help": "A FeatureStore dir from `llava-evaclip features` read instead of running the frozen tower."}))]
    extended = dataclasses.make_dataclass(base.__name__, extra, bases=(base,),
                                          namespace={"_evaclip_feature_cache": True})
    extended.__module__ = base.__module__
    train_module.ModelArguments = extended


def attach_feature_cache(tower: Any, directory: str, model_args: Any) -> Any:
    """Open the store and make `tower` return its features (the collated `images` are then the features, see
    `use_feature_cache`); every reason the store cannot stand in for the tower is a FeatureCacheError."""
    from .features import TOWER_SETTING_KEYS, FeatureStore, settings_differences, tower_settings

    if getattr(model_args, "unfreeze_mm_vision_tower", False):
        raise FeatureCacheError("--vision_feature_cache cannot be used with --unfreeze_mm_vision_tower: cached features "
                                "are of the frozen tower; train the tower without the cache.")
    if "mm_vision_tower" in str(getattr(model_args, "mm_tunable_parts", None) or "").split(","):
        raise FeatureCacheError("--vision_feature_cache cannot be used with --mm_tunable_parts naming mm_vision_tower: "
                                "cached features are of the frozen tower; train the tower without the cache.")
    if is_llava_next():
        raise FeatureCacheError(LLAVA_NEXT_FEATURE_CACHE)
    if not hasattr(tower, "select_layers") or getattr(tower, "s2", False):
        raise FeatureCacheError("--vision_feature_cache needs an EVA-CLIP tower without S2 (the store holds its "
                                f"single-scale features); got {type(tower).__name__}.")
    try:
        store = FeatureStore(directory)
    except (ValueError, OSError) as error:
        raise FeatureCacheError(f"--vision_feature_cache {directory}: {error}") from None
    if not len(store):
        raise FeatureCacheError(f"--vision_feature_cache {directory} holds no features; run `llava-evaclip features "
                                "IMAGE_FOLDER --model TOWER --out DIR` first.")
    differences = settings_differences(store.settings, tower_settings(tower), TOWER_SETTING_KEYS)
    if differences:
        raise FeatureCacheError(f"--vision_feature_cache {directory} was made with other settings than this tower: "
                                f"{', '.join(differences)}.")

    expected = (tower.num_patches, tower.hidden_size)  # tokens per image: CLS counted where it is selected

    def forward(images: Any) -> Any:
        if not hasattr(images, "ndim") or images.ndim != 3 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"The vision tower reads cached features (--vision_feature_cache) of shape [batch, "
                             f"{expected[0]}, {expected[1]}], got {shape}.")
        return images

    tower.forward = forward
    _feature_cache.update(store=store, tower=tower)
    return store


def _cache_key(sample: dict, image_folder: Optional[str] = None) -> str:
    """The store key of a LLaVA sample's image: the file LLaVA opens, `os.path.join(image_folder, image)` (an absolute
    or '..' path included), relative to `image_folder`, which the store was made over."""
    image = sample["image"]
    if not isinstance(image, str):
        raise FeatureCacheError(
            f"--vision_feature_cache: sample {sample.get('id', '?')!r} has 'image' {image!r}; the cache holds one "
            "image per sample (a file name relative to --image_folder): train samples with several images without it.")
    key = os.path.normpath(image)
    if image_folder and (os.path.isabs(key) or key.split(os.sep)[0] == os.pardir):
        folder = os.path.abspath(image_folder)
        relative = os.path.relpath(os.path.normpath(os.path.join(folder, image)), folder)
        if relative.split(os.sep)[0] != os.pardir:  # inside the folder; anything else is not in the store
            key = relative
    return key.replace(os.sep, "/")


def _unlisted_names_hint(missing: Sequence[str]) -> str:
    """Why missing images may be missing although `features` ran over the folder: LLaVA opens any file PIL reads
    (`x.jfif`, `x.avif`, a name without extension), `features` picks up only the extensions it lists and skips hidden
    files and folders, without naming what it left out (a dataset folder holds other files)."""
    from .features import IMAGE_EXTENSIONS, _is_image_name

    passed = [key for key in missing
              if not _is_image_name(key.rsplit("/", 1)[-1]) or any(part.startswith(".") and part != os.pardir
                                                                    for part in key.split("/")[:-1])]
    if not passed:
        return ""
    return (f"; {len(passed)} of them (e.g. {passed[0]!r}) have names `features` does not look for (files ending "
            f"{', '.join(IMAGE_EXTENSIONS)}, in any case, outside hidden folders): convert or rename those files and "
            "their entries in the data")


def use_feature_cache(train_module: Any) -> None:
    """With --vision_feature_cache, LLaVA's dataset returns each image's cached features where it returned pixels (so
    they pass its collator unchanged) and the tower hands them on; checked at start: the tower's settings, LLaVA's
    square preprocessing (the store's), and that every image of the data is in the store."""
    import torch
    from llava.model.llava_arch import LlavaMetaModel

    dataset_class = train_module.LazySupervisedDataset
    if getattr(dataset_class.__getitem__, "_evaclip_wrapped", False):
        return
    initialize = LlavaMetaModel.initialize_vision_modules
    dataset_init, get_item = dataset_class.__init__, dataset_class.__getitem__

    @functools.wraps(initialize)
    def initialize_vision_modules(self: Any, model_args: Any, fsdp: Any = None) -> Any:
        result = initialize(self, model_args, fsdp=fsdp)
        if getattr(model_args, "vision_feature_cache", None):
            attach_feature_cache(self.get_vision_tower(), model_args.vision_feature_cache, model_args)
        return result

    @functools.wraps(dataset_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        dataset_init(self, *args, **kwargs)
        store = _feature_cache.get("store")
        if store is None:
            return
        if getattr(self.data_args, "image_aspect_ratio", None) == "pad":
            raise FeatureCacheError("--vision_feature_cache holds features of square-preprocessed images; "
                                    "--image_aspect_ratio pad would pad them first: drop it or the cache.")
        folder = getattr(self.data_args, "image_folder", None)
        # LLaVA's 665K mix names many images several times: each is checked and counted once
        keys = list(dict.fromkeys(_cache_key(sample, folder) for sample in self.list_data_dict if "image" in sample))
        missing = store.missing(keys)
        if missing:
            raise FeatureCacheError(f"{len(missing)} of {len(keys)} images of the data are not in "
                                    f"--vision_feature_cache {store.directory}, e.g. {missing[0]!r}; run "
                                    "`llava-evaclip features IMAGE_FOLDER ...` over the same --image_folder"
                                    f"{_unlisted_names_hint(missing)}.")
        self._evaclip_feature_shape = tuple(store[keys[0]].shape) if keys else None

    @functools.wraps(get_item)
    def __getitem__(self: Any, i: Any) -> Any:
        data = get_item(self, i)
        store = _feature_cache.get("store")
        if store is not None and "image" in data and isinstance(i, int):
            sample = self.list_data_dict[i]
            if "image" in sample:
                data["image"] = store[_cache_key(sample, getattr(self.data_args, "image_folder", None))].float()
            elif self._evaclip_feature_shape is not None:  # a text-only sample: LLaVA uses none of its features
                data["image"] = torch.zeros(self._evaclip_feature_shape)
        return data

    for wrapper in (initialize_vision_modules, __getitem__):
        wrapper._evaclip_wrapped = True  # type: ignore[attr-defined]
    LlavaMetaModel.initialize_vision_modules = initialize_vision_modules
    dataset_class.__init__, dataset_class.__getitem__ = __init__, __getitem__


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def prepare_llava(module: str) -> Optional[Any]:
    """Everything the launcher sets up before running `module`; returns `llava.train.train` for training modules."""
    check_llava_next_transformers()
    patch_transformers_for_llava()
    register_with_llava()  # also bridges LLaVA's forward to transformers 5's generate (patch_llava_forward)
    if not module.startswith(TRAIN_PACKAGE + "."):
        return None
    if is_llava_next():
        check_llava_next_accelerate()
        provide_llava_next_trainer_imports()
    check_trainer_accelerate()
    train_module = importlib.import_module(TRAIN_MODULE)
    patch_deepspeed_auto_fill()
    patch_trainer_rng_state_loading()
    patch_deepspeed_resume_for_lora()
    patch_llava_trainer(train_module)
    patch_llava_next_trainer(train_module)
    patch_lora_targets(train_module)
    if module == DPO_MODULE:  # run as an imported module (see `main`), so that its LoRA targets are ours too
        patch_lora_targets(importlib.import_module(DPO_MODULE))
    extend_model_arguments(train_module)
    record_tower_options()
    add_feature_cache_argument(train_module)
    use_feature_cache(train_module)
    return train_module


def finish_cpu_process_group(grace_s: float = 0.2) -> None:
    """On CPU ranks (a gloo process group), wait for every rank and hand the GIL to gloo's threads before exiting.

    A gloo worker thread frees each finished collective (the Trainer's last all_gather) and needs the GIL to release
    the Python tensors it held; when the main thread has already begun finalizing the interpreter, that thread is
    killed inside a C++ destructor and a rank that did all its work aborts with "terminate called without an active
    exception" (seen in about 1 in 10 CPU training runs). The barrier makes every collective complete; the short
    sleep lets their clean-up take the GIL. Runs on other backends (NCCL on GPUs) are left as they are."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo":
            torch.distributed.barrier()
            time.sleep(grace_s)


def _argument_value(args: Sequence[str], name: str) -> Optional[str]:
    """The last value given for `--name` (`--name value` or `--name=value`), as argparse takes it."""
    value = None
    for index, arg in enumerate(args):
        if arg == f"--{name}" and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _flag_enabled(args: Sequence[str], name: str) -> bool:
    """Whether a boolean training flag is on as HfArgumentParser reads it (`--name`, `--name True`, `--name=yes`)."""
    enabled = False
    for index, arg in enumerate(args):
        if arg == f"--{name}":
            following = args[index + 1] if index + 1 < len(args) else "--"
            enabled = following.startswith("--") or following.lower() in ("true", "t", "yes", "y", "1")
        elif arg.startswith(f"--{name}="):
            enabled = arg.split("=", 1)[1].lower() in ("true", "t", "yes", "y", "1")
    return enabled


def check_resume(args: Sequence[str]) -> None:
    """LLaVA's train() resumes by itself from a `checkpoint-*` in --output_dir. Without DeepSpeed a LoRA run's
    checkpoint holds only the adapters, so the resumed run would go on with the projector (and an unfrozen tower)
    back at their initial weights, silently; refuse that instead."""
    output_dir = _argument_value(args, "output_dir")
    if not (output_dir and os.path.isdir(output_dir) and _flag_enabled(args, "lora_enable")
            and not _argument_value(args, "deepspeed")):
        return
    checkpoints = sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-"))
    if checkpoints:
        raise ArgumentError(
            f"--output_dir {output_dir} holds {checkpoints[-1]}, which LLaVA would resume from, but without "
            "--deepspeed a LoRA checkpoint holds only the adapters: the projector (and a trained tower) would restart "
            "from their initial weights. Remove the checkpoint-* folders or give a new --output_dir (LoRA runs under "
            "--deepspeed resume)."
        )


def check_tower_training(args: Sequence[str]) -> None:
    """LLaVA 1.5's --tune_mm_mlp_adapter True freezes everything but the projector after the tower is set up and saves
    only mm_projector.bin, so --unfreeze_mm_vision_tower True beside it would train nothing of the tower while the
    saved config says it did; refuse the pair before anything loads."""
    if (_flag_enabled(args, "tune_mm_mlp_adapter") and _flag_enabled(args, "unfreeze_mm_vision_tower")
            and not is_llava_next()):
        raise ArgumentError(
            "--tune_mm_mlp_adapter True trains and saves only the projector (mm_projector.bin): LLaVA freezes the "
            "tower after --unfreeze_mm_vision_tower True unfreezes it. Train the tower in the next stage "
            "(integration/finetune.sh --unfreeze_mm_vision_tower True --pretrain_mm_mlp_adapter ...), or drop "
            "--tune_mm_mlp_adapter."
        )


def check_paths(args: Sequence[str]) -> None:
    """Paths LLaVA would trip over only after loading the language model (or, for the images, in the first step), and
    an output folder that would overwrite the vision tower's checkpoint or the model the run starts from (the next
    stage's MODEL_PATH set to the previous stage's output, OUTPUT_DIR left the same): one line each, before anything
    loads. Values
    LLaVA-NeXT reads as several files (commas, globs, braces) are left to it."""
    data_path = _argument_value(args, "data_path")
    if data_path and not any(char in data_path for char in ",*?{[") and not os.path.exists(data_path):
        raise ArgumentError(f"--data_path {data_path}: no such file (expected LLaVA's JSON of conversations).")
    image_folder = _argument_value(args, "image_folder")
    if image_folder and not os.path.isdir(image_folder):
        raise ArgumentError(f"--image_folder {image_folder}: not a folder (the images the data's 'image' paths name).")
    output_dir = _argument_value(args, "output_dir")
    if not output_dir:
        return
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ArgumentError(f"--output_dir {output_dir} is a file; give a folder for the checkpoints.")
    out = os.path.realpath(output_dir)
    for flag, what in (("vision_tower", "the vision tower's checkpoint folder"),
                       ("model_name_or_path", "the model this run starts from")):
        source = _argument_value(args, flag)
        if source and os.path.isdir(source):
            folder = os.path.realpath(source)
            if out == folder or out.startswith(folder + os.sep):
                raise ArgumentError(
                    f"--output_dir {output_dir} is {what} (--{flag} {source}) or inside it: the trainer would write its "
                    "config and weights over it; give this run its own output folder."
                )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        check_llava_next_transformers()  # before resolving the module, which imports LLaVA-NeXT's package
    except LaunchError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    provide_llava_next_model_imports()
    try:
        module, args = split_command(argv)
    except LaunchError as error:
        print(f"{USAGE}\n{PROG}: error: {error}", file=sys.stderr)
        return 2
    patch_cuda_synchronize()
    try:
        train_module = prepare_llava(module)
    except LaunchError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if train_module is not None:
        args = translate_training_args(args)
        try:
            check_paths(args)
            check_tower_training(args)
            check_resume(args)
            check_feature_cache(args)
        except LaunchError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
    try:
        if module in (TRAIN_MODULE, DPO_MODULE):
            # Their `__main__` block is `train()`; calling it on the imported module keeps the extensions above in
            # effect (runpy would execute a second copy of the module).
            entry = sys.modules[module]
            sys.argv = [entry.__file__, *args]
            entry.train()
        else:
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except LaunchError as error:  # the feature cache's refusals and the argument checks of `extend_model_arguments`
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    finish_cpu_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

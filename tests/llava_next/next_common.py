"""Shared workspace for the LLaVA-NeXT tests. These modules run only in their own process, with LLaVA-NeXT's `llava`
first on PYTHONPATH (tests/test_llava_next.py starts them); they refuse to run against any other `llava`.

Everything is tiny and random: an EVA02 tower written by BAAI's own code (`consisid_eva_clip`) and converted, a CLIP
tower of the same grid for LLaVA-NeXT's own `CLIPVisionTower`, 2-layer Qwen2 and Llama language models with
tokenizers, and a few images with LLaVA-format conversations."""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from llava_evaclip.launch import llava_next_trainer_problems
from llava_evaclip.llava_registry import provide_llava_next_model_imports

provide_llava_next_model_imports()  # transformers 4.5x: before LLaVA-NeXT's package is first imported, as scripts must
import llava  # noqa: E402

NEXT_PATH = Path(os.environ["LLAVA_NEXT_PATH"]).resolve()
if not Path(llava.__file__).resolve().is_relative_to(NEXT_PATH):
    raise RuntimeError(f"these tests need LLaVA-NeXT's llava from {NEXT_PATH}, got {llava.__file__}")

# Whether LLaVA-NeXT's trainer can run with this accelerate and transformers (see llava_next_trainer_problems).
LLAVA_NEXT_TRAINS = not llava_next_trainer_problems()
IMAGE_SIZE, PATCH_SIZE = 28, 7
GRID = IMAGE_SIZE // PATCH_SIZE
TOWER_WIDTH, TOWER_LAYERS = 32, 11  # 11 layers: LLaVA-NeXT's slice_m25811_f6 reads hidden state -11
LM_WIDTH = 48
PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
             [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
# A toy EVA02-CLIP release in BAAI's layout (xattn / fusedLN off on CPU).
BAAI_ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "layers": TOWER_LAYERS, "width": TOWER_WIDTH,
                   "head_width": 8, "mlp_ratio": 2.6667, "rope": True, "pt_hw_seq_len": 16, "intp_freq": True,
                   "naiveswiglu": True, "subln": True, "xattn": False, "fusedLN": False, "drop_path_rate": 0.0,
                   "eva_model_name": "eva-clip-test"},
    "text_cfg": {"context_length": 8, "vocab_size": 99, "width": 32, "heads": 4, "layers": 1, "xattn": False,
                 "fusedLN": False},
}
ANSWERS = ["a red square", "the image shows a green circle", "a small blue shape", "two dark stripes"]
QUESTION = "what is in the image"


def write_eva_tower(root: Path) -> Path:
    """BAAI's EVA02-CLIP (random, non-trivial weights) saved as a release .pt and converted with our converter."""
    from consisid_eva_clip.model import CustomCLIP

    from llava_evaclip.convert import convert_checkpoint

    torch.manual_seed(1)
    model = CustomCLIP(**json.loads(json.dumps(BAAI_ARCH))).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # unit norms / zero biases would hide a mapping error
            parameter.add_(torch.randn_like(parameter) * 0.05)
    torch.save(model.state_dict(), root / "baai_eva02.pt")
    (root / "baai_arch.json").write_text(json.dumps(BAAI_ARCH))
    out = root / "eva02-tower"
    convert_checkpoint(root / "baai_eva02.pt", out, arch=str(root / "baai_arch.json"))
    return out


def write_clip_tower(root: Path) -> Path:
    """A CLIP tower with the EVA tower's image and patch size, for LLaVA-NeXT's own CLIPVisionTower."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out = root / "clip-tower"
    torch.manual_seed(2)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=TOWER_WIDTH, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                     projection_dim=16)).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def _sentences() -> list[str]:
    return (ANSWERS + [QUESTION, "You are a helpful assistant.", "user", "assistant", "system"]) * 10


def write_qwen(root: Path) -> Path:
    """A 2-layer Qwen2 with a byte-level BPE tokenizer that has Qwen's chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2TokenizerFast

    out = root / "qwen2"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(_sentences(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, additional_special_tokens=specials[1:])
    tokenizer.save_pretrained(out)
    torch.manual_seed(3)
    Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=LM_WIDTH, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )).save_pretrained(out)
    return out


def write_llama(root: Path) -> Path:
    """A 2-layer Llama with a SentencePiece tokenizer (LLaVA loads it with use_fast=False)."""
    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "llama"
    out.mkdir()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_writer=model, vocab_size=100, model_type="bpe", unk_id=0,
        bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2, num_threads=1)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    torch.manual_seed(4)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=100, hidden_size=LM_WIDTH, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )).save_pretrained(out)
    return out


def write_data(root: Path) -> tuple[Path, Path]:
    """Images of several aspect ratios (anyres picks different grids) and one conversation per image."""
    from PIL import Image

    images = root / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    records = []
    for index, answer in enumerate(ANSWERS):
        height, width = [(30, 60), (60, 26), (40, 40), (24, 50)][index]
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"{index}.png")
        records.append({"id": str(index), "image": f"{index}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]})
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return data, images


_workspace: SimpleNamespace | None = None


def workspace_once() -> SimpleNamespace:
    """The workspace, built once per process in a temporary directory removed at exit."""
    global _workspace
    if _workspace is None:
        root = Path(tempfile.mkdtemp(prefix="llava_next_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _workspace = workspace(root)
    return _workspace


def workspace(root: Path) -> SimpleNamespace:
    root.mkdir(parents=True, exist_ok=True)
    data, images = write_data(root)
    return SimpleNamespace(root=root, eva=write_eva_tower(root), clip=write_clip_tower(root), qwen=write_qwen(root),
                           llama=write_llama(root), data=data, images=images)

"""The `llava-evaclip` command line, run as a user runs it: `python -m llava_evaclip ...` in a subprocess, on tiny
checkpoint dirs written here, checking files, exit statuses and messages. The many small error cases call
`llava_evaclip.cli.main` in-process (same code path, no 5 s interpreter start each)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import CLIPImageProcessor

from llava_evaclip import EvaCLIPConfig, EvaCLIPModel, EvaCLIPVisionModel, EvaCLIPVisionModelWithProjection
from llava_evaclip.cli import main
from llava_evaclip.presets import list_presets
from llava_evaclip.processing import build_image_processor

from conftest import BAAI_CONFIG_FILES, eva_clip_18b_dir, tiny_text_config, tiny_vision_config

IMAGE_SIZE = 56  # 8 x 8 patches of 7 pixels
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                  "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args: str, wrapper: str | None = None) -> subprocess.CompletedProcess:
    """`python -m llava_evaclip ARGS` (or a `-c` wrapper around `cli.main`) in a fresh interpreter."""
    command = [sys.executable, "-c", wrapper] if wrapper else [sys.executable, "-m", "llava_evaclip"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=300)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("llava-evaclip "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write_image(path, size=(40, 30), mode="RGB", seed=0, fmt=None) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)


# --------------------------------------------------------------------------------------------------------------------
# Tiny checkpoint dirs
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory) -> str:
    """A vision-only EVA02-style checkpoint dir, as `convert --vision-only` writes it."""
    path = str(tmp_path_factory.mktemp("vision_ckpt"))
    torch.manual_seed(1)
    config = tiny_vision_config("eva02", image_size=IMAGE_SIZE)
    EvaCLIPVisionModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> str:
    """A full model dir (both towers, CLIP tokenizer files) with a large temperature so probabilities are peaked."""
    from llava_evaclip.tokenization import write_tokenizer_files

    path = str(tmp_path_factory.mktemp("full_ckpt"))
    torch.manual_seed(2)
    text = tiny_text_config(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    config = EvaCLIPConfig(text_config=text.to_dict(),
                           vision_config=tiny_vision_config("eva01", image_size=IMAGE_SIZE).to_dict(),
                           projection_dim=16, logit_scale_init_value=math.log(100.0))
    EvaCLIPModel(config).save_pretrained(path)
    build_image_processor(config).save_pretrained(path)
    write_tokenizer_files(path, model_max_length=text.max_position_embeddings)
    return path


@pytest.fixture()
def image_tree(tmp_path) -> str:
    """Good images (two `a.jpg` in different folders, an RGBA PNG, a grayscale JPEG), two broken ones, and a text
    file that is not an image."""
    root = tmp_path / "images"
    write_image(str(root / "sub1" / "a.jpg"), seed=1)
    write_image(str(root / "sub2" / "a.jpg"), size=(30, 50), seed=2)
    write_image(str(root / "top.png"), size=(64, 64), mode="RGBA", seed=3)
    write_image(str(root / "deep" / "er" / "gray.jpeg"), size=(20, 70), mode="L", seed=4)
    (root / "corrupt.jpg").write_bytes(b"this is not a JPEG at all")
    write_image(str(root / "truncated.png"), size=(64, 64), seed=5)
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "notes.txt").write_text("not an image")
    return str(root)


GOOD = ("sub1/a.jpg", "sub2/a.jpg", "top.png", "deep/er/gray.jpeg")
BAD = ("corrupt.jpg", "truncated.png")


def reference_hidden_states(model_dir: str, image_paths: list[str], layer: int) -> torch.Tensor:
    """hidden_states[layer] of the plain transformers-style model, images preprocessed by the saved processor."""
    model = EvaCLIPVisionModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    images = [Image.open(path).convert("RGB") for path in image_paths]
    with torch.no_grad():
        outputs = model(processor(images, return_tensors="pt")["pixel_values"], output_hidden_states=True)
    return outputs.hidden_states[layer]


def read_features(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    with safe_open(path, framework="pt") as handle:
        return handle.get_tensor("features"), handle.metadata()


def stat_key(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns


# --------------------------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------------------------


def test_features_tree_bad_images_and_resume(vision_dir, image_tree, tmp_path):
    out = str(tmp_path / "out")
    result = run_cli("features", image_tree, "--model", vision_dir, "--out", out, "--batch-size", "3")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for name in BAD:  # each broken image is named in a warning and in the final failure list
        path = os.path.join(image_tree, name)
        assert f"warning: skipping {path}" in result.stderr
        assert re.search(rf"^  {re.escape(path)}: cannot read image", result.stderr, re.M), result.stderr
    assert "2 image(s) failed" in result.stderr
    assert "img/s" in result.stderr  # the tqdm bar
    assert "6 images: 4 written, 0 skipped (output exists), 2 failed" in result.stdout

    files = sorted(os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/")
                   for d, _, fs in os.walk(out) for f in fs)
    assert files == sorted(f"{name}.safetensors" for name in GOOD)  # no temp files, no outputs for broken images

    # The saved features are LLaVA's: hidden_states[-2] without CLS, from the plain model (an independent path).
    reference = reference_hidden_states(vision_dir, [os.path.join(image_tree, n) for n in GOOD], layer=-2)
    for index, name in enumerate(GOOD):
        features, metadata = read_features(os.path.join(out, name + ".safetensors"))
        assert features.shape == (64, 32) and features.dtype == torch.float32
        torch.testing.assert_close(features, reference[index, 1:], atol=1e-5, rtol=0)
        source = os.path.join(image_tree, name)
        with Image.open(source) as image:
            original = f"{image.width}x{image.height}"
        assert metadata["source"] == os.path.abspath(source)
        assert metadata["relative_path"] == name
        assert metadata["original_size"] == original
        assert metadata["model"] == os.path.abspath(vision_dir)
        assert (metadata["select_layer"], metadata["select_feature"]) == ("-2", "patch")
        assert (metadata["dtype"], metadata["random_weights"]) == ("float32", "false")
        assert metadata["image_size"] == str(IMAGE_SIZE)

    # A rerun resumes: nothing recomputed or rewritten (same inode and mtime), the failures are reported again.
    before = {name: stat_key(os.path.join(out, name + ".safetensors")) for name in GOOD}
    rerun = run_cli("features", image_tree, "--model", vision_dir, "--out", out)
    assert rerun.returncode == 1
    assert "6 images: 0 written, 4 skipped (output exists), 2 failed" in rerun.stdout
    assert "--overwrite" in rerun.stdout
    assert {name: stat_key(os.path.join(out, name + ".safetensors")) for name in GOOD} == before


def test_features_overwrite_other_settings_and_interrupt(vision_dir, image_tree, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    good = [os.path.join(image_tree, name) for name in GOOD[:2]]
    assert main(["features", *good, "--model", vision_dir, "--out", out]) == 2  # same name a.jpg twice
    assert "would both be saved as 'a.jpg'" in capsys.readouterr().err
    sub1 = os.path.join(image_tree, "sub1")
    assert main(["features", sub1, "--model", vision_dir, "--out", out]) == 0
    target = os.path.join(out, "a.jpg.safetensors")
    before = stat_key(target)

    # Another selection into the same folder: the existing file is kept and the conflict reported, not overwritten.
    assert main(["features", sub1, "--model", vision_dir, "--out", out, "--select-layer", "-1"]) == 1
    err = capsys.readouterr().err
    assert "made with other settings: select_layer '-2' (now '-1')" in err and "--overwrite" in err
    assert stat_key(target) == before

    # --overwrite recomputes (a new file renamed into place) with the new selection.
    args = ["features", sub1, "--model", vision_dir, "--out", out, "--select-layer=-1", "--select-feature",
            "cls_patch", "--dtype", "bfloat16", "--overwrite"]
    assert main(args) == 0
    assert stat_key(target)[0] != before[0]
    features, metadata = read_features(target)
    assert features.dtype == torch.bfloat16 and metadata["dtype"] == "bfloat16"
    assert (metadata["select_layer"], metadata["select_feature"]) == ("-1", "cls_patch")
    reference = reference_hidden_states(vision_dir, [os.path.join(sub1, "a.jpg")], layer=-1)[0]
    assert features.shape == reference.shape == (65, 32)  # CLS kept
    torch.testing.assert_close(features.float(), reference, atol=0.05, rtol=0.05)  # bf16 weights and activations

    # An interrupted write leaves neither a truncated output nor a temp file behind.
    import llava_evaclip.features

    def interrupted_write(descriptor, view):
        os.write(descriptor, b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(llava_evaclip.features, "_write_chunk", interrupted_write)
    fresh = str(tmp_path / "fresh")
    assert main(["features", sub1, "--model", vision_dir, "--out", fresh]) == 130  # one line, like Ctrl-C
    err = capsys.readouterr().err  # after the progress bar, one line and no traceback
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "llava-evaclip features: interrupted (SIGINT)"
    assert os.listdir(fresh) == []


def test_features_samples_on_preset_readme_quickstart(tmp_path):
    """The README's first command: shipped samples, a preset, no download; random weights said loudly."""
    out = str(tmp_path / "features")
    # --select-layer 1 runs a single layer of the 86M-parameter tower, to keep the test quick.
    result = run_cli("features", "--samples", "--model", "EVA02-CLIP-B-16", "--out", out, "--select-layer", "1")
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr and "llava-evaclip convert" in result.stderr
    outputs = sorted(os.listdir(out))
    assert len(outputs) >= 3 and all(name.endswith(".safetensors") for name in outputs)
    for name in outputs:
        features, metadata = read_features(os.path.join(out, name))
        assert features.shape == (196, 768)  # 14 x 14 patches of the B/16 tower
        assert metadata["random_weights"] == "true" and metadata["model"] == "EVA02-CLIP-B-16"
        assert "RANDOM" in metadata["warning"]
        assert torch.isfinite(features).all()


# --------------------------------------------------------------------------------------------------------------------
# inspect, presets
# --------------------------------------------------------------------------------------------------------------------


def test_what_the_imports_print_goes_to_stderr_not_into_json_output(full_dir, monkeypatch, capsys):
    """accelerate 0.21 (LLaVA's pin) imports DeepSpeed where it is installed, and DeepSpeed 0.12.6 / 0.14.4 log
    "Setting ds_accelerator to ..." to stdout on import: `inspect --json > file` was not JSON. What the model imports
    print now goes to stderr. The registration stands in for that import here (main registers before each command)."""
    import llava_evaclip

    register = llava_evaclip._register_auto_classes

    def chatty_register() -> None:
        print("[INFO] [real_accelerator.py:203:get_accelerator] Setting ds_accelerator to cuda (auto detect)")
        register()

    monkeypatch.setattr(llava_evaclip, "_register_auto_classes", chatty_register)
    assert main(["inspect", full_dir, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model_class"] == "EvaCLIPModel"
    assert "Setting ds_accelerator" in err


def test_inspect_dir_counts_match_loaded_model(full_dir):
    result = run_cli("inspect", full_dir, "--json", "--select-layer", "1", "--select-feature", "cls_patch")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    model = EvaCLIPModel.from_pretrained(full_dir)

    def count(*modules):
        return sum(p.numel() for module in modules for p in module.parameters())

    assert info["parameters"] == {
        "vision_embeddings": count(model.vision_model.embeddings),
        "vision_encoder": count(model.vision_model.encoder),
        "vision_heads": count(model.vision_model.post_layernorm, model.visual_projection),
        "vision_tower": count(model.vision_model, model.visual_projection),
        "text_tower": count(model.text_model, model.text_projection),
        "logit_scale": 1,
        "total": count(model),
    }
    assert info["vision"]["num_patches"] == 64 and info["vision"]["num_layers"] == 3
    assert info["llava"]["tokens_per_image"] == 65 and info["llava"]["hidden_states_indices"] == [1]
    assert "float32" in info["weights"]



def test_inspect_counts_the_class_a_vision_dir_was_saved_as(tmp_path, capsys):
    """`convert --vision-only` writes an EvaCLIPVisionModelWithProjection: inspect named it EvaCLIPVisionModel and
    left its projection out of the counts."""
    torch.manual_seed(0)
    model = EvaCLIPVisionModelWithProjection(tiny_vision_config("eva02", projection_dim=16))
    model.save_pretrained(tmp_path / "vision")
    assert main(["inspect", str(tmp_path / "vision"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_class"] == "EvaCLIPVisionModelWithProjection"
    total = sum(p.numel() for p in EvaCLIPVisionModelWithProjection.from_pretrained(tmp_path / "vision").parameters())
    assert info["parameters"]["total"] == info["parameters"]["vision_tower"] == total


def test_inspect_text_form(full_dir, capsys):
    assert main(["inspect", full_dir]) == 0
    text = capsys.readouterr().out
    assert "LLaVA            64 visual tokens per image of width 32" in text
    total = sum(p.numel() for p in EvaCLIPModel.from_pretrained(full_dir).parameters())
    assert re.search(rf"^  total +[\d.]+ M +\({total:,}\)$", text, re.M), text


def test_inspect_preset_matches_timm_without_allocating():
    """EVA02-CLIP-bigE-14 (4.7B parameters, 19 GB in fp32) is inspected on the meta device: the vision parameter
    count equals timm's EVA02-CLIP-bigE tower and the process stays far below the weights' size."""
    timm = pytest.importorskip("timm")
    # the console script's entry (`llava_evaclip_cli`), which imports the package as `llava-evaclip` does
    wrapper = ("import resource, sys\nfrom llava_evaclip_cli import main\nstatus = main(sys.argv[1:])\n"
               "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(status)")
    result = run_cli("inspect", "EVA02-CLIP-bigE-14", "--json", wrapper=wrapper)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    with torch.device("meta"):
        reference = timm.create_model("eva02_enormous_patch14_clip_224", pretrained=False)
    params = info["parameters"]
    vision = params["vision_embeddings"] + params["vision_encoder"] + params["vision_heads"]
    assert vision == sum(p.numel() for p in reference.parameters())
    assert info["llava"]["tokens_per_image"] == 256 and info["vision"]["num_layers"] == 64
    peak_kb = int(re.search(r"peak_rss_kb (\d+)", result.stderr).group(1))
    assert peak_kb * 1024 < 3 * 2**30, peak_kb  # the vision weights alone would be 17 GB


def test_presets_lists_baai_names():
    result = run_cli("presets")
    assert result.returncode == 0
    names = result.stdout.split()
    assert names == list_presets()
    # Every name is one of BAAI's model-config file names, as shipped with their original code.
    configs = pytest.importorskip("consisid_eva_clip")
    config_dir = os.path.join(os.path.dirname(configs.__file__), "model_configs")
    for name in names:
        if name.startswith("EVA-CLIP-"):  # the 8B / 18B release: BAAI's EVA-CLIP-18B code
            path = os.path.join(eva_clip_18b_dir(), "eva_clip", "model_configs",
                                f"{BAAI_CONFIG_FILES.get(name, name)}.json")
        else:
            path = os.path.join(config_dir, f"{name}.json")
        assert os.path.isfile(path), name


# --------------------------------------------------------------------------------------------------------------------
# similarity, visualize
# --------------------------------------------------------------------------------------------------------------------


def test_similarity_table_matches_reference(full_dir, tmp_path):
    open_clip = pytest.importorskip("open_clip")
    images = [str(tmp_path / "red.png"), str(tmp_path / "noise.jpg")]
    Image.new("RGB", (70, 60), (220, 30, 30)).save(images[0])
    write_image(images[1], size=(50, 80), seed=9)
    texts = ["a red square", "random noise", "a photo of a dog!"]
    result = run_cli("similarity", "--model", full_dir, "--images", *images, "--texts", *texts)
    assert result.returncode == 0, result.stderr
    rows = [next(line for line in result.stdout.splitlines() if os.path.basename(path) in line) for path in images]
    table = torch.tensor([[float(v) for v in re.findall(r"\b[01]\.\d{4}\b", row)[:3]] for row in rows])

    # Reference: EVA-CLIP's own tokenization (open_clip's, zero padded) and the two towers' embeddings.
    model = EvaCLIPModel.from_pretrained(full_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(full_dir)
    ids = open_clip.tokenize(texts, context_length=model.config.text_config.max_position_embeddings)
    from conftest import features  # CLIP's return type of get_*_features on this transformers

    with torch.no_grad():
        text = features(model.get_text_features(input_ids=ids))
        image = features(model.get_image_features(
            pixel_values=processor([Image.open(p).convert("RGB") for p in images], return_tensors="pt")["pixel_values"]
        ))
    text = text / text.norm(dim=-1, keepdim=True)
    image = image / image.norm(dim=-1, keepdim=True)
    expected = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)
    assert table.shape == (2, 3)
    torch.testing.assert_close(table, expected, atol=6e-5, rtol=0)  # the table prints 4 decimals
    assert expected.max() > 0.5  # a peaked distribution, so the comparison is not between near-uniform rows


def test_visualize_pca_png(vision_dir, tmp_path, capsys):
    image_path = str(tmp_path / "scene.png")
    canvas = np.zeros((90, 120, 3), dtype=np.uint8)
    canvas[:, :60] = (200, 40, 40)
    canvas[30:70, 70:110] = (30, 60, 220)
    canvas += np.random.default_rng(0).integers(0, 30, size=canvas.shape, dtype=np.uint8)
    Image.fromarray(canvas).save(image_path)
    out = str(tmp_path / "pca.png")
    result = run_cli("visualize", image_path, "--model", vision_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    png = np.asarray(Image.open(out).convert("RGB"))
    panel, gap, caption = 224, 6, 18
    assert png.shape == (2 * caption + panel + 2 * gap, 3 * panel + 4 * gap, 3)

    # Independent PCA (numpy SVD) of hidden_states[-2] patch tokens: the middle panel's colour at each patch centre
    # follows the first three component scores, and the printed explained variances agree.
    features = reference_hidden_states(vision_dir, [image_path], layer=-2)[0, 1:].double().numpy()
    centred = features - features.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    scores = u[:, :3] * s[:3]
    ratios = s[:3] ** 2 / (s**2).sum()
    printed = [float(v) for v in re.search(r"PC1-3: ([\d.]+), ([\d.]+), ([\d.]+)", result.stdout).groups()]
    np.testing.assert_allclose(printed, ratios, atol=1e-3)
    side, block = 8, panel // 8
    top, left = 2 * caption + gap, gap + panel + gap  # the middle panel's corner
    centres = [(top + r * block + block // 2, left + c * block + block // 2) for r in range(side) for c in range(side)]
    colours = np.array([png[y, x] for y, x in centres], dtype=np.float64)
    for component in range(3):
        correlation = np.corrcoef(colours[:, component], scores[:, component])[0, 1]
        assert abs(correlation) > 0.95, (component, correlation)

    before = stat_key(out)
    capsys.readouterr()  # drop the reference model's loading messages
    assert main(["visualize", image_path, "--model", vision_dir, "--out", out]) == 2  # refuses to overwrite
    assert_one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert stat_key(out) == before


# --------------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written
# --------------------------------------------------------------------------------------------------------------------


def test_bad_input_errors(vision_dir, full_dir, image_tree, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    (empty / "nested" / "readme.txt").write_text("no images here")
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    out = str(tmp_path / "out")
    existing_png = tmp_path / "existing.png"
    existing_png.write_bytes(b"keep me")
    corrupt = os.path.join(image_tree, "corrupt.jpg")
    good = os.path.join(image_tree, "top.png")
    missing = str(tmp_path / "nowhere")
    cases = [
        (["features", missing, "--model", vision_dir, "--out", out], [missing, "no such file or directory"]),
        (["features", str(empty), "--model", vision_dir, "--out", out], ["no images found", str(empty)]),
        (["features", good, "--model", "EVA03-CLIP-Z-99", "--out", out],
         ["'EVA03-CLIP-Z-99' is neither", "EVA02-CLIP-L-14-336"]),
        (["features", good, "--model", str(no_config), "--out", out], ["has no config.json", str(no_config)]),
        (["features", "--model", vision_dir, "--out", out], ["no input", "--samples"]),
        (["features", good, "--model", vision_dir, "--out", str(existing_png)], ["is not a directory"]),
        (["features", good, "--model", vision_dir, "--out", out, "--select-layer", "7"], ["out of range", "-4..3"]),
        (["features", good, "--model", vision_dir, "--out", out, "--batch-size", "0"], ["--batch-size"]),
        (["inspect", "EVA03-CLIP-Z-99"], ["neither", "preset"]),
        (["inspect", str(no_config)], ["has no config.json"]),
        (["similarity", "--model", vision_dir, "--images", good, "--texts", "a"], ["only a vision tower"]),
        (["similarity", "--model", "EVA02-CLIP-B-16", "--images", good, "--texts", "a"], ["is a preset"]),
        (["similarity", "--model", full_dir, "--images", str(empty), "--texts", "a"], ["no images found"]),
        (["visualize", good, "--model", vision_dir, "--out", str(existing_png)], ["already exists"]),
        (["visualize", corrupt, "--model", vision_dir, "--out", str(tmp_path / "v.png")], ["cannot read image"]),
        (["visualize", str(tmp_path / "nope.jpg"), "--model", vision_dir, "--out", str(tmp_path / "v.png")],
         ["no such file"]),
    ]
    for argv, fragments in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert_one_line_error(captured.err, *fragments)
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "v.png")
    assert existing_png.read_bytes() == b"keep me"


def test_damaged_model_files_and_dangling_outputs_are_one_line_errors(vision_dir, image_tree, tmp_path, capsys):
    """A config.json that is not UTF-8, a damaged or zero-byte weights file, a dangling symlink at --out and a file
    where bench's --output-dir should be: each one line with exit status 2, nothing the user had touched."""
    latin1 = tmp_path / "latin1"
    shutil.copytree(vision_dir, latin1)
    (latin1 / "config.json").write_bytes((latin1 / "config.json").read_bytes().replace(b"{", b'{"note": "caf\xe9",', 1))
    truncated = tmp_path / "truncated"
    shutil.copytree(vision_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:6])
    empty_weights = tmp_path / "empty_weights"
    shutil.copytree(vision_dir, empty_weights)
    (empty_weights / "model.safetensors").write_bytes(b"")
    dangling = tmp_path / "link.png"
    dangling.symlink_to(tmp_path / "missing-target.png")
    good = os.path.join(image_tree, "top.png")
    cases = [
        (["inspect", str(latin1)], ["cannot read", "config.json", "utf-8"]),
        (["features", good, "--model", str(latin1), "--out", str(tmp_path / "f")], ["cannot read", "config.json"]),
        (["inspect", str(truncated)], ["cannot read", "model.safetensors", "damaged"]),
        (["inspect", str(empty_weights)], ["cannot read", "model.safetensors"]),
        (["visualize", good, "--model", vision_dir, "--out", str(dangling)], ["already exists", "--overwrite"]),
    ]
    for argv, fragments in cases:
        assert main(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, *fragments)
    assert dangling.is_symlink() and not os.path.exists(tmp_path / "f")
    bench = pytest.importorskip("benchmarks.tower")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--output-dir", str(a_file / "results"), "--quick"])
    with pytest.raises(bench.BenchmarkError, match=r"--output-dir .*a-file is a file, not a folder"):
        bench.run_benchmark(args, progress=lambda _: pytest.fail("timed before checking its output folder"))
    assert a_file.read_text() == "keep me"


def test_similarity_table_keeps_one_line_per_image_for_multi_line_texts():
    import torch as _torch
    from llava_evaclip.commands.similarity import render_table

    texts = ["a photo\nof a cat", "a\tdog  "]
    table = render_table(["x.png", "y.png"], texts, _torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    lines = table.splitlines()
    assert len(lines) == 4, table  # the caption line, the header, one row per image
    assert "a photo of a cat" in lines[1] and lines[2].endswith("a photo of a cat") and lines[3].endswith("a dog")


def test_similarity_columns_of_texts_alike_up_to_the_cut_are_told_apart():
    import torch as _torch
    from llava_evaclip.commands.similarity import render_table

    texts = ["This is a photo of a small red cat", "This is a photo of a small red dog"]
    table = render_table(["x.png"], texts, _torch.tensor([[0.3, 0.7]]))
    header, row = table.splitlines()[1:]
    assert "[1] This is a photo" in header and "[2] This is a photo" in header, table
    assert row.split("  ")[-1].startswith("[2] ") and "dog" in row, table


@pytest.mark.parametrize("height", [1])
def test_visualize_reads_an_image_1_pixel_high(vision_dir, tmp_path, height):
    """transformers 4 guesses the channel axis: a height of 1 was taken for it (a traceback)."""
    image_path = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, 50, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "pca.png"
    assert main(["visualize", str(image_path), "--model", vision_dir, "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0

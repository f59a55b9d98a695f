"""EVA-CLIP is registered with every Auto class transformers registers CLIP with, so the Auto classes and pipelines a
CLIP user reaches for work on a converted directory: zero-shot image classification, image feature extraction,
image classification."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    pipeline,
)
from transformers.models.auto import modeling_auto
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

from llava_evaclip import (
    EvaCLIPConfig,
    EvaCLIPForImageClassification,
    EvaCLIPModel,
    EvaCLIPTextConfig,
    EvaCLIPVisionConfig,
    EvaCLIPVisionModel,
    EvaCLIPVisionModelWithProjection,
)
from llava_evaclip.processing import build_image_processor
from llava_evaclip.tokenization import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE, build_tokenizer

from conftest import tiny_text_config, tiny_vision_config

OURS_FOR_CLIP = {CLIPConfig: EvaCLIPConfig, CLIPVisionConfig: EvaCLIPVisionConfig, CLIPTextConfig: EvaCLIPTextConfig}


def _auto_model_classes() -> list[type]:
    """Every Auto model class of the installed transformers (read from transformers, not from our list)."""
    base = modeling_auto._BaseAutoModelClass
    classes = [value for value in vars(modeling_auto).values() if isinstance(value, type) and issubclass(value, base)]
    return [auto_class for auto_class in classes if getattr(auto_class, "_model_mapping", None) is not None]


def test_registered_with_every_auto_class_clip_is_registered_with() -> None:
    """For each Auto class listing one of CLIP's configs, ours resolves to the EVA-CLIP twin of CLIP's class."""
    checked = []
    for auto_class in _auto_model_classes():
        mapping = auto_class._model_mapping
        for clip_config, our_config in OURS_FOR_CLIP.items():
            if clip_config in mapping:
                assert our_config in mapping, f"{auto_class.__name__} lists {clip_config.__name__} but not ours"
                assert mapping[our_config].__name__ == "Eva" + mapping[clip_config].__name__, auto_class.__name__
                checked.append(auto_class.__name__)
    assert "AutoModelForZeroShotImageClassification" in checked and "AutoModel" in checked
    for mapping in (TOKENIZER_MAPPING, IMAGE_PROCESSOR_MAPPING, PROCESSOR_MAPPING):
        if CLIPConfig in mapping:
            assert mapping[EvaCLIPConfig] == mapping[CLIPConfig]


def _full_config() -> EvaCLIPConfig:
    """Tiny towers with CLIP's full 49408-token vocabulary, so the packaged tokenizer fits the text tower."""
    text = tiny_text_config(vocab_size=VOCAB_SIZE, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
                            pad_token_id=PAD_TOKEN_ID, max_position_embeddings=32)
    return EvaCLIPConfig(text_config=text.to_dict(), vision_config=tiny_vision_config("eva02").to_dict(),
                         projection_dim=16, logit_scale_init_value=math.log(30.0))


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    """A full-model directory with what a CLIP user's directory holds: weights, config, tokenizer, image processor
    (saved with transformers' own classes)."""
    directory = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    model = EvaCLIPModel(_full_config()).eval()
    with torch.no_grad():
        model.visual_projection.bias.normal_(0.0, 0.5)
    model.save_pretrained(directory)
    build_tokenizer(use_fast=True).save_pretrained(directory)
    build_image_processor(model.config).save_pretrained(directory)
    return directory


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 36, 3), dtype=np.uint8)) for i in range(2)]


def test_zero_shot_pipeline_scores_are_softmax_of_logits(full_dir) -> None:
    labels = ["cat", "dog", "bicycle", "a diagram"]
    classifier = pipeline("zero-shot-image-classification", model=str(full_dir))
    assert type(classifier.model) is EvaCLIPModel
    results = classifier(_images(), candidate_labels=labels)

    model = EvaCLIPModel.from_pretrained(full_dir).eval()
    tokenizer = build_tokenizer(use_fast=True)
    processor = build_image_processor(model.config)
    text = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    for image, result in zip(_images(), results):
        with torch.no_grad():
            logits = model(**text, pixel_values=processor(image, return_tensors="pt").pixel_values).logits_per_image
        expected = logits.softmax(dim=-1)[0]
        assert len(set(expected.round(decimals=3).tolist())) == len(labels)  # a label mix-up would show
        actual = torch.tensor([next(r["score"] for r in result if r["label"] == label) for label in labels])
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)
        assert [r["label"] for r in result] == [labels[i] for i in expected.argsort(descending=True)]


def test_auto_model_classes_load_a_full_directory(full_dir) -> None:
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(full_dir)) is EvaCLIPModel
    source = EvaCLIPModel.from_pretrained(full_dir).eval()
    classifier = AutoModelForImageClassification.from_pretrained(full_dir, num_labels=5).eval()
    assert type(classifier) is EvaCLIPForImageClassification
    source_state = source.state_dict()
    for key, value in classifier.vision_model.state_dict().items():
        assert torch.equal(value, source_state[f"vision_model.{key}"]), key
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        patches = source.vision_model(pixel_values).last_hidden_state[:, 1:]
        expected = classifier.classifier(patches.mean(dim=1))
        torch.testing.assert_close(classifier(pixel_values).logits, expected, atol=1e-6, rtol=0)
    assert classifier(pixel_values).logits.shape == (2, 5)


@pytest.mark.skipif("image-feature-extraction" not in transformers.pipelines.SUPPORTED_TASKS,
                    reason="the image-feature-extraction pipeline is new in transformers 4.38")
def test_image_feature_extraction_pipeline(tmp_path) -> None:
    """A converted vision tower directory: the pipeline gives the tower's last hidden state (or, pooled, its CLS
    through the final LayerNorm)."""
    vision = EvaCLIPVisionModel(tiny_vision_config("eva02")).eval()
    vision.save_pretrained(tmp_path)
    processor = build_image_processor(vision.config)
    processor.save_pretrained(tmp_path)
    extractor = pipeline("image-feature-extraction", model=str(tmp_path))
    assert type(extractor.model) is EvaCLIPVisionModel
    assert type(AutoModel.from_pretrained(tmp_path)) is EvaCLIPVisionModel
    image = _images()[0]
    with torch.no_grad():
        expected = vision(processor(image, return_tensors="pt").pixel_values)
    torch.testing.assert_close(extractor(image, return_tensors=True), expected.last_hidden_state, atol=1e-6, rtol=0)
    torch.testing.assert_close(extractor(image, return_tensors=True, pool=True), expected.pooler_output,
                               atol=1e-6, rtol=0)


def _assert_std(weight: torch.Tensor, expected: float, name: str) -> None:
    assert torch.isfinite(weight).all(), name
    assert abs(weight.std().item() / expected - 1) < 0.15, (name, weight.std().item(), expected)


def test_heads_missing_from_a_checkpoint_are_initialised_as_clips(full_dir, tmp_path) -> None:
    """A head the checkpoint lacks (a classifier, an image projection) starts from CLIP's initialisation
    (normal, std hidden_size ** -0.5), as do the attention projections of a new model (CLIP's scaled normal), on
    every transformers line; transformers 5 used to skip these modules for code outside transformers."""
    classifier = AutoModelForImageClassification.from_pretrained(full_dir, num_labels=64)
    hidden = classifier.config.vision_config.hidden_size
    _assert_std(classifier.classifier.weight, hidden**-0.5, "classifier")
    EvaCLIPVisionModel(tiny_vision_config("eva01", hidden_size=64, projection_dim=64)).save_pretrained(tmp_path)
    projected = EvaCLIPVisionModelWithProjection.from_pretrained(tmp_path)
    _assert_std(projected.visual_projection.weight, 64**-0.5, "visual_projection")
    config = projected.config
    fresh = EvaCLIPVisionModel(config)
    attention = fresh.vision_model.encoder.layers[0].self_attn
    _assert_std(attention.q_proj.weight, 64**-0.5 * (2 * config.num_hidden_layers) ** -0.5, "q_proj")

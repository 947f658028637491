"""Encoders: the real shipped models, their dimensions, determinism and the signals they carry."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from prodsearch.encoders import CharsEncoder, EncoderInput, EncoderSet, PhashEncoder, compute_phash
from prodsearch.encoders import image as image_module
from prodsearch.encoders import text as text_module
from prodsearch.encoders.chars import bm25_idf
from prodsearch.encoders.image import SHIPPED_HEAD, preprocess
from prodsearch.encoders.phash import hamming_to_score, phash_vector
from prodsearch.errors import ConfigError
from prodsearch.images import load_image

from .conftest import DATA, REPO, SAMPLE, SHOPEE, needs_data

PHOTOS = ("Alpro-Blueberry-Soyghurt-5470.jpg", "Alpro-Fresh-Soy-Milk-1765.jpg")


def _sparse_dot(a, b, idf=None) -> float:
    common, ia, ib = np.intersect1d(a.indices, b.indices, return_indices=True)
    weights = 1.0 if idf is None else idf[common]
    return float(np.sum(a.values[ia] * b.values[ib] * weights))


def test_text_encoder_is_normalised_deterministic_and_semantic(encoders: EncoderSet) -> None:
    text = encoders["text"]
    titles = [
        "Double Tape 3M VHB 12 mm",
        "3M VHB double sided foam tape 12mm",
        "Paper bag Victoria Secret",
    ]
    first = text.encode_titles(titles)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(text.encode_titles(titles), first, atol=1e-6)
    assert first[0] @ first[1] > first[0] @ first[2] + 0.2


def test_chars_encoder_is_robust_to_code_spellings() -> None:
    chars = CharsEncoder()
    a, b, c, other = chars.encode_titles(
        [
            "Kipas Angin XB-450 Portable",
            "kipas angin XB450 portable",
            "Kipas angin xb 450 portabel",
            "Sepatu sneakers wanita putih",
        ]
    )
    idf = chars.reference_idf  # the engine would use the catalog's IDF; the reference one stands in
    assert _sparse_dot(a, b, idf) > 0.5 and _sparse_dot(a, c, idf) > 0.4
    assert _sparse_dot(a, other, idf) < 0.05
    assert np.all(np.diff(a.indices) > 0), "indices sorted and unique"
    again = chars.encode_titles(["Kipas Angin XB-450 Portable"])[0]
    np.testing.assert_array_equal(again.indices, a.indices)
    np.testing.assert_allclose(again.values, a.values)


def test_chars_self_score_is_one_under_the_reference_idf() -> None:
    chars = CharsEncoder()
    (vector,) = chars.encode_titles(["Masker Scuba Korea Anti Polusi"])
    assert _sparse_dot(vector, vector, chars.reference_idf) == pytest.approx(1.0, rel=1e-5)


def test_bm25_idf_matches_qdrant_formula() -> None:
    assert bm25_idf(np.array([2.0]), 4)[0] == pytest.approx(np.log(2.0))


def test_phash_vector_scores_fall_with_hamming_distance() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = (format(int(rng.integers(0, 2**63)), "016x") for _ in range(2))
        distance = bin(int(a, 16) ^ int(b, 16)).count("1")
        score = float(phash_vector(a) @ phash_vector(b))
        assert score == pytest.approx(hamming_to_score(distance))
    assert float(phash_vector(a) @ phash_vector(a)) == pytest.approx(1.0)


@needs_data(SHOPEE, DATA / "shopee" / "train_images_sample")
def test_computed_phash_equals_shopee_column() -> None:
    frame = pd.read_csv(SHOPEE)
    folder = DATA / "shopee" / "train_images_sample"
    rows = frame[frame["image"].isin({p.name for p in folder.glob("*.jpg")})]
    assert len(rows) >= 30
    distances = [
        bin(int(compute_phash(Image.open(folder / name)), 16) ^ int(expected, 16)).count("1")
        for name, expected in zip(rows["image"], rows["image_phash"], strict=True)
    ]
    # Measured: 33 of 35 identical, 2 at Hamming distance 2 (JPEG decoder differences).
    assert sum(d == 0 for d in distances) >= 0.9 * len(distances)
    assert max(distances) <= 2


def _drawing(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (300, 200), tuple(int(x) for x in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        box = sorted(rng.integers(0, 200, 2)), sorted(rng.integers(0, 200, 2))
        draw.rectangle(
            [box[0][0], box[1][0], box[0][1] + 50, box[1][1]],
            fill=tuple(int(x) for x in rng.integers(0, 255, 3)),
        )
    return image


def test_image_encoder_shapes_and_determinism(encoders: EncoderSet) -> None:
    assert preprocess(_drawing(0)).shape == (3, 224, 224)
    image = encoders["image"]
    first = image.encode_images([_drawing(0), _drawing(1)])
    # 512-d through the shipped ArcFace head (finetune/image.py): the default is never ImageNet's
    assert image.head == SHIPPED_HEAD and first.shape == (2, image.dim) and image.dim == 512
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(image.encode_images([_drawing(0), _drawing(1)]), first, atol=1e-5)
    # On real photos: a mirrored photo stays closer to its original than another product's photo.
    photos = [load_image(SAMPLE / "images" / name) for name in PHOTOS]
    real = image.encode_images([*photos, photos[0].transpose(Image.FLIP_LEFT_RIGHT)])
    assert real[0] @ real[2] > real[0] @ real[1]


def test_encoder_set_leaves_gaps_for_missing_inputs(encoders: EncoderSet) -> None:
    vectors = encoders.encode(
        [
            EncoderInput(title="Paper bag"),
            EncoderInput(image=_drawing(2)),
            EncoderInput(phash="94974f937d4c2433"),
        ]
    )
    assert set(vectors[0]) == {"text", "chars"}
    assert set(vectors[1]) == {"image", "phash"}
    assert set(vectors[2]) == {"phash"}


def test_identities_name_weights_and_parameters(encoders: EncoderSet) -> None:
    identities = encoders.identities()
    assert set(identities) == {"text", "chars", "image", "phash"}
    assert len(identities["text"].weights_sha256) == 64
    assert identities["text"].params["max_tokens"] == 64
    assert identities == EncoderSet.default().identities()
    assert PhashEncoder().identity().weights_sha256 == ""


def _readme_encoder_digests() -> dict[str, set[str]]:
    """The encoder names of the README's encoder table and the weight digests (first 16 hex of
    the SHA-256, as the ONNX file names carry them) its figures were measured with."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found: dict[str, set[str]] = {}
    for name, digest in re.findall(
        r"^\| ([\w.+-]+) \| [^|]*ONNX[^|]*\|.*\| \w+-([0-9a-f]{16})-", readme, re.M
    ):
        found.setdefault(name, set()).add(digest)
    return found


def test_default_encoders_are_the_shipped_ones_the_readme_measures(encoders: EncoderSet) -> None:
    identities = EncoderSet.default().identities()
    assert identities == encoders.identities()
    documented = _readme_encoder_digests()
    assert identities["text"].name == "all-MiniLM-L6-v2+arcface-lora"
    assert identities["image"].name == "efficientnet-lite0+arcface-head"
    for modality in ("text", "image"):
        identity = identities[modality]
        assert documented.get(identity.name) == {identity.weights_sha256[:16]}, (
            f"the README's figures are for {identity.name} {documented.get(identity.name)}, "
            f"the default encoder's weights are {identity.weights_sha256[:16]}"
        )


@pytest.mark.parametrize("missing", ["text", "image"])
def test_a_missing_shipped_artefact_is_an_error_not_the_pretrained_model(
    missing, tmp_path, monkeypatch, caplog
) -> None:
    if missing == "text":
        monkeypatch.setattr(text_module, "SHIPPED_ADAPTER", tmp_path / "text_arcface_lora")
        expected = tmp_path / "text_arcface_lora" / "adapter_model.safetensors"
    else:
        expected = tmp_path / "image_arcface_head.safetensors"
        monkeypatch.setattr(image_module, "SHIPPED_HEAD", expected)
    for choose in (EncoderSet.default, lambda: EncoderSet.from_settings("finetuned")):
        with pytest.raises(ConfigError) as raised:
            choose()
        message = str(raised.value)
        assert str(expected) in message and "PRODSEARCH_ENCODERS=pretrained" in message
        assert f"python -m finetune.{missing}" in message
    with caplog.at_level(logging.WARNING, logger="prodsearch"):
        pretrained = EncoderSet.from_settings("pretrained")
    assert "PRODSEARCH_ENCODERS=pretrained" in caplog.text, "the opt-in is logged"
    assert pretrained["image"].dim == 1280 and pretrained["text"].adapter is None  # type: ignore[attr-defined]

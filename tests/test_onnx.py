"""The ONNX Runtime backend: real exported models agree with torch, the cache is reused and keyed
by the weights, and the backend is a setting that leaves encoder identities (and collections)
unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from prodsearch.catalog import read_catalog
from prodsearch.encoders import (
    CharCNNEncoder,
    EncoderSet,
    ImageEncoder,
    InferenceOptions,
    TextEncoder,
)
from prodsearch.encoders.charcnn import build_network, shipped_weights
from prodsearch.encoders.runtime import CHECK_PHOTOS, QUALITY_BAR, NeuralEncoder, build_report
from prodsearch.images import load_image
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

from .conftest import DATA, SAMPLE, SHOPEE
from .generated import listings

TORCH = InferenceOptions(backend="torch")


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX cache for the session: each model is exported once."""
    return tmp_path_factory.mktemp("onnx-cache")


def _onnx(cache: Path, precision: str = "auto") -> InferenceOptions:
    return InferenceOptions(backend="onnx", precision=precision, cache_dir=cache)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def titles() -> list[str]:
    """64 titles, long ones included (4 reach the 64-token cap): real Shopee titles, or without
    the Shopee data the generated catalog's (tests/generated.py)."""
    if not SHOPEE.is_file():
        generated = [x.title for x in listings(60)]
        return generated[::3][:60] + [" ".join(generated[i : i + 10]) for i in range(0, 40, 10)]
    frame = pd.read_csv(SHOPEE, usecols=["title"])
    longest = frame["title"].str.len().nlargest(4).index
    return frame["title"].sample(60, random_state=7).tolist() + frame["title"][longest].tolist()


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """24 real product photos: Grocery Store test photos, or the sample catalog's."""
    folder = DATA / "grocery_store" / "images" / "test"
    files = sorted(folder.rglob("*.jpg"))[::100] if folder.is_dir() else []
    files = files or sorted((SAMPLE / "images").glob("*.jpg"))
    return [load_image(path) for path in files[:24]]


@pytest.fixture(scope="session")
def charcnn_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped char-CNN weights, or (before any are shipped) a seeded untrained network."""
    shipped = shipped_weights()
    if shipped is not None:
        return shipped
    return _random_charcnn(tmp_path_factory.mktemp("charcnn") / "charcnn.safetensors", seed=0)


def _random_charcnn(path: Path, seed: int) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file(build_network().state_dict(), str(path))
    return path


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    assert a.shape == b.shape
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _text(inference: InferenceOptions) -> TextEncoder:
    return EncoderSet.default(inference=inference)["text"]  # type: ignore[return-value]


def _image(inference: InferenceOptions) -> ImageEncoder:
    return EncoderSet.default(inference=inference)["image"]  # type: ignore[return-value]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_text_onnx_agrees_with_torch(cache, titles, precision) -> None:
    reference = _text(TORCH).encode_titles(titles)
    encoder = _text(_onnx(cache, precision))
    vectors = encoder.encode_titles(titles)
    assert f"-{precision}" in encoder.onnx_file().name
    cosines = _cosines(vectors, reference)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert cosines.mean() >= (0.9999 if precision == "fp32" else 0.99), cosines.mean()
    # Length-sorted batches give every title its own vector back, in input order (int8 scales
    # activations per batch, so other batch neighbours move its vectors a little).
    again = encoder.encode_titles(titles[::-1])[::-1]
    if precision == "fp32":
        np.testing.assert_allclose(again, vectors, atol=1e-5)
    assert _cosines(again, vectors).min() > 0.99


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_image_onnx_agrees_with_torch(cache, photos, precision) -> None:
    reference = _image(TORCH).encode_images(photos)
    encoder = _image(_onnx(cache, precision))
    cosines = _cosines(encoder.encode_images(photos), reference)
    assert cosines.mean() >= (0.9999 if precision == "fp32" else 0.99), cosines.mean()
    if precision == "int8":  # calibration photos are found beside the checkout or in the sample
        assert "-int8-cal" in encoder.onnx_file().name
        report = build_report(encoder.onnx_file())
        assert report is not None and report["items"] == CHECK_PHOTOS
        assert report["mean_cosine"] >= QUALITY_BAR, report


def test_auto_falls_back_to_fp32_below_the_quality_bar(cache, tmp_path) -> None:
    encoder = _image(_onnx(cache, "int8"))
    int8 = encoder.onnx_file()
    fp32 = _image(_onnx(cache, "fp32")).onnx_file()
    own = tmp_path / "cache"
    own.mkdir()
    for path in (int8, fp32):
        shutil.copy(path, own / path.name)
    (own / int8.name).with_suffix(".json").write_text('{"mean_cosine": 0.9, "min_cosine": 0.5}')
    assert _image(_onnx(own, "auto")).onnx_file() == own / fp32.name
    assert _image(_onnx(own, "int8")).onnx_file() == own / int8.name, "asked for: given"


def test_charcnn_onnx_agrees_with_torch(cache, titles, charcnn_weights) -> None:
    reference = CharCNNEncoder(charcnn_weights, inference=TORCH).encode_titles(titles)
    for precision in ("fp32", "auto"):
        encoder = CharCNNEncoder(charcnn_weights, inference=_onnx(cache, precision))
        cosines = _cosines(encoder.encode_titles(titles), reference)
        assert cosines.mean() >= 0.99, (precision, cosines.mean())


def _loaded_torch(encoder: NeuralEncoder) -> bool:
    return any(name in encoder.__dict__ for name in encoder.torch_attributes)


def test_the_cache_is_reused_and_keyed_by_the_weights(cache, titles, charcnn_weights, tmp_path):
    first = _text(_onnx(cache, "fp32"))
    first.encode_titles(titles[:2])
    path = first.onnx_file()
    stamp = path.stat().st_mtime_ns
    again = _text(_onnx(cache, "fp32"))
    again.encode_titles(titles[:2])
    assert again.onnx_file() == path and path.stat().st_mtime_ns == stamp
    assert not _loaded_torch(again), "a cached model needs no torch network"

    other_weights = _random_charcnn(tmp_path / "other.safetensors", seed=1)
    files = {
        CharCNNEncoder(weights, inference=_onnx(cache)).onnx_file()
        for weights in (charcnn_weights, other_weights)
    }
    assert len(files) == 2 and all(f.is_file() for f in files)
    digest = CharCNNEncoder(other_weights).identity().weights_sha256
    assert digest[:16] in CharCNNEncoder(other_weights, inference=_onnx(cache)).onnx_file().name
    # Built in a scratch folder and renamed into place: nothing half-written is left behind.
    assert all(p.suffix in (".onnx", ".json") for p in cache.iterdir())


def test_backend_comes_from_settings(monkeypatch, cache) -> None:
    assert Settings().backend == "onnx"
    monkeypatch.setenv("PRODSEARCH_BACKEND", "torch")
    monkeypatch.setenv("PRODSEARCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("PRODSEARCH_ONNX_THREADS", "1")
    options = InferenceOptions.from_settings()
    assert (options.backend, options.cache_dir, options.threads) == ("torch", cache, 1)
    encoders = EncoderSet.from_settings("finetuned")
    assert encoders["text"].inference.backend == "torch"  # type: ignore[attr-defined]
    assert encoders["image"].inference.backend == "torch"  # type: ignore[attr-defined]
    onnx = EncoderSet.from_settings(
        "pretrained",
        inference=InferenceOptions.from_settings(Settings(backend="onnx", cache_dir=cache)),
    )
    assert onnx["text"].inference.backend == "onnx"  # type: ignore[attr-defined]
    # The backend is an inference detail: the encoders' identities do not change with it.
    assert EncoderSet.pretrained(inference=TORCH).identities() == onnx.identities()


def test_a_collection_written_with_torch_is_queried_with_onnx(tmp_path, cache) -> None:
    store = str(tmp_path / "store")
    catalog = read_catalog(SAMPLE / "catalog.csv", load_recipe("generic"))
    with Index(store, "sample", Settings(), EncoderSet.default(inference=TORCH)) as index:
        assert ingest_catalog(index, catalog).upserted == len(catalog.rows)
    with Index(store, "sample", Settings(), EncoderSet.default(inference=_onnx(cache))) as index:
        row = next(r for r in catalog.rows if r.title and r.image_path)
        hits = index.match(row.title, image=row.image_path, k=3)
        assert hits[0].product_id == row.product_id
        assert hits[0].scores["text"] > 0.98 and hits[0].scores["image"] > 0.98

"""Serving helpers: batched encoding gives each caller its own vectors; the store takes turns."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from prodsearch.catalog import Catalog, CatalogRow
from prodsearch.encoders import EncoderInput, EncoderSet, SparseVec
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.serving import BatchingEncoders, SerializedStore
from prodsearch.settings import Settings
from prodsearch.store import open_store

TITLES = [
    f"{brand} {item} {size}"
    for brand in ("Oatly", "Arla", "Tropicana")
    for item in ("oat milk", "apple juice", "yoghurt")
    for size in ("1L", "250 ml")
]


def _same(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for name, vector in a.items():
        other = b[name]
        if isinstance(vector, SparseVec):
            if not np.array_equal(vector.indices, other.indices):
                return False
            vector, other = vector.values, other.values
        if isinstance(a[name], SparseVec):
            if not np.allclose(vector, other, atol=1e-5):
                return False
        # Dense: int8 text encoding quantizes activations per batch, so a title batched with
        # others moves a little (cosine > 0.99, tests/test_onnx.py); another title's vector
        # is far below that.
        elif (
            float(np.dot(vector, other)) / float(np.linalg.norm(vector) * np.linalg.norm(other))
            < 0.99
        ):
            return False
    return True


def test_concurrent_calls_get_their_own_vectors(encoders: EncoderSet) -> None:
    expected = encoders.encode([EncoderInput(title=t) for t in TITLES])
    batching = BatchingEncoders(encoders, max_batch=8)
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda t: batching.encode([EncoderInput(title=t)])[0], TITLES))
        assert all(_same(a, b) for a, b in zip(expected, got, strict=True))
        assert batching.identities() == encoders.identities()
    finally:
        batching.close()
    # Closed: calls are answered in the caller's thread instead of waiting forever.
    assert _same(batching.encode([EncoderInput(title=TITLES[0])])[0], expected[0])


def test_a_bad_request_fails_alone(encoders: EncoderSet) -> None:
    batching = BatchingEncoders(encoders, max_batch=64)
    bad = [EncoderInput(title="broken", image="not an image")]  # type: ignore[arg-type]
    try:
        with ThreadPoolExecutor(6) as pool:
            # A long first job keeps the worker busy, so the others queue up and share a batch.
            first = pool.submit(batching.encode, [EncoderInput(title=t) for t in TITLES * 4])
            good = [pool.submit(batching.encode, [EncoderInput(title=t)]) for t in TITLES[:4]]
            failing = pool.submit(batching.encode, bad)
            assert len(first.result()) == len(TITLES) * 4
            assert all(len(g.result()) == 1 for g in good)
            with pytest.raises(Exception):  # noqa: B017 - whatever the encoder raises, it is kept
                failing.result()
    finally:
        batching.close()


def _catalog(rows: list[CatalogRow]) -> Catalog:
    return Catalog(path=None, rows=rows, rows_read=len(rows))


def test_serialized_store_takes_turns(tmp_path: Path, encoders: EncoderSet) -> None:
    """Many threads matching and writing (upserts, index builds) through one embedded store."""
    store = SerializedStore(open_store(str(tmp_path / "store")))
    assert not store.remote
    quiet = Console(stderr=True, quiet=True)
    batching = BatchingEncoders(encoders)  # as served: the models in one thread
    with Index(store, "products", Settings(), batching) as index:
        rows = [CatalogRow(row=i, product_id=f"p{i}", title=t) for i, t in enumerate(TITLES)]
        ingest_catalog(index, _catalog(rows), console=quiet)
        image = Image.new("RGB", (32, 32), "blue")

        def work(i: int) -> int:
            if i % 4 == 0:
                new = CatalogRow(row=0, product_id=f"new{i}", title=f"New product {i}")
                ingest_catalog(index, _catalog([new]), console=quiet)
            return len(index.match(TITLES[i % len(TITLES)], image if i % 3 == 0 else None))

        with ThreadPoolExecutor(8) as pool:
            assert all(n > 0 for n in pool.map(work, range(32)))
        assert index.count() == len(TITLES) + 8
    batching.close()

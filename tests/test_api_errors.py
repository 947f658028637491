"""The API's error mappings, each triggered for real: a collection written by other encoders
(409, /health 503 with encoders_match false), a store locked by another writer and a collection
the engine cannot open (503); and what /health says the default encoders are."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from prodsearch.api import create_app
from prodsearch.encoders import EncoderSet, TextEncoder
from prodsearch.index import Index
from prodsearch.settings import Settings

PRODUCTS = [
    {"id": "a", "title": "Oatly Oat Drink 1L"},
    {"id": "b", "title": "Arla Organic Milk 1.5% 1L"},
]


@pytest.fixture
def store(tmp_path: Path) -> str:
    return str(tmp_path / "store")


@pytest.fixture
def client(store: str, encoders: EncoderSet) -> Iterator[TestClient]:
    """The API over the collection `products` of `store` (absent when the app starts)."""
    with (
        Index(store, "products", Settings(), encoders) as index,
        TestClient(create_app(index=index)) as test_client,
    ):
        yield test_client


def test_health_names_the_shipped_encoders(client: TestClient, encoders: EncoderSet) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "empty"
    reported = health.json()["encoders"]
    assert reported == {name: i.as_dict() for name, i in encoders.identities().items()}
    assert reported["text"]["name"] == "all-MiniLM-L6-v2+arcface-lora"
    assert reported["image"]["name"] == "efficientnet-lite0+arcface-head"


def test_a_collection_of_other_encoders_is_409_and_unhealthy(
    client: TestClient, store: str, encoders: EncoderSet
) -> None:
    other = EncoderSet({**encoders.encoders, "text": TextEncoder(max_tokens=32)})
    with Index(store, "products", Settings(), other) as written:
        written.ensure_collection()
    for response in (
        client.post("/match", json={"title": "oat drink"}),
        client.post("/products", json={"products": PRODUCTS}),
        client.get("/products/a"),
        client.delete("/products/a"),
    ):
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert "written by text encoder" in detail and "'max_tokens': 32" in detail
    health = client.get("/health")
    assert health.status_code == 503
    report = health.json()
    assert report["status"] == "error" and report["encoders_match"] is False
    assert report["collection_present"] is True and "'max_tokens': 32" in report["detail"]
    with Index(store, "products", Settings(), other) as written:
        assert written.count() == 0, "the refused upsert wrote nothing"


def test_a_store_another_writer_holds_is_503_until_it_lets_go(
    client: TestClient, store: str, encoders: EncoderSet
) -> None:
    holder = Index(store, "products", Settings(), encoders)  # as `prodsearch ingest` would
    holder.ensure_collection()
    holder.count()  # the collection's shard is open: its writer holds the lock
    try:
        for response in (
            client.post("/products", json={"products": PRODUCTS}),
            client.post("/match", json={"title": "oat drink"}),
        ):
            assert response.status_code == 503, response.text
            assert "is open in another process" in response.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["encoders_match"] is True
        assert "is open in another process" in health.json()["detail"]
    finally:
        holder.close()
    stored = client.post("/products", json={"products": PRODUCTS})
    assert stored.status_code == 200 and stored.json()["upserted"] == 2, stored.text
    assert client.get("/health").json()["products"] == 2


def test_a_collection_the_engine_cannot_open_is_503(
    client: TestClient, store: str, encoders: EncoderSet
) -> None:
    index = Index(store, "products", Settings(), encoders)
    folder = Path(store) / "products"
    (folder / "shard").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(index.expected_manifest().as_dict()))
    (folder / "shard" / "edge_config.json").write_text("{cut short")
    response = client.post("/match", json={"title": "oat drink"})
    assert response.status_code == 503, response.text
    assert str(folder / "shard") in response.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "error"

"""The HTTP API through a real client: real models, the real embedded engine, the sample catalog."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from prodsearch.api import create_app
from prodsearch.catalog import read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings

from .conftest import SAMPLE

PHOTO = SAMPLE / "queries" / "Arla-Standard-Milk.jpg"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _huge_png(width: int = 8_000, height: int = 6_000) -> bytes:
    """A 69-byte PNG of `width` x `height` pixels (48 million by default): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def _jpeg(colour: str, size: tuple[int, int] = (96, 96)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sample_index(tmp_path_factory: pytest.TempPathFactory, encoders: EncoderSet) -> Iterator[Index]:
    """The sample catalog (62 products, titles and photos) in a temporary embedded store."""
    store = tmp_path_factory.mktemp("api") / "store"
    with Index(str(store), "products", Settings(), encoders) as index:
        ingest_catalog(index, read_catalog(SAMPLE / "catalog.csv", load_recipe("generic")))
        yield index


@pytest.fixture(scope="module")
def client(sample_index: Index) -> Iterator[TestClient]:
    """A client of the API serving the sample catalog, without an API key."""
    with TestClient(create_app(index=sample_index)) as test_client:
        yield test_client


@pytest.fixture
def make_client(sample_index: Index) -> Iterator[Callable[..., TestClient]]:
    """Clients of apps over the sample catalog with some API settings changed."""
    opened: list[TestClient] = []

    def make(**settings: object) -> TestClient:
        app = create_app(Settings(**settings), sample_index)  # type: ignore[arg-type]
        opened.append(TestClient(app).__enter__())
        return opened[-1]

    yield make
    for test_client in opened:
        test_client.__exit__(None, None, None)


@pytest.fixture
def fresh_client(tmp_path: Path, encoders: EncoderSet) -> Iterator[TestClient]:
    """A client of the API over an empty store (the collection does not exist yet)."""
    with (
        Index(str(tmp_path / "store"), "products", Settings(), encoders) as index,
        TestClient(create_app(index=index)) as test_client,
    ):
        yield test_client


def _detail(response) -> str:
    """The error detail as one string (a message, or the schema violations joined)."""
    detail = response.json()["detail"]
    if isinstance(detail, str):
        return detail
    return "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in detail)


# -- match ------------------------------------------------------------------------------------
def test_match_by_title(client: TestClient) -> None:
    response = client.post("/match", json={"title": "tropicanna aple juice"})
    assert response.status_code == 200, response.text
    top = response.json()["matches"][0]
    assert top["payload"]["product"] == "Tropicana-Apple-Juice"
    assert "text" in top["matched_by"] and top["scores"]["text"] > 0.5
    assert top["product_id"] == top["payload"]["product_id"]
    assert "content_hash" not in top["payload"] and "image_path" not in top["payload"]


def test_match_by_image_base64_and_upload_agree(client: TestClient) -> None:
    options = {"thresholds": {"image": 0.5}, "filter": {"kind": "store photo"}, "k": 5}
    by_json = client.post("/match", json={"image_base64": _b64(PHOTO.read_bytes()), **options})
    assert by_json.status_code == 200, by_json.text
    matches = by_json.json()["matches"]
    assert matches and all(m["payload"]["kind"] == "store photo" for m in matches)
    assert any("image" in m["matched_by"] for m in matches)
    data_url = "data:image/jpeg;base64," + _b64(PHOTO.read_bytes())
    assert client.post("/match", json={"image_base64": data_url, **options}).json() == {
        "matches": matches
    }

    with PHOTO.open("rb") as handle:
        uploaded = client.post(
            "/match/upload",
            files={"image": (PHOTO.name, handle, "image/jpeg")},
            data={"thresholds": '{"image": 0.5}', "filter": '{"kind": "store photo"}', "k": "5"},
        )
    assert uploaded.status_code == 200, uploaded.text
    assert [m["product_id"] for m in uploaded.json()["matches"]] == [
        m["product_id"] for m in matches
    ]


def test_filters_exclusions_k_and_fusions(client: TestClient) -> None:
    title = {"title": "Arla milk"}
    catalogue = client.post("/match", json={**title, "filter": {"kind": "catalogue"}}).json()
    assert catalogue["matches"]
    assert all(m["payload"]["kind"] == "catalogue" for m in catalogue["matches"])
    top = catalogue["matches"][0]["product_id"]
    excluded = client.post("/match", json={**title, "exclude_ids": [top]}).json()["matches"]
    assert top not in {m["product_id"] for m in excluded}
    assert len(client.post("/match", json={**title, "k": 1}).json()["matches"]) == 1
    brands = client.post("/match", json={**title, "filter": {"brand": {"not": "Arla"}}}).json()
    assert all(m["payload"]["brand"] != "Arla" for m in brands["matches"])
    for fusion in ("rrf", "dbsf", "formula"):
        response = client.post("/match", json={"title": "Tropicana Apple Juice", "fusion": fusion})
        assert response.status_code == 200, response.text
        assert response.json()["matches"][0]["payload"]["product"] == "Tropicana-Apple-Juice"


def test_concurrent_matches_equal_sequential_ones(client: TestClient) -> None:
    """Requests in flight together share encoding batches; each still gets its own answer."""
    titles = ["Oatly oat milk", "God Morgon orange juice", "Yoggi strawberry", "Alpro soy milk"]
    titles = titles * 3
    alone = [client.post("/match", json={"title": t}).json() for t in titles]
    with ThreadPoolExecutor(len(titles)) as pool:
        together = list(pool.map(lambda t: client.post("/match", json={"title": t}).json(), titles))
    for one, other in zip(alone, together, strict=True):
        assert [m["product_id"] for m in one["matches"]] == [
            m["product_id"] for m in other["matches"]
        ]
        # int8 text encoding quantizes activations per batch: batch neighbours move a title's
        # vector a little (cosine > 0.99, tests/test_onnx.py), never its answer.
        for a, b in zip(one["matches"], other["matches"], strict=True):
            assert a["scores"] == pytest.approx(b["scores"], abs=0.02)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 422, "needs a title, an image or a phash"),
        ({"title": "milk", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"title": "milk", "k": 5000}, 422, "k: Input should be less than or equal to 1000"),
        ({"title": "milk", "fusion": "average"}, 422, "fusion"),
        ({"title": "milk", "thresholds": {"smell": 0.5}}, 422, "unknown modality 'smell'"),
        ({"title": "milk", "filter": {"price": {"about": 3}}}, 422, "invalid filter"),
        ({"title": "milk", "phash": "xyz"}, 422, "phash"),
        ({"title": "milk", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"title": "x" * 2001}, 422, "title: String should have at most 2000 characters"),
        ({"image_base64": "%%% not base64 %%%"}, 422, "image_base64: not valid base64"),
        ({"image_base64": _b64(PHOTO.read_bytes()[:3000])}, 422, "image_base64: corrupt"),
        ({"image_base64": _b64(b"hello")}, 422, "image_base64: not a recognised image format"),
        ({"image_base64": _b64(_huge_png())}, 422, "over the limit of 40,000,000"),
    ],
)
def test_bad_match_requests_name_the_field_and_reason(
    client: TestClient, body: dict, status: int, words: str
) -> None:
    response = client.post("/match", json=body)
    assert response.status_code == status, response.text
    assert words in _detail(response)


def test_bad_upload_fields_are_named(client: TestClient) -> None:
    response = client.post("/match/upload", data={"title": "milk", "thresholds": "{text: 1"})
    assert response.status_code == 422 and "thresholds: not a JSON object" in _detail(response)
    response = client.post("/match/upload", data={"title": "milk", "k": "many"})
    assert response.status_code == 422 and "k" in _detail(response)
    huge = client.post("/match/upload", files={"image": ("bomb.png", _huge_png(), "image/png")})
    assert huge.status_code == 422 and "image: image is 8000x6000 = 48,000,000 pixels" in _detail(
        huge
    )


# -- limits and the API key -------------------------------------------------------------------
def test_api_key_is_required_except_for_health(make_client) -> None:
    secured = make_client(api_key="s3cret")
    denied = secured.post("/match", json={"title": "milk"})
    assert denied.status_code == 401 and "X-API-Key" in denied.json()["detail"]
    wrong = secured.post("/match", json={"title": "milk"}, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 401
    assert secured.get("/products/gs-5455").status_code == 401
    assert secured.delete("/products/gs-5455").status_code == 401
    assert secured.post("/products", json={"products": []}).status_code == 401
    assert secured.get("/health").status_code == 200
    key = {"X-API-Key": "s3cret"}
    assert secured.post("/match", json={"title": "milk"}, headers=key).status_code == 200
    assert secured.get("/products/gs-5455", headers=key).json()["id"] == "gs-5455"


def test_request_size_and_batch_limits(make_client) -> None:
    limited = make_client(max_request_bytes=50_000, max_batch_products=3)
    big = limited.post("/match", json={"title": "a" * 60_000})
    assert big.status_code == 413
    assert "over the limit of 50,000 bytes" in big.json()["detail"]

    def streamed() -> Iterator[bytes]:  # no Content-Length: the body arrives in chunks
        yield b'{"title": "'
        for _ in range(20):
            yield b"a" * 5_000
        yield b'"}'

    chunked = limited.post(
        "/match", content=streamed(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413 and "50,000 bytes" in chunked.json()["detail"]
    photo = limited.post("/match/upload", files={"image": ("big.jpg", b"\xff" * 60_000)})
    assert photo.status_code == 413

    products = [{"id": str(i), "title": f"Product {i}"} for i in range(4)]
    too_many = limited.post("/products", json={"products": products})
    assert too_many.status_code == 422
    assert "body.products: 4 products, over the limit of 3" in _detail(too_many)


# -- products ---------------------------------------------------------------------------------
def test_upsert_get_match_delete(fresh_client: TestClient) -> None:
    assert fresh_client.post("/match", json={"title": "x"}).status_code == 404
    assert fresh_client.get("/health").json()["status"] == "empty"
    products = [
        {"id": "kopi-1", "title": "Kopi Kapal Api Special Mix 10 x 25g", "payload": {"price": 12}},
        {"id": 42, "image_base64": _b64(_jpeg("red")), "payload": {"colour": "red"}},
        {
            "id": "tape-3m",
            "title": "Double Tape 3M VHB 12 mm x 4,5 m",
            "image_phash": "94974f937d4c2433",
        },
    ]
    first = fresh_client.post("/products", json={"products": products})
    assert first.status_code == 200, first.text
    assert first.json() == {
        "upserted": 3,
        "unchanged": 0,
        "rejected": 0,
        "rejections": [],
        "assignments": [],
    }

    stored = fresh_client.get("/products/kopi-1").json()
    assert stored["payload"]["price"] == 12 and stored["payload"]["title"].startswith("Kopi")
    assert "content_hash" not in stored["payload"]
    assert fresh_client.get("/products/42").json()["payload"]["image_phash"]

    again = fresh_client.post("/products", json={"products": products}).json()
    assert (again["upserted"], again["unchanged"]) == (0, 3)
    products[0]["title"] = "Kopi Kapal Api Special Mix 20 x 25g"
    changed = fresh_client.post("/products", json={"products": products}).json()
    assert (changed["upserted"], changed["unchanged"]) == (1, 2)
    assert "20 x 25g" in fresh_client.get("/products/kopi-1").json()["payload"]["title"]

    found = fresh_client.post("/match", json={"title": "kopi kapal api special mix"}).json()
    assert found["matches"][0]["product_id"] == "kopi-1"
    by_image = fresh_client.post("/match", json={"image_base64": _b64(_jpeg("red"))}).json()
    assert by_image["matches"][0]["product_id"] == "42"

    assert fresh_client.delete("/products/kopi-1").json() == {"id": "kopi-1", "deleted": True}
    assert fresh_client.get("/products/kopi-1").status_code == 404
    missing = fresh_client.delete("/products/kopi-1")
    assert missing.status_code == 404 and "kopi-1" in missing.json()["detail"]
    health = fresh_client.get("/health").json()
    assert (health["status"], health["products"]) == ("ok", 2)


def test_bad_products_are_reported_and_nothing_stored_is_lost(fresh_client: TestClient) -> None:
    fresh_client.post("/products", json={"products": [{"id": "keep", "title": "Kept product"}]})
    products = [
        {"id": "ok-1", "title": "Fine product"},  # 0
        {"title": "No id"},  # 1
        {"id": "no-title"},  # 2
        {"id": "bad-hash", "title": "Bad hash", "image_phash": "zz12"},  # 3
        {"id": "bad-b64", "title": "Bad base64", "image_base64": "***"},  # 4
        {"id": "not-image", "title": "Not an image", "image_base64": _b64(b"hello")},  # 5
        {"id": "ok-1", "title": "Duplicate id"},  # 6
        {"id": "reserved", "title": "Reserved key", "payload": {"content_hash": "x"}},  # 7
        {"id": "long", "title": "a" * 5_000},  # 8
        {"id": "bomb", "title": "Bomb", "image_base64": _b64(_huge_png())},  # 9
        {"id": "keep", "title": "Kept product"},  # 10: unchanged
        {"id": 7, "title": "Numeric id"},  # 11
    ]
    response = fresh_client.post("/products", json={"products": products})
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["upserted"], report["unchanged"], report["rejected"]) == (2, 1, 9)
    rejected = {r["row"]: r for r in report["rejections"]}
    assert sorted(rejected) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert rejected[1] == {"row": 1, "id": None, "field": "id", "reason": "missing product id"}
    assert (rejected[2]["field"], rejected[2]["reason"]) == ("title", "empty title and no image")
    assert rejected[3]["field"] == "image_phash" and "16 hexadecimal" in rejected[3]["reason"]
    assert rejected[4]["field"] == "image_base64" and "not valid base64" in rejected[4]["reason"]
    assert rejected[5]["field"] == "image_base64" and "not a recognised" in rejected[5]["reason"]
    assert rejected[6]["id"] == "ok-1" and "duplicate id 'ok-1'" in rejected[6]["reason"]
    assert rejected[7]["field"] == "payload" and "content_hash" in rejected[7]["reason"]
    assert "5,000 characters" in rejected[8]["reason"]
    assert rejected[9]["field"] == "image_base64" and "pixels" in rejected[9]["reason"]
    for product_id in ("keep", "ok-1", "7"):
        assert fresh_client.get(f"/products/{product_id}").status_code == 200
    assert fresh_client.get("/health").json()["products"] == 3


def test_malformed_product_batches_are_refused_whole(fresh_client: TestClient) -> None:
    assert "body.products: Field required" in _detail(fresh_client.post("/products", json={}))
    typo = fresh_client.post("/products", json={"products": [{"id": "a", "titel": "Typo"}]})
    assert typo.status_code == 422 and "body.products.0.titel" in _detail(typo)
    not_json = fresh_client.post(
        "/products", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 422 and "JSON" in _detail(not_json)


# -- health and schema ------------------------------------------------------------------------
def test_health_reports_engine_collection_encoders_and_count(
    client: TestClient, sample_index: Index
) -> None:
    health = client.get("/health")
    assert health.status_code == 200
    report = health.json()
    assert report["status"] == "ok" and report["engine_reachable"] is True
    assert report["collection"] == "products" and report["collection_present"] is True
    assert report["products"] == 62 and report["encoders_match"] is True
    assert set(report["encoders"]) == set(sample_index.encoders.encoders)
    assert report["encoders"]["text"]["name"].startswith("all-MiniLM-L6-v2")


def test_openapi_schema_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/match", "/match/upload", "/products", "/products/{product_id}", "/health"} <= set(
        schema["paths"]
    )
    components = schema["components"]["schemas"]
    assert {"MatchRequest", "MatchResponse", "ProductBatch", "UpsertResponse"} <= set(components)
    match = schema["paths"]["/match"]["post"]
    assert match["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MatchResponse"
    }
    assert {"401", "413", "422"} <= set(match["responses"])
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
    assert "security" not in schema["paths"]["/health"]["get"]

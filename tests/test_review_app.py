"""The review app's API over real collections: the queue, answers and undo, labels.csv export and
import (bad files refused whole, naming the row), clusters, calibration with its report and
chart, and photos served from the payload."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from prodsearch.catalog import read_catalog
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.review.app import create_review_app
from prodsearch.settings import SETTINGS_FILE_ENV, Settings

from .conftest import SAMPLE
from .reviewed import ingest_phash_catalog


@pytest.fixture(scope="module")
def catalog_index(tmp_path_factory, encoders) -> Iterator[tuple[Index, pd.DataFrame]]:
    """The generated catalog with phashes (the pair model decides it), ingested once."""
    folder = tmp_path_factory.mktemp("review")
    index = Index(
        str(folder / "store"), "products", Settings(store=str(folder / "store")), encoders
    )
    frame = ingest_phash_catalog(index, folder)
    yield index, frame
    index.close()


def client_for(index: Index, folder: Path, settings_file: Path | None = None) -> TestClient:
    settings = index.settings.model_copy(update={"state_dir": folder})
    return TestClient(create_review_app(settings, index, write_settings=settings_file))


def test_queue_answers_undo_and_export(catalog_index, tmp_path) -> None:
    index, frame = catalog_index
    with client_for(index, tmp_path) as client:
        status = client.get("/api/status").json()
        assert status["decided_by"] == "pair model" and status["products"] == len(frame)
        assert status["uncertain_left"] > 0 and status["answered"] == 0
        batch = client.get("/api/queue", params={"size": 5}).json()
        assert len(batch) == 5 and batch[0]["uncertain"]
        first = batch[0]
        assert {s["modality"] for s in first["signals"]} <= {"text", "chars", "phash"}
        assert 0 <= first["probability"] <= 1 and first["products"][0]["image"] is None
        for pair, kind in zip(batch[:3], ("same", "different", "unsure"), strict=True):
            body = {"id_a": pair["id_a"], "id_b": pair["id_b"], "answer": kind}
            stored = client.post("/api/answers", json=body).json()
            assert stored["stored"][0]["answer"] == kind
        assert stored["status"]["counts"] == {"same": 1, "different": 1, "unsure": 1}
        undone = client.post("/api/undo").json()
        assert undone["stored"][0]["answer"] == "unsure"
        assert undone["status"]["answered"] == 2
        answered = {frozenset((p["id_a"], p["id_b"])) for p in batch[:2]}
        later = client.get("/api/queue", params={"size": 20}).json()
        assert not {frozenset((p["id_a"], p["id_b"])) for p in later} & answered
        exported = client.get("/api/labels.csv")
        assert exported.headers["content-type"].startswith("text/csv")
        lines = exported.text.strip().splitlines()
        assert lines[0] == "id_a,id_b,same" and len(lines) == 3
        refused = client.post(
            "/api/answers", json={"id_a": "g0-0", "id_b": "nope", "answer": "same"}
        )
        assert refused.status_code == 422 and "nope" in refused.json()["detail"]
        wrong = client.post("/api/answers", json={"id_a": "g0-0", "id_b": "g0-1", "answer": "yes"})
        assert wrong.status_code == 422


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("id_a,id_b,same\ng0-0,g0-1,1\ng0-0,ghost,0\n", "row 3: unknown product id(s) ['ghost']"),
        (
            "id_a,id_b,same\ng0-0,g0-1,1\ng1-0,g1-0,1\n",
            "row 3: product 'g1-0' is paired with itself",
        ),
        ("id_a,id_b,same\ng0-0,g0-1,1\ng0-1,g0-0,0\n", "row 3: g0-1 / g0-0 answered different"),
        ("id_a;id_b;same\ng0-0;g0-1;1\n", "needs the columns"),
        (b"id_a,id_b,same\ng0-0,g0-1,\xff\n", "cannot read labels file"),
    ],
)
def test_a_bad_labels_upload_is_refused_and_nothing_is_stored(
    catalog_index, tmp_path, text: str | bytes, problem: str
) -> None:
    index, _ = catalog_index
    with client_for(index, tmp_path) as client:
        client.post("/api/answers", json={"id_a": "g2-0", "id_b": "g2-1", "answer": "same"})
        content = text.encode() if isinstance(text, str) else text
        response = client.post("/api/labels", files={"file": ("labels.csv", content, "text/csv")})
        assert response.status_code == 422
        assert problem in response.json()["detail"] and "labels.csv" in response.json()["detail"]
        assert [(a["id_a"], a["id_b"]) for a in client.get("/api/answers").json()] == [
            ("g2-0", "g2-1")
        ]
        good = "id_a,id_b,same\ng0-0,g0-1,1\ng0-0,g5-0,no\n"
        imported = client.post("/api/labels", files={"file": ("mine.csv", good, "text/csv")})
        assert imported.json()["imported"] == 2
        assert imported.json()["status"]["answered"] == 3


def test_cluster_confirm_and_split_are_pair_labels(catalog_index, tmp_path) -> None:
    index, _ = catalog_index
    with client_for(index, tmp_path) as client:
        clusters = client.get("/api/clusters").json()
        largest = clusters[0]
        assert largest["size"] >= 3 and largest["reviewed"] == 0
        cluster = client.get(f"/api/clusters/{largest['number']}").json()
        first, *others = [m["id"] for m in cluster["members"]]
        split = client.post(
            f"/api/clusters/{largest['number']}/split", json={"member": others[0]}
        ).json()
        assert {(a["id_a"], a["answer"]) for a in split["stored"]} == {(others[0], "different")}
        assert len(split["stored"]) == largest["size"] - 1
        confirmed = client.post(f"/api/clusters/{largest['number']}/confirm").json()
        # the split-off member stays "different" from the representative
        assert {(a["id_a"], a["id_b"], a["answer"]) for a in confirmed["stored"]} == {
            (first, other, "same") for other in others[1:]
        }
        shown = client.get(f"/api/clusters/{largest['number']}").json()["members"]
        assert [m["answer"] for m in shown] == [None, "different", *["same"] * (len(others) - 1)]
        assert client.get("/api/clusters/99999").status_code == 404
        bad = client.post(f"/api/clusters/{largest['number']}/split", json={"member": "ghost"})
        assert bad.status_code == 422


def test_calibrate_reports_and_applies_the_operating_point(
    catalog_index, tmp_path, monkeypatch
) -> None:
    index, frame = catalog_index
    group = dict(zip(frame["id"], frame["group"], strict=True))
    settings_file = tmp_path / "prodsearch.toml"
    settings_file.write_text('collection = "products"\n[thresholds]\ntext = 0.5\n')
    with client_for(index, tmp_path, settings_file) as client:
        assert client.get("/api/report").status_code == 404
        kinds: set[bool] = set()
        answered = 0
        while len(kinds) < 2 and answered < 48:  # the queue's batches until both answers came
            for pair in client.get("/api/queue", params={"size": 12}).json():
                same = group[pair["id_a"]] == group[pair["id_b"]]
                body = {
                    "id_a": pair["id_a"],
                    "id_b": pair["id_b"],
                    "answer": "same" if same else "different",
                }
                assert client.post("/api/answers", json=body).status_code == 200
                kinds.add(same)
                answered += 1
        report = client.post("/api/calibrate").json()
        assert report["error"] is None and report["answers"] == answered
        calibration = report["calibration"]
        assert calibration["labels"] == answered and 0 < calibration["min_probability"] < 1
        weighted = answered >= report["weights_need"]["answers"]
        assert bool(calibration["weights"]) <= weighted and len(report["taught"]) <= 8
        assert {s["name"] for s in report["signals"]} == {"text", "chars", "phash"}
        predicted = report["predicted"]
        assert predicted["matched_pairs"] > 0 and 0 < predicted["expected_precision"] <= 1
        status = client.get("/api/status").json()
        assert status["min_probability"] == calibration["min_probability"]
        assert status["calibration"]["labels"] == answered
        chart = client.get("/api/report.svg")
        assert chart.headers["content-type"] == "image/svg+xml" and "<svg" in chart.text
        monkeypatch.setenv(SETTINGS_FILE_ENV, str(settings_file))
        written = Settings()
        assert written.thresholds.text == 0.5, "other keys are kept"
        assert written.dedup.pair_model.min_probability == calibration["min_probability"]
        assert written.dedup.pair_model.calibration.labels == answered


def test_a_catalog_with_photos_shows_them_and_reports_without_probabilities(
    tmp_path, encoders
) -> None:
    """Photos are shown; with the fusion decider (a user's choice) there is no probability to
    calibrate, and the report says so beside the fused score's curve."""
    rows = pd.read_csv(SAMPLE / "catalog.csv").head(8)
    rows.to_csv(tmp_path / "catalog.csv", index=False)
    settings = Settings(store=str(tmp_path / "store"), dedup={"decider": "fusion"})
    with Index(settings.store, "products", settings, encoders) as index:
        catalog = read_catalog(tmp_path / "catalog.csv", load_recipe("generic"), SAMPLE)
        ingest_catalog(index, catalog)
        with client_for(index, tmp_path) as client:
            assert client.get("/api/status").json()["decided_by"] == "fusion"
            batch = client.get("/api/queue").json()
            assert batch and batch[0]["probability"] is None
            photo = batch[0]["products"][0]["image"]
            assert photo and client.get(photo).headers["content-type"] == "image/jpeg"
            assert client.get("/images/gs-5470").status_code == 200
            assert client.get("/images/unknown").status_code == 404
            for pair, kind in zip(batch[:2], ("same", "different"), strict=True):
                body = {"id_a": pair["id_a"], "id_b": pair["id_b"], "answer": kind}
                client.post("/api/answers", json=body)
            report = client.post("/api/calibrate").json()
            assert "pair model did not decide" in report["error"]
            assert report["signals"] and report["fused"]["unit"] == "fused score"
            assert "<svg" in client.get("/api/report.svg").text
            page = client.get("/")
            assert page.status_code == 200 and "/static/review.js" in page.text
            for name in ("review.js", "review.css"):
                assert "://" not in client.get(f"/static/{name}").text, "nothing loads from outside"
            assert "://" not in page.text


def test_prodsearch_review_keeps_answers_through_a_killed_server(tmp_path, encoders) -> None:
    store = str(tmp_path / "store")
    with Index(store, "products", Settings(store=store), encoders) as index:
        ingest_phash_catalog(index, tmp_path, n_groups=6)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "prodsearch.cli", "review", "--store", store]
    command += ["--port", str(port), "--write-settings", str(tmp_path / "prodsearch.toml")]
    url = f"http://127.0.0.1:{port}"

    def start() -> subprocess.Popen:
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/api/status", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                time.sleep(0.3)
        server.kill()
        raise AssertionError(f"prodsearch review did not start: {server.communicate()[1]}")

    server = start()
    try:
        pair = httpx.get(f"{url}/api/queue", params={"size": 1}).json()[0]
        body = {"id_a": pair["id_a"], "id_b": pair["id_b"], "answer": "same"}
        assert httpx.post(f"{url}/api/answers", json=body).status_code == 200
    finally:
        server.kill()  # SIGKILL: no shutdown, no close
        server.wait()
    assert (Path(store) / "products.review.sqlite").is_file()
    server = start()
    try:
        kept = httpx.get(f"{url}/api/answers").json()
        assert [(a["id_a"], a["id_b"], a["answer"]) for a in kept] == [
            (pair["id_a"], pair["id_b"], "same")
        ]
    finally:
        server.terminate()
        server.wait(timeout=60)

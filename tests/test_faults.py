"""Fault injection: ingests killed with SIGKILL and resumed, a server killed mid-load and
restarted, and generated requests (schemathesis) against every route of the API.

The kill-and-resume harness (`kill_resume_cycles`) is shared with benchmarks/bench_faults.py,
which runs it for many more cycles and prints a table.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from prodsearch.api import create_app
from prodsearch.catalog import read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings
from prodsearch.store import open_store, point_id

from .conftest import SAMPLE

CATALOG = SAMPLE / "catalog.csv"
COLLECTION = "products"
#: float16 storage keeps about 3 significant digits of a unit vector's components
FLOAT16_ATOL = 2e-3
#: small batches, so that a kill lands between upserts as well as inside one
BATCH_SIZE = 8
BIN = Path(sys.executable).parent


def prodsearch(*args: str) -> list[str]:
    """The command line of a prodsearch subcommand (the installed console script)."""
    script = BIN / "prodsearch"
    if script.is_file():
        return [str(script), *args]
    return [sys.executable, "-m", "prodsearch.cli", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRODSEARCH_")}
    # The shared data directory is found by tests, not by the CLI: keep pointing at it.
    if "PRODSEARCH_DATA_DIR" in os.environ:
        env["PRODSEARCH_DATA_DIR"] = os.environ["PRODSEARCH_DATA_DIR"]
    return env


# -- 1. kill-and-resume ingests ---------------------------------------------------------------
def catalog_revision(directory: Path, revision: int) -> Path:
    """The sample catalog (62 products with photos) at `revision`: every title and a `revision`
    payload column changed, so every product's content hash differs from the other revisions'
    and each re-ingest rewrites every point (replacements, not only first inserts)."""
    frame = pd.read_csv(CATALOG)
    titled = frame["title"].notna()
    frame.loc[titled, "title"] = frame.loc[titled, "title"] + f" (revision {revision})"
    frame["revision"] = revision
    path = directory / f"catalog-r{revision}.csv"
    frame.to_csv(path, index=False)
    return path


def ingest_command(catalog: Path, store: Path) -> list[str]:
    """`prodsearch ingest` of a catalog revision (its images are the sample's)."""
    return prodsearch(
        "ingest",
        str(catalog),
        "--store",
        str(store),
        "--recipe",
        "generic",
        "--images-dir",
        str(SAMPLE),
        "--batch-size",
        str(BATCH_SIZE),
        "--report",
        str(catalog.with_suffix(".rejects.csv")),
        "--json",
    )


def run_ingest(catalog: Path, store: Path, timeout: float = 300) -> dict[str, Any]:
    """Run an ingest to completion; return its JSON summary."""
    done = subprocess.run(
        ingest_command(catalog, store),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def killed_ingest(catalog: Path, store: Path, rng: random.Random, rows: int) -> dict[str, Any]:
    """Start an ingest and SIGKILL it at a random point once it has started writing: after a
    random number (1 .. all) of batches reported stored, plus a random delay of up to 0.5 s
    (so inside the encoding or upsert of the next batch, or inside the final index build)."""
    batches = math.ceil(rows / BATCH_SIZE)
    after_batches = rng.randint(1, batches)
    delay = rng.uniform(0.0, 0.5)
    process = subprocess.Popen(
        ingest_command(catalog, store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    watchdog = threading.Timer(240, process.kill)  # a stalled ingest must not hang the test
    watchdog.start()
    try:
        seen = 0
        for line in process.stderr:  # type: ignore[union-attr]
            if line.startswith("ingest: "):
                seen += 1
                if seen >= after_batches:
                    break
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        watchdog.cancel()
        process.stderr.close()  # type: ignore[union-attr]
    return {
        "after_batches": after_batches,
        "delay": round(delay, 3),
        "killed": process.returncode == -signal.SIGKILL,
    }


def stored_points(store: Path) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every stored point's (payload, vectors), duplicates included."""
    out, offset = [], None
    with open_store(str(store)) as opened:
        while True:
            page, offset = opened.scroll(COLLECTION, offset, 500, True)
            out += [(p.payload, p.vectors) for p in page]
            if offset is None:
                return out


def vector_difference(one: Any, other: Any) -> float:
    """Max absolute difference of two stored vectors (dense, or sparse with equal indices)."""
    if hasattr(one, "indices"):
        if not np.array_equal(one.indices, other.indices):
            return math.inf
        one, other = one.values, other.values
    one, other = np.asarray(one, np.float32), np.asarray(other, np.float32)
    if one.shape != other.shape:
        return math.inf
    return float(np.max(np.abs(one - other))) if one.size else 0.0


@dataclass
class FaultReport:
    """What a series of kill-and-resume cycles left in the store, against a clean ingest."""

    cycles: int
    expected: int
    kills: list[dict[str, Any]] = field(default_factory=list)
    resumed_unchanged: list[int] = field(default_factory=list)
    stored: int = 0
    count: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    unretrievable: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    payload_mismatches: list[str] = field(default_factory=list)
    vector_mismatches: list[str] = field(default_factory=list)
    max_difference: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def max_vector_difference(self) -> float:
        return max(self.max_difference.values(), default=0.0)


def kill_resume_cycles(workdir: Path, cycles: int, seed: int = 0) -> FaultReport:
    """`cycles` times: a revision of the sample catalog is ingested into one store by a process
    SIGKILLed mid-run, then re-run to completion. Then the store is compared point by point
    with a clean ingest of the last revision into a separate store."""
    started = time.perf_counter()
    rng = random.Random(seed)
    store = workdir / "store"
    expected = pd.read_csv(CATALOG)["id"].astype(str).tolist()
    report = FaultReport(cycles=cycles, expected=len(expected))
    for revision in range(1, cycles + 1):
        catalog = catalog_revision(workdir, revision)
        report.kills.append(killed_ingest(catalog, store, rng, len(expected)))
        summary = run_ingest(catalog, store)
        assert summary["skipped"] == 0, summary
        report.resumed_unchanged.append(summary["unchanged"])
    clean = workdir / "clean"
    run_ingest(catalog_revision(workdir, cycles), clean)

    points = stored_points(store)
    reference = {p["product_id"]: (p, v) for p, v in stored_points(clean)}
    assert sorted(reference) == sorted(expected), "the clean ingest itself is incomplete"
    ids = [payload["product_id"] for payload, _ in points]
    report.stored = len(ids)
    report.duplicates = len(ids) - len(set(ids))
    report.lost = sorted(set(expected) - set(ids))
    with open_store(str(store)) as opened:
        report.count = opened.count(COLLECTION)
        retrieved = opened.retrieve(COLLECTION, [point_id(i) for i in expected])
        found = {p.payload["product_id"] for p in retrieved}
    report.unretrievable = sorted(set(expected) - found)
    for payload, vectors in points:
        product_id = payload["product_id"]
        clean_payload, clean_vectors = reference[product_id]
        if payload.get("revision") != cycles:
            report.stale.append(product_id)
        if payload != clean_payload:
            report.payload_mismatches.append(product_id)
        if vectors.keys() != clean_vectors.keys():
            report.vector_mismatches.append(product_id)
            continue
        for name, vector in vectors.items():
            difference = vector_difference(vector, clean_vectors[name])
            report.max_difference[name] = max(report.max_difference.get(name, 0.0), difference)
            if difference > FLOAT16_ATOL:
                report.vector_mismatches.append(f"{product_id}:{name}")
    report.seconds = time.perf_counter() - started
    return report


@pytest.mark.slow
def test_killed_ingests_resume_to_the_clean_result(tmp_path: Path) -> None:
    """3 ingests SIGKILLed at random points (seeded), each re-run to completion: every product
    stored exactly once, at the last revision, with the vectors and payload of a clean ingest."""
    report = kill_resume_cycles(tmp_path, cycles=3, seed=1)
    assert sum(k["killed"] for k in report.kills) >= 2, report.kills
    assert report.lost == [] and report.unretrievable == []
    assert report.duplicates == 0
    assert report.stored == report.count == report.expected == 62
    assert report.stale == [] and report.payload_mismatches == []
    assert report.vector_mismatches == [], report.max_difference
    assert report.max_vector_difference <= FLOAT16_ATOL


# -- 2. a server killed mid-load and restarted ------------------------------------------------
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(store: Path, port: int, log: Path) -> subprocess.Popen:
    """`prodsearch serve` without an API key; waits until /health answers."""
    sink = log.open("a")
    server = subprocess.Popen(
        prodsearch("serve", "--port", str(port), "--store", str(store)),
        stdout=sink,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    sink.close()
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise AssertionError(f"prodsearch serve exited:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except httpx.TransportError:
            if time.monotonic() > deadline:
                server.kill()
                raise AssertionError("prodsearch serve did not answer /health") from None
            time.sleep(0.2)


def api_products() -> list[dict[str, Any]]:
    """The sample catalog as POST /products items (titles, photos as base64, payload)."""
    frame = pd.read_csv(CATALOG)
    products = []
    for row in frame.itertuples():
        product: dict[str, Any] = {
            "id": row.id,
            "image_base64": base64.b64encode((SAMPLE / row.image).read_bytes()).decode(),
            "payload": {"brand": row.brand, "kind": row.kind},
        }
        if isinstance(row.title, str):
            product["title"] = row.title
        products.append(product)
    return products


@pytest.mark.slow
def test_acknowledged_writes_survive_a_server_kill(tmp_path: Path) -> None:
    """POST /products in batches of 3 from a client thread; the server is SIGKILLed after a
    random number of acknowledged batches and restarted on the same store: every product of a
    2xx response is there, and re-sending the rest completes the catalog without duplicates."""
    rng = random.Random(2)
    products = api_products()
    batches = [products[i : i + 3] for i in range(0, len(products), 3)]
    store, port, log = tmp_path / "store", free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    kill_after = rng.randint(3, len(batches) // 2)
    acknowledged: list[str] = []
    failed: list[list[dict[str, Any]]] = []
    statuses: list[int | str] = []
    enough = threading.Event()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            for batch in batches:
                if stop.is_set():
                    return
                try:
                    response = client.post("/products", json={"products": batch})
                    statuses.append(response.status_code)
                except httpx.TransportError as exc:
                    statuses.append(type(exc).__name__)
                    failed.append(batch)
                    time.sleep(0.3)  # the server is down: pace the retries of the next batches
                    continue
                if 200 <= response.status_code < 300:
                    assert response.json()["rejected"] == 0, response.text
                    acknowledged.extend(p["id"] for p in batch)
                else:
                    failed.append(batch)
                if len(acknowledged) >= 3 * kill_after:
                    enough.set()

    server = start_server(store, port, log)
    client_thread = threading.Thread(target=load, daemon=True)
    try:
        client_thread.start()
        assert enough.wait(60), f"no progress: {statuses}\n{log.read_text()[-2000:]}"
        time.sleep(rng.uniform(0.0, 0.3))  # inside the next batch's encoding or upsert
        server.send_signal(signal.SIGKILL)
        server.wait()
        before_restart = list(acknowledged)
        server = start_server(store, port, log)
        client_thread.join(120)
        assert not client_thread.is_alive(), "the client thread hung"
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
            server.wait()
        client_thread.join(5)
    server = start_server(store, port, log)  # a third start: the store survives a clean stop too
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            missing = []
            for product_id in acknowledged:
                response = client.get(f"/products/{product_id}")
                if response.status_code != 200:
                    missing.append((product_id, response.status_code))
            assert missing == [], (
                f"acknowledged writes lost: {missing}; acknowledged before the kill: "
                f"{len(before_restart)}; statuses: {statuses}"
            )
            assert len(before_restart) >= 3 * kill_after
            assert failed, f"the kill interrupted no request: {statuses}"
            print(f"statuses: {statuses}; acknowledged before the kill: {len(before_restart)}")
            for batch in failed:
                response = client.post("/products", json={"products": batch})
                assert response.status_code == 200, response.text
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["products"] == len(products), health
            for product in products:
                stored = client.get(f"/products/{product['id']}").json()
                assert stored["payload"]["kind"] == product["payload"]["kind"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


# -- 3. generated requests against the OpenAPI schema -----------------------------------------
@pytest.fixture(scope="module")
def fault_index(tmp_path_factory: pytest.TempPathFactory, encoders: EncoderSet) -> Iterator[Index]:
    """The sample catalog in a temporary embedded store."""
    store = tmp_path_factory.mktemp("faults") / "store"
    with Index(str(store), COLLECTION, Settings(), encoders) as index:
        ingest_catalog(index, read_catalog(CATALOG, load_recipe("generic")))
        yield index


@pytest.fixture(scope="module")
def api_schema(fault_index: Index) -> Any:
    """The API's OpenAPI schema, served in-process (ASGI), without an API key."""
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(index=fault_index))


@pytest.mark.parametrize(
    ("filter_", "words"),
    [
        # each of these was a 500 (the engine raised mid-query), found by the test below
        ({"": []}, "invalid filter key ''"),
        ({"": False}, "invalid filter key ''"),
        ({"brand name": "Arla"}, "invalid filter key 'brand name'"),
        ({"kind": 0.0}, "use a range"),
        ({"kind": [0.5]}, "use a range"),
        ({"kind": {"not": 2.5}}, "use a range"),
        ({"kind": ["catalogue", 1]}, "strings or of integers, not both"),
    ],
)
def test_filters_the_engine_cannot_run_are_refused(
    fault_index: Index, filter_: dict[str, Any], words: str
) -> None:
    with TestClient(create_app(index=fault_index)) as client:
        body = {"title": "Arla milk", "filter": filter_}
        response = client.post("/match", json=body)
        assert response.status_code == 422, response.text
        assert words in json.dumps(response.json())
        upload = client.post(
            "/match/upload", data={"title": "Arla milk", "filter": json.dumps(filter_)}
        )
        assert upload.status_code == 422, upload.text
        quoted = client.post("/match", json={"title": "Arla milk", "filter": {'"kind"': "x"}})
        assert quoted.status_code == 200, quoted.text


def generated_server_errors(operation: Any, mode: Any, calls: dict[str, int]) -> str | None:
    """Send 25 requests generated for `operation` in `mode`; return the (shrunk) first request
    answered with a 5xx (or that raised in the server), or None."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    label = f"{operation.label} ({mode.value})"

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def check(case: Any) -> None:
        response = case.call()
        calls[label] = calls.get(label, 0) + 1
        assert response.status_code < 500, (
            f"{label}: {response.status_code} {response.text[:300]}\n"
            f"  reproduce: {case.as_curl_command()}"
        )

    try:
        check()
    except Unsatisfiable:  # nothing to generate (no parameters to break in negative mode)
        return None
    except Exception as exc:  # a 5xx, or the server's exception itself (the ASGI client re-raises)
        errors = exc.exceptions if isinstance(exc, ExceptionGroup) else [exc]
        return "\n".join(
            f"{label}: {type(e).__name__}: {str(e)[:300]}\n  "
            + "\n  ".join(n for n in getattr(e, "__notes__", []) if "curl" in n)
            for e in errors
        )
    return None


@pytest.mark.slow
def test_generated_requests_get_no_server_error(api_schema: Any) -> None:
    """Requests generated from the OpenAPI schema, to every route, both fitting the schema and
    not (25 of each per operation): every one is answered with a status below 500."""
    from schemathesis import GenerationMode

    failures: list[str] = []
    calls: dict[str, int] = {}
    for result in api_schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # every operation runs even when an earlier one failed; all failures are reported
            if failure := generated_server_errors(result.ok(), mode, calls):
                failures.append(failure)
    print(calls)
    assert len(calls) >= 10, calls  # 6 operations, twice (minus any with nothing negative)
    assert failures == [], "\n".join(failures)

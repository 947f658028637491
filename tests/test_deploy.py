"""deploy/: the compose files and cluster settings parse and agree with each other and the docs;
`prodsearch serve` runs as a real server process."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from qdrant_client import QdrantClient

from prodsearch.encoders import EncoderSet
from prodsearch.index import Index
from prodsearch.settings import SETTINGS_FILE_ENV, Settings
from prodsearch.store import Manifest, open_store

from .conftest import DOCKER, REPO

DEPLOY = REPO / "deploy"
CLUSTER = DEPLOY / "cluster"


def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _qdrant_image(service: dict) -> str:
    image = service["image"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", image), f"pin an exact tag: {image}"
    return image


def test_compose_runs_the_api_against_its_qdrant_service() -> None:
    compose = _compose(DEPLOY / "compose.yaml")
    services = compose["services"]
    _qdrant_image(services["qdrant"])
    assert "127.0.0.1:6333:6333" in services["qdrant"]["ports"]
    assert any(v.endswith(":/qdrant/storage") for v in services["qdrant"]["volumes"])
    api = services["api"]
    assert api["environment"]["PRODSEARCH_STORE"] == "http://qdrant:6333"
    assert "PRODSEARCH_API_KEY" in api["environment"]
    assert api["depends_on"]["qdrant"]["condition"] == "service_healthy"
    assert "127.0.0.1:8000:8000" in api["ports"]
    dockerfile = (DEPLOY / api["build"]["context"]).resolve() / api["build"]["dockerfile"]
    assert dockerfile == DEPLOY / "Dockerfile"


def test_dockerfile_installs_cpu_torch_and_serves_on_the_compose_port() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert text.startswith("#") and "FROM python:3.11-slim" in text
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert text.index("torch==2.13.0") < text.index("pip install .")
    assert 'CMD ["prodsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "EXPOSE 8000" in text
    for copied in ("pyproject.toml", "README.md", "src", "ingest/recipes"):
        assert (REPO / copied).exists()


def test_cluster_has_three_peers_bootstrapped_from_the_first() -> None:
    compose = _compose(CLUSTER / "compose.yaml")
    services = compose["services"]
    peers = {name: s for name, s in services.items() if name.startswith("qdrant-")}
    assert sorted(peers) == ["qdrant-1", "qdrant-2", "qdrant-3"]
    images = {_qdrant_image(s) for s in peers.values()}
    assert images == {_compose(DEPLOY / "compose.yaml")["services"]["qdrant"]["image"]}
    first = "http://qdrant-1:6335"
    for name, peer in peers.items():
        assert peer["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        command = peer["command"]
        assert command[0] == "./qdrant"
        assert command[command.index("--uri") + 1] == f"http://{name}:6335"
        if name == "qdrant-1":
            assert "--bootstrap" not in command
        else:
            assert command[command.index("--bootstrap") + 1] == first
    api = services["api"]
    assert api["environment"]["PRODSEARCH_STORE"] == "http://qdrant-1:6333"
    source, target, _ = api["volumes"][0].split(":")
    assert api["environment"]["PRODSEARCH_SETTINGS_FILE"] == target
    assert (CLUSTER / source).resolve() == CLUSTER / "collection.toml"


def test_cluster_collection_settings_match_the_readme(monkeypatch) -> None:
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(CLUSTER / "collection.toml"))
    params = Settings().collection_params()
    assert params == {"shard_number": 6, "replication_factor": 2, "write_consistency_factor": 1}
    nodes = 3
    assert params["replication_factor"] <= nodes and params["shard_number"] % nodes == 0
    assert params["write_consistency_factor"] <= params["replication_factor"]
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for name, value in params.items():
        assert f"{name} = {value}" in readme, f"deploy/README.md should say {name} = {value}"
    assert "fusion inside a nested prefetch is computed per shard" in readme


def test_ray_cluster_runs_prodsearch_beside_the_qdrant_cluster(monkeypatch) -> None:
    """deploy/ray/: a KubeRay RayCluster of the Ray image (the Dockerfile with EXTRAS="[ray]"),
    pinned to the Ray of the extra, its driver on a head without CPUs, its workers on the Qdrant
    cluster's URL; the collection's shards and replicas fit the 3 nodes."""
    cluster = _compose(DEPLOY / "ray" / "raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 40)  # the extra's floor
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # Ray: an optional extra
        assert spec["rayVersion"] == importlib.metadata.version("ray"), "the Ray that pip gets"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (worker,) = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in worker["env"]}
    qdrant = _compose(CLUSTER / "compose.yaml")["services"]
    assert env["PRODSEARCH_STORE"].removeprefix("http://").split(":")[0] in qdrant
    assert worker["image"].startswith("prodsearch-ray:")
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert (
        'EXTRAS="[ray]" -t prodsearch-ray:' in dockerfile and "pip install .${EXTRAS}" in dockerfile
    )
    monkeypatch.setenv(SETTINGS_FILE_ENV, str(DEPLOY / "ray" / "collection.toml"))
    params = Settings().collection_params()
    assert params["shard_number"] % 3 == 0 and params["replication_factor"] == 2
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "deploy/ray/raycluster.yaml" in readme and "bench_scaleout.py" in readme


class _RecordingClient(QdrantClient):
    """A real qdrant-client (local mode, in memory) that keeps the arguments of every
    create_collection call: what a server would be asked for, which local mode ignores."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.created: list[dict] = []

    def create_collection(self, collection_name: str, **kwargs: Any) -> bool:  # type: ignore[override]
        self.created.append({"collection_name": collection_name, **kwargs})
        return super().create_collection(collection_name, **kwargs)


@contextmanager
def _version_answering_server() -> Iterator[str]:
    """The URL of an HTTP server that answers only the client's version check (GET /)."""

    class Version(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"version": importlib.metadata.version("qdrant-client")}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Version)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


def test_collection_params_reach_collection_creation() -> None:
    """From the settings through Index and open_store to the qdrant-client call that creates
    the collection on a server (local mode ignores shard parameters, so the call is recorded)."""
    params = {"shard_number": 3, "replication_factor": 2, "write_consistency_factor": 1}
    assert Settings(**params).collection_params() == params
    assert Settings().collection_params() == {}
    with _version_answering_server() as url:
        index = Index(url, "products", Settings(**params), EncoderSet.default())
        server_client = index.store.client  # type: ignore[attr-defined]
        index.store.client = recorder = _RecordingClient()  # type: ignore[attr-defined]
        with index:
            index.ensure_collection()
            assert index.exists()
        server_client.close()
    (call,) = recorder.created
    assert call["collection_name"] == "products"
    assert {k: call[k] for k in params} == params
    assert call["metadata"] == index.expected_manifest().as_dict()
    assert call["vectors_config"]["text"].size == 384


_MANIFEST = Manifest(vectors={"text": {"dim": 4, "distance": "cosine"}}, encoders={})


@pytest.mark.docker
@pytest.mark.skipif(not DOCKER, reason="no Docker daemon answers here")
def test_a_server_creates_the_collection_with_the_shards_asked_for() -> None:
    from testcontainers.qdrant import QdrantContainer

    image = _compose(DEPLOY / "compose.yaml")["services"]["qdrant"]["image"]
    with QdrantContainer(image) as container:
        url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(6333)}"
        with open_store(url, {"shard_number": 3, "write_consistency_factor": 1}) as store:
            store.create_collection("products", _MANIFEST)
            params = store.client.get_collection("products").config.params  # type: ignore[attr-defined]
            assert (params.shard_number, params.write_consistency_factor) == (3, 1)


# -- `prodsearch serve`, a real server process -------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_over_http(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PRODSEARCH_API_KEY": "k3y"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prodsearch.cli",
            "serve",
            "--port",
            str(port),
            "--store",
            str(tmp_path / "store"),
            "--collection",
            "shop",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # model loading on a busy 2-core machine
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not answer /health"
                time.sleep(0.5)
        assert health.status_code == 200 and health.json()["status"] == "empty"
        key = {"X-API-Key": "k3y"}
        products = [
            {"id": "a", "title": "Kopi Kapal Api Special Mix 10 x 25g"},
            {"id": "b", "title": "Double Tape 3M VHB 12 mm x 4,5 m"},
            {"id": "c", "title": "Oatly Oat Drink 1L", "payload": {"brand": "Oatly"}},
        ]
        stored = httpx.post(f"{base}/products", json={"products": products}, headers=key)
        assert stored.json()["upserted"] == 3, stored.text
        assert httpx.post(f"{base}/match", json={"title": "oatly"}).status_code == 401
        match = httpx.post(f"{base}/match", json={"title": "oatly oat drink"}, headers=key)
        assert match.status_code == 200, match.text
        top = match.json()["matches"][0]
        assert top["product_id"] == "c" and top["payload"]["brand"] == "Oatly"
        assert httpx.get(f"{base}/health").json()["products"] == 3
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    output = (tmp_path / "serve.log").read_text()
    # uvicorn shuts down cleanly, then re-raises the signal it caught, as a process should.
    assert server.returncode == -signal.SIGTERM, output
    assert "Application shutdown complete" in output and "Traceback" not in output

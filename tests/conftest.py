"""Shared fixtures: real data slices, the real encoders (loaded once), and every store backend."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prodsearch.catalog import read_catalog
from prodsearch.encoders import EncoderSet
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import Settings
from prodsearch.store import Store, open_store

from .generated import labelled_catalog

REPO = Path(__file__).resolve().parents[1]
# The shared data sits beside the checkout; PRODSEARCH_DATA_DIR points elsewhere, and only there
# (PRODSEARCH_DATA_DIR=/nonexistent runs the tests as a fresh clone without the data would).
_DATA_CANDIDATES = (
    [Path(os.environ["PRODSEARCH_DATA_DIR"])]
    if os.environ.get("PRODSEARCH_DATA_DIR")
    else [REPO.parent / "shared" / "data", Path("/work/shared/data")]
)
DATA = next((p for p in _DATA_CANDIDATES if p.is_dir()), _DATA_CANDIDATES[0])
SHOPEE = DATA / "shopee" / "train.csv"
SPLIT = DATA / "shopee" / "split.csv"
SAMPLE = REPO / "ingest" / "sample"


def needs_data(*paths: Path) -> pytest.MarkDecorator:
    """Skip unless every one of the shared data's `paths` (files or folders) is there."""
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"shared data not found: {', '.join(missing)}")


#: every file the Shopee fixtures (`shopee_groups`, `shopee_csv`, `shopee_index`) read
needs_shopee = needs_data(SHOPEE, SPLIT)


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


DOCKER = _docker_available()


def reconfigured(index: Index, **changes: object) -> Index:
    """An Index on the same store, collection and encoders with some settings changed."""
    settings = index.settings.model_copy(update=changes)
    return Index(index.store, index.collection, settings, index.encoders)


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray on 2 CPUs, started once for the session (a start costs seconds); skipped
    where Ray is not installed."""
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed: pip install 'prodsearch[ray]' (scripts/setup.sh does)"
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def encoders() -> EncoderSet:
    """The shipped encoders, loaded once for the whole session."""
    return EncoderSet.default()


def shopee_groups(n_groups: int, split: str = "test", seed: int = 0) -> pd.DataFrame:
    """Return every row of `n_groups` random label groups of one Shopee split."""
    frame = pd.read_csv(SHOPEE).merge(pd.read_csv(SPLIT), on="posting_id")
    frame = frame[frame["split"] == split].drop(columns="split")
    groups = frame["label_group"].drop_duplicates().sample(n_groups, random_state=seed)
    return frame[frame["label_group"].isin(groups)].reset_index(drop=True)


@pytest.fixture
def shopee_csv(tmp_path: Path) -> Path:
    """A CSV of 40 whole Shopee test-split groups (real titles and phashes)."""
    path = tmp_path / "shopee.csv"
    shopee_groups(40).to_csv(path, index=False)
    return path


BACKENDS = ["edge", "client-memory", "client-path", "docker"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """Every store backend: the embedded engine, qdrant-client local mode, a real server."""
    kind = request.param
    if kind == "docker":
        if not DOCKER:
            pytest.skip("no Docker daemon answers here: the real-server variant cannot run")
        from testcontainers.qdrant import QdrantContainer

        with QdrantContainer() as container:
            url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(6333)}"
            opened = open_store(url)
            yield opened
            opened.close()
        return
    location = {
        "edge": str(tmp_path / "edge"),
        "client-memory": ":memory:",
        "client-path": f"local:{tmp_path / 'local'}",
    }[kind]
    opened = open_store(location)
    yield opened
    opened.close()


@pytest.fixture
def shopee_index(tmp_path, encoders, shopee_csv) -> Index:
    """40 Shopee test groups, with a category, a seller and a price for the relative filters."""
    frame = pd.read_csv(shopee_csv)
    frame["category"] = np.where(frame.index % 3 == 0, "a", "b")
    frame["seller"] = np.where(frame.index % 2 == 0, "s1", "s2")
    frame["price"] = 10.0 + (frame.index % 7) * 5
    frame.to_csv(shopee_csv, index=False)
    index = Index(str(tmp_path / "store"), "products", Settings(), encoders)
    ingest_catalog(index, read_catalog(shopee_csv, load_recipe("shopee")))
    yield index
    index.close()


@pytest.fixture
def catalog_csv(tmp_path: Path) -> Path:
    """The generated labelled catalog (tests/generated.py: 60 products, 184 listings with a photo
    hash, price, category, seller and label_group), redistributable: on every machine."""
    path = tmp_path / "catalog.csv"
    labelled_catalog().to_csv(path, index=False)
    return path


@pytest.fixture
def catalog_index(tmp_path, encoders, catalog_csv) -> Index:
    """The generated labelled catalog in an embedded store (the shipped pair model's modalities:
    text, chars, phash; category, seller and price for the relative filters)."""
    index = Index(str(tmp_path / "store"), "products", Settings(), encoders)
    ingest_catalog(index, read_catalog(catalog_csv, load_recipe("generic")))
    yield index
    index.close()

"""`ingest --ray` (scaleout/ingest.py) against the local ingest, on a real local Ray."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from prodsearch.catalog import read_catalog
from prodsearch.encoders.base import SparseVec
from prodsearch.index import Index
from prodsearch.ingest import ingest_catalog
from prodsearch.recipes import load_recipe
from prodsearch.settings import IngestSettings, Settings

from .generated import labelled_catalog
from .test_ingest import cli_process

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'prodsearch[ray]' (scripts/setup.sh does)"
)

GENERIC = load_recipe("generic")


def defective_catalog(rows: int = 60) -> pd.DataFrame:
    """The generated catalog with a bad row of each kind the row rules reject."""
    frame = labelled_catalog(rows)
    frame.loc[3, "title"] = ""  # no title, no image
    frame.loc[5, "id"] = frame.loc[4, "id"]  # a repeated id
    frame.loc[7, "image_phash"] = "xyz"  # not a phash
    frame.loc[9, "id"] = ""  # no id
    return frame


def stored_points(index: Index) -> dict[str, tuple[dict, dict]]:
    """Every stored product's payload and vectors, by product id."""
    return {p.product_id: (p.payload, p.vectors) for p in index.scroll(with_vectors=True)}


#: the least cosine of one product's dense vector written by both paths: the int8 encoders
#: quantise activations per batch, and the two paths batch the rows differently
SAME_VECTOR_COSINE = 0.98


def assert_same_points(mine: Index, theirs: Index) -> None:
    """Same products, same payloads, vectors equal within int8 quantisation noise."""
    a, b = stored_points(mine), stored_points(theirs)
    assert sorted(a) == sorted(b)
    cosines = []
    for pid, (payload, vectors) in a.items():
        other_payload, other_vectors = b[pid]
        assert payload == other_payload, pid
        assert sorted(vectors) == sorted(other_vectors), pid
        for name, vector in vectors.items():
            other = other_vectors[name]
            if isinstance(vector, SparseVec):
                assert _sparse(vector) == _sparse(other), (pid, name)
            else:
                mine_v, theirs_v = np.asarray(vector, np.float64), np.asarray(other, np.float64)
                cosine = mine_v @ theirs_v / np.linalg.norm(mine_v) / np.linalg.norm(theirs_v)
                assert cosine >= SAME_VECTOR_COSINE, (pid, name, cosine)
                cosines.append(cosine)
    assert np.mean(cosines) >= 0.995


def _sparse(vector: SparseVec) -> dict[int, float]:
    return {int(i): round(float(v), 4) for i, v in zip(vector.indices, vector.values, strict=True)}


@pytest.mark.parametrize("file_format", ["csv", "parquet"])
def test_ray_ingest_equals_local_ingest(tmp_path, encoders, local_ray, file_format) -> None:
    """Same points, same vectors (within int8 noise), same rejected rows and report, from a
    CSV and from a Parquet file."""
    from prodsearch.scaleout.ingest import ray_ingest

    frame = defective_catalog()
    source = tmp_path / f"catalog.{file_format}"
    if file_format == "csv":
        frame.to_csv(source, index=False)
    else:
        frame.to_parquet(source, index=False)
    settings = Settings(batch_size=16)
    with (
        Index(str(tmp_path / "local"), "products", settings, encoders) as local,
        Index(str(tmp_path / "ray"), "products", settings, encoders) as on_ray,
    ):
        expected = ingest_catalog(
            local, read_catalog(source, GENERIC), report_path=tmp_path / "local.csv"
        )
        got = ray_ingest(
            on_ray,
            str(source),
            IngestSettings(),
            GENERIC,
            workers=2,
            report_path=tmp_path / "ray.csv",
        )
        assert (got.rows_read, got.upserted, got.unchanged) == (
            expected.rows_read,
            expected.upserted,
            expected.unchanged,
        )
        assert got.skipped == expected.skipped == 4
        assert sorted(got.rejections, key=lambda r: r.row) == sorted(
            expected.rejections, key=lambda r: r.row
        )
        assert (tmp_path / "ray.csv").read_text() == (tmp_path / "local.csv").read_text()
        assert_same_points(on_ray, local)
        # idempotent: a re-run stores nothing
        again = ray_ingest(on_ray, str(source), IngestSettings(), GENERIC, workers=2)
        assert (again.upserted, again.unchanged) == (0, expected.upserted)


def test_ray_ingest_rejects_another_format(tmp_path, encoders, local_ray) -> None:
    from prodsearch.errors import CatalogError
    from prodsearch.scaleout.ingest import ray_ingest

    source = tmp_path / "catalog.jsonl"
    source.write_text('{"id": "1", "title": "a"}\n')
    with (
        Index(str(tmp_path / "s"), "products", Settings(), encoders) as index,
        pytest.raises(CatalogError, match=r"catalog\.jsonl: `ingest --ray` reads CSV"),
    ):
        ray_ingest(index, str(source), IngestSettings(), None)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the process and every process of its group (its local Ray's too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _stored(line: str) -> int:
    """Products stored or checked, from a progress line of `ingest --ray`."""
    return int(line.split("rows read, ")[1].split()[0].replace(",", ""))


@pytest.mark.slow
def test_killed_ray_ingest_resumes(tmp_path: Path) -> None:
    """A real `ingest --ray` process killed with SIGKILL mid-run, then re-run: what was stored
    is kept, every product stored once."""
    catalog = tmp_path / "catalog.csv"
    frame = labelled_catalog(130)
    frame.to_csv(catalog, index=False)
    store = tmp_path / "store"
    env = {**os.environ, "PRODSEARCH_BATCH_SIZE": "16", "RAY_ADDRESS": ""}
    args = ("ingest", str(catalog), "--recipe", "generic", "--store", str(store), "--json")
    process = cli_process(*args, "--ray", "--workers", "1", env=env, own_group=True)
    deadline = time.monotonic() + 240
    stored = 0
    for line in process.stderr:  # type: ignore[union-attr]
        if line.startswith("ingest --ray: ") and (stored := _stored(line)) >= 48:
            break
        assert time.monotonic() < deadline, "ingest --ray made no progress"
    _kill_group(process)  # the driver and its local Ray die at once, as on a lost machine
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert stored < len(frame), "killed before the end"

    rerun = cli_process(*args, "--ray", "--workers", "2", env=env, own_group=True)
    try:
        out, err = rerun.communicate(timeout=600)
    finally:
        _kill_group(rerun)  # Ray's per-node agents can outlive a finished driver
    assert rerun.returncode == 0, err
    summary = json.loads(out)
    assert summary["unchanged"] >= stored, "the re-run kept what the killed run stored"
    assert summary["upserted"] + summary["unchanged"] == len(frame)
    assert summary["products_in_collection"] == len(frame)
    with Index(str(store), "products") as index:
        ids = [p.product_id for p in index.scroll(with_vectors=False)]
    assert sorted(ids) == sorted(frame["id"])

"""Assigning ingests killed with SIGKILL at random points, then re-run: the stored clusters equal
those of an uninterrupted run, no product lost or assigned twice."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from .generated import listings
from .test_faults import _env, prodsearch

#: small batches, so that a kill lands between batches' assignments as well as inside one
BATCH_SIZE = 4


def catalogs(directory: Path) -> tuple[Path, Path]:
    """A generated catalog in two parts: one listing of every product (deduplicated first), and
    the other listings (arriving later, assigned)."""
    frame = pd.DataFrame(
        [(x.product_id, x.title, x.price, x.group) for x in listings(24, seed=11)],
        columns=["id", "title", "price", "group"],
    )
    first = frame.groupby("group").head(1)
    paths = directory / "first.csv", directory / "later.csv"
    first.to_csv(paths[0], index=False)
    frame.drop(first.index).to_csv(paths[1], index=False)
    return paths


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        prodsearch(*args), capture_output=True, text=True, timeout=600, env=_env(), check=False
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def assigning_ingest(later: Path, store: Path) -> list[str]:
    return prodsearch(
        "ingest",
        str(later),
        "--store",
        str(store),
        "--assign",
        "--batch-size",
        str(BATCH_SIZE),
        "--json",
    )


def killed(later: Path, store: Path, rng: random.Random, batches: int) -> dict[str, Any]:
    """Start an assigning ingest and SIGKILL it after a random number of stored batches plus a
    random delay (inside an assignment, an upsert or the payload copies)."""
    after, delay = rng.randint(1, batches), rng.uniform(0.0, 0.4)
    process = subprocess.Popen(
        assigning_ingest(later, store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        seen = 0
        for line in process.stderr:  # type: ignore[union-attr]
            if line.startswith("ingest: "):
                seen += 1
                if seen >= after:
                    break
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        watchdog.cancel()
        process.stderr.close()  # type: ignore[union-attr]
    return {"after_batches": after, "delay": round(delay, 3), "killed": process.returncode == -9}


def clusters(store: Path) -> dict[str, str]:
    """The stored clusters (the log's members)."""
    with sqlite3.connect(store / "products.clusters.sqlite") as db:
        return dict(db.execute("SELECT product_id, cluster_id FROM members").fetchall())


def joins(store: Path) -> list[str]:
    """The products that joined or founded a cluster by assignment, in order."""
    with sqlite3.connect(store / "products.clusters.sqlite") as db:
        rows = db.execute(
            "SELECT products FROM events WHERE kind IN ('joined', 'founded') ORDER BY seq"
        ).fetchall()
    return [product for (products,) in rows for product in json.loads(products)]


@dataclass
class AssignFaults:
    """Kill-and-resume runs of assigning ingests against an uninterrupted one."""

    runs: int
    kills: list[dict[str, Any]] = field(default_factory=list)
    differing: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    assigned_twice: list[int] = field(default_factory=list)
    seconds: float = 0.0


def kill_assign_runs(workdir: Path, runs: int, seed: int = 0) -> AssignFaults:
    """An uninterrupted run (dedup of the first part, then an assigning ingest of the rest) and
    `runs` runs whose assigning ingest is killed once and re-run; compared cluster by cluster."""
    started = time.perf_counter()
    first, later = catalogs(workdir)
    expected_ids = set(pd.read_csv(first)["id"]) | set(pd.read_csv(later)["id"])
    batches = -(-len(pd.read_csv(later)) // BATCH_SIZE)

    def prepared(name: str) -> Path:
        store = workdir / name
        run("ingest", str(first), "--store", str(store))
        run("dedup", "--store", str(store), "--out", str(workdir / f"{name}.csv"))
        return store

    clean = prepared("clean")
    run(*assigning_ingest(later, clean)[1:])
    reference = clusters(clean)
    report = AssignFaults(runs)
    rng = random.Random(seed)
    for number in range(runs):
        store = prepared(f"killed{number}")
        report.kills.append(killed(later, store, rng, batches))
        run(*assigning_ingest(later, store)[1:])
        stored = clusters(store)
        if stored != reference:
            report.differing.append(number)
        if set(stored) != expected_ids:
            report.lost.append(number)
        assigned = joins(store)
        if len(assigned) != len(set(assigned)):
            report.assigned_twice.append(number)
    report.seconds = time.perf_counter() - started
    return report


@pytest.mark.slow
def test_killed_assigning_ingests_give_the_uninterrupted_clusters(tmp_path: Path) -> None:
    report = kill_assign_runs(tmp_path, runs=2, seed=3)
    assert sum(k["killed"] for k in report.kills) >= 1, report.kills
    assert report.differing == [] and report.lost == [] and report.assigned_twice == []

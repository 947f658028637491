"""Transfer benchmark: leave one catalog out, fit the pair model on the other three, decide the
held-out catalog label-free.

    .venv/bin/python benchmarks/bench_transfer.py [--data DIR] [--workdir DIR] [--before REV]
                                                  [--catalogs shopee,wdc_computers,...]

Catalogs: Shopee (fit on `val`, scored on `test`: row F1) and the three product_pairs sets (fit on
`train.txt`, scored on `valid.txt`: pair P/R/F1, a pair predicted same when either product is in
the other's match set). For each held-out catalog, in the same run:
- **this version**: the pair model fitted on the other three catalogs only (each weighing the
  same; its minimum probability chosen on their out-of-fold F1), then the held-out catalog
  decided with it, no label of it used (min-2 off);
- **char TF-IDF**: pairs above the cosine threshold tuned on the catalog's own train labels (for
  Shopee: on val, row F1 on test);
- **shipped before**: the `dedup` of revision REV (default: the one before the transfer work),
  run as a user runs it (ingest + dedup with its defaults) from a checkout of that revision.
The text encoder is the shipped one in every row (not refitted per held-out catalog: a 50-minute
fine-tuning run each; finetune/README says what it was trained on). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prodsearch.eval.metrics import Scores, pair_scores, row_scores  # noqa: E402
from prodsearch.eval.pairs import LabelledCatalog, tfidf_baseline  # noqa: E402
from prodsearch.eval.training import (  # noqa: E402
    CATALOGS,
    Labelled,
    decided,
    fit_pair_model,
    label_collection,
    open_catalog,
)
from prodsearch.index import Index  # noqa: E402
from prodsearch.labels import read_pair_file  # noqa: E402

BEFORE = "5ae7d9a"
LOG = Console(stderr=True)


def scores_of(catalog: Labelled, matched: np.ndarray) -> Scores:
    """Pair P/R/F1 over the labels, or row P/R/F1 against the groups."""
    table, collection = catalog.table, catalog.collection
    ids = table.ids
    sets = {pid: {pid} for pid in ids}
    for a, b in zip(table.a[matched].tolist(), table.b[matched].tolist(), strict=True):
        sets[ids[a]].add(ids[b])
    return _scores(collection, sets)


def _scores(collection, sets: dict[str, set[str]]) -> Scores:
    if collection.labels is not None:
        predicted = {frozenset((a, b)) for a, members in sets.items() for b in members if a != b}
        both = {frozenset((a, b)) for a, b in predicted} | {frozenset((b, a)) for a, b in predicted}
        labels = [(x.id_a, x.id_b, x.same) for x in collection.labels]
        return pair_scores(both, labels)
    groups = collection.groups
    members: dict[object, set[str]] = {}
    for pid, group in groups.items():
        members.setdefault(group, set()).add(pid)
    queries = sorted(collection.scored())
    union = {pid: set(sets.get(pid, {pid})) for pid in queries}
    for pid, found in list(union.items()):  # either direction: symmetric match sets
        for other in found:
            if other in union:
                union[other].add(pid)
    return row_scores([union[p] for p in queries], [members[groups[p]] for p in queries])


def tfidf_row(data: Path, name: str) -> Scores:
    """The char TF-IDF baseline with its threshold tuned on the catalog's own train labels."""
    if name == "shopee":
        from prodsearch.eval.shopee import _tfidf_scores  # one owner of the Shopee baseline

        return _tfidf_scores  # resolved by the caller, which holds the Shopee splits
    valid = LabelledCatalog(name, *read_pair_file(data / "product_pairs" / name / "valid.txt"))
    train = LabelledCatalog(name, *read_pair_file(data / "product_pairs" / name / "train.txt"))
    return tfidf_baseline(valid, train)[0]


def shipped_before(data: Path, name: str, revision: str, workdir: Path) -> Scores:
    """The dedup of an earlier revision, run as a user runs it, scored like this version's."""
    checkout = workdir / f"rev-{revision}"
    if not checkout.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(checkout), revision],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    if name == "shopee":
        return None  # see main: the earlier revision's Shopee figure comes from its own eval
    rows, labels = read_pair_file(data / "product_pairs" / name / "valid.txt")
    catalog, store, out = (
        workdir / f"{name}.csv",
        workdir / f"before-{name}",
        workdir / f"{name}.matches.csv",
    )
    with catalog.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "title"])
        writer.writerows([r.product_id, r.title or ""] for r in rows)
    env = {"PYTHONPATH": str(checkout / "src"), "PATH": "/usr/bin:/bin"}
    for args in (["ingest", str(catalog)], ["dedup", "--out", str(out)]):
        subprocess.run(
            [sys.executable, "-m", "prodsearch.cli", *args, "--store", str(store)],
            check=True,
            capture_output=True,
            env=env,
        )
    with out.open(encoding="utf-8") as handle:
        sets = {row["id"]: set(row["matches"].split()) for row in csv.DictReader(handle)}
    predicted = {frozenset((a, b)) for a, members in sets.items() for b in members if a != b}
    return pair_scores(predicted, [(x.id_a, x.id_b, x.same) for x in labels])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--catalogs", default=",".join(CATALOGS))
    args = parser.parse_args()
    names = args.catalogs.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prodsearch-transfer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with Index(str(workdir / "store"), "base") as base:
        fit = {n: label_collection(open_catalog(args.data, n, "fit", base, LOG)) for n in CATALOGS}
        held = {n: label_collection(open_catalog(args.data, n, "eval", base, LOG)) for n in names}
        rows = []
        for name in names:
            LOG.print(f"held out: {name}")
            model, minimum, _ = fit_pair_model([fit[n] for n in CATALOGS if n != name])
            ours = scores_of(held[name], decided(held[name], model, minimum))
            rows.append((name, minimum, ours))
    print(f"\nleave-one-catalog-out, {time.perf_counter() - started:.0f} s\n")
    print("| held-out catalog | this version: P / R / F1 (min probability) |")
    print("|---|---|")
    for name, minimum, ours in rows:
        print(
            f"| {name} | {ours.precision:.3f} / {ours.recall:.3f} / **{ours.f1:.3f}** ({minimum}) |"
        )


if __name__ == "__main__":
    main()

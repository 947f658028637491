"""Transfer benchmark: leave one catalog out, fit the pair model on the others, decide the
held-out catalog label-free.

    .venv/bin/python benchmarks/bench_transfer.py [--data DIR] [--workdir DIR] [--before REV]
                                                  [--sources shopee,wdc_computers,...]
                                                  [--text-adapter DIR]

Catalogs: Shopee (fit on `val`, scored on `test`: row F1), the three product_pairs sets (fit on
`train.txt`, scored on `valid.txt`: pair P/R/F1, a pair predicted same when either product is in
the other's match set) and Grocery Store photos (fit on `val` shop photos, scored on `test`
ones, each beside the catalogue images: row F1). For each held-out catalog, in the same run:
- **this version**: the pair model fitted on the other catalogs only (each weighing the
  same; its minimum probability chosen on their out-of-fold F1), then the held-out catalog
  decided with it, no label of it used (min-2 off);
- **char TF-IDF**: pairs above the cosine threshold tuned on the catalog's own train labels (for
  Shopee: on val, row F1 on test; none for Grocery Store, whose shop photos have no title);
- **shipped**: the shipped pair model and minimum probability (fitted on every catalog's
  fit splits, so this one's included: what a user of this version gets on it);
- **shipped before**: the `dedup` of revision REV (default: the one before the transfer work),
  run as a user runs it (ingest + dedup with its defaults) from a checkout of that revision.
The text encoder is the shipped one in every row (not refitted per held-out catalog: a 50-minute
fine-tuning run each; finetune/README says what it was trained on), or the adapter
`--text-adapter DIR` names (the pair models, the shipped one included, then decide over its
scores): e.g. the Shopee-only adapter of `python -m finetune.text --out DIR`, which has seen no
product_pairs set, for a leave-one-out of those sets whose text encoder has not seen them either.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from sklearn.feature_extraction.text import TfidfVectorizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prodsearch.encoders import EncoderSet  # noqa: E402
from prodsearch.eval.metrics import Scores, pair_scores, row_scores  # noqa: E402
from prodsearch.eval.pairs import TFIDF_GRID, LabelledCatalog, tfidf_baseline  # noqa: E402
from prodsearch.eval.training import (  # noqa: E402
    SOURCES,
    Labelled,
    decided,
    fit_pair_model,
    label_collection,
    open_source,
)
from prodsearch.index import Index  # noqa: E402
from prodsearch.labels import read_pair_file  # noqa: E402
from prodsearch.matching.pair_model import PairModel  # noqa: E402
from prodsearch.settings import Settings  # noqa: E402

BEFORE = "5ae7d9a"
LOG = Console(stderr=True)


def match_sets(catalog: Labelled, matched: np.ndarray) -> dict[str, set[str]]:
    """Each product's match set from decided pairs (either direction), itself included."""
    table = catalog.table
    sets = {pid: {pid} for pid in table.ids}
    for a, b in zip(table.a[matched].tolist(), table.b[matched].tolist(), strict=True):
        sets[table.ids[a]].add(table.ids[b])
        sets[table.ids[b]].add(table.ids[a])
    return sets


def scores_of(collection, sets: dict[str, set[str]]) -> Scores:
    """Pair P/R/F1 over a pair-labelled catalog's labels (a pair predicted same when either is in
    the other's set); row P/R/F1 of a group-labelled catalog's scored products."""
    if collection.labels is not None:
        predicted = {frozenset((a, b)) for a, members in sets.items() for b in members if a != b}
        return pair_scores(predicted, [(x.id_a, x.id_b, x.same) for x in collection.labels])
    groups = collection.groups
    members: dict[object, set[str]] = {}
    for pid, group in groups.items():
        members.setdefault(group, set()).add(pid)
    queries = sorted(collection.scored())
    return row_scores([sets.get(p, {p}) for p in queries], [members[groups[p]] for p in queries])


def tfidf(data: Path, name: str, fit, held) -> Scores | None:
    """The char TF-IDF baseline, its threshold tuned on the catalog's own train labels (Shopee:
    on val, scored on test); None for Grocery Store (its shop photos have no title)."""
    if name == "grocery":
        return None
    if name not in ("shopee", "grocery"):
        folder = data / "product_pairs" / name
        valid = LabelledCatalog(name, *read_pair_file(folder / "valid.txt"))
        train = LabelledCatalog(name, *read_pair_file(folder / "train.txt"))
        return tfidf_baseline(valid, train)[0]
    threshold = max(TFIDF_GRID, key=lambda t: scores_of(fit, tfidf_sets(fit, t)).f1)
    return scores_of(held, tfidf_sets(held, threshold))


def tfidf_sets(collection, threshold: float) -> dict[str, set[str]]:
    """Each product's match set: the products whose title's char TF-IDF cosine reaches
    `threshold` (the vectorizer fitted on the catalog)."""
    ids = [p.product_id for p in collection.products]
    titles = [str(p.payload.get("title") or "") for p in collection.products]
    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5)).fit_transform(titles)
    similarity = (vectors @ vectors.T).tocsr()
    sets = {}
    for i, pid in enumerate(ids):
        row = similarity.getrow(i)
        sets[pid] = {ids[j] for j in row.indices[row.data >= threshold]} | {pid}
    return sets


def shipped_before(data: Path, name: str, revision: str, workdir: Path, held) -> Scores:
    """The `dedup` of an earlier revision, run as a user runs it (ingest + dedup with that
    revision's defaults, from a checkout of it), scored like this version's."""
    checkout = workdir / f"rev-{revision}"
    if not checkout.exists():
        command = ["git", "worktree", "add", "--detach", str(checkout), revision]
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    catalog, store = workdir / f"{name}-before.csv", workdir / f"before-{name}"
    out = workdir / f"{name}-before.matches.csv"
    with catalog.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        fields = {"shopee": ["image_phash"], "grocery": ["image_path"]}.get(name, [])
        writer.writerow(["id", "title", *fields])
        for p in held.products:
            extra = [p.payload.get(f, "") for f in fields]
            writer.writerow([p.product_id, p.payload.get("title") or "", *extra])
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    for args in (["ingest", str(catalog)], ["dedup", "--out", str(out)]):
        command = [sys.executable, "-m", "prodsearch.cli", *args, "--store", str(store)]
        subprocess.run(command, check=True, capture_output=True, env=env)
    with out.open(encoding="utf-8") as handle:
        sets = {row["id"]: set(row["matches"].split()) for row in csv.DictReader(handle)}
    return scores_of(held, sets)


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--text-adapter", type=Path, default=None, help="default: the shipped")
    args = parser.parse_args()
    names = args.sources.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prodsearch-transfer-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    shipped = PairModel.load()
    shipped_minimum = Settings().dedup.pair_model.min_probability
    settings = Settings()
    encoders = EncoderSet.default(settings.text_max_tokens, text_adapter=args.text_adapter)
    if args.text_adapter is not None:
        LOG.print(f"text encoder: the adapter in {args.text_adapter}")
    with Index(str(workdir / "store"), "base", settings, encoders) as base:
        fit = {
            n: [label_collection(c) for c in open_source(args.data, n, "fit", base, LOG)]
            for n in SOURCES
        }
        held = {n: label_collection(open_source(args.data, n, "eval", base, LOG)[0]) for n in names}
        for name in names:
            LOG.print(f"held out: {name}")
            others = {n: group for n, group in fit.items() if n != name}
            model, minimum, _ = fit_pair_model(others, LOG, workdir / "store" / "models")
            sets = match_sets(held[name], decided(held[name], model, minimum))
            ours = scores_of(held[name].collection, sets)
            baseline = tfidf(args.data, name, fit[name][0].collection, held[name].collection)
            try:
                before = shipped_before(
                    args.data, name, args.before, workdir, held[name].collection
                )
            except subprocess.CalledProcessError as exc:
                LOG.print(f"shipped before, {name}: failed: {exc.stderr[-500:]!r}")
                before = None
            shipped_sets = match_sets(held[name], decided(held[name], shipped, shipped_minimum))
            shipped_scores = scores_of(held[name].collection, shipped_sets)
            rows.append((name, minimum, ours, baseline, shipped_scores, before))
    print_table(rows, time.perf_counter() - started)


def print_table(rows: list, seconds: float) -> None:
    """The markdown table of the leave-one-catalog-out run."""
    print(f"\nleave-one-catalog-out ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})\n")
    header = [
        "held-out catalog (metric)",
        "this version, fitted without it: P / R / F1",
        "char TF-IDF, threshold from its own train",
        "shipped (fitted on all)",
        "shipped before",
    ]
    print("| " + " | ".join(header) + " |")
    print("|---|---|---|---|---|")
    for name, minimum, *scores in rows:
        cells = [f"{s.precision:.3f} / {s.recall:.3f} / {s.f1:.3f}" if s else "-" for s in scores]
        metric = "row" if name in ("shopee", "grocery") else "pair"
        print(
            f"| {name} ({metric}) | **{cells[0]}** (p >= {minimum}) | "
            + " | ".join(cells[1:])
            + " |"
        )


if __name__ == "__main__":
    main()

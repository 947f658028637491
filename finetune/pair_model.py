"""Fit the shipped pair model on every labelled source: Shopee `val` and the product_pairs `train`
splits (wdc_computers, wdc_cameras, amazon_google), each in two structures.

    .venv/bin/python -m finetune.pair_model [--data DIR] [--store DIR] [--out FILE]
                                            [--sources shopee,wdc_computers,...]

Each catalog is ingested into its own collection of `--store` (kept: a re-run skips the
products already there), its candidate pairs collected, featured and labelled
(`prodsearch.eval.training`), then one model is fitted on all of them, each catalog weighing the
same; its minimum probability is the one with the best mean F1 over the sources when each is
left out in turn and decided by a model fitted on the others. Writes the model to FILE (default:
the shipped `assets/pair_model.json`) and a manifest beside it; prints the minimum probability
to put in settings.py. Shopee `test` and every `valid.txt` are never read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from finetune.common import DATA
from prodsearch.eval.training import SOURCES, fit_pair_model, label_collection, open_source
from prodsearch.index import Index
from prodsearch.matching.pair_model import SHIPPED_PAIR_MODEL


def main() -> None:
    """Fit and write the pair model (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--store", default="/tmp/prodsearch-pair-model")
    parser.add_argument("--out", type=Path, default=SHIPPED_PAIR_MODEL)
    parser.add_argument("--sources", default=",".join(SOURCES))
    args = parser.parse_args()
    console = Console(stderr=True)
    started = time.perf_counter()
    with Index(args.store, "pair-model-base") as base:
        sources = {}
        for name in args.sources.split(","):
            console.print(f"{name}: ingest, candidates, features")
            opened = open_source(args.data, name, "fit", base, console)
            sources[name] = [label_collection(c) for c in opened]
        model, minimum, held_out = fit_pair_model(sources, console, Path(args.store) / "models")
    model.save(args.out)
    manifest = {
        "catalogs": {
            c.name: {"products": len(c.table.ids), "pairs": len(c.table)}
            for group in sources.values()
            for c in group
        },
        "min_probability": minimum,
        "held_out_f1": held_out,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

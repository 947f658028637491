"""Fit the shipped pair model on every labelled catalog: Shopee `val` and the product_pairs `train`
splits (wdc_computers, wdc_cameras, amazon_google).

    .venv/bin/python -m finetune.pair_model [--data DIR] [--store DIR] [--out FILE]
                                            [--catalogs shopee,wdc_computers,...]

Each catalog is ingested into its own collection of `--store` (kept: a re-run skips the
products already there), its candidate pairs collected, featured and labelled
(`prodsearch.eval.training`), then one stacked model is fitted on all of them, each catalog
weighing the same, and its minimum probability chosen for the best mean out-of-fold F1 over the
catalogs. Writes the model to FILE (default: the shipped `assets/pair_model.json`) and a
manifest beside it. Shopee `test` and every `valid.txt` are never read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from finetune.common import DATA
from prodsearch.eval.training import CATALOGS, fit_pair_model, label_collection, open_catalog
from prodsearch.index import Index
from prodsearch.matching.pair_model import SHIPPED_PAIR_MODEL


def main() -> None:
    """Fit and write the pair model (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--store", default="/tmp/prodsearch-pair-model")
    parser.add_argument("--out", type=Path, default=SHIPPED_PAIR_MODEL)
    parser.add_argument("--catalogs", default=",".join(CATALOGS))
    args = parser.parse_args()
    console = Console(stderr=True)
    started = time.perf_counter()
    with Index(args.store, "pair-model-base") as base:
        labelled = []
        for name in args.catalogs.split(","):
            console.print(f"{name}: ingest, candidates, features")
            labelled.append(label_collection(open_catalog(args.data, name, "fit", base, console)))
        console.print("fitting the pair model")
        model, minimum, f1 = fit_pair_model(labelled)
    model.save(args.out)
    manifest = {
        "catalogs": {
            c.name: {
                "products": len(c.table.ids),
                "pairs": len(c.table),
                "out_of_fold_f1": f1[c.name],
            }
            for c in labelled
        },
        "min_probability": minimum,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.with_suffix(".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    console.print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

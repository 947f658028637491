"""Quality benchmark: pretrained vs ArcFace-fine-tuned encoders, in one run.

    .venv/bin/python benchmarks/bench_quality.py [--data DIR] [--skip-shopee] [--skip-images]

Shopee: `prodsearch eval` for each encoder set (thresholds and fusion tuned on val, reported on
test). Grocery Store: top-1 accuracy of the nearest catalogue image and mAP@R among test photos.
Prints markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from prodsearch.encoders import EncoderSet
from prodsearch.eval.images import grocery_image_metrics
from prodsearch.eval.shopee import run_evaluation
from prodsearch.settings import Settings

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(stderr=True, quiet=True)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--skip-shopee", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    log = Console(stderr=True)
    sets = {"pretrained": EncoderSet.pretrained(), "fine-tuned": EncoderSet.default()}

    if not args.skip_images:
        rows = []
        for name, encoders in sets.items():
            log.print(f"grocery image metrics, {name}")
            start = time.perf_counter()
            for subset, values in grocery_image_metrics(
                args.data / "grocery_store", encoders
            ).items():
                rows.append(
                    [
                        name,
                        subset,
                        str(values["test_photos"]),
                        f"{values['map_at_r']:.4f}",
                        f"{values['top1_to_catalogue']:.4f}",
                    ]
                )
            log.print(f"  {time.perf_counter() - start:.0f} s")
        print("## Grocery Store test photos: image encoder\n")
        print(table(["encoder", "subset", "test photos", "mAP@R", "top-1 to catalogue"], rows))
        print()

    if not args.skip_shopee:
        results = {}
        for name, encoders in sets.items():
            log.print(f"Shopee eval, {name} encoders")
            results[name] = run_evaluation(
                args.data / "shopee" / "train.csv",
                args.data / "shopee" / "split.csv",
                settings=Settings(),
                encoders=encoders,
                console=QUIET,
            )
        methods = sorted(
            {m.method for r in results.values() for m in r.methods},
            key=lambda m: (not m.startswith("baseline"), m.startswith("fused"), m),
        )
        rows = []
        for method in methods:
            cells = [method]
            for name in sets:
                found = [m for m in results[name].methods if m.method == method]
                cells.append(f"{found[0].test.f1:.4f}" if found else "-")
            rows.append(cells)
        print("## Shopee test F1 (tuned on val): pretrained vs fine-tuned encoders\n")
        print(table(["method", *sets], rows))
        for name, result in results.items():
            print(f"\n{name}: tuned settings {result.tuned}; eval took {result.seconds:.0f} s")


if __name__ == "__main__":
    main()

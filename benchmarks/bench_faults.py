"""Kill-and-resume benchmark: ingests SIGKILLed at random points, each re-run to completion.

    .venv/bin/python benchmarks/bench_faults.py [--runs 20] [--seed 0] [--assign]

`--runs` times, a revision of the sample catalog (62 products with photos; every title and a
payload column changed per revision, so every point is rewritten) is ingested into one embedded
store by a real `prodsearch ingest` process that is SIGKILLed after a random number of stored
batches plus a random delay (seeded), then re-run to completion. The store is then compared with
a clean ingest of the last revision into a separate store (the harness is
tests/test_faults.py's `kill_resume_cycles`). Prints a markdown table on stdout.

`--assign`: assigning ingests instead (issue 17's bar, 10 runs): a generated catalog's first
listings deduplicated, its other listings ingested with `--assign` in batches of 4, SIGKILLed at
a random point and re-run; each run's stored clusters against an uninterrupted run's (the harness
is tests/test_faults_assign.py's `kill_assign_runs`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_faults import FLOAT16_ATOL, kill_resume_cycles  # noqa: E402
from tests.test_faults_assign import kill_assign_runs  # noqa: E402


def main() -> None:
    """Run the cycles, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="kill-and-resume cycles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assign", action="store_true", help="assigning ingests (clusters)")
    args = parser.parse_args()
    if args.assign:
        assigning(args.runs, args.seed)
        return
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        report = kill_resume_cycles(Path(tmp), args.runs, args.seed)
    killed = sum(k["killed"] for k in report.kills)
    for number, (kill, unchanged) in enumerate(
        zip(report.kills, report.resumed_unchanged, strict=True), 1
    ):
        print(
            f"run {number}: kill after {kill['after_batches']} batches + {kill['delay']} s, "
            f"killed={kill['killed']}, re-run found {unchanged} already stored",
            file=sys.stderr,
        )
    print(
        f"### Kill-and-resume: sample catalog ({report.expected} products with photos), "
        f"seed {args.seed}, {os.cpu_count()} CPUs\n"
    )
    print(
        "| runs | killed mid-run | products lost | duplicates | stale (older revision) "
        "| max vector difference | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {report.cycles} | {killed} | {len(report.lost)} | {report.duplicates} | "
        f"{len(report.stale)} | {report.max_vector_difference:.2e} "
        f"(tolerance {FLOAT16_ATOL:g}) | {report.seconds:,.0f} |"
    )
    per_vector = ", ".join(f"{k} {v:.2e}" for k, v in sorted(report.max_difference.items()))
    print(
        f"\nmax difference per vector: {per_vector}; stored points {report.stored}, "
        f"count {report.count}, unretrievable {len(report.unretrievable)}, payload mismatches "
        f"{len(report.payload_mismatches)}, vector mismatches {len(report.vector_mismatches)}"
    )


def assigning(runs: int, seed: int) -> None:
    """Kill-and-resume runs of assigning ingests; print their table."""
    with tempfile.TemporaryDirectory(prefix="bench-faults-assign-") as tmp:
        report = kill_assign_runs(Path(tmp), runs, seed)
    for number, kill in enumerate(report.kills, 1):
        print(
            f"run {number}: kill after {kill['after_batches']} batches + {kill['delay']} s, "
            f"killed={kill['killed']}",
            file=sys.stderr,
        )
    killed = sum(k["killed"] for k in report.kills)
    print(f"### Kill-and-resume of assigning ingests, seed {seed}, {os.cpu_count()} CPUs\n")
    print(
        "| runs | killed mid-run | clusters differing from uninterrupted | products lost "
        "| assigned twice | seconds |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {report.runs} | {killed} | {len(report.differing)} | {len(report.lost)} | "
        f"{len(report.assigned_twice)} | {report.seconds:,.0f} |"
    )


if __name__ == "__main__":
    main()

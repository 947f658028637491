"""Load benchmark of the HTTP API: concurrent clients against a real `prodsearch serve` process.

    .venv/bin/python benchmarks/bench_load.py [--clients 50] [--duration 60] [--products 5000]
                                              [--workload title|image] [--data ../shared/data]

Ingests a slice of Shopee `train.csv` (titles + image_phash; `--products` rows) into a temporary
embedded store with `prodsearch ingest`, starts `prodsearch serve` on a free loopback port, and
has `--clients` concurrent clients (asyncio + httpx, one connection each) send POST /match for
`--duration` seconds: titles with their phash taken from Shopee rows that are not in the catalog
(`title`), or the sample catalog's photos as base64 (`image`, against the sample catalog). Prints
a markdown table on stdout (progress on stderr): requests/s, p50 / p95 / p99 latency, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "ingest" / "sample"
WARM_UP_REQUESTS = 20


def log(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli(*args: str) -> list[str]:
    """The command line of a prodsearch subcommand run with this interpreter."""
    return [sys.executable, "-m", "prodsearch.cli", *args]


def title_workload(data: Path, products: int, workdir: Path) -> tuple[Path, str, list[dict]]:
    """A Shopee catalog of `products` rows, and queries from the rows after them."""
    frame = pd.read_csv(data / "shopee" / "train.csv").sample(frac=1.0, random_state=0)
    catalog = workdir / "catalog.csv"
    frame.iloc[:products].to_csv(catalog, index=False)
    queries = [
        {"title": row.title, "phash": row.image_phash}
        for row in frame.iloc[products : products + 2_000].itertuples()
    ]
    return catalog, "shopee", queries


def image_workload() -> tuple[Path, str, list[dict]]:
    """The sample catalog, and its photos (catalogue and store photos) as queries."""
    photos = sorted((SAMPLE / "images").glob("*.jpg")) + sorted((SAMPLE / "queries").glob("*"))
    queries = [{"image_base64": base64.b64encode(p.read_bytes()).decode()} for p in photos]
    return SAMPLE / "catalog.csv", "generic", queries


def percentile(samples: list[float], q: int) -> float:
    """The q-th percentile (1-99) of `samples`."""
    return statistics.quantiles(samples, n=100)[q - 1]


async def run_clients(
    base: str, queries: list[dict], clients: int, duration: float
) -> tuple[list[float], int, float]:
    """Run `clients` loops of POST /match for `duration` s; return latencies (ms), errors, time."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        for query in queries[:WARM_UP_REQUESTS]:
            (await client.post("/match", json=query)).raise_for_status()
        stop = time.perf_counter() + duration

        async def one_client(offset: int) -> None:
            nonlocal errors
            for query in cycle(queries[offset:] + queries[:offset]):
                if time.perf_counter() >= stop:
                    return
                start = time.perf_counter()
                try:
                    response = await client.post("/match", json=query)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - start) * 1000)
                else:
                    errors += 1

        started = time.perf_counter()
        step = max(1, len(queries) // clients)
        await asyncio.gather(*(one_client(i * step % len(queries)) for i in range(clients)))
        return latencies, errors, time.perf_counter() - started


def wait_for_health(base: str, server: subprocess.Popen, server_log: Path) -> dict[str, Any]:
    """Poll /health until the server answers (it loads the models first)."""
    deadline = time.monotonic() + 600
    while True:
        if server.poll() is not None:
            raise SystemExit(f"prodsearch serve exited:\n{server_log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{base}/health", timeout=2).json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise SystemExit("prodsearch serve did not answer /health in 10 minutes") from None
            time.sleep(0.5)


def main() -> None:
    """Ingest, serve, load, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--products", type=int, default=5_000, help="Shopee catalog size")
    parser.add_argument("--workload", choices=("title", "image"), default="title")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = Path(tmp)
        if args.workload == "title":
            catalog, recipe, queries = title_workload(args.data, args.products, workdir)
        else:
            catalog, recipe, queries = image_workload()
        store = str(workdir / "store")
        log(f"ingesting {catalog} ...")
        subprocess.run(
            cli("ingest", str(catalog), "--recipe", recipe, "--store", store, "--json"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server_log = workdir / "serve.log"
        with server_log.open("w") as sink:
            server = subprocess.Popen(
                cli("serve", "--port", str(port), "--store", store),
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PRODSEARCH_API_KEY": ""},
            )
            try:
                health = wait_for_health(base, server, server_log)
                log(
                    f"serving {health['products']} products; {args.clients} clients for "
                    f"{args.duration:.0f} s ..."
                )
                latencies, errors, seconds = asyncio.run(
                    run_clients(base, queries, args.clients, args.duration)
                )
            finally:
                server.terminate()
                server.wait(timeout=60)

    requests = len(latencies) + errors
    print(
        f"### POST /match, {args.workload} queries, {health['products']:,} products "
        f"(embedded engine), {args.clients} clients, {seconds:.0f} s, {os.cpu_count()} CPUs\n"
    )
    print("| requests | requests/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {requests:,} | {len(latencies) / seconds:,.1f} | "
        f"{statistics.median(latencies):,.0f} | {percentile(latencies, 95):,.0f} | "
        f"{percentile(latencies, 99):,.0f} | {errors} |"
    )


if __name__ == "__main__":
    main()

"""Load benchmark of the HTTP API: concurrent clients against a real `prodsearch serve` process.

    .venv/bin/python benchmarks/bench_load.py [--clients 50] [--duration 60] [--products 5000]
        [--workload title|image] [--mixed] [--soak MINUTES] [--settle S] [--runs N]
        [--store DIR] [--pool shared|per-client] [--client-keepalive S] [--log-level L]
        [--server-log F] [--data DIR]

Ingests a slice of Shopee `train.csv` (titles + image_phash; `--products` rows) into an embedded
store with `prodsearch ingest` (a temporary one, or `--store DIR`, kept and re-used: a re-run
ingest skips unchanged products), starts `prodsearch serve` on a free loopback port, and has
`--clients` concurrent clients (asyncio + httpx; one shared keep-alive connection pool, as a load
balancer holds, or `--pool per-client`) send requests for `--duration` seconds:

- `title`: POST /match with titles and their phash from Shopee rows that are not in the catalog;
- `image`: POST /match with the sample catalog's photos (base64), against the sample catalog;
- `--mixed`: the operations of MIXED, drawn by weight: title matches, title + photo matches
  (the sample catalog is ingested into the same collection), batch upserts (new products, then
  new revisions of them), deletes of those, product reads. A new endpoint is one more
  `Operation` in MIXED.

`--soak MINUTES` runs for that long (instead of `--duration`) and logs the server's RSS and
open file descriptors every minute. Every run reports requests/s, p50 / p95 / p99 latency of
the answered requests, the unexpected failures by kind (HTTP status, or the client exception's
class, such as ReadError for a connection closed without an answer) with a sample of each,
the requests shed with 503 + Retry-After (overload, counted apart; the client waits as told),
/health's latency (polled every second during the load), the server's RSS (and its file-backed
part: the engine's mapped segments) and open file descriptors after `--settle` seconds of load
(the engine's segments take minutes of writes to reach their working set) and at the end, and
the machine's load average. Markdown on stdout, progress on stderr; exit code 1 when any
request failed unexpectedly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "ingest" / "sample"
WARM_UP_REQUESTS = 20
HEALTH_EVERY_S = 1.0
SERVER_TOTAL = re.compile(r"total;dur=([0-9.]+)")
UPSERT_BATCH = 10
UPSERT_IDS = 2_000


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


# -- what the clients send --------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One HTTP request."""

    method: str
    path: str
    json: dict[str, Any] | None = None


@dataclass
class Workload:
    """What the clients draw their requests from, and the ids the mixed workload wrote."""

    catalogs: list[list[str]]  # `prodsearch ingest` arguments, one list per catalog
    titles: list[dict[str, Any]]  # match bodies: title + phash of rows outside the catalog
    photos: list[dict[str, Any]] = field(default_factory=list)  # match bodies with an image
    new_products: Iterator[dict[str, Any]] = field(default_factory=lambda: iter(()))
    catalog_ids: list[str] = field(default_factory=list)
    written: deque[str] = field(default_factory=deque)  # upserted, not yet deleted


@dataclass(frozen=True)
class Operation:
    """A kind of request: how to build one, how often (weight), which statuses are right, and
    what to remember from a right answer."""

    name: str
    weight: int
    build: Callable[[Workload, random.Random], Call]
    expected: frozenset[int] = frozenset({200})
    after: Callable[[Workload, Call, httpx.Response], None] | None = None


def _match_title(work: Workload, rng: random.Random) -> Call:
    return Call("POST", "/match", rng.choice(work.titles))


def _match_photo(work: Workload, rng: random.Random) -> Call:
    return Call("POST", "/match", rng.choice(work.photos))


def _upsert(work: Workload, rng: random.Random) -> Call:
    return Call(
        "POST", "/products", {"products": list(itertools.islice(work.new_products, UPSERT_BATCH))}
    )


def _remember_written(work: Workload, call: Call, response: httpx.Response) -> None:
    work.written.extend(p["id"] for p in (call.json or {})["products"])


def _delete(work: Workload, rng: random.Random) -> Call:
    # The oldest product the run wrote (so the collection does not grow), else one never stored.
    product_id = work.written.popleft() if work.written else "bench-never-stored"
    return Call("DELETE", f"/products/{product_id}")


def _get(work: Workload, rng: random.Random) -> Call:
    return Call("GET", f"/products/{rng.choice(work.catalog_ids)}")


TITLE = [Operation("match title", 1, _match_title)]
IMAGE = [Operation("match image", 1, _match_photo)]
MIXED = [
    Operation("match title", 60, _match_title),
    Operation("match title + image", 15, _match_photo),
    Operation("upsert 10 products", 10, _upsert, after=_remember_written),
    Operation("delete product", 10, _delete, frozenset({200, 404})),
    Operation("get product", 5, _get),
]


def shopee_rows(data: Path, products: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Shopee rows in a fixed random order: the catalog's `products`, and the rows after it."""
    frame = pd.read_csv(data / "shopee" / "train.csv").sample(frac=1.0, random_state=0)
    return frame.iloc[:products], frame.iloc[products:]


def title_workload(data: Path, products: int, workdir: Path) -> Workload:
    """A Shopee catalog of `products` rows, and title + phash queries from the rows after them."""
    catalog, rest = shopee_rows(data, products)
    path = workdir / "catalog.csv"
    catalog.to_csv(path, index=False)
    return Workload(
        catalogs=[[str(path), "--recipe", "shopee"]],
        titles=[{"title": r.title, "phash": r.image_phash} for r in rest.iloc[:2_000].itertuples()],
        catalog_ids=catalog["posting_id"].tolist(),
    )


def _photos() -> list[Path]:
    """The sample catalog's photos (catalogue and store photos) and its query photos."""
    return sorted((SAMPLE / "images").glob("*.jpg")) + sorted((SAMPLE / "queries").glob("*"))


def _photo_queries() -> list[dict[str, Any]]:
    """The sample photos as base64 match bodies."""
    return [{"image_base64": base64.b64encode(p.read_bytes()).decode()} for p in _photos()]


def image_workload() -> Workload:
    """The sample catalog, and its photos as queries."""
    return Workload(
        catalogs=[[str(SAMPLE / "catalog.csv"), "--recipe", "generic"]],
        titles=[],
        photos=_photo_queries(),
    )


def mixed_workload(data: Path, products: int, workdir: Path) -> Workload:
    """The title workload's catalog plus the sample catalog (titles and photos); photo queries
    carry the sample product's title; upserts draw Shopee rows outside catalog and queries."""
    work = title_workload(data, products, workdir)
    sample = pd.read_csv(SAMPLE / "catalog.csv").dropna(subset=["title"])
    titles = dict(zip(sample["product"], sample["title"], strict=True))
    photos = _photo_queries()
    for body, path in zip(photos, _photos(), strict=True):
        # images/Arla-Standard-Milk-1234.jpg and queries/Arla-Standard-Milk.jpg: the product
        body["title"] = titles.get(path.stem.rstrip("0123456789").rstrip("-"))
    work.catalogs.append(
        [str(SAMPLE / "catalog.csv"), "--recipe", "generic", "--images-dir", str(SAMPLE)]
    )
    work.photos = photos
    # Upserts cycle over a fixed set of ids with a new revision each time (so each is written,
    # and the collection stays within catalog + UPSERT_IDS products however long the run).
    _, rest = shopee_rows(data, products)
    rows = list(rest.iloc[2_000 : 2_000 + UPSERT_IDS].itertuples())
    work.new_products = (
        {
            "id": f"bench-{n % len(rows)}",
            "title": rows[n % len(rows)].title,
            "image_phash": rows[n % len(rows)].image_phash,
            "payload": {"source": "bench", "revision": n // len(rows)},
        }
        for n in itertools.count()
    )
    return work


# -- running the clients ----------------------------------------------------------------------
@dataclass
class Tally:
    """What one operation's requests got."""

    latencies_ms: list[float] = field(default_factory=list)
    shed_ms: list[float] = field(default_factory=list)  # 503 + Retry-After: counted apart
    server_ms: list[float] = field(default_factory=list)  # Server-Timing total, when sent
    failures: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)

    def fail(self, kind: str, sample: str) -> None:
        self.failures[kind] += 1
        self.samples.setdefault(kind, sample)


def _shed_wait(response: httpx.Response) -> float | None:
    """The seconds to wait when the server shed the request (503 + Retry-After), else None."""
    retry_after = response.headers.get("retry-after", "")
    if response.status_code != 503 or not retry_after.isdigit():
        return None
    return float(retry_after)


async def send(
    client: httpx.AsyncClient,
    work: Workload,
    operation: Operation,
    tally: Tally,
    rng: random.Random,
) -> float:
    """Send one request of `operation`, record what it got; return the seconds to wait after."""
    call = operation.build(work, rng)
    start = time.perf_counter()
    try:
        response = await client.request(call.method, call.path, json=call.json)
    except httpx.HTTPError as exc:
        tally.fail(type(exc).__name__, f"{call.method} {call.path} {_brief(call)}: {exc!r}")
        return 0.0
    if timing := SERVER_TOTAL.search(response.headers.get("server-timing", "")):
        tally.server_ms.append(float(timing.group(1)))
    if response.status_code in operation.expected:
        tally.latencies_ms.append((time.perf_counter() - start) * 1000)
        if operation.after:
            operation.after(work, call, response)
        return 0.0
    if (wait := _shed_wait(response)) is not None:
        tally.shed_ms.append((time.perf_counter() - start) * 1000)
        return wait
    tally.fail(
        f"HTTP {response.status_code}",
        f"{call.method} {call.path} {_brief(call)}: {response.text[:300]}",
    )
    return 0.0


def _brief(call: Call) -> str:
    """The request body in a few words (the title, not the base64)."""
    if not call.json:
        return ""
    if "products" in call.json:
        return f"({len(call.json['products'])} products)"
    return repr({k: v for k, v in call.json.items() if k != "image_base64"})[:120]


async def poll_health(base: str, stop: float, tally: Tally) -> None:
    """GET /health every second on a connection of its own until `stop`."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while time.perf_counter() < stop:
            await send(
                client,
                Workload([], []),
                Operation("health", 1, lambda w, r: Call("GET", "/health")),
                tally,
                random.Random(),
            )
            await asyncio.sleep(HEALTH_EVERY_S)


def _client(
    base: str, connections: int, keepalive_s: float, tls: ssl.SSLContext
) -> httpx.AsyncClient:
    """An HTTP client with a pool of up to `connections` keep-alive connections (`tls`: shared,
    as httpx would otherwise build one per client, tens of ms each)."""
    limits = httpx.Limits(
        max_connections=connections,
        max_keepalive_connections=connections,
        keepalive_expiry=keepalive_s,
    )
    return httpx.AsyncClient(base_url=base, limits=limits, timeout=120, verify=tls)


@dataclass
class Run:
    """What a run measured: a Tally per operation (and one for /health), its seconds, the
    server's resources (server_resources) after `--settle` s of load and at its end, and the
    client's own event-loop lags (ms)."""

    tallies: dict[str, Tally]
    seconds: float
    resources: list[tuple[float, float, int]]
    client_lags_ms: list[float]


async def run_clients(
    base: str, work: Workload, operations: list[Operation], args: argparse.Namespace, pid: int
) -> Run:
    """Run `args.clients` loops drawing operations by weight for the run's duration."""
    tallies = {op.name: Tally() for op in operations} | {"health": Tally()}
    tls = ssl.create_default_context()
    if args.pool == "shared":
        pools = [_client(base, args.clients, args.client_keepalive, tls)]
    else:
        pools = [_client(base, 1, args.client_keepalive, tls) for _ in range(args.clients)]
    async with AsyncExitStack() as opened:
        for pool in pools:
            await opened.enter_async_context(pool)
        for query in (work.titles or work.photos)[:WARM_UP_REQUESTS]:
            (await pools[0].post("/match", json=query)).raise_for_status()
        stop = time.perf_counter() + (args.soak * 60 if args.soak else args.duration)
        weights = [op.weight for op in operations]

        async def one_client(seed: int) -> None:
            rng, client = random.Random(seed), pools[seed % len(pools)]
            while time.perf_counter() < stop:
                operation = rng.choices(operations, weights)[0]
                wait = await send(client, work, operation, tallies[operation.name], rng)
                await asyncio.sleep(wait)

        started = time.perf_counter()
        _, lags, resources, *_ = await asyncio.gather(
            poll_health(base, stop, tallies["health"]),
            loop_lags(stop),
            watch_server(pid, stop, args.settle, 60 if args.soak else None),
            *(one_client(i) for i in range(args.clients)),
        )
        return Run(tallies, time.perf_counter() - started, resources, lags)


async def loop_lags(stop: float) -> list[float]:
    """How late (ms) this client's event loop wakes from 50 ms sleeps until `stop`: when it is
    late, the client itself (its CPU share) adds to the latencies it measures."""
    lags = []
    while time.perf_counter() < stop:
        before = time.perf_counter()
        await asyncio.sleep(0.05)
        lags.append((time.perf_counter() - before - 0.05) * 1000)
    return lags


# -- the server -------------------------------------------------------------------------------
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


def server_resources(pid: int) -> tuple[float, float, int]:
    """The server process's RSS and its file-backed part (MB; the engine maps its segment files)
    and its open file descriptors."""
    process = psutil.Process(pid)
    memory = process.memory_info()
    return memory.rss / 1e6, memory.shared / 1e6, process.num_fds()


async def watch_server(
    pid: int, stop: float, settle_s: float, every_s: float | None
) -> list[tuple[float, float, int]]:
    """The server's resources (server_resources) after `settle_s` of load and 1 s before `stop`
    (the same clients connected both times); logged every `every_s` in between when given."""
    await asyncio.sleep(settle_s)
    seen = [server_resources(pid)]
    while (left := stop - 1 - time.perf_counter()) > 0:
        await asyncio.sleep(min(every_s or left, left))
        if every_s:
            rss, mapped, fds = server_resources(pid)
            log(
                f"  server RSS {rss:,.0f} MB ({mapped:,.0f} file-backed), {fds} open fds; "
                f"load average {os.getloadavg()[0]:.2f}"
            )
    return [*seen, server_resources(pid)]


def ingest(work: Workload, store: str) -> None:
    """Ingest the workload's catalogs into `store`."""
    for catalog in work.catalogs:
        log(f"ingesting {catalog[0]} ...")
        subprocess.run(
            cli("ingest", *catalog, "--store", store, "--json"),
            check=True,
            stdout=subprocess.DEVNULL,
        )


# -- the report -------------------------------------------------------------------------------
def percentile(samples: list[float], q: int) -> float:
    """The q-th percentile (1-99) of `samples` (0 with fewer than two)."""
    return statistics.quantiles(samples, n=100)[q - 1] if len(samples) > 1 else 0.0


def row(name: str, tally: Tally, seconds: float) -> str:
    """A table row: requests, answered per second, latency percentiles of the answered ones,
    failures, shed requests and how long their 503 took (p99), and the server's own time
    (Server-Timing) for all (p99)."""
    ok, shed = tally.latencies_ms, tally.shed_ms
    failed = sum(tally.failures.values())
    median = statistics.median(ok) if ok else 0.0
    return (
        f"| {name} | {len(ok) + len(shed) + failed:,} | {len(ok) / seconds:,.1f} | "
        f"{median:,.0f} | {percentile(ok, 95):,.0f} | {percentile(ok, 99):,.0f} | "
        f"{failed} | {len(shed):,} | {percentile(shed, 99):,.0f} | "
        f"{percentile(tally.server_ms, 99):,.0f} |"
    )


def report(run: Run, settle_s: float, loads: tuple[float, float]) -> int:
    """Print the run's tables; return the number of unexpected failures."""
    tallies, seconds = run.tallies, run.seconds
    print(
        "| operation | requests | answered/s | p50 ms | p95 ms | p99 ms | errors | shed (503) "
        "| 503 p99 ms | server p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    load = {k: t for k, t in tallies.items() if k != "health"}
    for name, tally in [*(load.items() if len(load) > 1 else []), ("all", _merged(load.values()))]:
        print(row(name, tally, seconds))
    health = tallies["health"].latencies_ms or [0.0]
    print(
        f"\n/health during the load: {len(tallies['health'].latencies_ms)} answered, p50 "
        f"{statistics.median(health):,.0f} ms, max {max(health):,.0f} ms, "
        f"{sum(tallies['health'].failures.values())} failed"
    )
    (rss0, mapped0, fds0), (rss1, mapped1, fds1) = run.resources
    print(
        f"server after {settle_s:.0f} s of load -> at its end: RSS {rss0:,.0f} -> {rss1:,.0f} MB "
        f"({(rss1 - rss0) / rss0:+.1%}; file-backed {mapped0:,.0f} -> {mapped1:,.0f} MB), "
        f"open fds {fds0} -> {fds1}; load average {loads[0]:.2f} -> {loads[1]:.2f}; "
        f"client event-loop lag p99 {percentile(run.client_lags_ms, 99):,.0f} ms, "
        f"max {max(run.client_lags_ms, default=0):,.0f} ms"
    )
    failures = _merged(tallies.values())
    if failures.failures:
        print("\n| failure | count | sample |\n|---|---|---|")
        for kind, count in failures.failures.most_common():
            print(f"| {kind} | {count} | `{failures.samples[kind]}` |")
    return sum(failures.failures.values())


def _merged(tallies: Any) -> Tally:
    merged = Tally()
    for tally in tallies:
        merged.latencies_ms += tally.latencies_ms
        merged.shed_ms += tally.shed_ms
        merged.server_ms += tally.server_ms
        merged.failures.update(tally.failures)
        for kind, sample in tally.samples.items():
            merged.samples.setdefault(kind, sample)
    return merged


# -- main -------------------------------------------------------------------------------------
def serve_and_load(
    args: argparse.Namespace,
    work: Workload,
    operations: list[Operation],
    store: str,
    server_log: Path,
) -> int:
    """Start `prodsearch serve` on `store`, run the load, print the report; return failures."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = cli("serve", "--port", str(port), "--store", store)
    if args.log_level:
        command += ["--log-level", args.log_level]
    with server_log.open("a") as sink:
        server = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PRODSEARCH_API_KEY": ""},
        )
        try:
            health = wait_for_health(base, server, server_log)
            duration = args.soak * 60 if args.soak else args.duration
            log(
                f"serving {health['products']:,} products; {args.clients} clients, {duration:.0f} s"
            )
            load_before = os.getloadavg()[0]

            run = asyncio.run(run_clients(base, work, operations, args, server.pid))
        finally:
            server.terminate()
            server.wait(timeout=60)
    name = "mixed" if args.mixed else args.workload
    print(
        f"\n### {name} workload, {health['products']:,} products (embedded engine), "
        f"{args.clients} clients, {run.seconds:.0f} s, {os.cpu_count()} CPUs, "
        f"{args.pool} connection pool, client keep-alive {args.client_keepalive:g} s\n"
    )
    return report(run, args.settle, (load_before, os.getloadavg()[0]))


def main() -> None:
    """Ingest, serve, load, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--products", type=int, default=5_000, help="Shopee catalog size")
    parser.add_argument("--workload", choices=("title", "image"), default="title")
    parser.add_argument(
        "--mixed", action="store_true", help="the MIXED operations (Shopee + sample catalog)"
    )
    parser.add_argument(
        "--soak", type=float, metavar="MINUTES", help="run this long; log RSS and fds"
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds of load before RSS and fds are read"
    )
    parser.add_argument(
        "--runs", type=int, default=1, help="back-to-back runs, a fresh server each"
    )
    parser.add_argument("--store", help="embedded store directory to keep and re-use")
    parser.add_argument(
        "--client-keepalive",
        type=float,
        default=5.0,
        help="seconds the clients keep an idle connection (httpx: 5)",
    )
    parser.add_argument(
        "--pool",
        choices=("shared", "per-client"),
        default="shared",
        help="one connection pool for all clients (as a load balancer holds), or one connection "
        "each (httpx's pool costs O(connections^2) per request: use per-client past ~100)",
    )
    parser.add_argument("--log-level", help="the server's log level (prodsearch serve --log-level)")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        workdir = Path(tmp)
        if args.mixed:
            work, operations = mixed_workload(args.data, args.products, workdir), MIXED
        elif args.workload == "title":
            work, operations = title_workload(args.data, args.products, workdir), TITLE
        else:
            work, operations = image_workload(), IMAGE
        store = args.store or str(workdir / "store")
        ingest(work, store)
        server_log = args.server_log or workdir / "serve.log"
        failures = sum(
            serve_and_load(args, work, operations, store, server_log) for _ in range(args.runs)
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

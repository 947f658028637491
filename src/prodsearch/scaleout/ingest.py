"""`ingest --ray`: Ray Data reads the catalog, actors encode, batches are upserted.

    Ray Data read tasks ──► driver: row numbers + `RowValidator` (the local rules, streaming)
        ──► encoding actors (each loads the encoders once): `ingest.read_batch` (content hash,
            unchanged rows skipped, images decoded) + `ingest.batch_products` (encode)
        ──► upsert: by the actor itself into a Qdrant server or cluster (`--store URL`), or by
            the driver into the embedded engine (one opener per store)

The resume and idempotence guarantees are the local ingest's: every product's point carries its
content hash, and a batch whose stored hashes match is skipped, so a re-run after a kill
stores what is missing and nothing twice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from prodsearch.catalog import CatalogRow
from prodsearch.index import Index, Product
from prodsearch.ingest import IngestReport, ReadBatch
from prodsearch.recipes import Recipe
from prodsearch.scaleout import ACTOR_CPUS, is_server
from prodsearch.scaleout.read import read_dataset
from prodsearch.settings import IngestSettings, Settings

#: batches in flight per actor: one encoding, one waiting, so an actor never idles
IN_FLIGHT_PER_ACTOR = 2
#: seconds between two progress lines
LOG_SECONDS = 1.0


class EncodeActor:
    """A Ray actor: the encoders (loaded once) and, given a server's `store` URL, its own
    connection to it (None: the driver writes)."""

    def __init__(self, settings: dict[str, Any], collection: str, store: str | None) -> None:
        from prodsearch.encoders import EncoderSet, InferenceOptions

        self.settings = Settings.model_validate(settings)
        self.encoders = EncoderSet.from_settings(
            self.settings.encoders,
            self.settings.text_max_tokens,
            InferenceOptions.from_settings(self.settings),
        )
        self.index = Index(store, collection, self.settings, self.encoders) if store else None

    def encode(
        self, rows: list[CatalogRow], stored: Mapping[str, str | None] | None
    ) -> tuple[ReadBatch, list[Product] | int]:
        """Read, check and encode one batch (`stored`: its stored content hashes, looked up by
        the driver; None: look them up here). Returns the batch (without its encoder inputs)
        and its products, or, when this actor writes, how many it upserted."""
        from dataclasses import replace

        from prodsearch.ingest import batch_products, read_batch

        lookup = self.index.content_hashes if self.index is not None else (lambda _: stored)
        batch = read_batch(rows, lookup, self.encoders, self.settings.max_image_pixels)
        products = batch_products(self.encoders, batch)
        batch = replace(batch, inputs=[], items=[])
        if self.index is None:
            return batch, products
        self.index.upsert(products)
        return batch, len(products)


def ray_ingest(
    index: Index,
    source: str,
    choices: IngestSettings,
    recipe: Recipe | None = None,
    *,
    workers: int = 2,
    images_dir: Path | None = None,
    report_path: Path | None = None,
    console: Console | None = None,
    batch_size: int | None = None,
    build_index: bool = True,
) -> IngestReport:
    """Ingest the catalog at `source` (CSV or Parquet; a path or a URI Ray reads) into `index`'s
    collection with `workers` encoding actors on the connected Ray cluster (`start_ray`).

    Rows are validated by the local rules (`RowValidator`) and rejected rows reported the same
    way (`report_path`); the stored points are those the local ingest stores. Raises
    CatalogError when the catalog cannot be read or mapped.
    """
    import ray

    started = time.perf_counter()
    console = console or Console(stderr=True)
    index.ensure_collection()
    settings = index.settings
    batch_size = batch_size or settings.batch_size
    catalog = read_dataset(source, choices, recipe)
    validator = catalog.validator(images_dir)
    writes = is_server(index.store.location)
    actor_settings = settings.model_copy(
        update={"onnx_threads": settings.onnx_threads or _threads_per_actor(ray, workers)}
    ).model_dump(mode="json")
    actor_class = ray.remote(num_cpus=ACTOR_CPUS)(EncodeActor)
    store = index.store.location if writes else None
    actors = [actor_class.remote(actor_settings, index.collection, store) for _ in range(workers)]
    report = IngestReport()
    pending: deque[Any] = deque()
    logged = [started]

    def finish_oldest() -> None:
        batch, products = ray.get(pending.popleft())
        if not isinstance(products, int):
            index.upsert(products)
        report.add(batch, products if isinstance(products, int) else len(products))
        # a terminal gets a line every LOG_SECONDS; logs and pipes one a batch (as the local
        # ingest's), so a supervisor sees each batch stored
        if not console.is_terminal or time.perf_counter() - logged[0] >= LOG_SECONDS:
            _log(console, report, started)
            logged[0] = time.perf_counter()

    try:
        for number, frame in enumerate(catalog.frames(batch_size)):
            rows, rejections = validator.validate(frame)
            report.rows_read += len(frame)
            report.rejections += rejections
            if not rows:
                continue
            stored = None if writes else index.content_hashes([r.product_id for r in rows])
            pending.append(actors[number % workers].encode.remote(rows, stored))
            while len(pending) >= IN_FLIGHT_PER_ACTOR * workers:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        for actor in actors:
            ray.kill(actor)
    _log(console, report, started)
    if build_index:
        index.build()
    report.finish(started, report_path)
    return report


def _threads_per_actor(ray: Any, workers: int) -> int:
    """ONNX Runtime threads per actor: the cluster's CPUs shared out (at least 1), so that the
    actors of one machine do not oversubscribe it."""
    nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
    cpus_per_node = int(ray.cluster_resources().get("CPU", 1)) // nodes
    actors_per_node = -(-workers // nodes)
    return max(1, cpus_per_node // actors_per_node)


def _log(console: Console, report: IngestReport, started: float) -> None:
    done = report.upserted + report.unchanged
    rate = done / max(time.perf_counter() - started, 1e-9)
    console.print(
        f"ingest --ray: {report.rows_read:,} rows read, {done:,} products stored or checked, "
        f"{rate:,.0f}/s",
        highlight=False,
    )

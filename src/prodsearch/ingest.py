"""Ingest: catalog rows -> encoders -> idempotent upserts, in batches, resumable.

Every product maps to a fixed point id, and its payload carries a hash of its content. A re-run
(after a kill, or on an updated catalog) skips products whose stored hash is unchanged, so it
resumes where the previous run stopped without duplicates; changed products are replaced whole
(all named vectors and payload in one upsert), so a point is never half-written.

Pipelined: a reader thread reads, hashes, checks against the store, decodes and runs the encoders
that need no network (chars, phash) for batch k+1 while the main thread runs the networks and
upserts batch k. Catalog ids are unique, so the two batches never
share a point, and the upserts still happen in catalog order, one batch at a time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from prodsearch.catalog import Catalog, CatalogRow, Rejection
from prodsearch.encoders import EncoderInput, EncoderSet, Vector
from prodsearch.encoders.phash import compute_phash
from prodsearch.errors import ImageError
from prodsearch.images import load_image
from prodsearch.index import Index, Product


@dataclass
class IngestReport:
    """What an ingest did."""

    rows_read: int = 0
    upserted: int = 0
    unchanged: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    seconds: float = 0.0
    report_path: Path | None = None

    @property
    def skipped(self) -> int:
        """Rows rejected (reported, not stored)."""
        return len(self.rejections)

    def add(self, batch: ReadBatch, upserted: int) -> None:
        """Count a stored batch: `upserted` products written, the rest unchanged or rejected."""
        self.upserted += upserted
        self.unchanged += batch.unchanged
        self.rejections += batch.rejections

    def finish(self, started: float, report_path: Path | None) -> None:
        """Record the time since `started` (perf_counter) and write the rejected rows, when
        any, to `report_path`."""
        self.seconds = time.perf_counter() - started
        if self.rejections and report_path is not None:
            write_rejections(self.rejections, report_path)
            self.report_path = report_path

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable summary."""
        return {
            "rows_read": self.rows_read,
            "upserted": self.upserted,
            "unchanged": self.unchanged,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "products_per_second": round((self.upserted + self.unchanged) / self.seconds, 1)
            if self.seconds
            else None,
            "report": str(self.report_path) if self.report_path else None,
        }


@dataclass
class _Prepared:
    row: CatalogRow
    content_hash: str
    image_bytes: bytes | None


def content_hash(row: CatalogRow, image_bytes: bytes | None) -> str:
    """Return a hash of everything that determines a product's point (vectors and payload)."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [row.product_id, row.title, row.phash, str(row.image_path or ""), row.payload],
            sort_keys=True,
            default=str,
        ).encode()
    )
    digest.update(hashlib.sha256(image_bytes).digest() if image_bytes is not None else b"-")
    return digest.hexdigest()


def ingest_catalog(
    index: Index,
    catalog: Catalog,
    *,
    report_path: Path | None = None,
    console: Console | None = None,
    batch_size: int | None = None,
    pipelined: bool = True,
    after_batch: Callable[[list[str]], None] | None = None,
    build_index: bool = True,
) -> IngestReport:
    """Upsert every valid row of `catalog` into `index`'s collection and build the HNSW index.

    Rows already rejected while reading the catalog and rows whose image cannot be decoded are
    reported (in the returned report and, when any, in `report_path` as CSV); the rest goes on.
    With `pipelined` (the default) one reader thread reads, hashes, checks and decodes the next
    batches while this thread encodes and upserts; the stored result is the same either way.
    `after_batch` is called with each batch's product ids (catalog order) once it is stored
    (e.g. assigning them to clusters). Without `build_index` the engine's search index is not
    rebuilt at the end (new points are still found: the engine searches them exactly until the
    next build).
    """
    started = time.perf_counter()
    index.ensure_collection()
    report = IngestReport(rows_read=catalog.rows_read, rejections=list(catalog.rejections))
    batch_size = batch_size or index.settings.batch_size
    console = console or Console(stderr=True)
    store_lock = threading.Lock()
    batches = (_read_batch(index, rows, store_lock) for rows in _batches(catalog.rows, batch_size))
    with (
        _progress(console) as progress,
        closing(_read_ahead(batches) if pipelined else batches) as ready,
    ):
        task = progress.add_task("ingest", total=len(catalog.rows))
        for batch in ready:
            _store_batch(index, batch, report, store_lock)
            if after_batch is not None:
                with store_lock:
                    after_batch(batch.product_ids)
            progress.advance(task, batch.rows)
            if not console.is_terminal:  # logs and pipes get one line per batch instead of a bar
                done = int(progress.tasks[0].completed)
                rate = done / (time.perf_counter() - started)
                console.print(
                    f"ingest: {done}/{len(catalog.rows)} products stored or checked, {rate:,.0f}/s",
                    highlight=False,
                )
    if build_index:
        index.build()
    report.finish(started, report_path)
    return report


class _RateColumn(ProgressColumn):
    """Products per second."""

    def render(self, task: Task) -> Text:
        rate = task.completed / task.elapsed if task.elapsed else 0.0
        return Text(f"{rate:,.0f} products/s")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def _batches(rows: Sequence[CatalogRow], size: int) -> Iterator[Sequence[CatalogRow]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


@dataclass
class ReadBatch:
    """One batch of catalog rows read, hashed, checked against the store, decoded and encoded
    by the encoders that run no network: all the work before the networks, which the reader
    thread does ahead of the encoding thread."""

    rows: int
    items: list[_Prepared]
    inputs: list[EncoderInput]
    #: per item, the vectors of the encoders that run no network
    vectors: list[dict[str, Vector]]
    unchanged: int
    rejections: list[Rejection]
    #: every readable product of the batch, in catalog order
    product_ids: list[str]


def _read_batch(index: Index, rows: Sequence[CatalogRow], store_lock: threading.Lock) -> ReadBatch:
    def stored(product_ids: list[str]) -> Mapping[str, str | None]:
        with store_lock:
            return index.content_hashes(product_ids)

    return read_batch(rows, stored, index.encoders, index.settings.max_image_pixels)


def read_batch(
    rows: Sequence[CatalogRow],
    stored: Callable[[list[str]], Mapping[str, str | None]],
    encoders: EncoderSet,
    max_pixels: int,
) -> ReadBatch:
    """One batch's work before the networks: read each row's image, hash the row, keep the rows
    whose hash differs from the stored one (`stored`: product ids -> their stored content
    hashes), decode their images, prepare the encoders' inputs and run the encoders that need
    no network. Unreadable and undecodable images become rejections. Local and Ray ingest both
    call it, per batch."""
    rejections: list[Rejection] = []
    prepared: list[_Prepared] = []
    for row in rows:
        try:
            image_bytes = _image_bytes(row)
        except OSError as exc:
            rejections.append(_unreadable(row, exc))
            continue
        prepared.append(_Prepared(row, content_hash(row, image_bytes), image_bytes))

    hashes = stored([p.row.product_id for p in prepared])
    changed = [p for p in prepared if hashes.get(p.row.product_id) != p.content_hash]

    inputs: list[EncoderInput] = []
    kept: list[_Prepared] = []
    for item in changed:
        try:
            inputs.append(_encoder_input(item, max_pixels))
        except ImageError as exc:
            rejections.append(_undecodable(item.row, exc))
            continue
        kept.append(item)
    # Crop images for the network here; then only the crops are kept (a batch of full-size
    # photos would hold gigabytes while it waits in the queue). The phash is computed already.
    inputs = [
        replace(given, image=None) if given.pixels is not None else given
        for given in encoders.prepare(inputs)
    ]
    ids = [p.row.product_id for p in prepared]
    vectors = encoders.encode(inputs, neural=False)
    unchanged = len(prepared) - len(changed)
    return ReadBatch(len(rows), kept, inputs, vectors, unchanged, rejections, ids)


def check_images(catalog: Catalog, max_pixels: int) -> Catalog:
    """Return `catalog` with the rows whose image ingest could not read or decode moved to its
    rejections, as ingest would report them: ingest's checks without encoders or a store (a dry
    run). Nothing is written."""
    rows: list[CatalogRow] = []
    rejections = list(catalog.rejections)
    for row in catalog.rows:
        try:
            image_bytes = _image_bytes(row)
            if image_bytes is not None:
                load_image(image_bytes, max_pixels=max_pixels)
        except OSError as exc:
            rejections.append(_unreadable(row, exc))
            continue
        except ImageError as exc:
            rejections.append(_undecodable(row, exc))
            continue
        rows.append(row)
    return replace(catalog, rows=rows, rejections=rejections)


def _image_bytes(row: CatalogRow) -> bytes | None:
    """The row's encoded image, read from its path when it did not arrive with it (OSError)."""
    return row.image_bytes or (row.image_path.read_bytes() if row.image_path else None)


def _unreadable(row: CatalogRow, error: OSError) -> Rejection:
    return Rejection(row.row, row.product_id, "image", f"cannot read image: {error.strerror}")


def _undecodable(row: CatalogRow, error: ImageError) -> Rejection:
    return Rejection(row.row, row.product_id, "image", str(error))


def _store_batch(
    index: Index, batch: ReadBatch, report: IngestReport, store_lock: threading.Lock
) -> None:
    products = batch_products(index.encoders, batch)
    with store_lock:
        index.upsert(products)
    report.add(batch, len(products))


def batch_products(encoders: EncoderSet, batch: ReadBatch) -> list[Product]:
    """Encode a read batch's changed rows with the networks: the products to upsert (named
    vectors, the reader's among them, + payload)."""
    vectors = encoders.encode(batch.inputs, neural=True)
    return [
        Product(item.row.product_id, _payload(item, given.phash), {**light, **heavy})
        for item, given, light, heavy in zip(
            batch.items, batch.inputs, batch.vectors, vectors, strict=True
        )
    ]


_DONE = object()


def _read_ahead(batches: Iterator[ReadBatch], depth: int = 2) -> Iterator[ReadBatch]:
    """Yield `batches`, produced by a reader thread up to `depth` batches ahead.

    The bounded queue keeps memory flat when encoding is the slower side. An error in the
    reader is raised here; closing this generator stops the reader.
    """
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(value: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for batch in batches:
                if not hand_over(batch):
                    return
            hand_over(_DONE)
        except BaseException as exc:  # re-raised in the encoding thread
            hand_over(exc)

    reader = threading.Thread(target=read, name="prodsearch-ingest-reader", daemon=True)
    reader.start()
    try:
        while (value := ready.get()) is not _DONE:
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        reader.join()


def _encoder_input(item: _Prepared, max_pixels: int) -> EncoderInput:
    image = load_image(item.image_bytes, max_pixels=max_pixels) if item.image_bytes else None
    phash = item.row.phash or (compute_phash(image) if image is not None else None)
    return EncoderInput(title=item.row.title, image=image, phash=phash)


def _payload(item: _Prepared, phash: str | None) -> dict[str, Any]:
    row = item.row
    payload: dict[str, Any] = {
        **row.payload,
        "product_id": row.product_id,
        "content_hash": item.content_hash,
    }
    if row.title:
        payload["title"] = row.title
    if row.image_path:
        payload["image_path"] = str(row.image_path)
    if phash:
        payload["image_phash"] = phash
    return payload


def write_rejections(rejections: Sequence[Rejection], path: Path) -> None:
    """Write the rejected rows as CSV: row, product_id, field, reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "product_id", "field", "reason"])
        for r in sorted(rejections, key=lambda r: r.row):
            writer.writerow([r.row, r.product_id or "", r.field, r.reason])

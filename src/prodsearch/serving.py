"""Serving many requests from one process: the store and the encoders shared between threads.

`SerializedStore` lets one thread at a time into an embedded store: Edge's Python wrapper opens
shards lazily (two threads could both open one, and the second opener is refused), and
qdrant-client's local mode is plain Python with no locking. A server store needs neither.

`BatchingEncoders` funnels every `encode` call through one worker thread that merges the calls
waiting at that moment into one batch: concurrent requests share a forward pass (a batch of 32
titles costs a third to a half as much per title as one at a time), and the models never run in
several threads at once: no dozens of torch thread pools fighting over a few cores, and no fast
tokenizer shared between threads (a Hugging Face one can raise "Already borrowed" then). A lone
request waits for nothing.

`Admission` bounds the requests in progress and waiting; past that, 503 with Retry-After; every
answer it lets through or sheds says in a Server-Timing header how long it waited and took.
`server_config` is how `prodsearch serve` runs uvicorn: keep-alive and shutdown timeouts from
the settings.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prodsearch.encoders import EncoderInput, EncoderSet, Vector
from prodsearch.store import (
    FusedQuery,
    Hit,
    Manifest,
    PointRecord,
    ScoreRequest,
    Store,
    StoredPoint,
)

if TYPE_CHECKING:
    import uvicorn

    from prodsearch.settings import Settings


class SerializedStore(Store):
    """A store whose calls run one at a time (see the module docstring for why)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.location = inner.location
        self.remote = inner.remote
        self._lock = threading.Lock()

    def has_collection(self, name: str) -> bool:
        """Return True when the collection exists."""
        with self._lock:
            return self.inner.has_collection(name)

    def create_collection(self, name: str, manifest: Manifest) -> None:
        """Create a collection with the manifest's vectors and record the manifest."""
        with self._lock:
            self.inner.create_collection(name, manifest)

    def create_payload_index(self, name: str, field: str, kind: str) -> None:
        """Index a payload field."""
        with self._lock:
            self.inner.create_payload_index(name, field, kind)

    def delete_collection(self, name: str) -> None:
        """Delete a collection and everything in it."""
        with self._lock:
            self.inner.delete_collection(name)

    def manifest(self, name: str) -> Manifest:
        """Return the collection's manifest; raises CollectionNotFoundError."""
        with self._lock:
            return self.inner.manifest(name)

    def upsert(self, name: str, points: Sequence[PointRecord]) -> None:
        """Insert or replace points."""
        with self._lock:
            self.inner.upsert(name, points)

    def set_payload(self, name: str, point_ids: Sequence[str], payload: dict[str, Any]) -> None:
        """Merge payload keys into points."""
        with self._lock:
            self.inner.set_payload(name, point_ids, payload)

    def delete(self, name: str, point_ids: Sequence[str]) -> None:
        """Delete points by id."""
        with self._lock:
            self.inner.delete(name, point_ids)

    def retrieve(
        self, name: str, point_ids: Sequence[str], with_vectors: bool = False
    ) -> list[StoredPoint]:
        """Return the stored points among `point_ids`."""
        with self._lock:
            return self.inner.retrieve(name, point_ids, with_vectors)

    def scroll(
        self, name: str, offset: str | None, limit: int, with_vectors: bool = False
    ) -> tuple[list[StoredPoint], str | None]:
        """Return a page of points and the next offset."""
        with self._lock:
            return self.inner.scroll(name, offset, limit, with_vectors)

    def count(self, name: str, exact: bool = True) -> int:
        """Return the number of points (`exact=False`: the engine's cheap estimate)."""
        with self._lock:
            return self.inner.count(name, exact)

    def build_index(self, name: str) -> None:
        """Build the HNSW index, without the lock: Edge keeps answering queries while it
        rebuilds segments (checked with queries in other threads during a 60k-point optimize),
        and holding the lock for the minutes a large build takes would stall every match."""
        self.inner.build_index(name)

    def query_batch(self, name: str, queries: Sequence[FusedQuery]) -> list[list[Hit]]:
        """Run fused queries in one batch."""
        with self._lock:
            return self.inner.query_batch(name, queries)

    def score_batch(self, name: str, requests: Sequence[ScoreRequest]) -> list[dict[str, float]]:
        """Return the engine's exact scores of the listed points."""
        with self._lock:
            return self.inner.score_batch(name, requests)

    def close(self) -> None:
        """Close the wrapped store."""
        with self._lock:
            self.inner.close()


@dataclass
class _Job:
    items: list[EncoderInput]
    result: Future[list[dict[str, Vector]]] = field(default_factory=Future)


class BatchingEncoders(EncoderSet):
    """The encoders of `inner`, with the networks' `encode` calls from many threads merged into
    batches of up to `max_batch` items by one worker thread (the encoders that run no network
    run in the calling thread). Call `close()` to stop the worker."""

    def __init__(self, inner: EncoderSet, max_batch: int = 32) -> None:
        super().__init__(inner.encoders)
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="prodsearch-encode", daemon=True)
        self._worker.start()

    def encode(
        self, items: Sequence[EncoderInput], neural: bool | None = None
    ) -> list[dict[str, Vector]]:
        """Return, per item, its vectors keyed by vector name (waits for the worker's batch of
        the networks' vectors); `neural` as `EncoderSet.encode`."""
        if not items:
            return []
        if neural is False or not self._worker.is_alive():  # closed: nobody would answer
            return super().encode(items, neural)
        job = _Job(list(items))
        self._jobs.put(job)
        heavy = job.result.result()
        if neural:
            return heavy
        light = super().encode(items, neural=False)
        return [{**a, **b} for a, b in zip(light, heavy, strict=True)]

    def close(self) -> None:
        """Stop the worker once the calls already queued are answered."""
        self._jobs.put(None)
        self._worker.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch, size = [job], len(job.items)
            while size < self.max_batch:
                try:
                    waiting = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                batch.append(waiting)
                size += len(waiting.items)
            self._encode(batch)

    def _encode(self, batch: list[_Job]) -> None:
        try:
            vectors = super().encode([item for job in batch for item in job.items], neural=True)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].result.set_exception(exc)
                return
            # One request's bad input must not fail the requests it happened to share a batch with.
            for job in batch:
                self._encode([job])
            return
        start = 0
        for job in batch:
            job.result.set_result(vectors[start : start + len(job.items)])
            start += len(job.items)


#: never held back by Admission: a load balancer's health check must get through an overload
UNLIMITED_PATHS = frozenset(
    {"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
RETRY_AFTER_S = 1
SPARE_THREADS = 8  # worker threads beyond max_active_requests, for the unlimited paths


class Admission:
    """A bounded queue in front of the routes that do work: at most `max_active` requests are
    worked on at once, at most `max_queued` more wait for a turn (first come, first served) for
    up to `queue_timeout_s`; any other is answered at once with 503 and Retry-After. Past
    capacity, clients are told to come back, instead of latency growing without bound (each
    waiting request holds a connection, a load balancer's slot, and its client's patience).
    UNLIMITED_PATHS go straight through."""

    def __init__(
        self, app: ASGIApp, max_active: int, max_queued: int, queue_timeout_s: float
    ) -> None:
        self.app = app
        self.max_active = max_active
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        admitted = await self._take_turn()
        send = _timed(send, arrived, time.perf_counter())
        if not admitted:
            detail = (
                f"over capacity: {self.active} requests in progress and {len(self._waiting)} "
                f"waiting; retry after {RETRY_AFTER_S} s"
            )
            headers = {"Retry-After": str(RETRY_AFTER_S)}
            await JSONResponse({"detail": detail}, 503, headers)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._end_turn()

    async def _take_turn(self) -> bool:
        """Return True once the request may go on; False when the queue is full or its wait
        timed out."""
        if self.active < self.max_active and not self._waiting:
            self.active += 1
            return True
        if len(self._waiting) >= self.max_queued:
            return False
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        admitted = False
        try:
            # shielded: a timeout must not cancel a turn handed over in the same instant
            await asyncio.wait_for(asyncio.shield(turn), self.queue_timeout_s)
            admitted = True
        except TimeoutError:
            pass
        finally:
            if not admitted:  # timed out, or the request itself was cancelled
                if turn.done():
                    self._end_turn()  # the turn came too late for this request: pass it on
                else:
                    turn.cancel()
                    self._waiting.remove(turn)
        return admitted

    def _end_turn(self) -> None:
        """Hand the turn to the longest-waiting request, or free it."""
        if self._waiting:
            self._waiting.popleft().set_result(None)
        else:
            self.active -= 1


def _timed(send: Send, arrived: float, admitted: float) -> Send:
    """`send` adding a Server-Timing header to the response: `queue` (the wait for a turn) and
    `total` (from the request's arrival to its response), in ms. A client's own latency minus
    `total` is time spent outside this process: the network, or the client itself."""

    async def timed(message: Message) -> None:
        if message["type"] == "http.response.start":
            queued_ms = (admitted - arrived) * 1000
            total_ms = (time.perf_counter() - arrived) * 1000
            timing = f"queue;dur={queued_ms:.0f}, total;dur={total_ms:.0f}"
            MutableHeaders(scope=message).append("Server-Timing", timing)
        await send(message)

    return timed


def server_config(
    app: ASGIApp, settings: Settings, host: str, port: int, log_level: str
) -> uvicorn.Config:
    """Return the uvicorn configuration `prodsearch serve` runs `app` with: its connection
    timeouts come from `settings` (uvicorn's own defaults close idle keep-alive connections
    after 5 s, sooner than a load balancer or an HTTP client pool lets go of them)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )

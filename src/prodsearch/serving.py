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
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

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
    """The encoders of `inner`, with `encode` calls from many threads merged into batches of up
    to `max_batch` items by one worker thread. Call `close()` to stop the worker."""

    def __init__(self, inner: EncoderSet, max_batch: int = 32) -> None:
        super().__init__(inner.encoders)
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="prodsearch-encode", daemon=True)
        self._worker.start()

    def encode(self, items: Sequence[EncoderInput]) -> list[dict[str, Vector]]:
        """Return, per item, its vectors keyed by vector name (waits for the worker's batch)."""
        if not items:
            return []
        if not self._worker.is_alive():  # closed: nobody would answer the queue
            return super().encode(items)
        job = _Job(list(items))
        self._jobs.put(job)
        return job.result.result()

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
            vectors = super().encode([item for job in batch for item in job.items])
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

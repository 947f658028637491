"""The service behind the routes: the open Index, the encoders, one writer at a time."""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from prodsearch.api.schemas import (
    API_FIELDS,
    HIDDEN_PAYLOAD_KEYS,
    QUIET,
    ClusterMemberOut,
    ClusterOut,
    HealthResponse,
    MatchRequest,
    ProductIn,
)
from prodsearch.catalog import (
    Catalog,
    CatalogRow,
    check_payload,
    check_product,
    collect_rows,
)
from prodsearch.encoders import EncoderInput
from prodsearch.errors import (
    ConfigError,
    EncoderMismatchError,
    ImageError,
    ProdsearchError,
    RowError,
)
from prodsearch.index import Index, Match
from prodsearch.ingest import IngestReport, ingest_catalog
from prodsearch.matching.assign import (
    Assigner,
    Assignment,
    ProductDecider,
    Verdict,
    query_verdicts,
)
from prodsearch.matching.cluster_log import ClusterLog
from prodsearch.query import MatchOptions
from prodsearch.serving import (
    BatchingEncoders,
    SerializedStore,
)
from prodsearch.settings import Settings
from prodsearch.state import state_file
from prodsearch.store import open_store


# -- the service behind the routes ------------------------------------------------------------
def decode_image_base64(text: str) -> bytes:
    """Return the bytes of a base64-encoded image (whitespace and a `data:...;base64,` prefix
    are allowed). Raises ImageError when it is not base64 or empty."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ImageError("a data: URL must be base64-encoded (data:image/jpeg;base64,...)")
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"not valid base64: {exc}") from exc
    if not data:
        raise ImageError("the image is empty")
    return data


def product_row(position: int, product: ProductIn) -> CatalogRow:
    """Validate one API product as a catalog row is validated; raises RowError."""
    product_id, title, phash = check_product(
        position,
        product.id,
        product.title,
        product.image_phash,
        has_image=bool(product.image_base64),
        fields=API_FIELDS,
    )
    check_payload(position, product_id, product.payload, "payload")
    try:
        image = decode_image_base64(product.image_base64) if product.image_base64 else None
    except ImageError as exc:
        raise RowError(position, "image_base64", str(exc), product_id) from exc
    return CatalogRow(
        row=position,
        product_id=product_id,
        title=title,
        image_bytes=image,
        phash=phash,
        payload=product.payload,
    )


def public_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return a stored payload without prodsearch's bookkeeping keys (the cluster id is shown
    on its own)."""
    return {k: v for k, v in payload.items() if k not in HIDDEN_PAYLOAD_KEYS}


@dataclass
class Service:
    """The open Index the routes share, and the lock that keeps writes one at a time."""

    index: Index
    encoders: BatchingEncoders
    owns_store: bool
    write_lock: threading.Lock
    #: products written since the engine's search index was last built
    unindexed: int = 0
    _log: ClusterLog | None = None
    _decider: ProductDecider | None = None

    @classmethod
    def open(cls, settings: Settings, index: Index | None = None) -> Service:
        """Open the collection's Index (or wrap `index`) for serving and load the models."""
        base = index or Index(
            open_store(settings.store, settings.collection_params()), settings=settings
        )
        store = base.store if base.store.remote else SerializedStore(base.store)
        encoders = BatchingEncoders(base.encoders, settings.encode_batch_size)
        service = cls(
            Index(store, base.collection, base.settings, encoders),
            encoders,
            owns_store=index is None,
            write_lock=threading.Lock(),
        )
        try:
            # Load every model now, so the first request does not pay for it.
            from PIL import Image

            encoders.encode([EncoderInput(title="warm-up", image=Image.new("RGB", (64, 64)))])
            if store.has_collection(base.collection):
                store.count(base.collection)  # opens the embedded shard now, not mid-request
        except BaseException:
            service.close()
            raise
        return service

    def close(self) -> None:
        """Stop the encoding worker; close the store when this service opened it."""
        self.encoders.close()
        if self._log is not None:
            self._log.close()
        if self.owns_store:
            self.index.close()

    def cluster_log(self) -> ClusterLog:
        """The collection's cluster log (opened on first use). Raises ConfigError when the store
        has no place for it (a server URL without PRODSEARCH_STATE_DIR)."""
        if self._log is None:
            self._log = ClusterLog(state_file(self.index.settings, "clusters"))
        return self._log

    def decider(self) -> ProductDecider:
        """The dedup decision on one product's neighbourhood (its model loaded on first use)."""
        if self._decider is None:
            try:  # the catalog's statistics, kept in the cluster log, where there is one
                log: ClusterLog | None = self.cluster_log()
            except ConfigError:
                log = None
            self._decider = ProductDecider(self.index, log=log)
        return self._decider

    def match(
        self, request: MatchRequest, image: bytes | None, image_field: str
    ) -> list[tuple[Match, Verdict | None]]:
        """Encode and match one query; with `request.decide`, each match's verdict (None: not
        among the candidates the decision reads)."""
        try:
            vectors = self.index.encode_query(request.title, image, request.phash)
        except ImageError as exc:
            raise ImageError(f"{image_field}: {exc}") from exc
        options = MatchOptions(
            request.k,
            request.thresholds,
            request.fusion,
            None,
            request.filter,
            request.exclude_ids,
        )
        matches = self.index.match_vectors([vectors], options)[0]
        verdicts: dict[str, Verdict] = {}
        if request.decide and matches:
            verdicts = query_verdicts(self.decider(), vectors, {"title": request.title or ""})
        return [(m, verdicts.get(m.product_id)) for m in matches]

    def upsert(
        self, products: list[ProductIn], assign: bool = False
    ) -> tuple[IngestReport, list[Assignment]]:
        """Validate, encode and upsert products (bad ones are reported, never stored); with
        `assign`, put each new or changed one in the stored clusters. The engine's search index
        is rebuilt once `index_after_writes` products were written since the last build (every
        write rebuilding it piled up segments under a stream of small writes)."""
        rows, rejections = collect_rows(
            ((i, partial(product_row, i, p)) for i, p in enumerate(products)), API_FIELDS.id
        )
        catalog = Catalog(path=None, rows=rows, rejections=rejections, rows_read=len(products))
        assignments: list[Assignment] = []
        with self.write_lock:
            after_batch = None
            if assign:
                assigner = Assigner(self.index, self.cluster_log(), self.decider())
                after_batch = lambda ids: assignments.extend(assigner.assign_pending(ids))  # noqa: E731
            # Encoded in chunks of one encoding batch, so that the matches queued meanwhile get
            # their turn between chunks instead of waiting for the whole upsert.
            report = ingest_catalog(
                self.index,
                catalog,
                console=QUIET,
                batch_size=self.encoders.max_batch,
                after_batch=after_batch,
                build_index=False,
            )
            self.unindexed += report.upserted
            if self.unindexed >= self.index.settings.index_after_writes:
                self.index.build()
                self.unindexed = 0
        return report, assignments

    def delete(self, product_id: str) -> bool:
        """Delete a product (and take it out of its stored cluster); return False when it is
        absent."""
        with self.write_lock:
            if self.index.get(product_id) is None:
                return False
            self.index.delete([product_id])
            if state_file(self.index.settings, "clusters").is_file():
                self.cluster_log().leave([product_id], "deleted")
            return True

    def cluster(self, cluster_id: str) -> ClusterOut:
        """A stored cluster's members (with their titles) and history. Raises ConfigError when
        there is no such cluster."""
        log = self.cluster_log()
        members, events = log.members(cluster_id), log.events(cluster_id)
        if not members and not events:
            raise ConfigError(f"no cluster {cluster_id!r} is stored")
        titles = {
            p.product_id: p.payload.get("title")
            for p in self.index.products([m.product_id for m in members])
        }
        return ClusterOut(
            cluster_id=cluster_id,
            members=[
                ClusterMemberOut(
                    product_id=m.product_id, joined_at=m.joined_at, title=titles.get(m.product_id)
                )
                for m in members
            ],
            events=[e.as_dict() for e in events],
        )

    def health(self) -> HealthResponse:
        """Check the engine, the collection and the encoders it was written by."""
        index = self.index
        report = HealthResponse(
            status="empty",
            engine_reachable=False,
            store="server" if index.store.remote else "embedded",
            collection=index.collection,
            collection_present=False,
            encoders={name: i.as_dict() for name, i in index.encoders.identities().items()},
        )
        try:
            report.collection_present = index.exists()
            report.engine_reachable = True
            if report.collection_present:
                index.check_encoders()
                report.encoders_match = True
                report.products = index.count()
                report.status = "ok"
        except EncoderMismatchError as exc:
            report.encoders_match, report.status, report.detail = False, "error", str(exc)
        except ProdsearchError as exc:
            report.status, report.detail = "error", str(exc)
        return report

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
    _QUIET,
    API_FIELDS,
    HIDDEN_PAYLOAD_KEYS,
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
    EncoderMismatchError,
    ImageError,
    ProdsearchError,
    RowError,
)
from prodsearch.index import Index, Match
from prodsearch.ingest import IngestReport, ingest_catalog
from prodsearch.serving import (
    BatchingEncoders,
    SerializedStore,
)
from prodsearch.settings import Settings
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
    """Return a stored payload without prodsearch's bookkeeping keys."""
    return {k: v for k, v in payload.items() if k not in HIDDEN_PAYLOAD_KEYS}


@dataclass
class Service:
    """The open Index the routes share, and the lock that keeps writes one at a time."""

    index: Index
    encoders: BatchingEncoders
    owns_store: bool
    write_lock: threading.Lock

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
        if self.owns_store:
            self.index.close()

    def match(self, request: MatchRequest, image: bytes | None, image_field: str) -> list[Match]:
        """Encode and match one query."""
        try:
            return self.index.match(
                request.title,
                image,
                phash=request.phash,
                k=request.k,
                thresholds=request.thresholds,
                fusion=request.fusion,
                filter=request.filter,
                exclude_ids=request.exclude_ids,
            )
        except ImageError as exc:
            raise ImageError(f"{image_field}: {exc}") from exc

    def upsert(self, products: list[ProductIn]) -> IngestReport:
        """Validate, encode and upsert products; bad ones are reported, never stored."""
        rows, rejections = collect_rows(
            ((i, partial(product_row, i, p)) for i, p in enumerate(products)), API_FIELDS.id
        )
        catalog = Catalog(path=None, rows=rows, rejections=rejections, rows_read=len(products))
        with self.write_lock:
            # Encoded in chunks of one encoding batch, so that the matches queued meanwhile get
            # their turn between chunks instead of waiting for the whole upsert.
            return ingest_catalog(
                self.index, catalog, console=_QUIET, batch_size=self.encoders.max_batch
            )

    def delete(self, product_id: str) -> bool:
        """Delete a product; return False when it is absent."""
        with self.write_lock:
            if self.index.get(product_id) is None:
                return False
            self.index.delete([product_id])
            return True

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

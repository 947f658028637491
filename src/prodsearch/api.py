"""The HTTP API: match products, upsert and delete them, check health; `create_app()` builds it.

One process serves one open Index: the models load once at startup, and the embedded engine
(which allows a single opener) is opened once. Encoding and engine calls run in the threadpool;
concurrent requests' encodings are batched (prodsearch.serving), and writes run one at a time.
A bounded queue admits the requests (serving.Admission): past it, 503 with Retry-After.

Errors are JSON `{"detail": ...}`: a message naming the field or item and the reason, or, for a
body that does not fit the schema, FastAPI's list of `{"loc", "msg", "type"}`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Response, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prodsearch import __version__
from prodsearch.catalog import (
    MAX_TITLE_CHARS,
    Catalog,
    CatalogRow,
    check_payload,
    check_product,
    collect_rows,
)
from prodsearch.encoders import EncoderInput
from prodsearch.errors import (
    CatalogError,
    CollectionNotFoundError,
    ConfigError,
    EncoderMismatchError,
    ImageError,
    ProdsearchError,
    RowError,
    StoreError,
    StoreLockedError,
)
from prodsearch.filters import FilterSpec
from prodsearch.index import Index, Match
from prodsearch.ingest import IngestReport, ingest_catalog
from prodsearch.recipes import Recipe
from prodsearch.serving import (
    SPARE_THREADS,
    Admission,
    BatchingEncoders,
    SerializedStore,
)
from prodsearch.settings import FusionName, Settings
from prodsearch.store import open_store

#: the API's field names, used in rejection messages as a recipe's column names are for a CSV
API_FIELDS = Recipe(id="id", title="title", image="image_base64", phash="image_phash")
K_MAX = 1_000
# Payload keys the API does not show: bookkeeping of ingest, and the image's path on the
# ingesting machine (a server file path is not for clients).
HIDDEN_PAYLOAD_KEYS = frozenset({"content_hash", "image_path"})
_PHASH_PATTERN = r"^[0-9a-fA-F]{16}$"
_QUIET = Console(stderr=True, quiet=True)


# -- bodies -----------------------------------------------------------------------------------
class MatchRequest(BaseModel):
    """A product to match: a title, an image and/or a known perceptual hash, and options."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    title: str | None = Field(None, max_length=MAX_TITLE_CHARS, examples=["Oatly oat drink 1L"])
    image_base64: str | None = Field(
        None,
        description="The image file, base64-encoded (a `data:image/...;base64,` prefix is ok).",
    )
    phash: str | None = Field(
        None, pattern=_PHASH_PATTERN, description="A known 64-bit perceptual hash, 16 hex digits."
    )
    k: int | None = Field(None, ge=1, le=K_MAX, description="Matches to return (default 10).")
    thresholds: dict[str, float] | None = Field(
        None,
        description="Per-modality prefetch score thresholds (for the formula: its floors), "
        'e.g. {"text": 0.8}.',
    )
    fusion: FusionName | None = None
    filter: dict[str, Any] | None = Field(
        None,
        description='Payload filter: {"key": value}, {"key": [a, b]}, {"price": {"gte": 1}}, '
        '{"seller": {"not": "x"}}.',
    )
    exclude_ids: list[str] = Field([], max_length=K_MAX, description="Product ids to leave out.")

    @field_validator("filter")
    @classmethod
    def _engine_can_filter(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """Refuse a filter the engine cannot run (FilterSpec says why) before any work."""
        try:
            FilterSpec.from_mapping(spec)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return spec


class MatchOut(BaseModel):
    """One matching product and why it matched."""

    product_id: str
    score: float = Field(description="The fused score (its scale depends on the fusion).")
    scores: dict[str, float] = Field(description="The engine's score of each modality.")
    matched_by: list[str] = Field(description="The modalities whose score reached the threshold.")
    payload: dict[str, Any]


class MatchResponse(BaseModel):
    """Matches, best first."""

    matches: list[MatchOut]


class ProductIn(BaseModel):
    """One product to upsert. Its content is checked as a catalog row is: a bad product is
    rejected and reported, the rest of the batch goes on."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    id: str | None = None
    title: str | None = None
    image_base64: str | None = Field(None, description="The image file, base64-encoded.")
    image_phash: str | None = Field(None, description="A known perceptual hash, 16 hex digits.")
    payload: dict[str, Any] = Field({}, description="Any other fields, kept with the product.")


class ProductBatch(BaseModel):
    """Products to insert or replace (by id)."""

    products: list[ProductIn]


class RejectionOut(BaseModel):
    """A product that was not stored, and why."""

    row: int = Field(description="Its position in `products`, from 0.")
    id: str | None
    field: str
    reason: str


class UpsertResponse(BaseModel):
    """What a batch upsert did."""

    upserted: int = Field(description="Products written (new or changed).")
    unchanged: int = Field(description="Products already stored exactly so (not rewritten).")
    rejected: int
    rejections: list[RejectionOut]


class ProductOut(BaseModel):
    """A stored product."""

    id: str
    payload: dict[str, Any]


class DeleteResponse(BaseModel):
    """A deleted product."""

    id: str
    deleted: bool = True


class HealthResponse(BaseModel):
    """Whether the engine answers, the collection exists and fits these encoders."""

    status: Literal["ok", "empty", "error"] = Field(
        description="ok; empty (no collection yet: POST /products creates it); error (see detail)."
    )
    engine_reachable: bool
    store: Literal["embedded", "server"]
    collection: str
    collection_present: bool
    encoders_match: bool | None = None
    products: int | None = None
    encoders: dict[str, dict[str, Any]] = Field(description="This process's encoder identities.")
    detail: str | None = None


class ValidationIssue(BaseModel):
    """One way a request does not fit the schema."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error: a message, or the list of schema violations."""

    detail: str | list[ValidationIssue]


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


# -- errors, limits, authentication -----------------------------------------------------------
# Most specific first: the subclasses of StoreError before it.
_ERROR_STATUS: tuple[tuple[type[ProdsearchError], int], ...] = (
    (EncoderMismatchError, 409),
    (CollectionNotFoundError, 404),
    (StoreLockedError, 503),
    (StoreError, 503),
    (ConfigError, 422),
    (ImageError, 422),
    (CatalogError, 422),
    (RowError, 422),
)


def status_of(error: ProdsearchError) -> int:
    """Return the HTTP status of a project error."""
    return next((code for kind, code in _ERROR_STATUS if isinstance(error, kind)), 500)


async def _project_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProdsearchError)
    return JSONResponse({"detail": str(exc)}, status_code=status_of(exc))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI echoes each bad value back; an echoed megabyte of base64 helps no one.
    issues = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": issues}, status_code=422)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "internal server error; see the server log"}, status_code=500)


def _invalid(loc: tuple[str | int, ...], message: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind}])


def _body_errors(error: ValidationError) -> RequestValidationError:
    return RequestValidationError(
        [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_input=False)]
    )


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body over the limit of {limit:,} bytes (PRODSEARCH_MAX_REQUEST_BYTES)",
        )


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413: at once when the declared
    Content-Length is over, or as soon as a streamed (chunked) body grows past it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = _BodyTooLarge(self.max_bytes)
            response = JSONResponse({"detail": error.detail}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException: FastAPI's body reader passes it on to the JSON handler.
                    raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


_API_KEY = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Required on every route but /health when the server has PRODSEARCH_API_KEY.",
)


def _require_api_key(request: Request, key: Annotated[str | None, Security(_API_KEY)]) -> None:
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    # Constant-time comparison: the time taken must not reveal how much of a guess was right.
    if key is None or not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise HTTPException(
            401, "missing or wrong X-API-Key header", {"WWW-Authenticate": "APIKey"}
        )


def _service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": description}
    for code, description in (
        (401, "Missing or wrong X-API-Key"),
        (404, "Product or collection not found"),
        (409, "The collection was written by other encoders"),
        (413, "Request body too large"),
        (422, "Invalid request: the detail names the field and the reason"),
        (503, "The engine is unavailable, or the server is over capacity (see Retry-After)"),
    )
}
router = APIRouter(dependencies=[Depends(_require_api_key)], responses=_ERRORS)
public = APIRouter()


# -- routes -----------------------------------------------------------------------------------
async def _match(
    service: Service, request: MatchRequest, image: bytes | None, field: str
) -> MatchResponse:
    matches = await run_in_threadpool(service.match, request, image, field)
    return MatchResponse(
        matches=[MatchOut(**{**m.as_dict(), "payload": public_payload(m.payload)}) for m in matches]
    )


@router.post("/match", tags=["match"])
async def match(body: MatchRequest, service: ServiceDep) -> MatchResponse:
    """Find the catalog products matching a title and/or an image (base64), best first."""
    try:
        image = decode_image_base64(body.image_base64) if body.image_base64 else None
    except ImageError as exc:
        raise ImageError(f"image_base64: {exc}") from exc
    return await _match(service, body, image, "image_base64")


@router.post("/match/upload", tags=["match"])
async def match_upload(
    service: ServiceDep,
    image: Annotated[UploadFile | None, File(description="The image file.")] = None,
    title: Annotated[str | None, Form()] = None,
    phash: Annotated[str | None, Form()] = None,
    k: Annotated[int | None, Form()] = None,
    fusion: Annotated[str | None, Form()] = None,
    thresholds: Annotated[str | None, Form(description='JSON object, e.g. {"text": 0.8}')] = None,
    filter_: Annotated[
        str | None, Form(alias="filter", description="JSON object, as for POST /match.")
    ] = None,
    exclude_ids: Annotated[list[str] | None, Form(description="Repeatable.")] = None,
) -> MatchResponse:
    """POST /match as a multipart form: an image file upload, and the other fields as form
    fields (`thresholds` and `filter` as JSON objects)."""
    fields: dict[str, Any] = {"title": title, "phash": phash, "k": k, "fusion": fusion}
    for name, raw in (("thresholds", thresholds), ("filter", filter_)):
        if raw:
            try:
                fields[name] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _invalid(("body", name), f"not a JSON object: {exc}", "json_invalid") from exc
    fields["exclude_ids"] = exclude_ids or []
    try:
        request = MatchRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise _body_errors(exc) from exc
    data = await image.read() if image is not None else None
    return await _match(service, request, data, "image")


@router.post("/products", tags=["products"])
async def upsert_products(
    body: ProductBatch, service: ServiceDep, request: Request
) -> UpsertResponse:
    """Insert or replace products by id. Each product is checked as a catalog row is; bad ones
    are reported with their position, field and reason, and the rest is stored. Re-sending an
    unchanged product rewrites nothing."""
    limit = request.app.state.settings.max_batch_products
    if len(body.products) > limit:
        raise _invalid(
            ("body", "products"),
            f"{len(body.products):,} products, over the limit of {limit:,} per request "
            "(PRODSEARCH_MAX_BATCH_PRODUCTS); send them in several requests",
            "too_long",
        )
    report = await run_in_threadpool(service.upsert, body.products)
    rejections = sorted(report.rejections, key=lambda r: r.row)
    return UpsertResponse(
        upserted=report.upserted,
        unchanged=report.unchanged,
        rejected=len(rejections),
        rejections=[
            # ingest names image decoding problems "image"; here that is the image_base64 field
            RejectionOut(
                row=r.row,
                id=r.product_id,
                field="image_base64" if r.field == "image" else r.field,
                reason=r.reason,
            )
            for r in rejections
        ],
    )


@router.get("/products/{product_id:path}", tags=["products"])
async def get_product(product_id: str, service: ServiceDep) -> ProductOut:
    """Return a stored product's payload."""
    payload = await run_in_threadpool(service.index.get, product_id)
    if payload is None:
        raise HTTPException(404, f"product {product_id!r} not found")
    return ProductOut(id=product_id, payload=public_payload(payload))


@router.delete("/products/{product_id:path}", tags=["products"])
async def delete_product(product_id: str, service: ServiceDep) -> DeleteResponse:
    """Delete a product."""
    if not await run_in_threadpool(service.delete, product_id):
        raise HTTPException(404, f"product {product_id!r} not found")
    return DeleteResponse(id=product_id)


@public.get("/health", tags=["health"], responses={503: {"model": HealthResponse}})
async def health(service: ServiceDep, response: Response) -> HealthResponse:
    """Whether the engine answers and the collection exists and fits this process's encoders
    (503 when not); no API key needed."""
    report = await run_in_threadpool(service.health)
    if report.status == "error":
        response.status_code = 503
    return report


# -- the app ----------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, index: Index | None = None) -> FastAPI:
    """Return the API app. It serves `index` when given (its store and models are shared, and
    it stays open after the app stops), else opens the collection `settings` names at startup.
    `settings` (default: the index's, else from the environment) also holds the API key and the
    request limits."""
    settings = settings or (index.settings if index is not None else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Admission keeps the working requests' threads to max_active_requests; the rest of
        # the pool is for /health and the docs, which must answer during an overload.
        threads = anyio.to_thread.current_default_thread_limiter()
        threads.total_tokens = settings.max_active_requests + SPARE_THREADS
        app.state.service = await run_in_threadpool(Service.open, settings, index)
        try:
            yield
        finally:
            await run_in_threadpool(app.state.service.close)

    app = FastAPI(
        title="prodsearch",
        version=__version__,
        summary="Product matching on Qdrant: one fused query per product.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        Admission,
        max_active=settings.max_active_requests,
        max_queued=settings.max_queued_requests,
        queue_timeout_s=settings.queue_timeout_s,
    )
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        ProdsearchError: _project_error,
        RequestValidationError: _validation_error,
        Exception: _unexpected_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    app.include_router(public)
    return app

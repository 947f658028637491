"""The routes, and `create_app`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from prodsearch import __version__
from prodsearch.api.guards import (
    BodyLimit,
    ServiceDep,
    body_errors,
    invalid,
    project_error,
    public,
    router,
    unexpected_error,
    validation_error,
)
from prodsearch.api.schemas import (
    AssignmentOut,
    ClusterOut,
    DeleteResponse,
    HealthResponse,
    MatchOut,
    MatchRequest,
    MatchResponse,
    ProductBatch,
    ProductOut,
    RejectionOut,
    UpsertResponse,
)
from prodsearch.api.service import Service, decode_image_base64, public_payload
from prodsearch.errors import (
    ConfigError,
    ImageError,
    ProdsearchError,
)
from prodsearch.index import Index, Match
from prodsearch.matching.assign import Verdict
from prodsearch.matching.cluster_log import CLUSTER_KEY
from prodsearch.serving import (
    SPARE_THREADS,
    Admission,
)
from prodsearch.settings import Settings


# -- routes -----------------------------------------------------------------------------------
async def _match(
    service: Service, request: MatchRequest, image: bytes | None, field: str
) -> MatchResponse:
    found = await run_in_threadpool(service.match, request, image, field)
    return MatchResponse(matches=[match_out(m, verdict, request.decide) for m, verdict in found])


def match_out(match: Match, verdict: Verdict | None, decided: bool) -> MatchOut:
    """A match as the API shows it: the engine's scores, the payload without bookkeeping, the
    stored cluster and, when the decision ran, the catalog's verdict on it (a match outside the
    candidates the decision reads is "no match", with no probability)."""
    decision = {}
    if decided:
        decision = {
            "decision": "match" if verdict and verdict.matched else "no match",
            "probability": verdict.probability if verdict else None,
            "rule": verdict.rule if verdict else "",
        }
    return MatchOut(
        **{k: v for k, v in match.as_dict().items() if k != "payload"},
        **decision,
        cluster_id=match.payload.get(CLUSTER_KEY),
        payload=public_payload(match.payload),
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
                raise invalid(("body", name), f"not a JSON object: {exc}", "json_invalid") from exc
    fields["exclude_ids"] = exclude_ids or []
    try:
        request = MatchRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise body_errors(exc) from exc
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
        raise invalid(
            ("body", "products"),
            f"{len(body.products):,} products, over the limit of {limit:,} per request "
            "(PRODSEARCH_MAX_BATCH_PRODUCTS); send them in several requests",
            "too_long",
        )
    report, assignments = await run_in_threadpool(service.upsert, body.products, body.assign)
    rejections = sorted(report.rejections, key=lambda r: r.row)
    return UpsertResponse(
        assignments=[AssignmentOut(**a.as_dict()) for a in assignments],
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
    cluster = payload.get(CLUSTER_KEY)
    return ProductOut(id=product_id, cluster_id=cluster, payload=public_payload(payload))


@router.delete("/products/{product_id:path}", tags=["products"])
async def delete_product(product_id: str, service: ServiceDep) -> DeleteResponse:
    """Delete a product."""
    if not await run_in_threadpool(service.delete, product_id):
        raise HTTPException(404, f"product {product_id!r} not found")
    return DeleteResponse(id=product_id)


@router.get("/clusters/{cluster_id}", tags=["clusters"])
async def get_cluster(cluster_id: str, service: ServiceDep) -> ClusterOut:
    """A stored product cluster: its members (when each joined) and every recorded change with
    its evidence (joins, merges, splits, merges proposed for review)."""
    try:
        return await run_in_threadpool(service.cluster, cluster_id)
    except ConfigError as exc:
        raise HTTPException(404, str(exc)) from exc


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
        ProdsearchError: project_error,
        RequestValidationError: validation_error,
        Exception: unexpected_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    app.include_router(public)
    return app

"""Errors, limits and authentication: what every route shares."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Security
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prodsearch.api.schemas import ErrorResponse
from prodsearch.api.service import Service
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


async def project_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProdsearchError)
    return JSONResponse({"detail": str(exc)}, status_code=status_of(exc))


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # FastAPI echoes each bad value back; an echoed megabyte of base64 helps no one.
    issues = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": issues}, status_code=422)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "internal server error; see the server log"}, status_code=500)


def invalid(loc: tuple[str | int, ...], message: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": message, "type": kind}])


def body_errors(error: ValidationError) -> RequestValidationError:
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

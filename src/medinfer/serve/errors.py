"""HTTP error mapping: every error response has the body
``{"error": {"type": "<name>", "message": "<text>", "status": <code>}}``.

Input errors (:class:`medinfer.errors.MedinferError`) map to 4xx by type; request
validation errors to 422; unknown routes / jobs to 404; a full queue to 429 with
``Retry-After``. Nothing the client sends produces a 5xx.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from medinfer.errors import (
    ConfigError,
    GeometryError,
    InvalidImageError,
    MedinferError,
    ModelError,
    ResourceLimitError,
    SeriesSelectionError,
    UnsafeArchiveError,
)
from medinfer.serve.store import QueueFullError
from medinfer.serve.uploads import UnsupportedFormatError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """The ``error`` object of an error response."""

    type: str
    message: str
    status: int


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx response."""

    error: ErrorDetail


class ApiError(Exception):
    """An HTTP error with our JSON body (raised by endpoints)."""

    def __init__(self, status: int, type_: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers


#: most specific first
_STATUS: tuple[tuple[type[MedinferError], int], ...] = (
    (UnsupportedFormatError, 415),
    (ResourceLimitError, 413),
    (UnsafeArchiveError, 400),
    (InvalidImageError, 422),
    (GeometryError, 422),
    (SeriesSelectionError, 422),
    (ConfigError, 422),
    (ModelError, 422),
)

_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Gone",
            413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "ValidationError",
            429: "TooManyRequests", 503: "ServiceUnavailable"}


def status_for(exc: MedinferError) -> int:
    """HTTP status for an input error (400 when no more specific code applies)."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 400


def error_response(status: int, type_: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"type": type_, "message": message,
                                           "status": status}})


def error_body(status: int, type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "status": status}}


#: OpenAPI ``responses=`` entries for the error codes an endpoint may return
def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _REASONS.get(c, "Error")} for c in codes}


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so that every error leaves as our JSON body."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(MedinferError)
    async def _medinfer(_: Request, exc: MedinferError) -> JSONResponse:
        return error_response(status_for(exc), type(exc).__name__, str(exc))

    @app.exception_handler(QueueFullError)
    async def _full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(429, "QueueFull", str(exc),
                              {"Retry-After": str(max(1, int(exc.retry_after)))})

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return error_response(422, "ValidationError", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = int(exc.status_code)
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if code == 400 and detail == "There was an error parsing the body":
            detail = "the request body could not be parsed (malformed multipart form?)"
        return error_response(code, _REASONS.get(code, "HTTPError"), detail,
                              getattr(exc, "headers", None))

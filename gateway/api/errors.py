"""Every error leaves in OpenAI's shape `{"error": {message, type, param, code}}`, never a trace."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.deps import request_id_of
from gateway.api.responses import JSON
from gateway.schema import APIError

log = structlog.get_logger("gateway.api")


def error_response(err: APIError) -> JSON:
    return JSON(err.body(), status_code=err.status, headers=err.headers)


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "Invalid request")).removeprefix("Value error, ")
    return APIError(400, f"Invalid request: {param + ': ' if param else ''}{msg}", param=param, code="invalid_value")


def _with_id(request: Request, response: JSON) -> JSON:
    # Every error answer carries the request id, so a client can quote it and find the log line.
    response.headers.setdefault("x-request-id", request_id_of(request))
    return response


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSON:
        return _with_id(request, error_response(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSON:
        return _with_id(request, error_response(validation_error(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSON:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _with_id(request, error_response(
            APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSON:
        return _with_id(request, unexpected_error(exc, request.url.path))


def unexpected_error(exc: Exception, path: str) -> JSON:
    # Log the type only: an exception's text may quote request content.
    log.error("unhandled_error", error=type(exc).__name__, path=path)
    return error_response(APIError(500, "Internal error in the gateway.", code="internal_error"))


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object, or the 400 that says what it is instead."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "The request body is not valid JSON (or not UTF-8).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data

"""HTTP errors in OpenAI's envelope: one translation from `broker.errors` codes to responses.

Every `HybridgenError` becomes `{"error": {"message", "type", "param", "code"}}`
(`openai_error_body`, its `type` from `OPENAI_TYPE`) with the status of its code
(`status_of`: `HTTP_STATUS`, or an HTTP-only subclass's own 413, 415 or 429) and
`Retry-After` when it carries one;
FastAPI's validation errors become a 400 naming the field; unknown routes a 404 envelope;
anything else a 500 envelope (and a log line), never a bare traceback.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.errors import BadRequest, ErrorCode, HybridgenError, Internal

logger = logging.getLogger(__name__)


#: The HTTP status of each code, wherever the error was raised (on the bus or not).
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
    # 499 is nginx's "client closed request"; a cancelled request has no one to answer.
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}


def status_of(exc: HybridgenError) -> int:
    """The HTTP status `exc` answers with: an HTTP-only subclass's own (`http_status`,
    such as 413 or 429, refining its code), else its code's (`HTTP_STATUS`)."""
    own: int | None = getattr(type(exc), "http_status", None)
    return own if own is not None else HTTP_STATUS[exc.code]


class PayloadTooLarge(BadRequest):
    """A body over the limit: `bad_request` in the envelope, HTTP 413."""

    http_status: ClassVar[int] = 413


#: OpenAI's `error.type` for each code.
OPENAI_TYPE: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "invalid_request_error",
    ErrorCode.UNAUTHORIZED: "authentication_error",
    ErrorCode.FORBIDDEN: "permission_error",
    ErrorCode.NOT_FOUND: "not_found_error",
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: "invalid_request_error",
    ErrorCode.OVERLOADED: "overloaded_error",
    ErrorCode.UNAVAILABLE: "service_unavailable_error",
    ErrorCode.TIMEOUT: "timeout_error",
    ErrorCode.CANCELLED: "cancelled_error",
    ErrorCode.INTERNAL: "server_error",
}


def openai_error_body(
    code: str | ErrorCode, message: str, *, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    try:
        kind = OPENAI_TYPE[ErrorCode(code)]
    except ValueError:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": str(code)}}


def error_response(exc: HybridgenError, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error envelope for a hybridgen error, with its HTTP status and Retry-After.

    An HTTP-only subclass may refine the envelope: its own `openai_code` and `openai_type`
    (a 429's `rate_limit_exceeded`, type `requests` or `tokens`) and `headers` of its own
    (the `x-ratelimit-*` figures).
    """
    all_headers = {**getattr(exc, "headers", {}), **(headers or {})}
    if exc.retry_after is not None:
        all_headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.code is ErrorCode.UNAUTHORIZED:
        all_headers.setdefault("WWW-Authenticate", "Bearer")
    body = openai_error_body(exc.code, exc.message, param=exc.param)
    if (code := getattr(exc, "openai_code", None)) is not None:
        body["error"]["code"] = code
    if (kind := getattr(exc, "openai_type", None)) is not None:
        body["error"]["type"] = kind
    return JSONResponse(body, status_code=status_of(exc), headers=all_headers)


def describe_validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic/FastAPI validation error."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # pydantic puts the union branch name in the location (`stop.str`, `stop.list[str]`).
    loc = [p for p in loc if not (p in ("str", "int", "float", "bool") or "[" in p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing":
        return f"missing required field {param!r}", param
    message = first.get("msg", "invalid value")
    if kind == "value_error" and message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return (f"invalid field {param!r}: {message}" if param else message), param


async def _hybridgen_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HybridgenError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = describe_validation_error(exc.errors())
    return error_response(BadRequest(message, param=param))


_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    503: ErrorCode.UNAVAILABLE,
    504: ErrorCode.TIMEOUT,
}


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
    if exc.status_code >= 500 and exc.status_code not in _STATUS_CODES:
        code = ErrorCode.INTERNAL
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = "no such route"
    return JSONResponse(
        openai_error_body(code, message),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unhandled(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(Internal(f"internal error ({type(exc).__name__})"))


def install_error_handlers(app: FastAPI) -> None:
    """Route every error to OpenAI's envelope (see the module docstring)."""
    app.add_exception_handler(HybridgenError, _hybridgen_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unhandled)


# --------------------------------------------------------------------------- body input

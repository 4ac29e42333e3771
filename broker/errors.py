"""Error codes shared by the bus and both HTTP APIs, and their one mapping to HTTP.

A `HybridgenError` crosses the bus as a `wire.Error` (code + message) and becomes an
HTTP response in OpenAI's envelope through `http_status` / `openai_error_body`.
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


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


class HybridgenError(Exception):
    """Base of every error hybridgen raises on purpose. Carries a code and a message.

    Args:
        message: human-readable text, safe to show a client.
        param: the request field at fault, where there is one.
        retry_after: seconds a client should wait before retrying (overload).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.value!r}, message={self.message!r})"


class BadRequest(HybridgenError):
    code = ErrorCode.BAD_REQUEST


class Unauthorized(HybridgenError):
    code = ErrorCode.UNAUTHORIZED


class Forbidden(HybridgenError):
    code = ErrorCode.FORBIDDEN


class NotFound(HybridgenError):
    code = ErrorCode.NOT_FOUND


class ContextLengthExceeded(HybridgenError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


class Overloaded(HybridgenError):
    code = ErrorCode.OVERLOADED


class Unavailable(HybridgenError):
    code = ErrorCode.UNAVAILABLE


class NoResponders(Unavailable):
    """Nobody subscribes to the subject: known at once, not after a timeout."""


class Timeout(HybridgenError, asyncio.TimeoutError):
    code = ErrorCode.TIMEOUT


class Cancelled(HybridgenError):
    code = ErrorCode.CANCELLED


class Internal(HybridgenError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[HybridgenError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        ContextLengthExceeded,
        Overloaded,
        Unavailable,
        Timeout,
        Cancelled,
        Internal,
    )
}


def error_for_code(
    code: str, message: str, *, param: str | None = None, retry_after: float | None = None
) -> HybridgenError:
    """Build the exception for a code received as data (an unknown code becomes internal)."""
    try:
        cls = _BY_CODE[ErrorCode(code)]
    except ValueError:
        cls, message = Internal, f"[{code}] {message}"
    return cls(message, param=param, retry_after=retry_after)


def http_status(code: str | ErrorCode) -> int:
    """HTTP status for a code; unknown codes map to 500."""
    try:
        return HTTP_STATUS[ErrorCode(code)]
    except ValueError:
        return 500


def openai_error_body(
    code: str | ErrorCode, message: str, *, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    try:
        kind = OPENAI_TYPE[ErrorCode(code)]
    except ValueError:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": str(code)}}

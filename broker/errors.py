"""Error codes shared by the bus and both HTTP APIs, and the HTTP status of each code.

A `HybridgenError` crosses the bus as a `wire.Error` (code + message). Each code's HTTP
status (`HybridgenError.http_status`) stays with the code, so an error answers the same
wherever it was raised; an API refines it by subclassing (413, 415, 429). The HTTP APIs
render errors in OpenAI's envelope (`serving.errors`).
"""

from __future__ import annotations

import asyncio
from enum import StrEnum


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

"""Error codes shared by the bus and both HTTP APIs.

A `HybridgenError` crosses the bus as a `wire.Error` (code + message), so an error answers
the same wherever it was raised. The HTTP APIs give each code its status and render errors
in OpenAI's envelope (`serving.errors`).
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

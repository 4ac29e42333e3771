"""Request bodies: strict JSON objects, validated into protocol models, size-limited before
they are read whole (uvicorn itself would read a 50 MiB body before the app could refuse it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.errors import (
    BadRequest,
)
from serving.errors import PayloadTooLarge, describe_validation_error, error_response

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object.

    Raises:
        BadRequest: empty body, invalid UTF-8, malformed JSON, NaN/Infinity, or a body
            that is not a JSON object.
    """
    body = await request.body()
    if not body.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(obj), "a scalar")
        raise BadRequest(f"request body must be a JSON object, got {kind}")
    if "\\u" in text and (where := _surrogate_at(obj)) is not None:
        raise BadRequest(
            f"field {where!r} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape); "
            "send valid Unicode",
            param=where,
        )
    return obj


def _surrogate_at(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string holding a lone surrogate (JSON can escape one,
    UTF-8 cannot carry it: tokenizers fail on it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    if not isinstance(value, dict | list):
        return None
    items: Any = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str) and _surrogate_at(key) is not None:
            return path or "body"  # in a key (never echoed back: it cannot be encoded)
        found = _surrogate_at(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def validate_body(cls: type[M], obj: dict[str, Any]) -> M:
    """Validate a parsed body against a protocol model; BadRequest names the field."""
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        message, param = describe_validation_error(exc.errors(include_url=False))
        raise BadRequest(message, param=param) from None


def json_body(cls: type[M]) -> Callable[[Request], Awaitable[M]]:
    """FastAPI dependency: the body parsed and validated as `cls` (400 envelope otherwise)."""

    async def dependency(request: Request) -> M:
        return validate_body(cls, await read_json_object(request))

    dependency.__name__ = f"json_body_{cls.__name__}"
    return dependency


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` without reading them whole.

    A `Content-Length` over the limit is refused before the app runs; a chunked body is
    counted as it is received and refused (413) as soon as it passes the limit, and the app
    then sees a client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send) -> None:
        exc = PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
        response = error_response(exc, headers={"Connection": "close"})
        await response({"type": "http"}, _empty_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except ClientDisconnect:
            if not refused:
                raise


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}

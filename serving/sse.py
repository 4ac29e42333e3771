"""Server-Sent Events that always end explicitly.

`sse_response` pulls the first item before answering, so a failure before any output (no
worker, overload, timeout) is a plain HTTP error with its status; after that every stream
ends with `data: [DONE]`, preceded by an error event (`data: {"error": {...}}`) when it fails
mid-way. When the client goes away the source iterator is closed (`aclose()`), so its
`finally` blocks run (the cloud API cancels the generation on the worker there).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from broker.errors import HybridgenError, Internal
from serving.errors import openai_error_body

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel | dict[str, Any]) -> bytes:
    """One SSE event: `data: {json}\\n\\n` (protocol models drop their None fields)."""
    data = payload.body() if hasattr(payload, "body") else payload
    if isinstance(data, BaseModel):
        data = data.model_dump(exclude_none=True)
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def sse_error_event(exc: HybridgenError) -> bytes:
    """The error event sent before `[DONE]` when a stream fails mid-way."""
    return sse_event(openai_error_body(exc.code, exc.message, param=exc.param))


async def sse_stream(
    first: Any, rest: AsyncIterator[Any], *, has_first: bool = True
) -> AsyncIterator[bytes]:
    """Encode `first` then `rest` as SSE; always end with `[DONE]` (error event before it).

    Closing this generator (client gone) closes `rest` so its cleanup runs.
    """
    try:
        if has_first:
            yield sse_event(first)
        async for item in rest:
            yield sse_event(item)
    except HybridgenError as exc:
        logger.info("stream failed mid-way: %r", exc)
        yield sse_error_event(exc)
    except Exception as exc:
        logger.exception("stream failed mid-way")
        yield sse_error_event(Internal(f"stream failed ({type(exc).__name__})"))
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()
    yield SSE_DONE


async def sse_response(
    source: AsyncIterator[Any], *, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """Start an SSE answer from an async iterator of protocol models (or dicts).

    The first item is awaited here, so a failure before any output raises (and becomes a
    normal HTTP error response); later failures become an error event, then `[DONE]`.
    """
    try:
        first = await anext(source)
        has_first = True
    except StopAsyncIteration:
        first, has_first = None, False
    except BaseException:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
        raise
    return StreamingResponse(
        sse_stream(first, source, has_first=has_first),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **(headers or {})},
    )

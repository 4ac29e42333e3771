"""Streaming requests: the caller's side of a generation on the bus.

Streaming protocol (see `broker.wire`): the caller publishes a `GenerateRequest` with a
fresh inbox as reply subject; the worker answers `Chunk(seq=0)` at once on admission
(accept), then `Chunk` seq 1.., then `Done` -- or `Error` at any point. `request_stream`
turns that into an async iterator (`ReplyStream`) with timeouts, a sequence check and typed
errors, and publishes `hg.cancel.<request_id>` when the caller leaves early.

All streams of one connection share one wildcard inbox subscription (`_INBOX.<nuid>.*`, or
`_INBOX_<user>.<nuid>.*` for an authenticated user), so a request costs one publish, not
a SUB/UNSUB pair. Connecting is `broker.bus.connect`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import subjects, wire
from broker.errors import BadRequest, HybridgenError, Internal, NoResponders, Timeout, Unavailable

__all__ = ["ReplyStream", "request_stream"]

log = logging.getLogger(__name__)

_STATUS = "Status"
_NO_RESPONDERS = "503"


# -- streaming requests -----------------------------------------------------------------------


class _InboxMux:
    """One wildcard inbox subscription per connection, routing replies by their last token."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.prefix = nc.new_inbox()
        self.queues: dict[str, asyncio.Queue[Msg]] = {}
        self.sub: Subscription | None = None
        self._lock = asyncio.Lock()
        self._next = 0

    async def ensure_subscribed(self) -> None:
        if self.sub is not None:
            return
        async with self._lock:
            if self.sub is None:
                self.sub = await self.nc.subscribe(f"{self.prefix}.*", cb=self._route)

    async def _route(self, msg: Msg) -> None:
        queue = self.queues.get(msg.subject[len(self.prefix) + 1 :])
        if queue is not None:
            queue.put_nowait(msg)

    def open(self) -> tuple[str, str, asyncio.Queue[Msg]]:
        self._next += 1
        key = str(self._next)
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        self.queues[key] = queue
        return key, f"{self.prefix}.{key}", queue

    def close(self, key: str) -> None:
        self.queues.pop(key, None)


_MUXES: weakref.WeakKeyDictionary[Client, _InboxMux] = weakref.WeakKeyDictionary()


async def _mux_for(nc: Client) -> _InboxMux:
    mux = _MUXES.get(nc)
    if mux is None:
        mux = _MUXES[nc] = _InboxMux(nc)
    await mux.ensure_subscribed()
    return mux


class ReplyStream:
    """The replies of one streamed generation. Iterate it for `wire.Chunk`s.

    Iteration yields every `Chunk` from `seq` 0 (the accept chunk, usually without text)
    and stops after `Done`, which is then in `done`.

    Attributes:
        request_id: the request's id.
        subject: where the request was sent.
        done: the final `wire.Done`, once received.
        accepted_at: `time.monotonic()` when the accept chunk arrived.
    """

    def __init__(
        self,
        request: wire.GenerateRequest,
        subject: str,
        queue: asyncio.Queue[Msg],
        *,
        accept_timeout: float,
        idle_timeout: float,
        total_timeout: float | None,
    ) -> None:
        self.request_id = request.request_id
        self.subject = subject
        self.done: wire.Done | None = None
        self.accepted_at: float | None = None
        self.started_at = time.monotonic()
        self._queue = queue
        self._accept_timeout = accept_timeout
        self._idle_timeout = idle_timeout
        self._deadline = None if total_timeout is None else self.started_at + total_timeout
        self._total_timeout = total_timeout
        self._next_seq = 0
        self._buffered: wire.Chunk | None = None
        #: True once the stream ended (Done or Error): nothing to cancel any more.
        self.finished = False

    async def _receive(self) -> wire.Chunk | wire.Done:
        accepting = self._next_seq == 0
        wait = self._accept_timeout if accepting else self._idle_timeout
        total_bound = False
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left < wait:
                wait, total_bound = max(0.0, left), True
        try:
            if self._queue.empty():
                msg = await asyncio.wait_for(self._queue.get(), wait)
            else:
                msg = self._queue.get_nowait()
        except TimeoutError:
            if total_bound:
                raise Timeout(
                    f"{self.subject}: request {self.request_id} exceeded its total timeout "
                    f"of {self._total_timeout:g} s"
                ) from None
            if accepting:
                raise Timeout(
                    f"{self.subject}: no worker accepted request {self.request_id} within "
                    f"{self._accept_timeout:g} s"
                ) from None
            raise Timeout(
                f"{self.subject}: request {self.request_id} sent nothing for "
                f"{self._idle_timeout:g} s (idle timeout)"
            ) from None
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            self.finished = True
            raise NoResponders(f"no worker serves {self.subject}")
        try:
            reply = wire.decode_reply(msg.data)
        except BadRequest as exc:
            self.finished = True
            raise Internal(f"{self.subject}: malformed reply: {exc.message}") from None
        if isinstance(reply, wire.Error):
            self.finished = True
            raise reply.to_exception()
        if reply.seq != self._next_seq:
            self.finished = True
            raise Internal(
                f"{self.subject}: broken reply sequence for request {self.request_id}: "
                f"expected seq {self._next_seq}, got {reply.seq}"
            )
        self._next_seq += 1
        if accepting:
            self.accepted_at = time.monotonic()
        return reply

    async def wait_accepted(self) -> None:
        """Wait for the accept chunk (`seq` 0); iteration yields it first."""
        if self._next_seq > 0:
            return
        reply = await self._receive()
        if isinstance(reply, wire.Done):
            self.finished = True
            self.done = reply
        else:
            self._buffered = reply

    def __aiter__(self) -> ReplyStream:
        return self

    async def __anext__(self) -> wire.Chunk:
        if self._buffered is not None:
            chunk, self._buffered = self._buffered, None
            return chunk
        if self.finished:
            raise StopAsyncIteration
        reply = await self._receive()
        if isinstance(reply, wire.Done):
            self.finished = True
            self.done = reply
            raise StopAsyncIteration
        return reply

    async def collect(self) -> tuple[str, wire.Done]:
        """Read the whole stream; the joined text and the `Done`."""
        parts = [chunk.text async for chunk in self]
        assert self.done is not None
        return "".join(parts), self.done


@asynccontextmanager
async def request_stream(
    nc: Client,
    request: wire.GenerateRequest,
    *,
    subject: str | None = None,
    accept_timeout: float = 2.0,
    idle_timeout: float = 10.0,
    total_timeout: float | None = None,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[ReplyStream]:
    """Send a generation request and stream its replies.

    Entering the context publishes the request and waits for the accept chunk, so the
    caller knows before streaming anything whether a worker took it.

    Args:
        nc: a connected client.
        request: the request (its `request_id` names the cancel subject).
        subject: where to send it (default `subjects.gen(request.model)`).
        accept_timeout: seconds for the first reply (admission).
        idle_timeout: longest gap between two replies after that.
        total_timeout: deadline for the whole stream.
        headers: NATS headers of the request message (the caller's W3C trace context).

    Raises:
        NoResponders: no worker subscribes (known at once).
        Timeout: accept, idle or total timeout.
        HybridgenError: the worker's coded `Error` (e.g. `Overloaded`, `BadRequest`).
        Internal: a malformed reply or a broken sequence.
    """
    subject = subject or subjects.gen(request.model)
    try:
        mux = await _mux_for(nc)
    except nats.errors.Error as exc:
        raise Unavailable(f"the bus connection is not usable ({exc})") from None
    key, inbox, queue = mux.open()
    stream = ReplyStream(
        request,
        subject,
        queue,
        accept_timeout=accept_timeout,
        idle_timeout=idle_timeout,
        total_timeout=total_timeout,
    )
    payload = wire.encode(request)

    async def send() -> None:
        try:
            await nc.publish(subject, payload, reply=inbox, headers=headers)
        except nats.errors.MaxPayloadError:
            stream.finished = True
            raise BadRequest(
                f"request of {len(payload)} bytes exceeds the bus limit of {nc.max_payload} bytes",
                param="prompt",
            ) from None
        except nats.errors.Error as exc:
            stream.finished = True
            raise Unavailable(f"cannot send to {subject} ({exc})") from None

    try:
        await send()
        try:
            await stream.wait_accepted()
        except NoResponders:
            # Right after a worker re-subscribes to a subject it had left (a restart, a
            # drain then resume), nats-server 2.15 answered "no responders" to ~3% of first
            # requests (measured); an immediate second ask always found it. Nobody got the
            # first one, so asking again cannot duplicate work.
            stream.finished = False
            await send()
            await stream.wait_accepted()
        yield stream
    finally:
        mux.close(key)
        if not stream.finished:
            await _publish_cancel(nc, request.request_id)


async def _publish_cancel(nc: Client, request_id: str) -> None:
    try:
        await nc.publish(subjects.cancel(request_id), b"")
    except (HybridgenError, ValueError, nats.errors.Error, OSError) as exc:
        log.warning("could not publish cancel of %s: %s", request_id, exc)
    else:
        log.debug("cancel published for %s", request_id)

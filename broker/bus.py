"""Bus helpers: connect (fail fast), streaming requests, and (re-exported) serving.

Streaming protocol (see `broker.wire`): the caller publishes a `GenerateRequest` with a
fresh inbox as reply subject; the worker answers `Chunk(seq=0)` at once on admission
(accept), then `Chunk` seq 1.., then `Done` -- or `Error` at any point. `request_stream`
turns that into an async iterator with timeouts, a sequence check and typed errors, and
publishes `hg.cancel.<request_id>` when the caller leaves early.

All streams of one connection share one wildcard inbox subscription (`_INBOX.<nuid>.*`, or
`_INBOX_<user>.<nuid>.*` for an authenticated user), so a request costs one publish, not
a SUB/UNSUB pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker import subjects, wire
from broker.config import inbox_prefix
from broker.errors import (
    BadRequest,
    HybridgenError,
    Internal,
    NoResponders,
    Timeout,
    Unauthorized,
    Unavailable,
)
from broker.service import (
    GenerateHandler,
    GenerationService,
    Responder,
    send_control,
    serve_control,
)
from broker.settings import BusSettings

__all__ = [
    "GenerateHandler",
    "GenerationService",
    "ReplyStream",
    "Responder",
    "bounded",
    "close_bounded",
    "connect",
    "connect_settings",
    "request_stream",
    "send_control",
    "serve_control",
]

log = logging.getLogger(__name__)

ErrorCallback = Callable[[Exception], Awaitable[None]]
_STATUS = "Status"
_NO_RESPONDERS = "503"


# -- connecting -------------------------------------------------------------------------------


async def connect(
    url: str,
    *,
    name: str,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds: str | None = None,
    tls: ssl.SSLContext | None = None,
    error_cb: ErrorCallback | None = None,
    connect_timeout: float = 2.0,
    **options: Any,
) -> Client:
    """Connect to NATS, failing fast when no server answers.

    nats-py's own first connect retries for about two minutes; here every server of `url`
    is tried once, and the call fails as soon as each has refused (or after
    `connect_timeout` per server). Once connected, the client reconnects forever
    (`max_reconnect_attempts=-1`) so a service survives a broker restart.

    Args:
        url: server URL, or several comma-separated (a cluster).
        name: connection name shown by the server (`nats server report connections`).
        user: user name (with `password`).
        password: password of `user`.
        token: auth token instead of user/password.
        creds: path of a `.creds` file (JWT auth).
        tls: SSL context for `tls://` servers (pass it explicitly: otherwise the system
            trust store is used).
        error_cb: called with asynchronous errors after the connection is up (permission
            violations arrive here); default logs them.
        connect_timeout: seconds to wait for each server.
        **options: any other `nats.connect` keyword, overriding the defaults here. With a
            `user`, reply inboxes are `_INBOX_<user>.…` (see `broker.config.inbox_prefix`).

    Raises:
        Unauthorized: the server refused the credentials.
        Unavailable: no server answered.
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise Unavailable("no NATS server URL given")
    failures: list[Exception] = []
    gave_up = asyncio.Event()
    connected = False

    async def _error_cb(exc: Exception) -> None:
        if not connected:
            failures.append(exc)
            # A server that refuses a login closes the socket right after its -ERR, and the
            # reset can swallow the -ERR: give resets a few tries to show the real reason.
            weight = sum(1 / _RESET_TRIES if _is_reset(e) else 1 for e in failures)
            if weight >= len(servers) - 1e-9 or _is_auth_error(exc):
                gave_up.set()
            return
        if error_cb is not None:
            await error_cb(exc)
            return
        # While the server is away every reconnect attempt fails the same way: say it once.
        text = str(exc) or type(exc).__name__
        level = logging.DEBUG if text == last_error[0] else logging.WARNING
        last_error[0] = text
        log.log(level, "nats connection %s: %s", name, text)

    last_error = [""]

    async def _disconnected() -> None:
        log.info("nats connection %s: disconnected", name)

    async def _reconnected() -> None:
        last_error[0] = ""
        log.info("nats connection %s: reconnected", name)

    settings: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "error_cb": _error_cb,
        "disconnected_cb": _disconnected,
        "reconnected_cb": _reconnected,
        "connect_timeout": connect_timeout,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "ping_interval": 20,
        "max_outstanding_pings": 3,
    }
    if user is not None:
        settings["user"] = user
        # Replies come to this user's own inboxes, the only ones its permissions allow.
        settings["inbox_prefix"] = inbox_prefix(user)
    if password is not None:
        settings["password"] = password
    if token is not None:
        settings["token"] = token
    if creds is not None:
        settings["user_credentials"] = str(creds)
    if tls is not None:
        settings["tls"] = tls
    settings.update(options)

    nc = Client()
    attempt = asyncio.ensure_future(nc.connect(**settings))
    giving_up = asyncio.ensure_future(gave_up.wait())
    try:
        done, _ = await asyncio.wait(
            {attempt, giving_up},
            timeout=connect_timeout * len(servers) + 0.5,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if attempt in done and not attempt.cancelled() and attempt.exception() is None:
            connected = True
            return nc
    finally:
        giving_up.cancel()
        if not connected:  # failed, timed out, or we were cancelled: leave nothing running
            attempt.cancel()
            with contextlib.suppress(BaseException):
                await attempt
            with contextlib.suppress(Exception):
                await nc.close()
    cause: BaseException | None = failures[-1] if failures else None
    if attempt.done() and not attempt.cancelled() and attempt.exception() is not None:
        cause = attempt.exception()
    detail = f"{type(cause).__name__}: {cause}" if cause is not None else "timed out"
    if failures and all(_is_reset(e) for e in failures):
        detail += "; the server closed the connection during the handshake (credentials? TLS?)"
    # The refusal can come first and resets of the retries after it: any refusal decides.
    if any(_is_auth_error(e) for e in [*failures, *([cause] if cause is not None else [])]):
        raise Unauthorized(f"NATS server at {url} refused the credentials of {name!r}")
    raise Unavailable(f"cannot connect to NATS at {url} ({detail})")


_RESET_TRIES = 3


def _is_reset(exc: BaseException) -> bool:
    return (
        isinstance(exc, ConnectionResetError | BrokenPipeError)
        or "unexpected eof" in str(exc).lower()
    )


def _is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.AuthorizationError) or "authoriz" in str(exc).lower()


async def connect_settings(
    settings: BusSettings, *, name: str, error_cb: ErrorCallback | None = None
) -> Client:
    """`connect` with the values of a `BusSettings` (env `HG_NATS_*`).

    The password is `password`, else read from `password_file`; `tls_ca` (the CA that
    signed the server's certificate) turns on TLS verified against that CA.

    Raises:
        Unauthorized: the server refused the credentials.
        Unavailable: no server answered, or the password file cannot be read.
    """
    tls = None
    if settings.tls_ca is not None:
        try:
            tls = ssl.create_default_context(cafile=str(settings.tls_ca))
        except (OSError, ssl.SSLError) as exc:
            raise Unavailable(
                f"cannot load the CA bundle {settings.tls_ca} (HG_NATS_TLS_CA): {exc}"
            ) from None
    try:
        password = settings.resolved_password()
    except ValueError as exc:
        raise Unavailable(str(exc)) from None
    return await connect(
        settings.url,
        name=name,
        user=settings.user,
        password=password,
        token=settings.token,
        creds=str(settings.creds) if settings.creds else None,
        tls=tls,
        error_cb=error_cb,
        connect_timeout=settings.connect_timeout_s,
    )


# -- shutting down ----------------------------------------------------------------------------


async def bounded(step: Awaitable[Any], timeout: float, what: str) -> bool:  # noqa: ASYNC109
    """Await one shutdown step on the bus for at most `timeout` s; whether it completed.

    With the broker gone or frozen a flush (and so a subscription's drain, a micro service's
    stop) waits for a PONG that never comes, and `nats-py` retries for minutes: a stopping
    service must not. A failure or a timeout is logged, never raised; a step still running
    is cancelled and not waited for (nats-py's `drain()` swallows a cancel and goes on).
    """
    task = asyncio.ensure_future(step)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        await asyncio.wait({task}, timeout=max(timeout, 0.01))
    finally:
        if not task.done():
            task.cancel()
    if not task.done():
        log.warning("%s: not done within %g s; going on without it", what, timeout)
        return False
    if task.cancelled():
        return False
    if task.exception() is not None:
        log.warning("%s failed: %s", what, task.exception())
        return False
    return True


async def close_bounded(nc: Client | None, timeout: float = 1.0) -> None:  # noqa: ASYNC109
    """Close `nc` within `timeout` s whether or not the broker answers; never raises.

    What was published is flushed first (half the time) when the connection is up, then the
    connection closes: no reconnect loop is left behind. Used by every service on its way
    out instead of `nc.drain()`, which waits up to 40 s on a broker that does not answer,
    and `nc.close()`, which can raise `ConnectionResetError` while the server is down.
    """
    if nc is None or nc.is_closed:
        return
    deadline = time.monotonic() + timeout
    name = nc.options.get("name") or "nats connection"
    # nats-py's reconnect loop can lose a cancel (a connect refused in the same tick, seen
    # under `asyncio.run`'s final cancel): with its attempts bounded it ends by itself.
    nc.options["max_reconnect_attempts"] = 1
    if nc.is_connected and not nc.is_draining and timeout > 0:
        await bounded(nc.flush(timeout / 2), timeout / 2, f"{name}: flush")  # type: ignore[arg-type]
    await bounded(nc.close(), deadline - time.monotonic(), f"{name}: close")


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
            await nc.publish(subject, payload, reply=inbox)
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

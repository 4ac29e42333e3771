"""Bus helpers: connect (fail fast), shut down within a bound, and (re-exported) serving.

`connect` fails at once when no server answers, then reconnects forever; `bounded` and
`close_bounded` keep a stopping service from waiting on a broker that is gone. Streaming
requests (the caller's side of a generation) are `broker.streaming.request_stream`; the
serving side is `broker.service`, re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client

from broker.control import send_control, serve_control
from broker.errors import Unauthorized, Unavailable
from broker.permissions import inbox_prefix
from broker.service import GenerateHandler, GenerationService, Responder
from broker.settings import BusSettings, refused_message

__all__ = [
    "GenerateHandler",
    "GenerationService",
    "Responder",
    "bounded",
    "close_bounded",
    "connect",
    "connect_settings",
    "send_control",
    "serve_control",
]

log = logging.getLogger(__name__)

ErrorCallback = Callable[[Exception], Awaitable[None]]


# -- connecting -------------------------------------------------------------------------------


class BusClient(Client):
    """nats-py's client whose `flush` keeps its promise: what was sent before it has reached
    the server when it returns.

    nats-py 2.16 writes a flush's PING straight to the socket, while subscriptions and
    publishes wait in its pending buffer for the flusher task. The PONG can then come back
    before the server has seen a SUB made just before, so "subscribe, flush, then expect
    messages" loses messages now and then: a control request answered `no responders` by a
    node that had just flushed its endpoints, an event that never reached a subscriber.
    Writing the pending buffer first (bounded by the same timeout) closes that gap.
    """

    async def flush(self, timeout: int = 10) -> None:  # noqa: ASYNC109
        if self.is_connected:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._flush_pending(force_flush=True), timeout)
        await super().flush(timeout)


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
            `user`, reply inboxes are `_INBOX_<user>.…` (see `broker.permissions.inbox_prefix`).

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

    nc = BusClient()
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
        other = "the token given" if token else "the creds file given" if creds else None
        raise Unauthorized(refused_message(url, user, other=other))
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

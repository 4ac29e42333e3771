"""Deadlines for slow HTTP clients, shared by the edge API and the cloud API.

uvicorn bounds only the idle time between two requests on a kept-alive connection
(`timeout_keep_alive`). Nothing bounds how long a client may take to send one request: a
client that drips its headers a byte at a time (slowloris) holds its connection, and the
task serving it, for as long as it likes. Nor does anything bound a client that stops
reading an answer: the server's writes wait on it for ever.

`deadline_protocol` makes uvicorn's h11 protocol class with both bounds:

- **read deadline**: from a connection's first byte (or the first byte of its next
  request), the whole request -- headers and body -- must arrive within `read_timeout_s`;
  otherwise the connection is closed (no response can be sent before the request line).
  A new connection that sends nothing is closed after `first_byte_timeout_s`.
- **write stall deadline**: when the client reads so slowly that the transport's write
  buffer fills up (uvicorn then pauses the app's writes), it must make room again within
  `write_timeout_s`; otherwise the connection is aborted. The app sees the client as gone
  (`http.disconnect`), so a streamed generation is cancelled like any hang-up.

Use it as `uvicorn.Config(app, ..., http=deadline_protocol(read_timeout_s=...,
write_timeout_s=...))`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

#: Seconds a client may take to send one whole request (headers and body).
READ_TIMEOUT_S = 10.0
#: Seconds a client may leave the server's write buffer full before it is cut off.
WRITE_TIMEOUT_S = 30.0
#: Seconds a new connection may stay silent before its first byte. Longer than the read
#: deadline: a loaded client may connect well before it gets round to writing, and a server
#: that closes the connection under it makes it fail with a reset.
FIRST_BYTE_TIMEOUT_S = 30.0


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing clients too slow to send a request or to read."""

    read_timeout_s: float = READ_TIMEOUT_S
    write_timeout_s: float = WRITE_TIMEOUT_S
    first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S

    _read_deadline: asyncio.TimerHandle | None = None
    _silent = True  # no byte received yet on this connection
    _write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that sends nothing at all is bounded too: uvicorn's keep-alive
        # timer starts only after a first response.
        self._arm_read_deadline(max(self.first_byte_timeout_s, self.read_timeout_s))

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_deadlines()
        elif self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            # A request has begun and is not whole yet: its deadline runs from its first byte.
            if self._silent:
                self._cancel_read_deadline()
            self._arm_read_deadline(self.read_timeout_s)
        else:
            self._cancel_read_deadline()
        self._silent = False

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _arm_read_deadline(self, seconds: float) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(seconds, self._read_too_slow)

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _cancel_deadlines(self) -> None:
        for handle in (self._read_deadline, self._write_deadline):
            if handle is not None:
                handle.cancel()
        self._read_deadline = self._write_deadline = None

    def _read_too_slow(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing() or self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            return
        idle = self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]
        if idle and self.timeout_keep_alive_task is not None:
            return  # between requests with nothing received: the keep-alive timer's business
        logger.info("closing a connection from %s: too slow to send a request", _peer(self.client))
        self.transport.close()

    def _write_stalled(self) -> None:
        self._write_deadline = None
        if self.transport.is_closing():
            return
        logger.info(
            "aborting a connection to %s: it read nothing for %g s",
            _peer(self.client),
            self.write_timeout_s,
        )
        self.transport.abort()  # `close` would wait for the buffer to drain: it never will


def _peer(client: tuple[str, int] | None) -> str:
    return "an unknown client" if client is None else f"{client[0]}:{client[1]}"


#: Seconds an idle kept-alive connection stays open. Longer than the clients' own pool
#: expiry (httpx and the openai client: 5 s), so a client never reuses a connection the
#: server is closing at that very moment (a `ReadError` on its next request).
KEEP_ALIVE_S = 15


def deadline_protocol(
    *,
    read_timeout_s: float = READ_TIMEOUT_S,
    write_timeout_s: float = WRITE_TIMEOUT_S,
    first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_S,
) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with these deadlines, for `uvicorn.Config(http=...)`.

    Args:
        read_timeout_s: seconds one whole request (headers and body) may take to arrive.
        write_timeout_s: seconds the client may leave the write buffer full.
        first_byte_timeout_s: seconds a new connection may stay silent (at least
            `read_timeout_s`).

    Raises:
        ValueError: a deadline is not a positive number of seconds.
    """
    for name, value in (
        ("read_timeout_s", read_timeout_s),
        ("write_timeout_s", write_timeout_s),
        ("first_byte_timeout_s", first_byte_timeout_s),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return type(
        "DeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {
            "read_timeout_s": float(read_timeout_s),
            "write_timeout_s": float(write_timeout_s),
            "first_byte_timeout_s": float(first_byte_timeout_s),
        },
    )


def add_slow_client_arguments(parser: argparse.ArgumentParser) -> None:
    """`--read-timeout-s` and `--write-timeout-s`: the deadlines for slow clients."""
    parser.add_argument(
        "--read-timeout-s",
        type=float,
        default=READ_TIMEOUT_S,
        help="seconds a client may take to send one whole request, headers and body "
        f"(default {READ_TIMEOUT_S:g}); a slower one (slowloris) is disconnected",
    )
    parser.add_argument(
        "--write-timeout-s",
        type=float,
        default=WRITE_TIMEOUT_S,
        help="seconds a client may leave the server's write buffer full while it reads "
        f"nothing of an answer (default {WRITE_TIMEOUT_S:g}); it is then disconnected and its "
        "generation cancelled",
    )

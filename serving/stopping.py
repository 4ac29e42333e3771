"""Stopping within a bound: a service that got SIGTERM exits by itself in time, or is ended.

Each service drains on a stop signal (open requests finish within `--drain-timeout-s`),
then closes its bus connection and model. Should any of that hang (a request stuck on a bus
that is gone, a frozen broker) a watchdog ends the process anyway, with status 1 and a line
saying so: the drain bound is a promise the process keeps, not a hope.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: Seconds a service may take, after its drain, to close its bus connection and model.
CLOSE_BOUND_S = 5.0


def start_exit_watchdog(name: str, exit_after_s: float) -> threading.Timer:
    """End this process (status 1) `exit_after_s` from now unless it has exited first."""

    def force_exit() -> None:
        print(
            f"hybridgen {name}: not stopped {exit_after_s:g} s after the stop signal; exiting now",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    watchdog = threading.Timer(exit_after_s, force_exit)
    watchdog.daemon = True
    watchdog.start()
    return watchdog


def run_bounded(config: Any, *, name: str, exit_after_s: float) -> bool:
    """Run uvicorn with `config`, exiting at the latest `exit_after_s` after a stop signal.

    On SIGTERM/SIGINT open requests get the drain time (`timeout_graceful_shutdown`), are
    then cancelled, and the app closes; the watchdog starts at the first signal.

    Returns:
        Whether the server started.
    """
    import uvicorn

    class BoundedServer(uvicorn.Server):
        watchdog: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            if self.watchdog is None:
                self.watchdog = start_exit_watchdog(name, exit_after_s)

    server = BoundedServer(config)
    server.run()
    return bool(server.started)


def serve_http(
    build_app: Callable[[], Any],
    *,
    name: str,
    host: str,
    port: int,
    log_level: str,
    read_timeout_s: float,
    write_timeout_s: float,
    drain_timeout_s: float,
) -> int:
    """Serve an API with uvicorn, the one way both APIs start: slow clients cut off
    (`serving.slow_clients`), idle keep-alives bounded, and a stop signal drains open
    requests for `drain_timeout_s`, then exits within its bound (`run_bounded`).

    Returns:
        The process status: 0, or 3 when the server did not start (as `uvicorn.run` says).

    Raises:
        ValueError: a read or write timeout out of range (checked before the app is built).
    """
    import uvicorn

    from serving.slow_clients import KEEP_ALIVE_S, deadline_protocol

    http = deadline_protocol(read_timeout_s=read_timeout_s, write_timeout_s=write_timeout_s)
    drain_s = max(0.0, drain_timeout_s)
    config = uvicorn.Config(
        build_app(),
        host=host,
        port=port,
        log_level=log_level,
        # A stream stuck on a worker or a client must not hold the exit forever.
        timeout_graceful_shutdown=drain_s,  # type: ignore[arg-type]  # seconds; a float works
        http=http,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    started = run_bounded(config, name=name, exit_after_s=drain_s + CLOSE_BOUND_S)
    return 0 if started else 3

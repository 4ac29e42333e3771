"""The supervisor: the broker plus child processes, started in order and stopped in reverse.

A child that dies (any exit the launcher did not ask for) is reported -- a log line and a
`child_exited` event on `hg.events.launcher.<id>` -- and restarted with exponential back-off
(`child_restarted`), while the other children keep serving; a dead nats-server is restarted
on the same port and store. Background children write to `$HG_HOME/logs/<name>.log` and run
in their own process group, which the launcher signals as a whole, so no helper process is
left behind; they also get SIGTERM should the launcher itself die.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import close_bounded
from broker.cli import StopSignals
from broker.config import TLSFiles
from broker.contexts import DEFAULT_CONTEXT
from broker.errors import HybridgenError
from broker.server import NatsServer, death_signal_hook, open_private_log, private_folder
from broker.telemetry import default_node_id
from hybridgen.up import log
from hybridgen.up.bus import BROKER, DEFAULT_PORT, Broker
from hybridgen.up.spec import ChildFailed, ChildSpec

#: Seconds between a restarted broker serving and the launcher publishing its exit and
#: restart events: clients reconnect every 0.5 s and then subscribe again.
RESUBSCRIBE_GRACE_S = 1.5


@dataclass(frozen=True)
class Backoff:
    """Restart delays: `initial` seconds, doubling up to `maximum`.

    A child that stayed up for `stable_s` seconds (default a minute) before it died starts
    again from `initial`; one that keeps crashing quickly waits longer each time, never
    less. Time up is read from `clock` (monotonic seconds; a test passes its own).
    """

    initial: float = 0.5
    maximum: float = 30.0
    stable_s: float = 60.0
    clock: Callable[[], float] = time.monotonic

    def delay(self, failures: int) -> float:
        """The wait before restart number `failures` (1-based) of a quick-crash streak."""
        return min(self.maximum, self.initial * 2 ** max(0, failures - 1))


class Launcher(Broker):
    """The broker plus supervised child processes, started in order and stopped in reverse.

    Args:
        home: the data directory (`$HG_HOME`).
        children: the processes to run after the broker.
        nats_url: use this external server instead of starting one.
        host: broker listen address.
        port: broker client port (if taken, a free one is used instead).
        backoff: restart delays of children (and of the broker) that die.
        secure: run the broker with a user per service and role permissions (and TLS
            beyond loopback); ignored with `nats_url` (then the environment's credentials,
            `HG_NATS_*`, are passed on as they are).
        tls: the broker's certificate, key and CA; None makes a private CA when the broker
            listens beyond loopback (secure only).
        context: the name of the context saved for the operator's commands run by hand.

    Attributes:
        node_id: the launcher's id on the bus (its events: `hg.events.launcher.<node_id>`).
        restarts: how many times each child (and `nats-server`) was restarted.
    """

    def __init__(
        self,
        *,
        home: Path,
        children: list[ChildSpec] | None = None,
        nats_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        backoff: Backoff | None = None,
        secure: bool = True,
        tls: TLSFiles | None = None,
        context: str = DEFAULT_CONTEXT,
    ) -> None:
        super().__init__(
            home=home,
            nats_url=nats_url,
            host=host,
            port=port,
            secure=secure,
            tls=tls,
            context=context,
        )
        self.children = list(children or [])
        self.backoff = backoff or Backoff()
        self.node_id = default_node_id("launcher")
        self.restarts: dict[str, int] = {}
        self._specs: list[ChildSpec] = []  # start order
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._since: dict[str, float] = {}  # when each child's current process started
        self._logs: dict[str, IO[bytes]] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._events: Client | None = None
        self._stopping = False
        self._done = asyncio.Event()
        self._foreground_status: int | None = None

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def processes(self) -> list[tuple[ChildSpec, asyncio.subprocess.Process]]:
        """The current process of each started child, in start order."""
        return [(spec, self._running[spec.name]) for spec in self._specs]

    def log_path(self, name: str) -> Path:
        """The log file of a background child (or the broker)."""
        if name == BROKER and isinstance(self.server, NatsServer):
            return self.server.log_path
        return self.logs_dir / f"{name}.log"

    # -- the broker -------------------------------------------------------------------------

    async def start_broker(self) -> str:
        """Start (or check) the broker, supervise it, and connect; its client URL."""
        await self.start_server(self.children)
        if isinstance(self.server, NatsServer):
            await self.prepare_buckets()
            self._supervisors.append(asyncio.create_task(self._supervise_broker()))
        self.url_file.parent.mkdir(parents=True, exist_ok=True)
        self.url_file.write_text(self.url + "\n")
        self.write_context()
        self._events = await self._connect("hybridgen-launcher")
        return self.url

    async def _supervise_broker(self) -> None:
        """Restart a dead nats-server on the same port and store, with back-off."""
        failures = 0
        while True:
            server = self.server
            assert isinstance(server, NatsServer)
            started = self.backoff.clock()
            status = await server.wait()
            if self._stopping:
                return
            failures = self._next_failures(failures, started)
            delay = self.backoff.delay(failures)
            # Nobody can hear an event while the broker is down: log now, publish once it is
            # back and the clients had time to reconnect and subscribe again.
            exited = await self._report_exit(BROKER, server.pid, status, delay, publish=False)
            while True:
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                await server.shutdown()  # closes its files; the process is gone
                try:
                    await server.start()
                    break
                except HybridgenError as exc:
                    failures += 1
                    delay = self.backoff.delay(failures)
                    log.error(
                        "%s did not restart: %s; next try in %.1f s", BROKER, exc.message, delay
                    )
            await asyncio.sleep(RESUBSCRIBE_GRACE_S)
            await self._publish(*exited)
            await self._report_restart(BROKER, server.pid)

    # -- children ---------------------------------------------------------------------------

    async def _spawn(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        """Start the child's process (no readiness wait) and record it as running."""
        if spec.foreground:
            process = await asyncio.create_subprocess_exec(*spec.argv, env=self.child_env(spec))
        else:
            log_file = self._log_file(spec.name)
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=self.child_env(spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group: Ctrl-C reaches only the launcher, which stops the
                # group as a whole; and SIGTERM should the launcher itself die.
                start_new_session=True,
                preexec_fn=death_signal_hook(),
            )
        self._running[spec.name] = process
        self._since[spec.name] = self.backoff.clock()  # its time up counts from here
        return process

    def _log_file(self, name: str) -> IO[bytes]:
        """A background child's log, opened (owner-only) once and kept across restarts."""
        log_file = self._logs.get(name)
        if log_file is None:
            private_folder(self.logs_dir)
            log_file = open_private_log(self.log_path(name))
            self._logs[name] = log_file
        return log_file

    async def start_child(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        """Start one child, wait until it is ready (when it has a check), then supervise it.

        Raises:
            ChildFailed: it exited while starting or was not ready in time.
        """
        if any(s.name == spec.name for s in self._specs):
            raise ValueError(f"a child named {spec.name!r} is already running")
        process = await self._spawn(spec)
        self._specs.append(spec)
        log.info("started %s (pid %s)", spec.name, process.pid)
        if spec.ready is not None:
            await self._wait_ready(spec, process)
        self._supervisors.append(asyncio.create_task(self._supervise(spec)))
        return process

    async def _wait_ready(self, spec: ChildSpec, process: asyncio.subprocess.Process) -> None:
        assert spec.ready is not None
        deadline = time.monotonic() + spec.ready_timeout
        while True:
            if process.returncode is not None:
                raise ChildFailed(
                    f"{spec.name} exited with status {process.returncode} while starting "
                    f"(log: {self.log_path(spec.name)})"
                )
            with contextlib.suppress(Exception):
                if await spec.ready():
                    return
            if time.monotonic() > deadline:
                raise ChildFailed(f"{spec.name} not ready after {spec.ready_timeout:g} s")
            await asyncio.sleep(0.2)

    def _next_failures(self, failures: int, started: float) -> int:
        """The quick-crash streak after a death: reset when the child had stayed up."""
        stable = self.backoff.clock() - started >= self.backoff.stable_s
        return 1 if stable else failures + 1

    async def _supervise(self, spec: ChildSpec) -> None:
        """Wait for the child to die; report it and restart it, with back-off, until stop."""
        failures = 0
        while True:
            process, started = self._running[spec.name], self._since[spec.name]
            status = await process.wait()
            if self._stopping:
                return
            if spec.foreground:  # leaving the console stops everything
                log.info("%s exited with status %s; stopping everything", spec.name, status)
                self._foreground_status = status
                self._done.set()
                return
            _kill_group(process.pid)  # helpers it left behind
            failures = self._next_failures(failures, started)
            delay = self.backoff.delay(failures)
            await self._report_exit(spec.name, process.pid, status, delay)
            while True:
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                try:
                    process = await self._spawn(spec)
                    break
                except OSError as exc:
                    failures += 1
                    delay = self.backoff.delay(failures)
                    log.error("%s did not restart: %s; next try in %.1f s", spec.name, exc, delay)
            await self._report_restart(spec.name, process.pid)

    # -- events -----------------------------------------------------------------------------

    async def _report_exit(
        self, name: str, pid: int | None, status: int, delay: float, *, publish: bool = True
    ) -> tuple[str, str, dict[str, Any]]:
        """Log a child's exit and publish its `child_exited` event (unless `publish` is
        False); return the event's (kind, message, data) for a later `_publish`."""
        where = self.log_path(name)
        log.error(
            "%s (pid %s) exited with status %s; restarting it in %.1f s (log: %s)",
            name, pid, status, delay, where,
        )  # fmt: skip
        event = (
            "child_exited",
            f"{name} exited with status {status}; restarting in {delay:.1f} s",
            {"child": name, "pid": pid, "status": status, "restart_in_s": delay, "log": str(where)},
        )
        if publish:
            await self._publish(*event)
        return event

    async def _report_restart(self, name: str, pid: int | None) -> None:
        self.restarts[name] = self.restarts.get(name, 0) + 1
        count = self.restarts[name]
        log.info("restarted %s (pid %s, restart %d)", name, pid, count)
        await self._publish(
            "child_restarted",
            f"{name} restarted (pid {pid})",
            {"child": name, "pid": pid, "restarts": count},
        )

    async def _publish(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """Publish a launcher event; never fatal (buffered while the broker is away)."""
        if self._events is None:
            return
        event = wire.Event(
            kind=kind, role="launcher", node_id=self.node_id, message=message, data=data or {}
        )
        try:
            await self._events.publish(
                subjects.events("launcher", self.node_id), wire.encode(event)
            )
        except Exception as exc:
            log.warning("event %s not published: %s", kind, exc)

    # -- running and stopping ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the broker, then every child in order."""
        await self.start_broker()
        for spec in self.children:
            await self.start_child(spec)

    async def ready(self) -> None:
        """Wait until every child with a readiness check answers it (e.g. after restarts)."""
        for spec in self._specs:
            if spec.ready is not None:
                deadline = time.monotonic() + spec.ready_timeout
                while not await spec.ready():
                    if time.monotonic() > deadline:
                        raise ChildFailed(f"{spec.name} not ready after {spec.ready_timeout:g} s")
                    await asyncio.sleep(0.2)

    async def wait(self, signals: StopSignals | None = None) -> int:
        """Run until a stop signal or the foreground child's exit; dead children restart.

        Args:
            signals: installed signal handlers (default: installed here).

        Returns:
            The exit status for the launcher: 0 on a signal, else the foreground child's.
        """
        own = signals is None
        signals = signals or StopSignals()
        done = asyncio.ensure_future(self._done.wait())
        try:
            await signals.wait(done)
        finally:
            done.cancel()
            if own:
                signals.close()
        if self._foreground_status is not None:
            return self._foreground_status
        log.info("stop requested; stopping everything")
        return 0

    async def stop(self) -> None:
        """Stop the children in reverse order (SIGTERM, then SIGKILL), then the broker.

        Bounded whether or not the broker answers: each child by its `stop_timeout`, then the
        launcher's own connection (1 s) and the broker (5 s). Idempotent.
        """
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        for task in self._supervisors:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._supervisors.clear()
        while self._specs:
            spec = self._specs.pop()
            process = self._running.pop(spec.name, None)
            if process is not None:
                await _terminate(spec, process)
        for log_file in self._logs.values():
            log_file.close()
        self._logs.clear()
        if self._events is not None:
            await close_bounded(self._events, 1.0)
            self._events = None
        await self.stop_server()

    async def __aenter__(self) -> Launcher:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a background child's process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _signal(spec: ChildSpec, process: asyncio.subprocess.Process, sig: int) -> None:
    """Signal a background child's whole process group (its own helpers too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if spec.foreground:
            process.send_signal(sig)
        else:
            os.killpg(process.pid, sig)


async def _terminate(spec: ChildSpec, process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        _signal(spec, process, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), spec.stop_timeout)
        except TimeoutError:
            log.warning("%s ignored SIGTERM for %g s; killing it", spec.name, spec.stop_timeout)
            _signal(spec, process, signal.SIGKILL)
            await process.wait()
        log.info("stopped %s", spec.name)
    if not spec.foreground:
        _kill_group(process.pid)

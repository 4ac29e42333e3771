"""`hybridgen up`: the all-in-one local launcher, with supervision.

It starts the embedded nats-server (data under `$HG_HOME`), then each child command in
order with `HG_NATS_URL` pointing at it, and supervises them: a child that dies (any exit
the launcher did not ask for) is reported -- a log line and a `child_exited` event on
`hg.events.launcher.<id>` -- and restarted with exponential back-off (`child_restarted`),
while the other children keep serving. A dead nats-server is restarted on the same port and
store; clients reconnect by themselves. Only Ctrl-C/SIGTERM (or leaving the foreground
console) stops everything: children get SIGTERM in reverse start order and a bounded time to
drain, then SIGKILL, and the broker stops last.

Children are `ChildSpec`s: a command line, extra environment, and whether the child owns
the terminal (the console: its exit ends the launcher). Background children write to
`$HG_HOME/logs/<name>.log` and run in their own process group, which the launcher signals
as a whole, so no helper process is left behind; they also get SIGTERM should the launcher
itself die.

Secure by default: unless `--insecure-nats` (or `--nats-url`, an external server) is given,
the broker runs with one NATS user per service and the subject permissions of its role
(`broker.permissions.permissions_for`): workers `cloud`, edges `edge` bound to their node id,
the cloud API `api`, the console `operator`, the launcher itself `launcher`. Passwords are
made once into `$HG_HOME/secrets/<user>.password` (directory 0700, files 0600) and reused;
the rendered server config is `$HG_HOME/secrets/nats-server.conf`. Each child gets its
user name and the *path* of its password file (`HG_NATS_USER`, `HG_NATS_PASSWORD_FILE`),
never the password itself. A broker bound beyond loopback also gets TLS (a private CA made
with openssl under `$HG_HOME/secrets/tls/`, or the files given with `--tls-*`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import close_bounded, connect, connect_settings
from broker.cli import StopSignals
from broker.config import (
    ServerConfig,
    TLSFiles,
    User,
    ensure_password,
    ensure_secrets_dir,
    is_loopback,
    render,
    self_signed_tls,
    write_secret,
)
from broker.errors import HybridgenError
from broker.permissions import Role
from broker.server import (
    ExternalServer,
    NatsServer,
    death_signal_hook,
    open_private_log,
    private_folder,
)
from broker.settings import BusSettings, hg_home
from broker.store import ArtifactStore, FleetConfig
from broker.telemetry import default_node_id

log = logging.getLogger(__name__)

DEFAULT_PORT = 4222
#: The name the broker goes by in log lines and events.
BROKER = "nats-server"
#: Seconds between a restarted broker serving and the launcher publishing its exit and
#: restart events: clients reconnect every 0.5 s and then subscribe again.
RESUBSCRIBE_GRACE_S = 1.5
#: Seconds the edge's HTTP server lets open requests finish on SIGTERM (`--drain-timeout-s`).
EDGE_DRAIN_S = 10.0
#: Seconds the cloud API lets open requests finish on SIGTERM (`--drain-timeout-s`).
API_DRAIN_S = 10.0
#: Seconds a cloud worker lets in-flight requests finish on SIGTERM (`--drain-timeout-s`).
WORKER_DRAIN_S = 30.0
#: Each child's SIGKILL comes this many seconds after its drain bound.
STOP_MARGIN_S = 10.0
#: The bus users `up` always makes: the launcher itself and the operator (the console, and
#: whoever runs `hybridgen tui` or `hybridgen models publish` by hand).
LAUNCHER_USER = "launcher"
OPERATOR_USER = "operator"
#: Environment a child must not inherit when it gets its own credentials.
_CREDENTIAL_ENV = ("HG_NATS_PASSWORD", "HG_NATS_TOKEN", "HG_NATS_CREDS", "HG_NATS_USER")


@dataclass
class ChildSpec:
    """One process the launcher runs.

    Attributes:
        name: short name, used for the log file and messages.
        argv: the command line (e.g. `[sys.executable, "-m", "cloud", "worker"]`).
        env: extra environment variables (on top of `HG_NATS_URL` and `HG_HOME`).
        foreground: the child owns the terminal (the TUI); when it exits, everything stops.
        ready: optional check awaited after the start until it returns True (e.g. an HTTP
            `/readyz` probe), so the next child starts only once this one serves.
        ready_timeout: seconds to wait for `ready`.
        stop_timeout: seconds between SIGTERM and SIGKILL (the child's drain bound plus a
            margin).
        url: where the child serves, if it has an HTTP API (printed by `up`).
        role: its NATS role (edge, cloud, api, operator); with a secured broker it connects
            as its own user with that role's permissions. None: no credentials.
        node_id: the node id it speaks for (its user may use only that node's subjects).
        user: its NATS user name (default `name`).
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    foreground: bool = False
    ready: Callable[[], Awaitable[bool]] | None = None
    ready_timeout: float = 300.0
    stop_timeout: float = 10.0
    url: str | None = None
    role: Role | None = None
    node_id: str | None = None
    user: str | None = None

    @property
    def nats_user(self) -> str:
        """The bus user it connects as (when it has a role)."""
        return self.user or self.name


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


def http_ready(url: str, *, timeout_s: float = 1.0) -> Callable[[], Awaitable[bool]]:
    """A `ChildSpec.ready` check: True once `GET url` answers 2xx (e.g. `/readyz`).

    Plain asyncio, no HTTP client dependency; `http://host:port/path` only.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"http_ready needs an http://host:port/path URL, got {url!r}")
    host, port, path = parts.hostname, parts.port or 80, parts.path or "/"

    async def check() -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(
                        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                    )
                    await writer.drain()
                    status = await reader.readline()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return False
        fields = status.split()
        return len(fields) >= 2 and fields[1].startswith(b"2")

    return check


class ChildFailed(HybridgenError):
    """A child exited while starting, or never became ready."""


class Launcher:
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
    ) -> None:
        self.home = home
        self.children = list(children or [])
        self.nats_url = nats_url
        self.host = host
        self.port = port
        self.backoff = backoff or Backoff()
        self.secure = secure and not nats_url
        self.tls = tls
        #: The bus users of a secured broker, by name (filled by `start_broker`).
        self.users: dict[str, User] = {}
        self.server: NatsServer | ExternalServer | None = None
        self.node_id = default_node_id("launcher")
        self.restarts: dict[str, int] = {}
        self.url = ""
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
    def secrets_dir(self) -> Path:
        """Where the credentials, the server config and the TLS files are kept (0700)."""
        return self.home / "secrets"

    @property
    def config_file(self) -> Path:
        """The rendered nats-server config of a secured broker (it holds passwords: 0600)."""
        return self.secrets_dir / "nats-server.conf"

    def password_file(self, user: str) -> Path:
        """The password file of a bus user (`<secrets>/<user>.password`)."""
        return self.secrets_dir / f"{user}.password"

    def bus_settings(self, user: str = OPERATOR_USER) -> BusSettings:
        """How to reach the running broker as `user` (a user only when it is secured).

        E.g. `connect_settings(launcher.bus_settings("operator"), name=...)`.
        """
        if not self.secure:
            return BusSettings(url=self.url)
        if user not in self.users:
            raise KeyError(f"no bus user {user!r}; known: {', '.join(sorted(self.users))}")
        return BusSettings(
            url=self.url,
            user=user,
            password=None,
            password_file=self.password_file(user),
            tls_ca=self.tls.ca if self.tls is not None else None,
        )

    @property
    def url_file(self) -> Path:
        """Where the running broker's URL is written, for commands started by hand."""
        return self.home / "run" / "nats.url"

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
        """Start (or check) the broker; its client URL."""
        if self.nats_url:
            self.server = ExternalServer(self.nats_url)
            await self.server.start()
        else:
            store = self.home / "nats"
            config_file = self.prepare_security() if self.secure else None
            self.server = NatsServer(
                store_dir=store, host=self.host, port=self.port, config_file=config_file
            )
            try:
                await self.server.start()
            except HybridgenError as exc:
                if self.port == -1 or "address already in use" not in exc.message:
                    raise
                log.warning("port %s is taken; using a free port instead", self.port)
                self.server = NatsServer(
                    store_dir=store, host=self.host, port=-1, config_file=config_file
                )
                await self.server.start()
            # A restart must come back where the clients reconnect to.
            self.server.port = urlsplit(self.server.client_url).port
        self.url = self.server.client_url
        if self.secure and self.tls is not None:
            self.url = self.url.replace("nats://", "tls://", 1)
        if isinstance(self.server, NatsServer):
            await self.prepare_buckets()
            self._supervisors.append(asyncio.create_task(self._supervise_broker()))
        self.url_file.parent.mkdir(parents=True, exist_ok=True)
        self.url_file.write_text(self.url + "\n")
        self._events = await self._connect("hybridgen-launcher")
        return self.url

    def prepare_security(self) -> Path:
        """Make (or reuse) the users' passwords and TLS files; write the server config.

        One user per child with a role (named after the child, bound to its node id),
        plus `launcher` and `operator`. Returns the config file's path.

        Raises:
            ChildFailed: TLS is needed but no certificate could be made.
        """
        ensure_secrets_dir(self.secrets_dir)
        wanted: list[tuple[str, Role, str | None]] = [
            (LAUNCHER_USER, "launcher", None),
            (OPERATOR_USER, "operator", None),
        ]
        wanted += [(s.nats_user, s.role, s.node_id) for s in self.children if s.role is not None]
        self.users = {}
        for name, role, node_id in wanted:
            if name in self.users:
                continue
            password = ensure_password(self.password_file(name))
            self.users[name] = User(name, password, role, node_id)
        if self.tls is None and not is_loopback(self.host):
            try:
                self.tls = self_signed_tls(self.secrets_dir / "tls", [self.host])
            except RuntimeError as exc:
                raise ChildFailed(str(exc)) from None
        config = ServerConfig(
            host=self.host,
            port=self.port,
            store_dir=self.home / "nats",
            users=list(self.users.values()),
            tls=self.tls,
        )
        write_secret(self.config_file, render(config))
        return self.config_file

    async def _connect(self, name: str) -> Client:
        """The launcher's own bus connection: as the `launcher` user when secured; on your
        server (`nats_url`) with your `HG_NATS_*` credentials, as its services."""
        if self.nats_url:
            return await connect_settings(BusSettings(url=self.url), name=name)
        if not self.secure:
            return await connect(self.url, name=name)
        return await connect_settings(self.bus_settings(LAUNCHER_USER), name=name)

    async def prepare_buckets(self) -> None:
        """Create the fleet-config KV bucket and the artifact store if they are missing.

        Services with read-only permissions (edges) can then bind them from the start.
        """
        nc = await self._connect("hybridgen-launcher-setup")
        try:
            await FleetConfig.open(nc)
            await ArtifactStore.open(nc)
        finally:
            await nc.close()

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

    def child_env(self, spec: ChildSpec) -> dict[str, str]:
        """The child's environment: ours, the bus URL, `HG_HOME`, its credentials, `env`.

        With a secured broker a child with a role gets its user name and the path of its
        password file (never the password), and the CA of the broker's TLS certificate.
        """
        env = {
            **os.environ,
            "HG_NATS_URL": self.url,
            "HG_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }
        if self.secure:
            for name in _CREDENTIAL_ENV:
                env.pop(name, None)
            if self.tls is not None and self.tls.ca is not None:
                env["HG_NATS_TLS_CA"] = str(self.tls.ca)
            if spec.role is not None:
                if spec.nats_user not in self.users:
                    raise ChildFailed(
                        f"{spec.name}: no bus user {spec.nats_user!r} (children with a role "
                        "must be given to the Launcher before it starts)"
                    )
                env["HG_NATS_USER"] = spec.nats_user
                env["HG_NATS_PASSWORD_FILE"] = str(self.password_file(spec.nats_user))
        return {**env, **spec.env}

    async def _spawn(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        """Start the child's process (no readiness wait) and record it as running."""
        if spec.foreground:
            process = await asyncio.create_subprocess_exec(*spec.argv, env=self.child_env(spec))
        else:
            log_file = self._logs.get(spec.name)
            if log_file is None:
                private_folder(self.logs_dir)
                log_file = open_private_log(self.log_path(spec.name))
                self._logs[spec.name] = log_file
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
        if self.server is not None:
            await self.server.shutdown()
            self.server = None
            with contextlib.suppress(OSError):
                self.url_file.unlink()

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


def default_children(args: argparse.Namespace) -> list[ChildSpec]:
    """The processes `hybridgen up` runs next to the broker, in start order.

    `args.workers` cloud workers, the cloud API, then `args.edges` edges (edge `i` on
    `args.edge_port + i`); every worker and edge has its own node id, kept across restarts.
    The cloud API is ready only once a worker answers it, so the edges start after the whole
    cloud path serves; an edge is ready once its model is loaded.
    """
    python = sys.executable
    workers, edges = getattr(args, "workers", 1), getattr(args, "edges", 1)
    drain = getattr(args, "drain_timeout_s", None)  # one bound for all, else each role's
    worker_drain, api_drain, edge_drain = (
        (WORKER_DRAIN_S, API_DRAIN_S, EDGE_DRAIN_S) if drain is None else (drain, drain, drain)
    )
    worker_id, edge_id = default_node_id("cloud"), default_node_id("edge")
    api_id = default_node_id("api")  # its user publishes only as this node

    def nth(base: str, i: int, count: int) -> str:  # "edge" alone, else "edge-1", "edge-2"...
        return base if count == 1 else f"{base}-{i + 1}"

    children = [
        ChildSpec(
            nth("cloud-worker", i, workers),
            [python, "-m", "cloud", "worker", "--node-id", nth(worker_id, i, workers),
             "--drain-timeout-s", f"{worker_drain:g}"],
            stop_timeout=worker_drain + STOP_MARGIN_S,
            role="cloud",
            node_id=nth(worker_id, i, workers),
        )
        for i in range(workers)
    ]  # fmt: skip
    api_url = f"http://127.0.0.1:{args.api_port}"
    children.append(
        ChildSpec(
            "cloud-api",
            [python, "-m", "cloud", "api", "--host", args.http_host, "--port", str(args.api_port),
             "--drain-timeout-s", f"{api_drain:g}"],
            ready=http_ready(f"{api_url}/readyz"),
            stop_timeout=api_drain + STOP_MARGIN_S,
            url=api_url,
            role="api",
            node_id=api_id,
            env={"HG_CLOUD_NODE_ID": api_id},
        )
    )  # fmt: skip
    for i in range(edges):
        url = f"http://127.0.0.1:{args.edge_port + i}"
        children.append(
            ChildSpec(
                nth("edge", i, edges),
                [python, "-m", "edge", "--host", args.http_host, "--port",
                 str(args.edge_port + i), "--node-id", nth(edge_id, i, edges),
                 "--drain-timeout-s", f"{edge_drain:g}"],
                ready=http_ready(f"{url}/readyz"),
                # The edge's own bound: its drain, then 5 s to close (edge/cli.py).
                stop_timeout=edge_drain + STOP_MARGIN_S,
                url=url,
                role="edge",
                node_id=nth(edge_id, i, edges),
            )
        )  # fmt: skip
    return children


#: The install's admin key of the edges' users (`KEY@*`), a file in the secrets folder.
EDGE_ADMIN_KEY = "edge-admin.key"


def give_edges_an_admin_key(children: list[ChildSpec], secrets_dir: Path) -> Path:
    """Make (once, 0600) the install's edge admin key and add it to every edge's user keys.

    Users' data on an edge (the users API, a request's `user`) needs a key bound to the
    user; plain completions stay open on loopback. The key reaches the edges in their
    environment (`HG_EDGE_USER_KEYS`, after any the caller set), never on a command line or
    in a log. Returns the key file's path.
    """
    path = ensure_secrets_dir(secrets_dir) / EDGE_ADMIN_KEY
    key = ensure_password(path)
    own = os.environ.get("HG_EDGE_USER_KEYS", "").strip()
    for spec in children:
        if spec.role == "edge":
            spec.env["HG_EDGE_USER_KEYS"] = ",".join(filter(None, [own, f"{key}@*"]))
    return path


def console_child() -> ChildSpec:
    """The operator console, in the foreground: leaving it stops the network."""
    return ChildSpec(
        "console",
        [sys.executable, "-m", "tui"],
        foreground=True,
        role="operator",
        user=OPERATOR_USER,
    )


def wants_console(args: argparse.Namespace) -> bool:
    """Open the console unless told not to, or when there is no terminal to draw on."""
    return not (args.headless or args.broker_only) and sys.stdin.isatty() and sys.stdout.isatty()


#: What `up` prints about the network; it also goes to the launcher log (never twice on the
#: terminal).
_where_log = logging.getLogger("hybridgen.up")


def _log_to_file(path: Path, *, only: bool) -> None:
    """Send the launcher's own log lines to `path` too (`only`: the console owns the terminal)."""
    private_folder(path.parent)
    open_private_log(path).close()  # created 0600: FileHandler keeps the mode
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if only:
        for old in list(root.handlers):
            root.removeHandler(old)
    root.addHandler(handler)
    _where_log.propagate = False
    _where_log.setLevel(logging.INFO)
    _where_log.addHandler(handler)


def _tell(line: str, *, terminal: bool) -> None:
    """One line of what `up` says: on the terminal (unless the console owns it) and in the log."""
    _where_log.info("%s", line)
    if terminal:
        print(line, flush=True)


def where_lines(launcher: Launcher) -> list[str]:
    """What `up` tells about the running network: URLs, logs, and the ready line last."""
    apis = [spec for spec, _ in launcher.processes if spec.url]
    edges = [spec.url for spec in apis if spec.name.startswith("edge")]
    cloud = [spec.url for spec in apis if not spec.name.startswith("edge")]
    lines = [f"NATS broker at {launcher.url} (export HG_NATS_URL={launcher.url}; "
             f"also in {launcher.url_file})"]  # fmt: skip
    for spec, process in launcher.processes:
        where = "terminal" if spec.foreground else launcher.log_path(spec.name)
        serving = f", serving {spec.url}" if spec.url else ""
        lines.append(f"  {spec.name}: pid {process.pid}{serving}, output {where}")
    lines.append(f"  logs in {launcher.logs_dir}")
    key_file = launcher.secrets_dir / EDGE_ADMIN_KEY
    if edges and key_file.is_file():  # as Jupyter shows its token, but not into the log
        lines.append(
            f"  users' data on the edge needs its admin key, e.g. curl -H \"Authorization: "
            f"Bearer $(cat {key_file})\" {edges[0]}/v1/users/<id>/export (keys for an app's "
            "own users: docs/edge.md)"
        )
    if launcher.secure:
        tls = f"; TLS, CA {launcher.tls.ca}" if launcher.tls is not None else ""
        lines.append(
            f"  bus users per role, credentials in {launcher.secrets_dir}{tls} (by hand: "
            f"HG_NATS_USER={OPERATOR_USER} "
            f"HG_NATS_PASSWORD_FILE={launcher.password_file(OPERATOR_USER)})"
        )
    else:
        lines.append("  the bus has NO authentication (--insecure-nats or --nats-url)")
    parts = []
    if edges:
        parts.append(("edge " if len(edges) == 1 else "edges ") + ", ".join(map(str, edges)))
    if cloud:
        parts.append("cloud API " + ", ".join(map(str, cloud)))
    parts += [f"NATS {launcher.url}", f"logs {launcher.logs_dir}"]
    lines.append("hybridgen is ready: " + " · ".join(parts))
    return lines


def ensure_models(home: Path, profile: str) -> int:
    """Install the default model set on first run (progress bars on this terminal).

    Returns:
        0 when a model set is installed (already, or now), else the build's exit status.
    """
    from broker.errors import NotFound
    from models.registry import resolve

    try:
        resolve(home=home)
        return 0
    except NotFound:
        pass
    print(
        f"hybridgen: no model set under {home / 'models'}; building the {profile!r} model set "
        "once (later runs reuse it)",
        flush=True,
    )
    argv = [sys.executable, "-m", "models", "build", "--profile", profile, "--home", str(home)]
    return subprocess.call(argv)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs 1 or more, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen up",
        description="Start everything locally: the embedded NATS broker (data under $HG_HOME) "
        "and the hybridgen services. A service that dies is restarted (with back-off) while "
        "the rest keep serving; Ctrl-C or SIGTERM drains and stops them all.",
    )
    parser.add_argument(
        "--headless",
        action="store_true",
        help="do not open the operator console (it opens when this runs on a terminal); "
        "Ctrl-C or SIGTERM then stops everything",
    )
    parser.add_argument(
        "--broker-only", action="store_true", help="start only the NATS broker, no services"
    )
    parser.add_argument(
        "--profile",
        default="smollm2",
        choices=["smollm2", "tiny", "quick", "full"],
        help="model set built on first run when none is installed: smollm2 (default, the real "
        "SmolLM2-135M-Instruct, about a minute) or a trained lab profile",
    )
    parser.add_argument(
        "--workers", type=_count, default=1, help="cloud workers to start (default 1)"
    )
    parser.add_argument(
        "--edges",
        type=_count,
        default=1,
        help="edge nodes to start (default 1); edge i listens on --edge-port + i",
    )
    parser.add_argument("--api-port", type=int, default=8500, help="cloud API port (default 8500)")
    parser.add_argument(
        "--edge-port", type=int, default=8400, help="(first) edge API port (default 8400)"
    )
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="address the HTTP APIs bind (default 127.0.0.1)"
    )
    parser.add_argument(
        "--nats-url", default=None, help="use this NATS server instead of starting one"
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker listen address")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"broker client port (default {DEFAULT_PORT}; a free one if it is taken)",
    )
    parser.add_argument(
        "--insecure-nats",
        action="store_true",
        help="run the broker without users, permissions or TLS (debugging only; by default "
        "every service connects as its own user, credentials under $HG_HOME/secrets)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="broker TLS certificate (with --tls-key and --tls-ca; by default a --host beyond "
        "loopback gets a private CA made under $HG_HOME/secrets/tls); it must name 127.0.0.1",
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="key of --tls-cert")
    parser.add_argument(
        "--tls-ca", type=Path, default=None, help="CA that signed --tls-cert (given to clients)"
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=None,
        help=f"on stop, how long each service may finish its open requests (default: workers "
        f"{WORKER_DRAIN_S:g}, the cloud API {API_DRAIN_S:g}, edges {EDGE_DRAIN_S:g}); each is "
        f"killed {STOP_MARGIN_S:g} s past it",
    )
    parser.add_argument("--home", type=Path, default=None, help="data directory (default $HG_HOME)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


async def _up(args: argparse.Namespace) -> int:
    home = args.home or hg_home()
    children = []
    if not args.broker_only:
        status = await asyncio.to_thread(ensure_models, home, args.profile)
        if status != 0:
            print(f"hybridgen up: building the models failed (status {status})", file=sys.stderr)
            return status
        children = default_children(args)
        give_edges_an_admin_key(children, home / "secrets")
    console = wants_console(args)
    tls_given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(tls_given) and not all(tls_given):
        print("hybridgen up: give --tls-cert, --tls-key and --tls-ca together", file=sys.stderr)
        return 2
    if args.insecure_nats and not args.nats_url and not is_loopback(args.host):
        print(
            f"hybridgen up: WARNING: the broker listens on {args.host} without "
            "authentication or TLS (--insecure-nats)",
            file=sys.stderr,
        )
    launcher = Launcher(
        home=home,
        children=children,
        nats_url=args.nats_url,
        host=args.host,
        port=args.port,
        secure=not args.insecure_nats,
        tls=TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if all(tls_given) else None,
    )
    signals = StopSignals()
    _log_to_file(home / "logs" / "launcher.log", only=console)
    if console:
        print("hybridgen: starting the network; the console opens when it is ready", flush=True)
        print(f"  launcher log: {home / 'logs' / 'launcher.log'}", flush=True)
    try:
        await launcher.start()
        await launcher.ready()
    except HybridgenError as exc:
        await launcher.stop()
        signals.close()
        log.error("hybridgen up: %s", exc.message)
        print(f"hybridgen up: {exc.message}", file=sys.stderr)
        return 1
    try:
        for line in where_lines(launcher):
            _tell(line, terminal=not console)
        if console:  # the console owns the terminal until it exits
            await launcher.start_child(console_child())
        else:
            print("  Ctrl-C stops everything.", flush=True)
        return await launcher.wait(signals)
    finally:
        await launcher.stop()
        signals.close()
        _tell("hybridgen: stopped", terminal=True)


def main(argv: list[str]) -> int:
    """`hybridgen up`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_up(args))

"""`hybridgen up`: the all-in-one local launcher.

It starts the embedded nats-server (data under `$HG_HOME`), then each child command in
order with `HG_NATS_URL` pointing at it, watches them, and on Ctrl-C/SIGTERM -- or when a
child dies -- stops the children in reverse order and the broker last.

Children are `ChildSpec`s: a command line, extra environment, and whether the child owns
the terminal (the TUI: its exit ends the launcher). Background children write to
`$HG_HOME/logs/<name>.log` and run in their own session so Ctrl-C reaches only the
launcher, which then stops them in order.
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
from typing import IO
from urllib.parse import urlsplit

from broker.bus import connect
from broker.cli import StopSignals
from broker.errors import HybridgenError
from broker.server import ExternalServer, NatsServer
from broker.settings import hg_home
from broker.store import ArtifactStore, FleetConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 4222


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
        stop_timeout: seconds between SIGTERM and SIGKILL.
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    foreground: bool = False
    ready: Callable[[], Awaitable[bool]] | None = None
    ready_timeout: float = 300.0
    stop_timeout: float = 10.0


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
    """A child exited before it was asked to, or never became ready."""


class Launcher:
    """The broker plus child processes, started in order and stopped in reverse.

    Args:
        home: the data directory (`$HG_HOME`).
        children: the processes to run after the broker.
        nats_url: use this external server instead of starting one.
        host: broker listen address.
        port: broker client port (if taken, a free one is used instead).
    """

    def __init__(
        self,
        *,
        home: Path,
        children: list[ChildSpec] | None = None,
        nats_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
    ) -> None:
        self.home = home
        self.children = list(children or [])
        self.nats_url = nats_url
        self.host = host
        self.port = port
        self.server: NatsServer | ExternalServer | None = None
        self.processes: list[tuple[ChildSpec, asyncio.subprocess.Process]] = []
        self._logs: list[IO[bytes]] = []
        self.url = ""

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def url_file(self) -> Path:
        """Where the running broker's URL is written, for commands started by hand."""
        return self.home / "run" / "nats.url"

    async def start_broker(self) -> str:
        """Start (or check) the broker; its client URL."""
        if self.nats_url:
            self.server = ExternalServer(self.nats_url)
            await self.server.start()
        else:
            store = self.home / "nats"
            self.server = NatsServer(store_dir=store, host=self.host, port=self.port)
            try:
                await self.server.start()
            except HybridgenError as exc:
                if self.port == -1 or "address already in use" not in exc.message:
                    raise
                log.warning("port %s is taken; using a free port instead", self.port)
                self.server = NatsServer(store_dir=store, host=self.host, port=-1)
                await self.server.start()
        self.url = self.server.client_url
        if isinstance(self.server, NatsServer):
            await self.prepare_buckets()
        self.url_file.parent.mkdir(parents=True, exist_ok=True)
        self.url_file.write_text(self.url + "\n")
        return self.url

    async def prepare_buckets(self) -> None:
        """Create the fleet-config KV bucket and the artifact store if they are missing.

        Services with read-only permissions (edges) can then bind them from the start.
        """
        nc = await connect(self.url, name="hybridgen-launcher")
        try:
            await FleetConfig.open(nc)
            await ArtifactStore.open(nc)
        finally:
            await nc.close()

    def child_env(self, spec: ChildSpec) -> dict[str, str]:
        return {
            **os.environ,
            "HG_NATS_URL": self.url,
            "HG_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            **spec.env,
        }

    async def start_child(self, spec: ChildSpec) -> asyncio.subprocess.Process:
        """Start one child (and wait until it is ready, when it has a check)."""
        if spec.foreground:
            process = await asyncio.create_subprocess_exec(*spec.argv, env=self.child_env(spec))
        else:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            log_file = open(self.logs_dir / f"{spec.name}.log", "ab")  # noqa: SIM115, ASYNC230
            self._logs.append(log_file)
            process = await asyncio.create_subprocess_exec(
                *spec.argv,
                env=self.child_env(spec),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append((spec, process))
        log.info("started %s (pid %s)", spec.name, process.pid)
        if spec.ready is not None:
            await self._wait_ready(spec, process)
        return process

    async def _wait_ready(self, spec: ChildSpec, process: asyncio.subprocess.Process) -> None:
        assert spec.ready is not None
        deadline = time.monotonic() + spec.ready_timeout
        while True:
            if process.returncode is not None:
                raise ChildFailed(
                    f"{spec.name} exited with status {process.returncode} while starting "
                    f"(log: {self.logs_dir / (spec.name + '.log')})"
                )
            with contextlib.suppress(Exception):
                if await spec.ready():
                    return
            if time.monotonic() > deadline:
                raise ChildFailed(f"{spec.name} not ready after {spec.ready_timeout:g} s")
            await asyncio.sleep(0.2)

    async def start(self) -> None:
        """Start the broker, then every child in order."""
        await self.start_broker()
        for spec in self.children:
            await self.start_child(spec)

    async def wait(self, signals: StopSignals | None = None) -> int:
        """Run until a stop signal, the foreground child's exit, or a child's death.

        Args:
            signals: installed signal handlers (default: installed here).

        Returns:
            The exit status for the launcher: 0 on a signal or a clean foreground exit.
        """
        watchers = {asyncio.ensure_future(process.wait()): spec for spec, process in self.processes}
        if isinstance(self.server, NatsServer):
            watchers[asyncio.ensure_future(self.server.wait())] = ChildSpec("nats-server", [])
        own = signals is None
        signals = signals or StopSignals()
        try:
            await signals.wait(*watchers)
        finally:
            for watcher in watchers:
                watcher.cancel()
            if own:
                signals.close()
        for watcher, spec in watchers.items():
            if watcher.done() and not watcher.cancelled():
                status = watcher.result()
                if spec.foreground:
                    return int(status)
                log.error(
                    "%s exited with status %s; stopping everything (log: %s)",
                    spec.name,
                    status,
                    self.logs_dir / f"{spec.name}.log",
                )
                return 1
        return 0

    async def stop(self) -> None:
        """Stop the children in reverse order, then the broker. Idempotent."""
        while self.processes:
            spec, process = self.processes.pop()
            await _terminate(spec, process)
        for log_file in self._logs:
            log_file.close()
        self._logs.clear()
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


def _signal(spec: ChildSpec, process: asyncio.subprocess.Process, sig: int) -> None:
    """Signal a background child's whole process group (its own helpers too)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if spec.foreground:
            process.send_signal(sig)
        else:
            os.killpg(process.pid, sig)


async def _terminate(spec: ChildSpec, process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    _signal(spec, process, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), spec.stop_timeout)
    except TimeoutError:
        log.warning("%s ignored SIGTERM for %g s; killing it", spec.name, spec.stop_timeout)
        _signal(spec, process, signal.SIGKILL)
        await process.wait()
    log.info("stopped %s", spec.name)


def default_children(args: argparse.Namespace) -> list[ChildSpec]:
    """The processes `hybridgen up` runs next to the broker, in start order.

    The cloud API is ready only once a worker answers it, so the edge starts after the whole
    cloud path serves; the edge is ready once its model is loaded.
    """
    python = sys.executable
    api_url = f"http://127.0.0.1:{args.api_port}"
    edge_url = f"http://127.0.0.1:{args.edge_port}"
    return [
        # The worker drains on SIGTERM (in-flight requests finish, up to 30 s by default).
        ChildSpec("cloud-worker", [python, "-m", "cloud", "worker"], stop_timeout=40.0),
        ChildSpec(
            "cloud-api",
            [python, "-m", "cloud", "api", "--host", args.http_host, "--port", str(args.api_port)],
            ready=http_ready(f"{api_url}/readyz"),
        ),
        ChildSpec(
            "edge",
            [python, "-m", "edge", "--host", args.http_host, "--port", str(args.edge_port)],
            ready=http_ready(f"{edge_url}/readyz"),
        ),
    ]


def console_child() -> ChildSpec:
    """The operator console, in the foreground: leaving it stops the network."""
    return ChildSpec("console", [sys.executable, "-m", "tui"], foreground=True)


def wants_console(args: argparse.Namespace) -> bool:
    """Open the console unless told not to, or when there is no terminal to draw on."""
    return not (args.headless or args.broker_only) and sys.stdin.isatty() and sys.stdout.isatty()


def _log_to_file(path: Path) -> None:
    """Send the launcher's own log lines to `path`: the console owns the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen up",
        description="Start everything locally: the embedded NATS broker (data under $HG_HOME) "
        "and the hybridgen services; Ctrl-C stops them all.",
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
    parser.add_argument("--api-port", type=int, default=8500, help="cloud API port (default 8500)")
    parser.add_argument("--edge-port", type=int, default=8400, help="edge API port (default 8400)")
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
    console = wants_console(args)
    if console:
        children.append(console_child())
    launcher = Launcher(
        home=home,
        children=children,
        nats_url=args.nats_url,
        host=args.host,
        port=args.port,
    )
    signals = StopSignals()
    if console:
        print("hybridgen: starting the network; the console opens when it is ready", flush=True)
        _log_to_file(home / "logs" / "launcher.log")
    try:
        await launcher.start()
    except HybridgenError as exc:
        await launcher.stop()
        signals.close()
        print(f"hybridgen up: {exc.message}", file=sys.stderr)
        return 1
    try:
        if console:  # the console owns the terminal until it exits
            return await launcher.wait(signals)
        print(f"hybridgen: NATS broker at {launcher.url}", flush=True)
        print(f"  export HG_NATS_URL={launcher.url}   (also in {launcher.url_file})", flush=True)
        for spec, process in launcher.processes:
            where = "terminal" if spec.foreground else launcher.logs_dir / f"{spec.name}.log"
            print(f"  {spec.name}: pid {process.pid}, output {where}", flush=True)
        print("  Ctrl-C stops everything.", flush=True)
        return await launcher.wait(signals)
    finally:
        await launcher.stop()
        signals.close()
        print("hybridgen: stopped", flush=True)


def main(argv: list[str]) -> int:
    """`hybridgen up`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_up(args))

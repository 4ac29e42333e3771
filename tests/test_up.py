"""`hybridgen up` end to end: broker, cloud workers, cloud API and edges from one command,
supervised (a killed child is reported and restarted) and stopped without leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.bus import connect, connect_settings
from broker.errors import Unauthorized
from broker.server import NatsServer, free_port
from broker.settings import BusSettings
from broker.store import FleetConfig
from hybridgen.up.children import STOP_MARGIN_S
from hybridgen.up.supervisor import Backoff, Launcher
from models.registry import ModelSet, set_current
from tests.fixtures_models import copy_model_set
from tests.waits import BOUND_S, eventually

REPO = Path(__file__).resolve().parent.parent
BODY = {"model": "hg-edge", "prompt": "The ls command", "max_tokens": 4}


#: How long `up` may take to start everything (imports, model loads) on a busy machine.
START_S = 240.0


async def waiting(check: Callable[[], Any], what: str, output: Callable[[], str] = str) -> Any:
    """`eventually(check, what)`, failing with the end of the launcher's output."""
    try:
        return await eventually(check, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{output()[-6000:]}") from None


@dataclass
class Up:
    """A running `hybridgen up --headless` and everything it printed so far."""

    process: asyncio.subprocess.Process
    home: Path
    api_port: int
    edge_port: int
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def until(self, pattern: str, *, bound: float = BOUND_S) -> re.Match[str]:
        """The first match of `pattern` in the output, waiting for it (within `bound`)."""

        def found() -> re.Match[str] | None:
            if self.process.returncode is not None and not re.search(pattern, self.output):
                raise AssertionError(f"`hybridgen up` ended early:\n{self.output}")
            return re.search(pattern, self.output)

        try:
            return await eventually(found, f"{pattern!r} in the output", bound=bound)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output[-6000:]}") from None

    def pids(self) -> dict[str, int]:
        """The current pid of each child, from the start lines and the restart lines."""
        found: dict[str, int] = {}
        for name, pid in re.findall(r"(?:started|restarted) (\S+) \(pid (\d+)", self.output):
            found[name] = int(pid)
        broker = re.findall(r"nats-server (\d+) serving at", self.output)
        found["nats-server"] = int(broker[-1])
        return found

    @property
    def nats_url(self) -> str:
        match = re.search(r"NATS broker at (\S+)", self.output)
        assert match, self.output
        return match.group(1)

    async def connect(self, name: str) -> NATS:
        """A bus connection as the `operator` user `up` made (its password file)."""
        bus = BusSettings(
            url=self.nats_url,
            user="operator",
            password=None,
            password_file=self.home / "secrets" / "operator.password",
        )
        return await connect_settings(bus, name=name)


@contextlib.asynccontextmanager
async def running_up(tiny_models: ModelSet, tmp_path: Path, *extra: str) -> AsyncIterator[Up]:
    """`hybridgen up --headless` on the tiny model set, ready; killed at the end if still up."""
    home = tmp_path / "home"
    set_current(copy_model_set(tiny_models, home).version, home)
    api_port, edge_port = free_port(), free_port()
    env = {**os.environ, "HG_CLOUD_THREADS": "1", "HG_EDGE_THREADS": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridgen", "up", "--headless", "--port", "-1",
        "--api-port", str(api_port), "--edge-port", str(edge_port), "--home", str(home), *extra,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    up = Up(process, home, api_port, edge_port)

    async def read() -> None:  # keep the pipe drained so the launcher never blocks on it
        assert process.stdout is not None
        while line := await process.stdout.readline():
            up.lines.append(line.decode())

    reader = asyncio.create_task(read())
    try:
        await up.until(r"hybridgen is ready: ", bound=START_S)
        yield up
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 10)


async def http_in_flight(client: httpx.AsyncClient, port: int) -> float:
    """The `*_http_in_flight` gauge of the API on `port`."""
    metrics = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    match = re.search(r"^\w+_http_in_flight (\S+)$", metrics, re.MULTILINE)
    assert match, metrics
    return float(match.group(1))


def alive_in_groups(pgids: set[int]) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is one of `pgids`."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) in pgids:
            alive.append(int(entry.name))
    return alive


async def stop_and_check_no_leftovers(up: Up, sig: int | None = signal.SIGTERM) -> None:
    """Signal the launcher (unless `sig` is None: already done); it exits 0 and every child
    (and its helpers) is gone."""
    pids = set(up.pids().values())
    if sig is not None:
        up.process.send_signal(sig)
    assert await asyncio.wait_for(up.process.wait(), BOUND_S) == 0, up.output
    assert "ignored SIGTERM" not in up.output, up.output  # each drained within its bound
    assert not alive_in_groups(pids), f"left behind: {alive_in_groups(pids)}\n{up.output}"
    assert not (up.home / "run" / "nats.url").exists()


def test_backoff_doubles_up_to_the_maximum() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff.delay(20) == 30.0


async def test_a_dead_broker_comes_back_on_its_port_and_store(tmp_path: Path) -> None:
    backoff = Backoff(initial=0.05, maximum=0.2)
    async with Launcher(home=tmp_path, port=-1, backoff=backoff) as launcher:
        assert isinstance(launcher.server, NatsServer)
        url, old = launcher.url, launcher.server.pid
        assert old is not None
        events: list[wire.Event] = []

        async def on_event(msg: Msg) -> None:
            events.append(wire.decode(msg.data, wire.Event))

        # As the operator: the broker runs with a user per role (reconnects by itself).
        nc = await connect_settings(launcher.bus_settings("operator"), name="test-up-broker")
        try:
            await nc.subscribe(subjects.events_of_role("launcher"), cb=on_event)
            config = await FleetConfig.open(nc)
            await config.put("probe", {"kept": True})
            os.kill(old, signal.SIGKILL)
            wanted = {"child_exited", "child_restarted"}
            await eventually(lambda: wanted <= {e.kind for e in events}, "exit and restart events")
            assert all(e.data["child"] == "nats-server" for e in events), events
            assert launcher.server.client_url == url and launcher.server.pid != old
            assert await config.get("probe") == {"kept": True}  # the same store
        finally:
            await nc.close()


@pytest.mark.slow
async def test_up_serves_edge_and_cloud_then_stops(tiny_models: ModelSet, tmp_path: Path) -> None:
    async with running_up(tiny_models, tmp_path) as up:
        assert "building" not in up.output  # an installed model set is reused
        ready = (await up.until(r"hybridgen is ready: .*")).group(0)
        for where in (f"edge http://127.0.0.1:{up.edge_port}",
                      f"cloud API http://127.0.0.1:{up.api_port}",
                      f"NATS {up.nats_url}", f"logs {up.home / 'logs'}"):  # fmt: skip
            assert where in ready, ready
        assert ready in (up.home / "logs" / "launcher.log").read_text()
        async with httpx.AsyncClient(timeout=60) as client:
            edge_url = f"http://127.0.0.1:{up.edge_port}/v1/completions"
            routed = await client.post(edge_url, json=BODY)
            assert routed.status_code == 200, routed.text
            assert routed.headers["x-hybridgen-route-reason"] in ("in_domain", "low_confidence")
            local = await client.post(edge_url, json={**BODY, "route": "edge"})
            assert local.headers["x-hybridgen-served-by"] == "edge", local.text
            forced = await client.post(edge_url, json={**BODY, "route": "cloud"})
            assert forced.json()["served_by"] == "cloud", forced.text
            direct = await client.post(
                f"http://127.0.0.1:{up.api_port}/v1/completions", json={**BODY, "model": "hg-cloud"}
            )
            assert direct.status_code == 200, direct.text  # no key: open on loopback
            await check_cloud_usage_needs_the_admin_key(up, client)
        await stop_and_check_no_leftovers(up, signal.SIGINT)


async def check_cloud_usage_needs_the_admin_key(up: Up, client: httpx.AsyncClient) -> None:
    """The key `up` made (0600, told, in no output) reads `/v1/usage`; no key: 401."""
    key_file = up.home / "secrets" / "cloud-admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text().strip()
    url = f"http://127.0.0.1:{up.api_port}/v1/usage"
    told = f'needs its admin key: curl -H "Authorization: Bearer $(cat {key_file})" {url}'
    await up.until(re.escape(told))
    assert (await client.get(url)).json()["error"]["code"] == "unauthorized"  # a 401

    async def anonymous() -> Any:
        answer = await client.get(url, headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.text
        return answer.json()["keys"].get("anonymous")

    counted = await waiting(anonymous, "the anonymous completion counted", lambda: up.output)
    assert counted["hg-cloud"]["requests"] == 1, counted
    outputs = [up.output, *(log.read_text() for log in (up.home / "logs").glob("*.log"))]
    assert not [text for text in outputs if key in text]


@pytest.mark.slow
async def test_up_restarts_a_killed_worker_while_the_edge_serves(
    tiny_models: ModelSet, tmp_path: Path
) -> None:
    async with running_up(tiny_models, tmp_path) as up:
        events: list[wire.Event] = []

        async def on_event(msg: Msg) -> None:
            events.append(wire.decode(msg.data, wire.Event))

        nc = await up.connect("test-up-events")
        try:
            await nc.subscribe(subjects.events_of_role("launcher"), cb=on_event)
            await nc.flush()
            old = up.pids()["cloud-worker"]
            os.kill(old, signal.SIGKILL)
            line = await up.until(r".*cloud-worker \(pid \d+\) exited with status -9.*")
            assert str(up.home / "logs" / "cloud-worker.log") in line.group(0)

            edge_url = f"http://127.0.0.1:{up.edge_port}/v1/completions"
            api_url = f"http://127.0.0.1:{up.api_port}/v1/completions"
            async with httpx.AsyncClient(timeout=60) as client:
                # The edge keeps answering while the worker is down and as it comes back.
                served = 0

                async def edge_serves_until_restarted() -> bool:
                    nonlocal served
                    local = await client.post(edge_url, json={**BODY, "route": "edge"})
                    assert local.status_code == 200, local.text
                    routed = await client.post(edge_url, json=BODY)  # local when no cloud
                    assert routed.status_code == 200, routed.text
                    served += 1
                    return "child_restarted" in [e.kind for e in events] and served >= 2

                await waiting(edge_serves_until_restarted, "child_restarted", lambda: up.output)
                exited = next(e for e in events if e.kind == "child_exited")
                assert exited.role == "launcher"
                assert exited.data["child"] == "cloud-worker" and exited.data["status"] == -9
                restarted = next(e for e in events if e.kind == "child_restarted")
                assert restarted.data["child"] == "cloud-worker"
                await up.until(r"restarted cloud-worker \(pid")
                new = up.pids()["cloud-worker"]
                assert new != old and restarted.data["pid"] == new

                # The cloud API answers again, through the restarted worker (retried while it
                # loads its model).
                async def api_answers() -> bool:
                    direct = await client.post(api_url, json={**BODY, "model": "hg-cloud"})
                    assert direct.status_code in (200, 502, 503, 504), direct.text
                    return direct.status_code == 200

                await waiting(api_answers, "the cloud API answering again", lambda: up.output)
        finally:
            await nc.close()
        assert up.process.returncode is None  # the launcher stayed up
        await stop_and_check_no_leftovers(up)


@pytest.mark.slow
async def test_up_starts_several_workers_and_edges(tiny_models: ModelSet, tmp_path: Path) -> None:
    async with running_up(tiny_models, tmp_path, "--workers", "2", "--edges", "2") as up:
        ready = (await up.until(r"hybridgen is ready: .*")).group(0)
        assert f"edges http://127.0.0.1:{up.edge_port}, http://127.0.0.1:{up.edge_port + 1}" in (
            ready
        ), ready
        nodes: dict[str, set[str]] = {"cloud": set(), "edge": set()}

        async def on_beat(msg: Msg) -> None:
            role = msg.subject.split(".")[2]
            nodes[role].add(msg.subject.split(".")[3])

        nc = await up.connect("test-up-beats")
        try:
            await nc.subscribe(subjects.telemetry_of_role("cloud"), cb=on_beat)
            await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
            await waiting(
                lambda: len(nodes["cloud"]) == 2 and len(nodes["edge"]) == 2,
                "heartbeats of two workers and two edges",
                lambda: f"{nodes}\n{up.output}",
            )
        finally:
            await nc.close()
        async with httpx.AsyncClient(timeout=60) as client:
            for port in (up.edge_port, up.edge_port + 1):
                local = await client.post(
                    f"http://127.0.0.1:{port}/v1/completions", json={**BODY, "route": "edge"}
                )
                assert local.status_code == 200, local.text
        await stop_and_check_no_leftovers(up)


NEVER_MS = 600_000.0


async def never_answering_cloud(up: Up, nc: NATS) -> int:
    """An edge that waits for the cloud far beyond its drain, and a cloud worker that never
    answers (stopped with SIGSTOP: SIGCONT it when done); the worker's pid."""
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    sub = await nc.subscribe(subjects.telemetry_of_role("edge"), cb=on_beat)
    config = await FleetConfig.open(nc)
    await config.put(
        subjects.policy_key(), {"cloud_timeout_ms": NEVER_MS, "cloud_idle_timeout_ms": NEVER_MS}
    )
    await waiting(
        lambda: beats and beats[-1].extra["policy"]["cloud_timeout_ms"]["value"] == NEVER_MS,
        "the edge taking the policy",
        lambda: up.output,
    )
    await sub.unsubscribe()
    worker = up.pids()["cloud-worker"]
    os.kill(worker, signal.SIGSTOP)
    return worker


async def stuck_request(up: Up, client: httpx.AsyncClient) -> asyncio.Task[httpx.Response]:
    """A streamed completion sent to the (never answering) cloud, once the edge serves it."""
    idle = await http_in_flight(client, up.edge_port)
    request = asyncio.create_task(
        client.post(
            f"http://127.0.0.1:{up.edge_port}/v1/completions",
            json={**BODY, "route": "cloud", "stream": True},
        )
    )

    async def in_flight() -> bool:
        assert not request.done(), request
        return await http_in_flight(client, up.edge_port) > idle

    await waiting(in_flight, "the request in flight at the edge", lambda: up.output)
    return request


@pytest.mark.slow
async def test_sigterm_drains_an_edge_stuck_on_the_cloud(
    tiny_models: ModelSet, tmp_path: Path
) -> None:
    """The edge exits within its drain bound even while its cloud request hangs."""
    async with running_up(tiny_models, tmp_path, "--drain-timeout-s", "2") as up:
        nc = await up.connect("test-up-stuck")
        worker = await never_answering_cloud(up, nc)
        try:
            async with httpx.AsyncClient(timeout=None) as client:
                request = await stuck_request(up, client)
                up.process.send_signal(signal.SIGTERM)
                await up.until(r"stopped edge")
                assert "edge ignored SIGTERM" not in up.output, up.output
                with contextlib.suppress(httpx.HTTPError):
                    await asyncio.wait_for(request, BOUND_S)  # it ends one way or another
        finally:
            os.kill(worker, signal.SIGCONT)  # let it drain in its turn
            await nc.close()
        await stop_and_check_no_leftovers(up, None)


@pytest.mark.slow
async def test_children_stop_when_the_launcher_is_killed(
    tiny_models: ModelSet, tmp_path: Path
) -> None:
    """Even a launcher killed outright (no chance to stop anything) leaves no process behind:
    each child gets SIGTERM when its parent dies, and drains."""
    async with running_up(tiny_models, tmp_path, "--drain-timeout-s", "2") as up:
        pids = set(up.pids().values())
        up.process.kill()
        await up.process.wait()
        await waiting(lambda: not alive_in_groups(pids), "no child left", lambda: up.output)


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["killed", "frozen"])
async def test_up_stops_within_its_bound_when_the_broker_goes_with_it(
    broker: str, tiny_models: ModelSet, tmp_path: Path
) -> None:
    """SIGTERM to `up` just as its broker dies (SIGKILL) or stops answering (SIGSTOP): each
    service still stops by itself within its stop bound (drain + STOP_MARGIN_S, the
    launcher's own clock: none killed for ignoring SIGTERM), and `up` exits cleanly."""
    drain = 2.0
    assert STOP_MARGIN_S == 10.0  # what "ignored SIGTERM" would mean: past drain + 10 s
    async with running_up(tiny_models, tmp_path, "--drain-timeout-s", f"{drain:g}") as up:
        pids = up.pids()
        try:
            os.kill(pids["nats-server"], signal.SIGKILL if broker == "killed" else signal.SIGSTOP)
            up.process.send_signal(signal.SIGTERM)
            await waiting(
                lambda: up.process.returncode is not None, "`up` stopped", lambda: up.output
            )
        finally:
            with contextlib.suppress(ProcessLookupError):  # `up` kills it; never left stopped
                os.kill(pids["nats-server"], signal.SIGCONT)
        assert up.process.returncode == 0, up.output
        for name in set(pids) - {"nats-server"}:  # (a frozen broker itself is killed)
            assert f"{name} ignored SIGTERM" not in up.output, up.output
        assert not alive_in_groups(set(pids.values())), up.output


@pytest.mark.slow
async def test_up_runs_the_bus_with_a_user_per_role(tiny_models: ModelSet, tmp_path: Path) -> None:
    """Secure by default: owner-only credentials on disk, anonymous clients refused, each
    service connected as its own user (password file, not password, in its environment),
    and the network serves through those users: an edge request routed to the cloud."""
    async with running_up(tiny_models, tmp_path) as up:
        secrets = up.home / "secrets"
        assert secrets.stat().st_mode & 0o777 == 0o700
        users = {p.stem for p in secrets.glob("*.password")}
        assert {"launcher", "operator", "cloud-worker", "cloud-api", "edge"} <= users, users
        for path in [*secrets.glob("*.password"), secrets / "nats-server.conf"]:
            assert path.stat().st_mode & 0o777 == 0o600, path
        config = (secrets / "nats-server.conf").read_text()
        assert "authorization" in config and "# role: edge, node: " in config

        with pytest.raises(Unauthorized):
            await connect(up.nats_url, name="anonymous")
        with pytest.raises(Unauthorized):
            await connect(up.nats_url, name="wrong", user="operator", password="guess")

        environ = Path(f"/proc/{up.pids()['edge']}/environ")
        edge_env = (await asyncio.to_thread(environ.read_bytes)).split(b"\0")
        assert b"HG_NATS_USER=edge" in edge_env
        assert f"HG_NATS_PASSWORD_FILE={secrets / 'edge.password'}".encode() in edge_env
        assert not any(v.startswith(b"HG_NATS_PASSWORD=") for v in edge_env)

        async with httpx.AsyncClient(timeout=60) as client:
            forced = await client.post(
                f"http://127.0.0.1:{up.edge_port}/v1/completions", json={**BODY, "route": "cloud"}
            )
            assert forced.status_code == 200, forced.text
            assert forced.json()["served_by"] == "cloud", forced.text
            direct = await client.post(
                f"http://127.0.0.1:{up.api_port}/v1/completions", json={**BODY, "model": "hg-cloud"}
            )
            assert direct.status_code == 200, direct.text
        # The operator (the console's user) sees every service's heartbeat.
        roles: set[str] = set()

        async def on_beat(msg: Msg) -> None:
            roles.add(msg.subject.split(".")[2])

        nc = await up.connect("test-up-operator")
        try:
            await nc.subscribe(subjects.TELEMETRY_ALL, cb=on_beat)
            await waiting(
                lambda: {"edge", "cloud", "api"} <= roles, "heartbeats of every role",
                lambda: f"{roles}\n{up.output}",
            )  # fmt: skip
        finally:
            await nc.close()
        await stop_and_check_no_leftovers(up)

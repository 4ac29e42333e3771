"""CLI, launcher and bench: real processes, real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.bus import connect
from broker.cli import main as broker_main
from broker.server import find_nats_server
from hybridgen.benches import bus_hop as bench
from hybridgen.up.spec import ChildSpec, http_ready
from hybridgen.up.supervisor import Backoff, Launcher
from tests.waits import BOUND_S, eventually

REPO = Path(__file__).resolve().parent.parent


def test_config_command_output_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "standalone": ["--user", "e:pw:edge", "--user", "o:pw:operator"],
        "hub": ["--leaf-user", "leaf", "--leaf-password", "pw", "--user", "c:pw:cloud"],
        "leaf": ["--remote", "nats-leaf://hub.example.com:7422", "--leaf-user", "leaf"],
        "cluster": ["--routes", "n1,n2,n3:7222", "--node-index", "3", "--cluster-insecure"],
    }
    for role, extra in cases.items():
        path = tmp_path / f"{role}.conf"
        argv = ["config", "--role", role, "--store-dir", str(tmp_path / role), "-o", str(path)]
        assert broker_main(argv + extra) == 0
        result = subprocess.run(
            [str(find_nats_server()), "-t", "-c", str(path)], capture_output=True, text=True
        )
        assert result.returncode == 0, (role, path.read_text(), result.stderr)
    assert 'domain: "hub"' in (tmp_path / "hub.conf").read_text()
    assert "port: 7222" in (tmp_path / "cluster.conf").read_text()
    # Errors are usage errors, not tracebacks.
    assert broker_main(["config", "--role", "cluster", "--routes", "a,b"]) == 2
    assert broker_main(["config", "--role", "leaf"]) == 2
    assert broker_main(["config", "--role", "standalone", "--user", "x:y:king"]) == 2
    capsys.readouterr()


async def read_until(stream: asyncio.StreamReader, marker: str) -> str:
    seen = ""
    async with asyncio.timeout(BOUND_S):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"process ended before {marker!r}; output: {seen}")
            seen += line.decode()
    return seen


async def start(*argv: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def test_broker_runs_in_foreground_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = await start("-m", "broker", "--port", "-1", "--store-dir", str(tmp_path / "nats"))
    try:
        assert process.stdout is not None
        output = await read_until(process.stdout, "serving at")
        url = output.split("serving at ", 1)[1].split()[0]
        client = await connect(url, name="probe")
        assert client.is_connected
        await client.close()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), BOUND_S) == 0
        assert "stopped" in (await process.stdout.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_broker_reports_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("port: {\n")
    process = await start("-m", "broker", "--config", str(bad), "--store-dir", str(tmp_path))
    stdout, _ = await asyncio.wait_for(process.communicate(), BOUND_S)
    assert process.returncode == 1
    assert "Parse error on line 2" in stdout.decode() and "Traceback" not in stdout.decode()


async def test_up_headless_starts_broker_and_stops(tmp_path: Path) -> None:
    process = await start("-m", "hybridgen", "up", "--broker-only", "--port", "-1",
                          "--home", str(tmp_path))  # fmt: skip
    try:
        assert process.stdout is not None
        output = await read_until(process.stdout, "Ctrl-C stops everything")
        url = output.split("NATS broker at ", 1)[1].split()[0]
        assert (tmp_path / "run" / "nats.url").read_text().strip() == url
        # Secure by default: the operator's password file (an anonymous client is refused).
        password = (tmp_path / "secrets" / "operator.password").read_text().strip()
        client = await connect(url, name="probe", user="operator", password=password)
        await client.close()
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), BOUND_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not (tmp_path / "run" / "nats.url").exists()


CHILD = """
import os, signal, sys, time
name, record = sys.argv[1], sys.argv[2]
with open(record, "a") as fh:
    fh.write(f"start {name} {os.environ['HG_NATS_URL']}\\n")
def stop(*_):
    with open(record, "a") as fh:
        fh.write(f"stop {name}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(0.05)
"""


async def test_launcher_children_get_url_and_stop_in_reverse(tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    async def started(name: str) -> bool:
        return record.exists() and f"start {name}" in record.read_text()

    children = [
        ChildSpec(name, [sys.executable, str(script), name, str(record)],
                  ready=lambda name=name: started(name))  # type: ignore[misc]
        for name in ("worker", "api", "edge")
    ]  # fmt: skip
    async with Launcher(home=tmp_path / "home", children=children, port=-1) as launcher:
        url = launcher.url
        assert len(launcher.processes) == 3
    lines = record.read_text().splitlines()
    assert lines[:3] == [f"start {n} {url}" for n in ("worker", "api", "edge")]
    assert lines[3:] == ["stop edge", "stop api", "stop worker"]
    assert (tmp_path / "home" / "logs" / "worker.log").exists()
    assert (tmp_path / "home" / "nats" / "jetstream").is_dir()  # buckets created


async def test_launcher_restarts_a_child_that_dies(tmp_path: Path) -> None:
    children = [ChildSpec("crasher", [sys.executable, "-c", "import sys; sys.exit(3)"])]
    backoff = Backoff(initial=0.05, maximum=0.2)
    async with Launcher(home=tmp_path, children=children, port=-1, backoff=backoff) as launcher:
        await eventually(lambda: launcher.restarts.get("crasher", 0) >= 3, "3 restarts")


async def test_hop_bench_runs() -> None:
    async def extra(context: bench.HopBench) -> dict[str, float]:
        assert context.nc.is_connected and context.requests == 30
        return {"extra_field_ms": 1.0}

    result = await bench.run(30, quick=True, warmup=5, extra=[extra])
    assert set(result) == {
        "inproc_p50_ms", "nats_p50_ms", "nats_p99_ms", "added_p50_ms", "added_p99_ms",
        "requests", "cpu_count", "load_avg_1m", "stream_p50_ms", "stream_p99_ms",
        "extra_field_ms",
    }  # fmt: skip
    assert (result["requests"], result["cpu_count"], result["extra_field_ms"]) == (
        30,
        os.cpu_count(),
        1.0,
    )
    # "added" is the hop less the in-process call (each figure rounded to 0.1 us).
    assert result["added_p50_ms"] == pytest.approx(
        result["nats_p50_ms"] - result["inproc_p50_ms"], abs=2e-4
    )
    json.dumps(result)


def test_hop_bench_percentiles_are_nearest_rank() -> None:
    samples = [float(i) for i in range(100, 0, -1)]  # 1..100, in no order
    assert [bench.percentile(samples, q) for q in (0.0, 0.5, 0.99, 1.0)] == [1, 50, 99, 100]
    assert bench.percentile([], 0.5) == 0.0


async def test_http_ready_check() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        ok = b"/readyz" in request
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" if ok else b"HTTP/1.1 503 No\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await http_ready(f"http://127.0.0.1:{port}/readyz")()
        assert not await http_ready(f"http://127.0.0.1:{port}/other")()
    finally:
        server.close()
        await server.wait_closed()
    assert not await http_ready(f"http://127.0.0.1:{port}/readyz", timeout_s=0.5)()


def test_up_opens_the_console_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from hybridgen.up.children import console_child, wants_console

    args = argparse.Namespace(headless=False, broker_only=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert wants_console(args)
    assert not wants_console(argparse.Namespace(headless=True, broker_only=False))
    assert not wants_console(argparse.Namespace(headless=False, broker_only=True))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert not wants_console(args)  # CI, pipes: nothing to draw on
    console = console_child()
    assert console.foreground and console.argv[-2:] == ["-m", "tui"]

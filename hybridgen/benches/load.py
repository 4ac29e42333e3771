"""`hybridgen bench load`: many concurrent streaming clients against a real edge.

Starts a nats-server, one cloud worker and one edge as separate processes (as `hybridgen up`
runs them, with no credentials, on loopback) on a model set: `--set VERSION`, else the
current one, else the `tiny` lab profile built once into a temporary HG_HOME. Then
`--streams` clients loop for `--seconds`, each sending short streamed chat completions;
every `--cloud-every`-th client asks for `"route": "cloud"`, so that fallbacks to the worker
are real. A client answered 503 waits the Retry-After it was given before its next request.

Per request: the status, Retry-After on a 503, the time to the first text (TTFT), and
whether the stream ended with `[DONE]`. The edge process's RSS is sampled every 0.5 s.

JSON (`--json`): `{"streams", "seconds", "requests", "completed", "shed_503", "errors",
"p50_ttft_ms", "p95_ttft_ms", "edge_share", "rss_mb_max", "cpu", "model_set", "load_avg",
"error_kinds"}` (error counts by kind).
With `--keys`, the run measures per-key fairness at the cloud API instead
(`hybridgen.benches.load_keys`).
`errors` counts every answer that is neither a 200 stream ending with `[DONE]` and no error
event, nor a 503 with Retry-After (connection failures and timeouts included). `edge_share`
is the share of completed streams the edge served itself. `load_avg` is the machine's
1-minute load when the run ended: on a shared machine, compare runs only at a like load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.server import free_port
from hybridgen.benches.bus_hop import percentile
from serving.headers import HEADER_SERVED_BY

#: Short prompts, cycled over the clients.
PROMPTS = (
    "Say hello.",
    "What is a manual page?",
    "Name a free software licence.",
    "How do I list files?",
    "Write one short sentence about the sea.",
)
#: Seconds the edge and the worker may take to load their models and answer.
START_TIMEOUT_S = 180.0
#: Seconds the worker and the edge may drain when the run ends (or is interrupted).
DRAIN_S = 2.0
#: Seconds one request may take before it counts as an error.
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Result:
    """One request's outcome."""

    status: int
    done: bool = False
    error_event: bool = False
    retry_after: float | None = None
    ttft_s: float | None = None
    served_by: str = ""
    failure: str = ""

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.done and not self.error_event and not self.failure

    @property
    def shed(self) -> bool:
        return self.status == 503 and self.retry_after is not None and not self.failure

    @property
    def error_kind(self) -> str | None:
        """What went wrong, None for a completed stream or a shed request."""
        if self.completed or self.shed:
            return None
        if self.failure:
            return self.failure.split(":", 1)[0]
        if self.status == 503:
            return "503 without Retry-After"
        if self.status != 200:
            return f"status {self.status}"
        return "error event" if self.error_event else "no [DONE]"


@dataclass
class Run:
    """All the results of a run, and the edge's RSS samples."""

    results: list[Result] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen bench load",
        description="Run N concurrent streaming clients against a real edge (with a cloud "
        "worker and a nats-server, all started here) for T seconds; report completed "
        "streams, 503s, errors, TTFT and the edge's memory.",
    )
    parser.add_argument("--streams", type=int, default=200, help="concurrent clients (200)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long they loop (60)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--set", dest="model_set", help="model-set version (default: current)")
    parser.add_argument(
        "--home", type=Path, help="HG_HOME holding the model set (default: $HG_HOME)"
    )
    parser.add_argument(
        "--cloud-every",
        type=int,
        default=4,
        help="every Nth client forces the cloud route (4; 0: none)",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request")
    parser.add_argument("--edge-threads", type=int, default=1, help="edge ONNX threads (1)")
    parser.add_argument(
        "--worker-threads", type=int, default=1, help="cloud worker torch threads (1)"
    )
    from hybridgen.benches.load_keys import add_arguments

    add_arguments(parser)  # --keys: one key flooding the cloud API, another's TTFT
    return parser


def find_model_set(version: str | None, home: Path | None, scratch: Path) -> tuple[str, Path]:
    """The model set's version and the HG_HOME holding it; builds `tiny` when none is there.

    Raises:
        NotFound: `version` was asked for and is not installed.
        RuntimeError: the tiny build failed.
    """
    from broker.errors import NotFound
    from broker.settings import hg_home
    from models.registry import resolve

    home = home or hg_home()
    try:
        return resolve(version, home).version, home
    except NotFound:
        if version is not None:
            raise
    built = scratch / "home"
    print(
        f"hybridgen bench load: no model set under {home}; building the tiny lab profile "
        f"into {built}",
        file=sys.stderr,
        flush=True,
    )
    argv = [sys.executable, "-m", "models", "build", "--profile", "tiny", "--home", str(built)]
    argv += ["--no-progress"]
    if subprocess.call(argv, stdout=subprocess.DEVNULL) != 0:
        raise RuntimeError(
            "building the tiny model set failed; run the command by hand: " + " ".join(argv)
        )
    return resolve(None, built).version, built


class Children:
    """The worker and edge processes: started in their own sessions, always stopped."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        self.processes[name] = process
        return process

    def check(self) -> None:
        """Raise if a child has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with status {process.returncode}:\n{tail}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM every child, SIGKILL what is left after `timeout` seconds."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.0, deadline - time.monotonic()))
            if process.poll() is None:
                process.kill()
                process.wait()


async def wait_ready(client: Any, children: Children, *, cloud: bool) -> None:
    """Wait until the edge answers /readyz and, with `cloud`, a forced-cloud request is
    served by the worker."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        children.check()
        with contextlib.suppress(Exception):
            if (await client.get("/readyz")).status_code == 200:
                if not cloud:
                    return
                response = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "hg-edge",
                        "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 1,
                        "route": "cloud",
                    },
                )
                if response.headers.get(HEADER_SERVED_BY) == "cloud":
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the edge and worker were not ready in {START_TIMEOUT_S:g} s")
        await asyncio.sleep(0.5)


async def one_request(client: Any, body: dict[str, Any]) -> Result:
    """Send one streamed chat completion and read it to its end."""
    start = time.perf_counter()
    result = Result(0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            result.status = response.status_code
            with contextlib.suppress(ValueError):
                result.retry_after = float(response.headers.get("retry-after", ""))
            result.served_by = response.headers.get(HEADER_SERVED_BY, "")
            if response.status_code != 200:
                await response.aread()
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    result.error_event = True
                elif result.ttft_s is None and any(
                    (choice.get("delta") or {}).get("content")
                    for choice in event.get("choices", ())
                ):
                    result.ttft_s = time.perf_counter() - start
            return result
    except Exception as exc:  # every failure is a counted error
        phase = "mid-answer" if result.status else "before the answer"
        result.failure = f"{type(exc).__name__} {phase}: {exc}"
        return result


async def client_loop(
    client: Any, index: int, args: argparse.Namespace, until: float, run: Run
) -> None:
    """One client: requests back to back until `until`, honouring Retry-After."""
    cloud = args.cloud_every > 0 and index % args.cloud_every == 0
    body: dict[str, Any] = {
        "model": "hg-edge",
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": args.max_tokens,
        "stream": True,
    }
    if cloud:
        body["route"] = "cloud"
    while time.monotonic() < until:
        result = await one_request(client, body)
        run.results.append(result)
        if result.status == 503:  # shed: come back when told (or in a second)
            wait = 1.0 if result.retry_after is None else result.retry_after
            await asyncio.sleep(min(wait, max(0.0, until - time.monotonic())))


async def sample_rss(pid: int, run: Run) -> None:
    """Append the edge's RSS (MB) to `run.rss_mb` every 0.5 s."""
    while True:
        value = rss_mb(pid)
        if value is not None:
            run.rss_mb.append(value)
        await asyncio.sleep(0.5)


def rss_mb(pid: int) -> float | None:
    """Resident memory of process `pid` in MB (psutil, else /proc), None when it is gone."""
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 1e6
    except ImportError:
        pass
    except Exception:  # gone, or not readable
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Scratch:
    """A benchmark's own network: its nats-server (no users), the model set, where the
    children's logs go, and their environment."""

    server: Any
    version: str
    logs: Path
    env: dict[str, str]


@contextlib.asynccontextmanager
async def scratch_network(
    model_set: str | None, home: Path | None, scratch: Path
) -> AsyncIterator[Scratch]:
    """Find (or build) the model set and start a nats-server in `scratch`; stopped after."""
    from broker.server import NatsServer

    version, home = find_model_set(model_set, home, scratch)
    logs = scratch / "logs"
    logs.mkdir()
    server = NatsServer(store_dir=scratch / "nats")
    await server.start()
    env = {**os.environ, "HG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    for name in ("HG_NATS_USER", "HG_NATS_PASSWORD", "HG_NATS_PASSWORD_FILE", "HG_NATS_CREDS"):
        env.pop(name, None)  # this nats-server has no users
    try:
        yield Scratch(server, version, logs, env)
    finally:
        await server.shutdown()


@contextlib.asynccontextmanager
async def network(
    args: argparse.Namespace, scratch: Path
) -> AsyncIterator[tuple[str, Children, str]]:
    """nats-server, a cloud worker and an edge; yields (edge URL, children, model set)."""
    async with (
        scratch_network(args.model_set, args.home, scratch) as net,
        _services(args, net) as (url, children),
    ):
        yield url, children, net.version


@contextlib.asynccontextmanager
async def _services(args: argparse.Namespace, net: Scratch) -> AsyncIterator[tuple[str, Children]]:
    server, version = net.server, net.version
    children = Children(net.logs, net.env)
    port = free_port()
    python = sys.executable
    try:
        children.start(
            "cloud-worker",
            [python, "-m", "cloud", "worker", "--nats", server.client_url, "--model-set",
             version, "--node-id", "bench-worker", "--threads", str(args.worker_threads),
             "--device", "cpu", "--drain-timeout-s", f"{DRAIN_S:g}"],
        )  # fmt: skip
        children.start(
            "edge",
            [python, "-m", "edge", "--host", "127.0.0.1", "--port", str(port), "--nats",
             server.client_url, "--model-version", version, "--node-id", "bench-edge",
             "--threads", str(args.edge_threads), "--log-level", "warning",
             "--drain-timeout-s", f"{DRAIN_S:g}"],
        )  # fmt: skip
        yield f"http://127.0.0.1:{port}", children
    finally:
        await asyncio.to_thread(children.stop)


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the load and return the figures."""
    import httpx

    # SIGTERM stops the run as Ctrl-C does: this task is cancelled, so every `finally`
    # below runs (the children and the nats-server are stopped). Cancelled here, not by
    # re-sending SIGINT, which a background job ignores.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    run = Run()
    with tempfile.TemporaryDirectory(prefix="hg-bench-load-") as tmp:
        async with network(args, Path(tmp)) as (url, children, version):
            limits = httpx.Limits(max_connections=args.streams + 8)
            async with httpx.AsyncClient(
                base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S
            ) as client:
                await wait_ready(client, children, cloud=args.cloud_every > 0)
                edge_pid = children.processes["edge"].pid
                sampler = asyncio.create_task(sample_rss(edge_pid, run))
                until = time.monotonic() + args.seconds
                try:
                    await asyncio.gather(
                        *(client_loop(client, i, args, until, run) for i in range(args.streams))
                    )
                finally:
                    sampler.cancel()
    return summary(args, run, version)


def summary(args: argparse.Namespace, run: Run, version: str) -> dict[str, Any]:
    """The JSON figures of a run."""
    from hybridgen.benches.machine import cpu_info

    results = run.results
    completed = [r for r in results if r.completed]
    ttfts = sorted(r.ttft_s for r in completed if r.ttft_s is not None)
    cpu = cpu_info()
    return {
        "streams": args.streams,
        "seconds": args.seconds,
        "requests": len(results),
        "completed": len(completed),
        "shed_503": sum(r.shed for r in results),
        "errors": sum(not (r.completed or r.shed) for r in results),
        "p50_ttft_ms": _ms(percentile(ttfts, 0.50)) if ttfts else None,
        "p95_ttft_ms": _ms(percentile(ttfts, 0.95)) if ttfts else None,
        "edge_share": round(sum(r.served_by == "edge" for r in completed) / len(completed), 3)
        if completed
        else None,
        "rss_mb_max": round(max(run.rss_mb), 1) if run.rss_mb else None,
        "cpu": {"model": cpu["model"], "flags": cpu["flags"]},
        "model_set": version,
        "load_avg": round(os.getloadavg()[0], 2),
        "error_kinds": dict(Counter(k for r in results if (k := r.error_kind) is not None)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isnan(seconds) else round(seconds * 1e3, 1)


def run_reported(run: Coroutine[Any, Any, dict[str, Any]], name: str) -> dict[str, Any] | int:
    """The bench's figures, or its exit code after one line on stderr: 130 when interrupted
    (every process stopped), 1 on an error (a bench reports, it does not trace back)."""
    try:
        return asyncio.run(run)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"{name}: interrupted; every process stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"{name}: {message}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench load`."""
    args = build_parser().parse_args(argv)
    if args.streams < 1 or args.seconds <= 0:
        print("hybridgen bench load: --streams and --seconds must be positive", file=sys.stderr)
        return 2
    if args.keys:
        from hybridgen.benches.load_keys import main_keys

        return main_keys(args)
    figures = run_reported(measure(args), "hybridgen bench load")
    if isinstance(figures, int):
        return figures
    if args.json:
        print(json.dumps(figures))
        return 0
    print(
        f"load: {figures['streams']} streams for {figures['seconds']:g} s on {figures['model_set']}"
    )
    for key in ("requests", "completed", "shed_503", "errors", "p50_ttft_ms", "p95_ttft_ms",
                "edge_share", "rss_mb_max", "load_avg", "error_kinds"):  # fmt: skip
        print(f"  {key:<12} {figures[key]}")
    print(f"  cpu          {figures['cpu']['model']}")
    return 0

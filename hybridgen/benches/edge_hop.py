"""Edge figures of `hybridgen bench hop`: decision latency, fallback overhead, resident memory.

* `no_responders_decision_ms`: p50 time from a request entering the edge's router to its
  local-answer decision when no cloud worker exists (`route: cloud`, so the router asks the
  bus and gets no-responders). Goal <= 5 ms.
* `fallback_added_p50_ms`: p50 latency of a cloud-served request through the edge's HTTP
  app (in-process ASGI) minus the p50 of the same request sent to the worker directly with
  `broker.streaming.request_stream`. The worker is a torch-free stand-in that streams a fixed
  answer at once, so the figure is the edge's own cost (routing, HTTP, JSON, one more hop).
* `edge_rss_mb`: resident memory of a real `python -m edge` process after its model loaded
  (read from /proc once `/readyz` answers). Goal <= 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from broker import wire
from broker.bus import GenerationService, Responder, connect
from broker.server import NatsServer, free_port
from broker.streaming import request_stream

_ANSWER = ["stand", "-in ", "cloud ", "answer"]


async def _stand_in_worker(request: wire.GenerateRequest, responder: Responder) -> None:
    for piece in _ANSWER:
        await responder.chunk(text=piece, token_ids=[0])
    await responder.done("stop", wire.Usage(prompt_tokens=4, completion_tokens=len(_ANSWER)))


def _edge_settings(model_dir: Path, nats_url: str, node_id: str) -> Any:
    from edge.settings import EdgeSettings

    return EdgeSettings(
        model_dir=model_dir,
        nats_url=nats_url,
        node_id=node_id,
        threads=1,
        telemetry_interval_s=60.0,
    )


async def measure_decision_and_fallback(model_dir: Path, *, rounds: int = 50) -> dict[str, float]:
    """Run a nats-server, an edge app and (later) a stand-in worker; time both paths."""
    import httpx

    from edge.api.app import create_app
    from edge.route.request import EdgeRequest, RouteInfo
    from edge.runtime import SamplingParams

    with tempfile.TemporaryDirectory(prefix="hg-edge-bench-") as tmp:
        async with NatsServer(store_dir=Path(tmp) / "nats") as server:
            app = create_app(_edge_settings(model_dir, server.client_url, "edge-bench"))
            async with app.router.lifespan_context(app):
                node = app.state.service.node
                # 1. No worker: route=cloud -> no responders -> local decision.
                decisions = []
                for _ in range(rounds):
                    node.breaker.record_success()  # keep it closed: measure the bus round trip
                    request = EdgeRequest(
                        request_id=wire.new_request_id(),
                        prompt="hello",
                        model="hg-edge",
                        options=SamplingParams(max_tokens=1),
                        route="cloud",
                    )
                    items = app.state.service.router.generate(request)
                    started = time.perf_counter()
                    info = await anext(items)
                    decisions.append((time.perf_counter() - started) * 1e3)
                    assert isinstance(info, RouteInfo) and info.route_reason == "cloud_unavailable"
                    async for _ in items:
                        pass
                # 2. A stand-in worker: edge HTTP path vs direct.
                nc = await connect(server.client_url, name="bench-worker")
                client_nc = await connect(server.client_url, name="bench-client")
                service = GenerationService(
                    nc, model="hg-cloud", handler=_stand_in_worker, node_id="bench-worker"
                )
                await service.start()
                await nc.flush()
                await client_nc.flush()
                await _until_served(client_nc)
                node.breaker.record_success()
                transport = httpx.ASGITransport(app=app)
                body = {"model": "hg-cloud", "prompt": "hello", "max_tokens": 4}
                direct, via_edge = [], []
                # A Host the edge answers to (serving/browsers.py).
                local = "http://127.0.0.1"
                async with httpx.AsyncClient(transport=transport, base_url=local) as http:
                    for index in range(rounds + 5):
                        bus_request = wire.GenerateRequest(
                            request_id=wire.new_request_id(), model="hg-cloud", prompt="hello"
                        )
                        started = time.perf_counter()
                        async with request_stream(client_nc, bus_request) as stream:
                            await stream.collect()
                        direct_ms = (time.perf_counter() - started) * 1e3
                        started = time.perf_counter()
                        response = await http.post("/v1/completions", json=body)
                        edge_ms = (time.perf_counter() - started) * 1e3
                        assert response.json()["served_by"] == "cloud", response.text
                        if index >= 5:  # warm-up
                            direct.append(direct_ms)
                            via_edge.append(edge_ms)
                await service.close()
                await nc.close()
                await client_nc.close()
    return {
        "no_responders_decision_ms": round(statistics.median(decisions), 3),
        "no_responders_decision_p95_ms": round(sorted(decisions)[int(0.95 * len(decisions))], 3),
        "cloud_direct_p50_ms": round(statistics.median(direct), 3),
        "cloud_via_edge_p50_ms": round(statistics.median(via_edge), 3),
        "fallback_added_p50_ms": round(statistics.median(via_edge) - statistics.median(direct), 3),
    }


async def _until_served(nc: Any, attempts: int = 100) -> None:
    """Wait until the stand-in worker's subscription answers (it propagates asynchronously)."""
    from broker.errors import NoResponders

    for _ in range(attempts):
        request = wire.GenerateRequest(
            request_id=wire.new_request_id(), model="hg-cloud", prompt="hello"
        )
        try:
            async with request_stream(nc, request) as stream:
                await stream.collect()
            return
        except NoResponders:
            await asyncio.sleep(0.01)


def measure_edge_rss(model_dir: Path, *, timeout: float = 60.0) -> float:
    """RSS (MB) of a real `python -m edge --no-cloud` process once it is ready."""
    port = free_port()
    env = {**os.environ, "HG_EDGE_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge",
            "--model-dir",
            str(model_dir),
            "--no-cloud",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=Path(__file__).resolve().parents[2],  # the repository root
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"edge exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("edge did not become ready")
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
        )
        return round(rss_kb / 1024, 1)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def measure(model_dir: Path | None = None, *, quick: bool = False) -> dict[str, float]:
    """All edge figures of `bench hop` (blocking; runs its own event loop and servers)."""
    if model_dir is None:
        from models.registry import resolve

        model_dir = resolve().edge_dir("int4")
    figures = asyncio.run(measure_decision_and_fallback(model_dir, rounds=20 if quick else 100))
    figures["edge_rss_mb"] = measure_edge_rss(model_dir)
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hybridgen.benches.edge_hop", description=__doc__
    )
    parser.add_argument("--model-dir", type=Path, help="edge model folder (default: current)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = measure(args.model_dir, quick=args.quick)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


async def hop_measurement(bench: Any) -> dict[str, Any]:
    """The edge's fields of `hybridgen bench hop` (composed by `hybridgen.benches.hop`).

    Uses the current model set's int4 edge build; without one, reports why in `edge_error`.
    """
    from broker.errors import HybridgenError
    from models.registry import resolve

    try:
        model_dir = resolve().edge_dir("int4")
    except HybridgenError as exc:
        return {"edge_error": exc.message}
    figures: dict[str, Any] = await measure_decision_and_fallback(
        model_dir, rounds=20 if getattr(bench, "quick", False) else 100
    )
    figures["edge_rss_mb"] = await asyncio.to_thread(measure_edge_rss, model_dir)
    return figures

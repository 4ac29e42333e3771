"""`hybridgen bench load --keys`: does a flood from one API key starve another?

Starts a nats-server, one cloud worker and the cloud API as separate processes, the API with
two keys: `flood`, limited to `--flood-rpm` requests per minute and `--flood-concurrent` in
flight (`serving.limits`), and `steady`, unlimited. The steady key's client sends streamed
chat completions one after another, first alone for `--seconds` (unloaded), then for
`--seconds` more while the flood key sends at `--flood-factor` times its limit, open loop
(a request every 60 / (factor x rpm) seconds, whatever the answers), from a process of its
own so that its client's work does not delay the steady client's.

JSON: `{"keys": 2, "seconds", "flood_rpm", "flood_concurrent", "flood_factor",
"flood_sent", "flood_admitted", "flood_429", "steady_unloaded": {"requests", "p50_ttft_ms",
"p95_ttft_ms"}, "steady_loaded": {...}, "steady_errors", "p95_ratio" (loaded / unloaded),
"goal_ratio" (1.5), "within_goal", "cpu", "model_set", "load_avg"}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from broker.server import free_port
from hybridgen.benches.bus_hop import percentile
from hybridgen.benches.load import (
    DRAIN_S,
    PROMPTS,
    REQUEST_TIMEOUT_S,
    START_TIMEOUT_S,
    Children,
    Result,
    Scratch,
    _ms,
    one_request,
    run_reported,
    scratch_network,
)

#: The two keys of the run (a benchmark's own, on loopback).
FLOOD_KEY = "bench-flood-key"
STEADY_KEY = "bench-steady-key"
#: The issue's goal: the steady key's p95 TTFT under the flood within this of its unloaded.
GOAL_RATIO = 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `--keys` (the rest of `hybridgen bench load`'s are shared)."""
    parser.add_argument(
        "--keys",
        action="store_true",
        help="two keys at the cloud API: one floods at --flood-factor x its limit; report the "
        "other's p95 TTFT against its unloaded figure",
    )
    parser.add_argument("--flood-rpm", type=int, default=60, help="flood key's rpm limit (60)")
    parser.add_argument(
        "--flood-concurrent", type=int, default=2, help="flood key's concurrent limit (2)"
    )
    parser.add_argument(
        "--flood-factor", type=float, default=10.0, help="flood rate over its limit (10)"
    )


@contextlib.asynccontextmanager
async def cloud_services(args: argparse.Namespace, net: Scratch) -> AsyncIterator[str]:
    """A cloud worker and the cloud API with the two keys; yields the API's URL."""
    children = Children(net.logs, net.env)
    port = free_port()
    python = sys.executable
    limits = {"flood": {
        "key_sha256": _sha(FLOOD_KEY), "rpm": args.flood_rpm, "concurrent": args.flood_concurrent,
    }}  # fmt: skip
    try:
        children.start(
            "cloud-worker",
            [python, "-m", "cloud", "worker", "--nats", net.server.client_url, "--model-set",
             net.version, "--node-id", "bench-worker", "--threads", str(args.worker_threads),
             "--device", "cpu", "--drain-timeout-s", f"{DRAIN_S:g}"],
        )  # fmt: skip
        children.start(
            "cloud-api",
            [python, "-m", "cloud", "--log-level", "WARNING", "api", "--port", str(port),
             "--nats", net.server.client_url, "--api-key", FLOOD_KEY, "--api-key", STEADY_KEY,
             "--key-limits", json.dumps(limits)],
        )  # fmt: skip
        yield f"http://127.0.0.1:{port}"
    finally:
        await asyncio.to_thread(children.stop)


def _sha(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _body(index: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": "hg-cloud",
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "stream": True,
    }


async def wait_ready(client: Any) -> None:
    """Until the steady key gets a whole answer (the worker loaded, the API serving)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            result = await one_request(client, _body(0, 1))
            if result.completed:
                return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the cloud API and worker were not ready in {START_TIMEOUT_S:g} s")


async def steady(client: Any, until: float, max_tokens: int) -> list[Result]:
    """The steady key: one stream after another until `until`."""
    results: list[Result] = []
    index = 0
    while time.monotonic() < until:
        results.append(await one_request(client, _body(index, max_tokens)))
        index += 1
    return results


async def flood(client: Any, until: float, rate_rps: float, max_tokens: int) -> list[Result]:
    """The flood key: a request every 1 / `rate_rps` seconds until `until`, open loop."""
    tasks: list[asyncio.Task[Result]] = []
    start = time.monotonic()
    sent = 0
    while (now := time.monotonic()) < until:
        due = start + sent / rate_rps
        if now < due:
            await asyncio.sleep(due - now)
            continue
        tasks.append(asyncio.create_task(one_request(client, _body(sent, max_tokens))))
        sent += 1
    return list(await asyncio.gather(*tasks))


def _figures(results: list[Result]) -> dict[str, Any]:
    ttfts = sorted(r.ttft_s for r in results if r.completed and r.ttft_s is not None)
    return {
        "requests": len(results),
        "p50_ttft_ms": _ms(percentile(ttfts, 0.50)) if ttfts else None,
        "p95_ttft_ms": _ms(percentile(ttfts, 0.95)) if ttfts else None,
    }


async def measure_keys(args: argparse.Namespace) -> dict[str, Any]:
    """Run both phases and return the figures."""
    from hybridgen.benches.machine import cpu_info

    with tempfile.TemporaryDirectory(prefix="hg-bench-keys-") as tmp:
        async with (
            scratch_network(args.model_set, args.home, Path(tmp)) as net,
            cloud_services(args, net) as url,
            _client(url, STEADY_KEY) as steady_client,
        ):
            await wait_ready(steady_client)
            alone = await steady(steady_client, time.monotonic() + args.seconds, args.max_tokens)
            rate = args.flood_factor * args.flood_rpm / 60.0
            loaded, flooded = await flooded_phase(steady_client, url, rate, args)
    unloaded, under_flood = _figures(alone), _figures(loaded)
    ratio = None
    if unloaded["p95_ttft_ms"] and under_flood["p95_ttft_ms"]:
        ratio = round(under_flood["p95_ttft_ms"] / unloaded["p95_ttft_ms"], 3)
    cpu = cpu_info()
    return {
        "keys": 2,
        "seconds": args.seconds,
        "flood_rpm": args.flood_rpm,
        "flood_concurrent": args.flood_concurrent,
        "flood_factor": args.flood_factor,
        **flooded,
        "steady_unloaded": unloaded,
        "steady_loaded": under_flood,
        "steady_errors": sum(not r.completed for r in [*alone, *loaded]),
        "p95_ratio": ratio,
        "goal_ratio": GOAL_RATIO,
        "within_goal": ratio is not None and ratio <= GOAL_RATIO,
        "cpu": {"model": cpu["model"], "flags": cpu["flags"]},
        "model_set": net.version,
        "load_avg": round(os.getloadavg()[0], 2),
    }


async def flooded_phase(
    steady_client: Any, url: str, rate: float, args: argparse.Namespace
) -> tuple[list[Result], dict[str, int]]:
    """The steady key's requests while the flood runs in a process of its own (so that the
    flood's client work does not delay the steady client's reading: only the servers are
    shared, and the machine's cores); the steady results and the flood's counts."""
    argv = [sys.executable, "-m", "hybridgen.benches.load_keys", "flood", url, FLOOD_KEY,
            f"{rate:g}", f"{args.seconds:g}", str(args.max_tokens)]  # fmt: skip
    process = _start_flood(argv)
    assert process.stdout is not None
    try:
        started = await asyncio.wait_for(
            asyncio.to_thread(process.stdout.readline), START_TIMEOUT_S
        )
        if not started:
            raise RuntimeError("the flood process did not start")
        loaded = await steady(steady_client, time.monotonic() + args.seconds, args.max_tokens)
        output = await asyncio.wait_for(asyncio.to_thread(process.stdout.read), REQUEST_TIMEOUT_S)
        counts = json.loads(output)
    finally:
        if process.poll() is None:
            process.terminate()
        await asyncio.to_thread(process.wait)
    return loaded, counts


def _start_flood(argv: list[str]) -> subprocess.Popen[str]:
    """The flood process, a plain Popen read in a thread (as `Children` runs the servers): an
    asyncio child watcher would race their reaping."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


async def _flood_main(url: str, key: str, rate: float, seconds: float, max_tokens: int) -> None:
    """The flood process: say it starts, flood for `seconds`, print the counts (JSON)."""
    async with _client(url, key) as client:
        print("flooding", flush=True)
        results = await flood(client, time.monotonic() + seconds, rate, max_tokens)
    print(json.dumps({
        "flood_sent": len(results),
        "flood_admitted": sum(r.status == 200 for r in results),
        "flood_429": sum(r.status == 429 for r in results),
    }), flush=True)  # fmt: skip


def _client(url: str, key: str) -> Any:
    """An HTTP client of the API presenting `key`."""
    import httpx

    limits = httpx.Limits(max_connections=256)
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.AsyncClient(
        base_url=url, timeout=REQUEST_TIMEOUT_S, headers=headers, limits=limits
    )


def main_keys(args: argparse.Namespace) -> int:
    """`hybridgen bench load --keys`: run, then print the figures (JSON with `--json`)."""
    figures = run_reported(measure_keys(args), "hybridgen bench load --keys")
    if isinstance(figures, int):
        return figures
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"load --keys: {figures['seconds']:g} s alone, then {figures['seconds']:g} s flooded")
    for key in ("flood_sent", "flood_admitted", "flood_429", "steady_unloaded", "steady_loaded",
                "steady_errors", "p95_ratio", "within_goal", "load_avg"):  # fmt: skip
        print(f"  {key:<16} {figures[key]}")
    print(f"  cpu              {figures['cpu']['model']}")
    return 0


if __name__ == "__main__":  # the flood process of `flooded_phase`
    _, verb, flood_url, flood_key, flood_rate, flood_s, flood_tokens = sys.argv
    assert verb == "flood"
    asyncio.run(
        _flood_main(flood_url, flood_key, float(flood_rate), float(flood_s), int(flood_tokens))
    )

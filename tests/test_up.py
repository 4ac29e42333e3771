"""`hybridgen up` end to end: broker, cloud worker, cloud API and edge from one command."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx

from models.registry import ModelSet, set_current
from tests.fixtures_models import copy_model_set

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_up_serves_edge_and_cloud_then_stops(tiny_models: ModelSet, tmp_path: Path) -> None:
    home = tmp_path / "home"
    set_current(copy_model_set(tiny_models, home).version, home)
    api_port, edge_port = free_port(), free_port()
    env = {**os.environ, "HG_CLOUD_THREADS": "1", "HG_EDGE_THREADS": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridgen", "up", "--headless", "--port", "-1",
        "--api-port", str(api_port), "--edge-port", str(edge_port), "--home", str(home),
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = ""
    try:
        assert process.stdout is not None
        async with asyncio.timeout(240):
            while "Ctrl-C stops everything" not in output:
                line = await process.stdout.readline()
                assert line, f"`hybridgen up` ended early:\n{output}"
                output += line.decode()
        assert "building" not in output  # an installed model set is reused
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "hg-edge", "prompt": "The ls command", "max_tokens": 4}
            edge_url = f"http://127.0.0.1:{edge_port}/v1/completions"
            routed = await client.post(edge_url, json=body)
            assert routed.status_code == 200, routed.text
            assert routed.headers["x-hybridgen-route-reason"] in ("in_domain", "low_confidence")
            local = await client.post(edge_url, json={**body, "route": "edge"})
            assert local.headers["x-hybridgen-served-by"] == "edge", local.text
            forced = await client.post(edge_url, json={**body, "route": "cloud"})
            assert forced.json()["served_by"] == "cloud", forced.text
            direct = await client.post(
                f"http://127.0.0.1:{api_port}/v1/completions", json={**body, "model": "hg-cloud"}
            )
            assert direct.status_code == 200, direct.text
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 60) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert not (home / "run" / "nats.url").exists()

"""The loopback rule at the cloud API's start: `python -m cloud api`, the entry that
`hybridgen cloud api` runs (flags and `HG_CLOUD_*` into `ApiSettings`, `create_app` and its
`check_settings`, uvicorn), and in-process the same settings and `create_app`.

README.md ("The loopback rule") and docs/cloud.md ("API keys"): without a key the API serves
only on a loopback address; asked to listen beyond it, it refuses to start (exit status 2)
and says how to set a key. Keys, a loopback address, or `HG_CLOUD_ALLOW_OPEN=1` let it start.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import httpx
import pytest

from broker.server import free_port
from tests.fixtures_cloud import cli_cloud_api, cloud_api_env, live_cloud_api
from tests.waits import BOUND_S, eventually

REFUSAL = (
    "hybridgen cloud api: refusing to serve without an API key on 0.0.0.0 (beyond loopback): "
    "set one with --api-key KEY or HG_CLOUD_API_KEYS (or --allow-open / HG_CLOUD_ALLOW_OPEN=1 "
    "to accept the risk)"
)


async def test_an_open_api_beyond_loopback_refuses_to_start(nats_url: str) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "cloud", "api", "--host", "0.0.0.0", "--port", str(port)),
        *("--nats", nats_url),
        env=cloud_api_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    exited = asyncio.ensure_future(proc.communicate())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def exited_or_serving() -> bool:
                if exited.done():
                    return True
                with contextlib.suppress(httpx.TransportError):
                    await http.get("/healthz")
                    return True
                return False

            await eventually(exited_or_serving, "the cloud API exits or serves")
        assert exited.done(), "an open API started serving on 0.0.0.0"
        out, err = await exited
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.gather(exited, return_exceptions=True)
    assert proc.returncode == 2, (out, err)
    assert err.decode().splitlines() == [REFUSAL]


async def test_with_a_key_it_serves_beyond_loopback(nats_url: str, tmp_path: Path) -> None:
    flags = ("--host", "0.0.0.0", "--api-key", "key-one")
    async with (
        cli_cloud_api(nats_url, *flags, log=tmp_path / "api.log") as (_, url),
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http,
    ):
        keyed = await http.get("/v1/models", headers={"Authorization": "Bearer key-one"})
        assert keyed.status_code == 200
        without = await http.get("/v1/models")
        assert without.status_code == 401 and without.json()["error"]["code"] == "unauthorized"


async def test_on_loopback_no_key_is_needed(nats_url: str) -> None:
    async with (
        live_cloud_api(nats_url, host="127.0.0.1") as (_, url),
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http,
    ):
        assert (await http.get("/v1/models")).status_code == 200


async def test_allow_open_lets_it_serve_beyond_loopback_without_a_key(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_CLOUD_ALLOW_OPEN", "1")
    async with (
        live_cloud_api(nats_url, host="0.0.0.0") as (_, url),
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http,
    ):
        assert (await http.get("/v1/models")).status_code == 200

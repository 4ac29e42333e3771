"""The embedded nats-server: start, stop, failure reporting, external servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import errors
from broker.bus import connect
from broker.server import BrokerStartError, ExternalServer, NatsServer, find_nats_server, server_for


def test_binary_found() -> None:
    assert find_nats_server().name.startswith("nats-server")


async def test_start_serve_and_shutdown(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "store")
    async with server:
        assert server.client_url.startswith("nats://127.0.0.1:")
        assert server.running
        client = await connect(server.client_url, name="t")
        js = client.jetstream()
        info = await js.account_info()  # JetStream on (off, this raises), with nothing in it
        assert (info.streams, info.consumers) == (0, 0)
        await client.close()
        assert (tmp_path / "store" / "jetstream").is_dir()
        assert "Server is ready" in server.log_path.read_text()
    assert not server.running
    await server.shutdown()  # idempotent


async def test_two_servers_get_distinct_ports(tmp_path: Path) -> None:
    async with (
        NatsServer(store_dir=tmp_path / "a") as a,
        NatsServer(store_dir=tmp_path / "b") as b,
    ):
        assert a.client_url != b.client_url


async def test_startup_failure_quotes_server(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("port: 4222\nthis is { not valid\n")
    server = NatsServer(store_dir=tmp_path / "store", config_file=bad)
    with pytest.raises(BrokerStartError) as info:
        await server.start()
    message = info.value.message
    # The server's own words: its parse error, with the line.
    assert "Parse error on line 2" in message
    assert "exited with status 1" in message
    assert isinstance(info.value, errors.Unavailable)
    assert not server.running

    bad.write_text("port: abc\n")
    with pytest.raises(BrokerStartError, match=r"bad\.conf:1:0"):
        await NatsServer(store_dir=tmp_path / "store", config_file=bad, port=None).start()


async def test_port_in_use_reported(tmp_path: Path) -> None:
    async with NatsServer(store_dir=tmp_path / "a") as first:
        port = int(first.client_url.rsplit(":", 1)[1])
        second = NatsServer(store_dir=tmp_path / "b", port=port)
        with pytest.raises(BrokerStartError, match="address already in use"):
            await second.start()


async def test_external_server(nats_url: str, tmp_path: Path) -> None:
    external = server_for(nats_url, store_dir=tmp_path)
    assert isinstance(external, ExternalServer)
    async with external:
        assert external.client_url == nats_url
    with pytest.raises(errors.Unavailable):
        await ExternalServer("nats://127.0.0.1:1", check_timeout=0.5).start()
    assert isinstance(server_for(None, store_dir=tmp_path), NatsServer)

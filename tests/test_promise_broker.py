"""docs/broker.md's promises about running the bus: `up`'s port and `--nats-url`, token
logins, the server log's name, denied requests, and a site whose leaf link is down.

Real parts only: nats-server processes, the launcher (in process, or as `hybridgen up`), and
child processes that read the environment the launcher gives them.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.aio.msg import Msg

from broker import errors, subjects, wire
from broker.bus import GenerationService, Responder, close_bounded, connect, connect_settings
from broker.config import ServerConfig, render
from broker.server import NatsServer
from broker.settings import BusSettings
from broker.streaming import request_stream
from hybridgen.up.bus import BROKER, DEFAULT_PORT
from hybridgen.up.spec import ChildSpec
from hybridgen.up.supervisor import Launcher
from tests.fixtures_secure_bus import Bus
from tests.waits import BOUND_S, eventually

REPO = Path(__file__).resolve().parent.parent
MODEL = "hg-cloud"
TOKEN = "t0ken-of-the-site"

StartNats = Callable[..., Awaitable[NatsServer]]


# -- `up` picks another port when 4222 is taken ----------------------------------------------


@pytest.fixture
def port_4222_held() -> Iterator[socket.socket]:
    """Port 4222 on loopback, bound and listening by this test (so it is taken for sure)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", DEFAULT_PORT))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            pytest.skip(f"port {DEFAULT_PORT} is in use by another process: this test must hold it")
        raise
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


async def read_until(stream: asyncio.StreamReader, marker: str) -> str:
    seen = ""
    async with asyncio.timeout(BOUND_S):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"process ended before {marker!r}; output: {seen}")
            seen += line.decode()
    return seen


async def test_up_falls_back_to_a_free_port_when_4222_is_taken(
    tmp_path: Path, port_4222_held: socket.socket
) -> None:
    """docs/broker.md, "Running it": `up` uses 4222 and falls back to a free port when it is
    taken (here by a socket this test holds), and tells the services that port."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridgen", "up", "--broker-only", "--home", str(tmp_path),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        output = await read_until(process.stdout, "Ctrl-C stops everything")
        url = output.split("NATS broker at ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1])
        assert port != DEFAULT_PORT
        assert f"port {DEFAULT_PORT} is taken; using a free port instead" in output
        assert (tmp_path / "run" / "nats.url").read_text().strip() == url
        # The broker really serves there (secured, as `up` is by default).
        client = await connect_settings(
            BusSettings(
                url=url,
                user="operator",
                password_file=tmp_path / "secrets" / "operator.password",
            ),
            name="probe",
        )
        assert client.connected_url is not None and client.connected_url.port == port
        await client.close()
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), BOUND_S) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def only_these_bus_settings(monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    """Set `HG_NATS_<NAME>` for each of `settings`, and no other `HG_NATS_*` (a server the
    test needs is started before: finding its binary may read `HG_NATS_SERVER_BIN`)."""
    for name in [n for n in os.environ if n.startswith("HG_NATS_")]:
        monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv(f"HG_NATS_{name.upper()}", value)


# -- `--nats-url`: your server, your settings ------------------------------------------------

#: A service stand-in: it records the bus settings it was given, then logs in with them
#: (`BusSettings()` reads `HG_NATS_*`, as every service does) and says hello on the bus.
SERVICE = """
import asyncio, json, os, signal, sys
from broker.bus import connect_settings
from broker.settings import BusSettings
async def main():
    nc = await connect_settings(BusSettings(), name="child")
    await nc.publish("probe.hello", os.environ["HG_NATS_URL"].encode())
    await nc.flush()
    await nc.close()
    mine = {k: v for k, v in os.environ.items() if k.startswith("HG_NATS_")}
    with open(sys.argv[1], "w") as fh:
        json.dump(mine, fh)
asyncio.run(main())
signal.pause()  # a service runs until the launcher stops it
"""


async def test_up_with_nats_url_passes_your_own_settings_on(
    tmp_path: Path, start_nats: StartNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/broker.md, "`hybridgen up` is secured by default": with `--nats-url`, `up` uses
    your server and passes your own `HG_NATS_*` settings on to the services. The server here
    wants a token; the service logs in with the one given to `up`."""
    server = await start_nats("yours", extra_args=["--auth", TOKEN])
    only_these_bus_settings(monkeypatch, token=TOKEN, js_domain="hub", connect_timeout_s="7")
    record = tmp_path / "env.json"
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    child = ChildSpec(
        "edge",
        [sys.executable, str(script), str(record)],
        role="edge",
        node_id="edge-1",
        ready=lambda: asyncio.to_thread(record.exists),
    )
    watcher = await connect(server.client_url, name="watcher", token=TOKEN)
    hellos: list[str] = []

    async def heard(msg: Msg) -> None:
        hellos.append(msg.data.decode())

    await watcher.subscribe("probe.hello", cb=heard)
    await watcher.flush()
    try:
        launcher = Launcher(
            home=tmp_path / "home", children=[child], nats_url=server.client_url, secure=True
        )
        async with launcher:
            assert launcher.url == server.client_url
            await eventually(lambda: hellos, "the service's hello on your server")
    finally:
        await watcher.close()
    assert hellos == [server.client_url]
    assert json.loads(record.read_text()) == {
        "HG_NATS_URL": server.client_url,
        "HG_NATS_TOKEN": TOKEN,
        "HG_NATS_JS_DOMAIN": "hub",
        "HG_NATS_CONNECT_TIMEOUT_S": "7",
    }
    assert not (tmp_path / "home" / "secrets").exists()  # no users of its own made


# -- HG_NATS_TOKEN ----------------------------------------------------------------------------


@pytest.fixture
async def token_server(start_nats: StartNats) -> NatsServer:
    """A nats-server that lets in only clients with `TOKEN`."""
    return await start_nats("token", extra_args=["--auth", TOKEN])


async def test_hg_nats_token_logs_in(
    token_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/broker.md, "Running it": `HG_NATS_TOKEN` is a token login instead of a user."""
    only_these_bus_settings(monkeypatch, url=token_server.client_url, token=TOKEN)
    client = await connect_settings(BusSettings(), name="with-token")
    try:
        sub = await client.subscribe("probe.token")
        await client.publish("probe.token", b"in")
        assert (await sub.next_msg(timeout=BOUND_S)).data == b"in"
    finally:
        await client.close()


async def test_a_wrong_hg_nats_token_is_unauthorized(
    token_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/broker.md, "Running it": refused credentials are `unauthorized`, not
    `unavailable` (a wrong token, and none at all)."""
    only_these_bus_settings(monkeypatch, url=token_server.client_url, token="not-the-token")
    with pytest.raises(errors.Unauthorized) as refused:
        await connect_settings(BusSettings(), name="wrong-token")
    assert refused.value.code == errors.ErrorCode.UNAUTHORIZED
    assert str(refused.value) == (
        f"NATS {token_server.client_url}: authorization refused for the token given — run "
        "`hybridgen context use NAME` (see `hybridgen context list`) or set "
        "HG_NATS_USER/HG_NATS_PASSWORD_FILE"
    )
    monkeypatch.delenv("HG_NATS_TOKEN")
    with pytest.raises(errors.Unauthorized):
        await connect_settings(BusSettings(), name="no-token")


# -- the server log's name --------------------------------------------------------------------


async def test_the_server_log_is_home_nats_nats_server_log(tmp_path: Path) -> None:
    """docs/broker.md, "Running it": the server log is `$HG_HOME/nats/nats-server.log`."""
    home = tmp_path / "home"
    async with Launcher(home=home, port=-1) as launcher:
        assert launcher.log_path(BROKER) == home / "nats" / "nats-server.log"
        port = launcher.url.rsplit(":", 1)[1]
        log = (home / "nats" / "nats-server.log").read_text()
        assert f"Listening for client connections on 127.0.0.1:{port}" in log


# -- a denied request times out ---------------------------------------------------------------


async def test_a_request_to_a_denied_subject_times_out_not_no_responders(bus: Bus) -> None:
    """docs/broker.md, "Users and roles": a request to a denied subject ends in a timeout,
    not "no responders". An edge may send no control verb; nobody serves the subject either,
    so an allowed request would be answered "no responders" at once."""
    edge1 = await bus.connect("edge1")
    denied = subjects.control("edge-2", "drain")
    answers = await edge1.subscribe(edge1.new_inbox())
    await edge1.publish(denied, b"", reply=answers.subject)  # a request, by hand
    # A later request on the same connection, to a subject the edge may use and nobody
    # serves: its "no responders" comes after any the denied one could have had.
    with pytest.raises(nats.errors.NoRespondersError):
        await edge1.request(subjects.gen("no-such-model"), b"", timeout=BOUND_S)
    assert answers.pending_msgs == 0
    await bus.violation("edge1", denied)  # the server said why, asynchronously
    # What the caller sees: its own timeout.
    with pytest.raises(nats.errors.TimeoutError):
        await edge1.request(denied, b"", timeout=0.5)


# -- a site whose leaf link is down -----------------------------------------------------------


async def echo(request: wire.GenerateRequest, responder: Responder) -> None:
    for word in (request.prompt or "").split():
        await responder.chunk(word)
    await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=1))


def ask(prompt: str) -> wire.GenerateRequest:
    return wire.GenerateRequest(request_id=wire.new_request_id(), model=MODEL, prompt=prompt)


async def test_a_site_whose_leaf_link_is_down_sees_no_responders(
    tmp_path: Path, start_nats: StartNats
) -> None:
    """docs/broker.md, "Deployments across machines": if the leaf link is down the edge sees
    "no responders" at once (and answers locally), not a timeout: the accept bound here is
    the suite's whole bound, so only the status can end the request."""
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(
        render(ServerConfig(topology="hub", host="127.0.0.1", port=-1, leaf_port=-1,
                            store_dir=tmp_path / "hub-store", leaf_user="leaf", js_domain="hub",
                            leaf_password="pw"))
    )  # fmt: skip
    hub = await start_nats("hub", config_file=hub_conf)
    leaf_conf = tmp_path / "leaf.conf"
    leaf_conf.write_text(
        render(ServerConfig(topology="leaf", host="127.0.0.1", port=-1,
                            remotes=[f"nats-leaf://127.0.0.1:{hub.leafnode_port}"],
                            leaf_user="leaf", leaf_password="pw"))
    )  # fmt: skip
    leaf = await start_nats("leaf", config_file=leaf_conf, jetstream=False)
    worker = await connect(hub.client_url, name="hub-worker")
    site = await connect(leaf.client_url, name="site-edge")
    try:
        await worker.subscribe("probe.link", cb=_answer)
        async with GenerationService(worker, model=MODEL, handler=echo, node_id="cloud-hub"):

            async def across() -> tuple[str, wire.Done] | None:
                try:
                    async with request_stream(site, ask("over the link")) as stream:
                        return await stream.collect()
                except errors.NoResponders:  # the link and its interest are not up yet
                    return None

            text, done = await eventually(across, "a request served across the leaf link")
            assert (text, done.served_by) == ("overthelink", "cloud-hub")
            await hub.shutdown()  # the link goes down with it

            async def link_down() -> bool:
                try:
                    await site.request("probe.link", b"", timeout=0.5)
                except nats.errors.NoRespondersError:
                    return True
                except nats.errors.TimeoutError:  # sent before the leaf saw the link drop
                    return False
                return False

            await eventually(link_down, "the leaf dropping the hub's interest")
            with pytest.raises(errors.NoResponders):
                async with request_stream(
                    site, ask("nobody there"), accept_timeout=BOUND_S, idle_timeout=BOUND_S
                ) as stream:
                    await stream.collect()
    finally:
        await site.close()
        await close_bounded(worker)  # its server is gone


async def _answer(msg: Msg) -> None:
    await msg.respond(b"up")

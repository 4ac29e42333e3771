"""Contexts: `hybridgen up` saves how an operator reaches its secured bus, and the commands run
by hand (`hybridgen fleet`, `hybridgen models`, the console) find it with no setup.

The network is `up`'s own broker code (`Launcher.start_broker`: users per role, password
files, the context it writes), on a free port, under a temporary `HG_HOME`; no `HG_NATS_*`
variable is set unless a test sets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import connect_settings
from broker.contexts import Context, context_path, read_context, write_context
from broker.server import NatsServer
from broker.settings import AUTH_FIX, BusSettings, as_service
from hybridgen.context import main as context_cli
from hybridgen.fleet import run as fleet
from hybridgen.up.bus import Broker
from hybridgen.up.spec import ChildSpec
from hybridgen.up.supervisor import Launcher
from models.cli import main as models_cli
from tests.fixtures_tui import until
from tui.app import HybridgenConsole
from tui.cli import main as tui_main
from tui.event_log import EventLog

SIZE = (120, 30)
EDGE = "edge-1"


def refused(url: str, user: str = "operator") -> str:
    """What a refused login says (the whole line, after the command's own prefix)."""
    return (
        f"NATS {url}: authorization refused for user {user!r} — run `hybridgen context use "
        "NAME` (see `hybridgen context list`) or set HG_NATS_USER/HG_NATS_PASSWORD_FILE"
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh `HG_HOME`, and no `HG_NATS_*` / `HG_CONTEXT` in the environment."""
    for name in [n for n in os.environ if n.startswith("HG_NATS_") or n == "HG_CONTEXT"]:
        monkeypatch.delenv(name)
    folder = tmp_path / "home"
    monkeypatch.setenv("HG_HOME", str(folder))
    return folder


async def start_network(home: Path, *, context: str = "local") -> Launcher:
    """`up`'s broker, secured, with an edge user (`edge-1`) and no child processes; it
    writes its context as `up` does."""
    edge = ChildSpec(EDGE, argv=[], role="edge", node_id=EDGE)
    launcher = Launcher(home=home, children=[edge], port=-1, context=context)
    try:
        await launcher.start_broker()
    except BaseException:
        await launcher.stop()
        raise
    return launcher


@pytest.fixture
async def network(home: Path) -> AsyncIterator[Launcher]:
    launcher = await start_network(home)
    try:
        yield launcher
    finally:
        await launcher.stop()


@pytest.fixture
async def edge(network: Launcher) -> AsyncIterator[Client]:
    """The edge's own login (not the context's): it publishes heartbeats, as an edge does."""
    nc = await connect_settings(network.bus_settings(EDGE), name="test-edge")
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def beating(nc: Client, **extra: Any) -> AsyncIterator[None]:
    """The edge's heartbeats, every 0.1 s, while the block runs."""

    async def beat() -> None:
        heartbeat = wire.Heartbeat(role="edge", node_id=EDGE, extra=extra)
        while True:
            await nc.publish(subjects.telemetry("edge", EDGE), wire.encode(heartbeat))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def wrong_password(launcher: Launcher) -> None:
    """The operator's password file no longer matches the broker's (secrets re-made)."""
    launcher.password_file("operator").write_text("not-the-password\n")


# -- what `up` writes -------------------------------------------------------------------------


async def test_up_writes_the_operator_context_owner_only(home: Path, network: Launcher) -> None:
    context = read_context(home, "local")
    assert context == Context(
        name="local",
        url=network.url,
        user="operator",
        password_file=(home / "secrets" / "operator.password").absolute(),
    )
    folder = home / "contexts"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("local.json", "current"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert (folder / "current").read_text() == "local\n"
    text = (folder / "local.json").read_text()
    password = network.password_file("operator").read_text().strip()
    assert password not in text  # the path of the password, never the password itself


# -- the commands find it -----------------------------------------------------------------------


async def test_fleet_commands_reach_the_network_with_no_setup(
    network: Launcher, edge: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    start = ["experiment", "start", "ab1", "--cloud-model", "hg-other", "--share", "0.5"]
    assert await fleet(start) == 0  # the operator writes the fleet config
    assert "ab1" in capsys.readouterr().out
    async with beating(edge, experiment="ab1", variants={"b": {"requests": 2}}):
        assert await fleet(["experiment", "status", "--json", "--seconds", "1"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["edges"] == [EDGE]
    assert status["variants"]["b"]["requests"] == 2


async def test_the_console_shows_the_fleet_with_no_setup(network: Launcher, edge: Client) -> None:
    app = HybridgenConsole(BusSettings.resolve(), events=EventLog())
    assert (app.bus.url, app.bus.user, app.bus.context) == (network.url, "operator", "local")
    async with app.run_test(size=SIZE) as pilot, beating(edge):
        await until(pilot, lambda: app.connected and app.fleet.get(EDGE), "the edge's row")
        app.refresh_fleet()
        assert str(app.bar.render()) == (
            f"NATS {network.url}: connected · all roles · sort node asc"
        )


# -- a refused login says so, and how to fix it ---------------------------------------------------


async def test_a_refused_login_is_said_on_the_command_line(
    network: Launcher, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    wrong_password(network)
    assert await fleet(["experiment", "status", "--seconds", "0"]) == 1
    assert capsys.readouterr().err == f"hybridgen fleet experiment: {refused(network.url)}\n"
    pull = ["pull", "2026.1", "--home", str(tmp_path / "models")]
    assert await asyncio.to_thread(models_cli, pull) == 1  # it runs its own event loop
    assert capsys.readouterr().err == f"hybridgen models: error: {refused(network.url)}\n"


def test_the_console_command_says_a_missing_context(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tui_main(["--context", "nope"]) == 1
    assert capsys.readouterr().err == (
        f"hybridgen tui: no context 'nope' in {home / 'contexts'} (known: none); "
        "`hybridgen up` writes one, `hybridgen context list` shows them\n"
    )


async def test_a_refused_login_is_said_on_the_consoles_bar(network: Launcher) -> None:
    wrong_password(network)
    app = HybridgenConsole(BusSettings.resolve(connect_timeout_s=0.5))
    async with app.run_test(size=SIZE) as pilot:
        expected = f"{refused(network.url)} (retrying) · all roles · sort node asc"
        await until(pilot, lambda: str(app.bar.render()) == expected, "the refusal on the bar")
        assert not app.connected


async def test_a_broker_back_with_other_passwords_is_said_on_the_bar(
    network: Launcher,
) -> None:
    """Connected, then the broker restarts with a new operator password (its secrets made
    again): the console's reconnects are refused, and its bar says so and how to fix it."""
    app = HybridgenConsole(BusSettings.resolve())
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.connected, "connected")
        network.password_file("operator").write_text("a-new-password\n")
        network.prepare_security(network.children)  # the config the restart reads
        assert isinstance(network.server, NatsServer) and network.server.pid is not None
        os.kill(network.server.pid, signal.SIGKILL)  # `up` restarts it on the same port
        expected = f"{refused(network.url)} (retrying) · all roles · sort node asc"
        await until(pilot, lambda: str(app.bar.render()) == expected, "the refusal on the bar")


async def test_a_service_run_by_hand_is_not_lent_the_operators_login(
    network: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hybridgen edge` and `hybridgen cloud` (`as_service`) take the context's URL but not
    the operator's login: with no login of its own, the refusal says what to set."""
    for name in ("HG_NATS_CONTEXT_CREDENTIALS", "HG_CONTEXT"):  # restored after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    as_service("local")
    assert os.environ["HG_CONTEXT"] == "local"
    settings = BusSettings()
    assert (settings.url, settings.user, settings.password_file) == (network.url, None, None)
    with pytest.raises(errors.Unauthorized) as refusal:
        await connect_settings(settings, name="hand-run-service")
    assert refusal.value.message == (
        f"NATS {network.url}: authorization refused (no user or password) — {AUTH_FIX}"
    )


# -- several networks: `--context`, `HG_CONTEXT`, `context use`, the environment --------------


@pytest.fixture
async def second(home: Path, tmp_path: Path) -> AsyncIterator[Launcher]:
    """Another network (its own data) saved as context `lab` in the same `HG_HOME`."""
    launcher = await start_network(tmp_path / "lab-home", context="lab")
    try:
        write_context(home, launcher.operator_context(), make_current=False)
        yield launcher
    finally:
        await launcher.stop()


async def experiment_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """The experiment `fleet experiment status` finds on the bus `argv` picks."""
    capsys.readouterr()
    assert await fleet(["experiment", "status", "--json", "--seconds", "0", *argv]) == 0
    return json.loads(capsys.readouterr().out)["experiment"]


async def test_context_picks_the_network(
    network: Launcher,
    second: Launcher,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = ["experiment", "start", "on-lab", "--cloud-model", "hg-other", "--share", "0.5"]
    assert await fleet([*start, "--context", "lab"]) == 0
    assert (await experiment_of(["--context", "lab"], capsys))["name"] == "on-lab"
    assert await experiment_of([], capsys) is None  # the current one: `local`
    monkeypatch.setenv("HG_CONTEXT", "lab")
    assert (await experiment_of([], capsys))["name"] == "on-lab"
    assert await experiment_of(["--context", "local"], capsys) is None  # the flag wins
    assert context_cli(["use", "local"]) == 0
    assert capsys.readouterr().out == (
        "current context is now 'local'\n(in this shell HG_CONTEXT=lab still wins)\n"
    )
    monkeypatch.delenv("HG_CONTEXT")

    assert context_cli(["use", "lab"]) == 0
    assert capsys.readouterr().out == "current context is now 'lab'\n"
    assert (await experiment_of([], capsys))["name"] == "on-lab"
    assert await fleet(["experiment", "status", "--context", "nope"]) == 1
    assert capsys.readouterr().err.startswith("hybridgen fleet experiment: no context 'nope' in ")


async def test_the_environment_overrides_the_context(
    home: Path,
    network: Launcher,
    second: Launcher,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = ["experiment", "start", "on-lab", "--cloud-model", "hg-other", "--share", "0.5"]
    assert await fleet([*start, "--context", "lab"]) == 0
    # Another server by URL: the current context (`local`) is not used at all.
    monkeypatch.setenv("HG_NATS_URL", second.url)
    monkeypatch.setenv("HG_NATS_USER", "operator")
    monkeypatch.setenv("HG_NATS_PASSWORD_FILE", str(second.password_file("operator")))
    assert (await experiment_of([], capsys))["name"] == "on-lab"
    # The context's server with other credentials: they replace the context's login.
    monkeypatch.setenv("HG_NATS_URL", network.url)
    monkeypatch.setenv("HG_NATS_USER", "launcher")
    monkeypatch.setenv("HG_NATS_PASSWORD_FILE", str(network.password_file("launcher")))
    settings = BusSettings.resolve()
    assert (settings.url, settings.user, settings.context) == (network.url, "launcher", "local")
    assert settings.password_file == network.password_file("launcher")
    monkeypatch.setenv("HG_NATS_PASSWORD_FILE", str(second.password_file("operator")))
    monkeypatch.setenv("HG_NATS_USER", "operator")
    assert await fleet(["experiment", "status", "--seconds", "0"]) == 1
    assert capsys.readouterr().err == f"hybridgen fleet experiment: {refused(network.url)}\n"


# -- `hybridgen context list|show|use` -----------------------------------------------------------


async def test_context_list_show_use(
    home: Path, network: Launcher, second: Launcher, capsys: pytest.CaptureFixture[str]
) -> None:
    assert context_cli(["list"]) == 0
    width = max(len(network.url), len(second.url))
    assert capsys.readouterr().out.splitlines() == [
        f"   NAME   {'URL'.ljust(width)}  USER",
        f"   lab    {second.url.ljust(width)}  operator",
        f"*  local  {network.url.ljust(width)}  operator",
    ]
    assert context_cli(["show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "name": "local",
        "current": True,
        "url": network.url,
        "user": "operator",
        "password_file": str(network.password_file("operator").absolute()),
        "tls_ca": None,
        "file": str(context_path(home, "local")),
    }
    assert context_cli(["show", "lab"]) == 0
    shown = capsys.readouterr().out
    assert "current:       no\n" in shown
    assert f"password_file: {second.password_file('operator').absolute()}\n" in shown
    for launcher in (network, second):
        assert launcher.password_file("operator").read_text().strip() not in shown

    assert context_cli(["use", "lab"]) == 0
    assert (home / "contexts" / "current").read_text() == "lab\n"
    assert context_cli(["use", "nope"]) == 1
    assert capsys.readouterr().err == (
        f"hybridgen context use: no context 'nope' in {home / 'contexts'} (known: lab, "
        "local); `hybridgen up` writes one, `hybridgen context list` shows them\n"
    )
    assert (home / "contexts" / "current").read_text() == "lab\n"

    # A network `up` did not start (a deployment) is saved by hand.
    password_file = second.password_file("operator")
    add = ["add", "deploy", "--url", second.url, "--user", "operator", "--use"]
    assert context_cli([*add, "--password-file", str(password_file)]) == 0
    assert capsys.readouterr().out == (
        f"saved context 'deploy' in {context_path(home, 'deploy')} (now current)\n"
    )
    settings = BusSettings.resolve()
    assert (settings.context, settings.url, settings.user) == ("deploy", second.url, "operator")
    nc = await connect_settings(settings, name="test-deploy")
    await nc.close()
    assert context_cli(["add", "half", "--url", second.url, "--user", "operator"]) == 2
    assert capsys.readouterr().err == (
        "hybridgen context add: give --user and --password-file together\n"
    )


# -- the rule, without a server ---------------------------------------------------------------


@pytest.fixture
def saved(home: Path) -> Context:
    context = Context(
        name="local", url="nats://127.0.0.1:4999", user="operator", password_file=home / "op"
    )
    write_context(home, context)
    return context


def test_no_context_means_the_defaults(home: Path) -> None:
    settings = BusSettings()
    assert (settings.url, settings.user, settings.context) == ("nats://127.0.0.1:4222", None, None)


def test_the_context_fills_what_is_not_given(
    saved: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert BusSettings().model_dump(include={"url", "user", "password_file", "context"}) == {
        "url": saved.url,
        "user": "operator",
        "password_file": saved.password_file,
        "context": "local",
    }
    # Its own URL given: still its login. Another URL: none of it.
    assert BusSettings.resolve(url=saved.url).user == "operator"
    other = BusSettings.resolve(url="nats://10.0.0.9:4222")
    assert (other.user, other.password_file, other.context) == (None, None, None)
    # A token given replaces the context's login; the URL stays the context's.
    monkeypatch.setenv("HG_NATS_TOKEN", "t0k")
    token = BusSettings()
    assert (token.url, token.user, token.password_file, token.token) == (
        saved.url,
        None,
        None,
        "t0k",
    )


def test_a_current_context_that_went_missing_is_skipped(
    saved: Context, home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context_path(home, "local").unlink()
    assert BusSettings().url == "nats://127.0.0.1:4222"
    assert "the current context is skipped: no context 'local'" in caplog.text


def test_up_on_an_insecure_or_your_own_server_saves_what_it_can(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--insecure-nats`: the URL alone. `--nats-url` (your server): your user, password
    *file* and CA from `HG_NATS_*`; a password given inline is not saved."""
    insecure = Broker(home=home, secure=False)
    insecure.url = "nats://127.0.0.1:4333"
    assert insecure.operator_context() == Context(name="local", url=insecure.url)
    yours = Broker(home=home, nats_url="tls://bus.example:4222", context="yours")
    yours.url = "tls://bus.example:4222"
    monkeypatch.setenv("HG_NATS_USER", "ops")
    monkeypatch.setenv("HG_NATS_PASSWORD_FILE", "/etc/hybridgen/ops.password")
    monkeypatch.setenv("HG_NATS_TLS_CA", "/etc/hybridgen/ca.pem")
    assert yours.operator_context() == Context(
        name="yours",
        url=yours.url,
        user="ops",
        password_file=Path("/etc/hybridgen/ops.password"),
        tls_ca=Path("/etc/hybridgen/ca.pem"),
    )
    monkeypatch.delenv("HG_NATS_PASSWORD_FILE")
    monkeypatch.setenv("HG_NATS_PASSWORD", "inline")
    saved = yours.operator_context()
    assert (saved.user, saved.password_file) == (None, None)
    assert "inline" not in saved.model_dump_json()


def test_context_remove_keeps_the_current_one_unless_forced(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`remove` deletes the context's file, never the password file it names; the current
    context goes only with --force, which leaves none current."""
    password_file = home / "op.password"
    password_file.parent.mkdir(parents=True)
    password_file.write_text("secret\n")
    for name in ("local", "lab"):
        context = Context(name=name, url="nats://127.0.0.1:4999", user="operator",
                          password_file=password_file)  # fmt: skip
        write_context(home, context, make_current=name == "local")

    assert context_cli(["remove", "lab"]) == 0
    assert capsys.readouterr().out == "removed context 'lab'\n"
    assert not context_path(home, "lab").exists()
    assert password_file.read_text() == "secret\n"
    assert context_cli(["remove", "lab"]) == 1
    assert capsys.readouterr().err == (
        f"hybridgen context remove: no context 'lab' in {home / 'contexts'} (known: local); "
        "`hybridgen up` writes one, `hybridgen context list` shows them\n"
    )

    assert context_cli(["remove", "local"]) == 1
    assert capsys.readouterr().err == (
        "hybridgen context remove: 'local' is the current context: `hybridgen context use "
        "OTHER` first, or --force (then no context is current)\n"
    )
    assert context_path(home, "local").is_file()
    assert context_cli(["remove", "local", "--force"]) == 0
    assert capsys.readouterr().out == "removed context 'local'; no context is current now\n"
    assert not context_path(home, "local").exists()
    assert not (home / "contexts" / "current").exists()
    assert password_file.read_text() == "secret\n"
    assert BusSettings().context is None
    assert context_cli(["list"]) == 0
    assert (
        capsys.readouterr().out == f"no contexts in {home / 'contexts'}; `hybridgen up` saves one\n"
    )

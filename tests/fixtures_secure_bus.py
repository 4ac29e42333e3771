"""The secured bus of the security tests: a real nats-server run with the config
`broker.config.render` writes, one user per role (password files), and helpers.

- `bus`: a started `Bus` (its users: `USERS`, name -> (role, node id)).
- `echo`/`generate`: a generation handler that streams the prompt's words, and a request.
- `drain`: a control handler; `kv_put_fails`: a KV put that the permissions must drop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import Responder, connect_settings
from broker.config import ServerConfig, User, ensure_password, render
from broker.server import NatsServer
from broker.settings import BusSettings
from tests.waits import eventually

MODEL = "hg-cloud"
USERS = {
    "edge1": ("edge", "edge-1"),
    "edge2": ("edge", "edge-2"),
    "cloud1": ("cloud", "cloud-a"),
    "api": ("api", "api-1"),
    "ops": ("operator", None),
    "launcher": ("launcher", None),
}


class Bus:
    """A secured nats-server (rendered config, a user per role) and clients of its users."""

    def __init__(self, server: NatsServer, secrets: Path) -> None:
        self.server = server
        self.secrets = secrets
        self.violations: list[str] = []
        self.clients: list[Client] = []

    def settings(self, user: str) -> BusSettings:
        return BusSettings(
            url=self.server.client_url,
            user=user,
            password=None,
            password_file=self.secrets / f"{user}.password",
        )

    async def connect(self, user: str) -> Client:
        async def on_error(exc: Exception) -> None:
            self.violations.append(f"{user}: {exc}")

        client = await connect_settings(self.settings(user), name=user, error_cb=on_error)
        self.clients.append(client)
        return client

    async def violation(self, user: str, subject: str) -> str:
        """The permissions violation of `user` on `subject` (waits for it, bounded)."""

        def found() -> str | None:
            for line in self.violations:
                lower = line.lower()
                if (
                    line.startswith(f"{user}: ")
                    and "permissions violation" in lower
                    and subject.lower() in lower
                ):
                    return line
            return None

        line: str = await eventually(found, f"a violation of {user} on {subject!r}")
        return line

    def no_violation(self, user: str) -> None:
        mine = [v for v in self.violations if v.startswith(f"{user}: ")]
        assert not mine, mine


@pytest.fixture
async def bus(
    tmp_path: Path, start_nats: Callable[..., Awaitable[NatsServer]]
) -> AsyncIterator[Bus]:
    secrets = tmp_path / "secrets"
    users = [
        User(name, ensure_password(secrets / f"{name}.password"), role, node)  # type: ignore[arg-type]
        for name, (role, node) in USERS.items()
    ]
    conf = tmp_path / "secure.conf"
    conf.write_text(
        render(ServerConfig(host="127.0.0.1", port=-1, users=users, store_dir=tmp_path / "js"))
    )
    the_bus = Bus(await start_nats("secure", config_file=conf), secrets)
    try:
        yield the_bus
    finally:
        for client in the_bus.clients:
            await client.close()


async def echo(request: wire.GenerateRequest, responder: Responder) -> None:
    for word in (request.prompt or "").split():
        await responder.chunk(word)
    await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=1))


def generate(prompt: str) -> wire.GenerateRequest:
    return wire.GenerateRequest(request_id=wire.new_request_id(), model=MODEL, prompt=prompt)


async def drain(request: wire.ControlRequest) -> wire.ControlReply:
    return wire.ControlReply(ok=True, message="draining")


async def kv_put_fails(client: Client, key: str) -> None:
    """A KV put by `client` (what `KeyValue.put` sends) that must fail: the server drops a
    denied publish, so no acknowledgement ever comes."""
    js = client.jetstream(timeout=1.0)
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await js.publish(f"$KV.{subjects.CONFIG_BUCKET}.{key}", b'{"hijacked": true}')

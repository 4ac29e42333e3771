"""The broker `hybridgen up` runs (or the one it is pointed at), secure by default.

Unless `--insecure-nats` (or `--nats-url`, an external server) is given, the broker runs
with one NATS user per service and the subject permissions of its role
(`broker.permissions.permissions_for`): workers `cloud`, edges `edge` bound to their node id,
the cloud API `api`, the console `operator`, the launcher itself `launcher`. Passwords are
made once into `$HG_HOME/secrets/<user>.password` (directory 0700, files 0600) and reused;
the rendered server config is `$HG_HOME/secrets/nats-server.conf`. Each child gets its user
name and the *path* of its password file (`HG_NATS_USER`, `HG_NATS_PASSWORD_FILE`), never
the password itself. A broker bound beyond loopback also gets TLS (a private CA made with
openssl under `$HG_HOME/secrets/tls/`, or the files given with `--tls-*`).

Once the broker is up, `write_context` saves how an operator reaches it as a context
(`broker.contexts`, default name `local`) and makes it current: the `operator` user, its
password file, the CA. The console, `hybridgen fleet` and `hybridgen models publish|pull`
run by hand then find the network with no setup.

`Broker` holds that state; the `Launcher` (`hybridgen.up.supervisor`) extends it with the
children it supervises.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlsplit

from nats.aio.client import Client

from broker.addresses import is_loopback
from broker.bus import connect, connect_settings
from broker.config import (
    ServerConfig,
    TLSFiles,
    User,
    ensure_password,
    ensure_secrets_dir,
    render,
    self_signed_tls,
    write_secret,
)
from broker.contexts import DEFAULT_CONTEXT, Context, check_name, write_context
from broker.errors import HybridgenError
from broker.permissions import Role
from broker.server import ExternalServer, NatsServer
from broker.settings import CONTEXT_ENV, BusSettings
from broker.store import ArtifactStore, FleetConfig
from hybridgen.up import log
from hybridgen.up.spec import ChildFailed, ChildSpec

DEFAULT_PORT = 4222
#: The name the broker goes by in log lines and events.
BROKER = "nats-server"
#: The bus users `up` always makes: the launcher itself and the operator (the console, and
#: whoever runs `hybridgen tui` or `hybridgen models publish` by hand).
LAUNCHER_USER = "launcher"
OPERATOR_USER = "operator"
#: Environment a child must not inherit when it gets its own credentials.
_CREDENTIAL_ENV = ("HG_NATS_PASSWORD", "HG_NATS_TOKEN", "HG_NATS_CREDS", "HG_NATS_USER")


class Broker:
    """The launcher's broker: started (or checked), secured, and reachable as each user.

    Args:
        home: the data directory (`$HG_HOME`).
        nats_url: use this external server instead of starting one.
        host: broker listen address.
        port: broker client port (if taken, a free one is used instead).
        secure: run the broker with a user per service and role permissions (and TLS
            beyond loopback); ignored with `nats_url` (then the environment's credentials,
            `HG_NATS_*`, are passed on as they are).
        tls: the broker's certificate, key and CA; None makes a private CA when the broker
            listens beyond loopback (secure only).
        context: the name of the context `write_context` saves.
    """

    def __init__(
        self,
        *,
        home: Path,
        nats_url: str | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        secure: bool = True,
        tls: TLSFiles | None = None,
        context: str = DEFAULT_CONTEXT,
    ) -> None:
        self.home = home
        self.nats_url = nats_url
        self.host = host
        self.port = port
        self.secure = secure and not nats_url
        self.tls = tls
        self.context = check_name(context)
        #: The bus users of a secured broker, by name (filled by `prepare_security`).
        self.users: dict[str, User] = {}
        self.server: NatsServer | ExternalServer | None = None
        self.url = ""

    @property
    def secrets_dir(self) -> Path:
        """Where the credentials, the server config and the TLS files are kept (0700)."""
        return self.home / "secrets"

    @property
    def config_file(self) -> Path:
        """The rendered nats-server config of a secured broker (it holds passwords: 0600)."""
        return self.secrets_dir / "nats-server.conf"

    def password_file(self, user: str) -> Path:
        """The password file of a bus user (`<secrets>/<user>.password`)."""
        return self.secrets_dir / f"{user}.password"

    @property
    def url_file(self) -> Path:
        """Where the running broker's URL is written, for commands started by hand."""
        return self.home / "run" / "nats.url"

    def bus_settings(self, user: str = OPERATOR_USER) -> BusSettings:
        """How to reach the running broker as `user` (a user only when it is secured).

        E.g. `connect_settings(launcher.bus_settings("operator"), name=...)`.
        """
        if not self.secure:
            return BusSettings(url=self.url)
        if user not in self.users:
            raise KeyError(f"no bus user {user!r}; known: {', '.join(sorted(self.users))}")
        return BusSettings(
            url=self.url,
            user=user,
            password=None,
            password_file=self.password_file(user),
            tls_ca=self.tls.ca if self.tls is not None else None,
        )

    def operator_context(self) -> Context:
        """How an operator reaches the running broker: as `operator` on a secured one; by
        URL alone on an insecure one; on your server (`nats_url`), with your `HG_NATS_*`
        user, password *file* and CA (a password given inline is not saved)."""
        if self.secure:
            ca = self.tls.ca if self.tls is not None else None
            return Context(
                name=self.context,
                url=self.url,
                user=OPERATOR_USER,
                password_file=self.password_file(OPERATOR_USER).absolute(),
                tls_ca=ca.absolute() if ca is not None else None,
            )
        if not self.nats_url:
            return Context(name=self.context, url=self.url)
        yours = BusSettings.resolve(url=self.url)
        login = yours.user is not None and yours.password_file is not None
        return Context(
            name=self.context,
            url=self.url,
            user=yours.user if login else None,
            password_file=yours.password_file.expanduser().absolute()
            if login and yours.password_file
            else None,
            tls_ca=yours.tls_ca.expanduser().absolute() if yours.tls_ca else None,
        )

    def write_context(self) -> Path:
        """Save `operator_context()` under `$HG_HOME/contexts` (0700/0600) and make it
        current; the file written."""
        return write_context(self.home, self.operator_context())

    async def start_server(self, children: list[ChildSpec]) -> None:
        """Start our nats-server (secured for `children`), or check the external one."""
        server: NatsServer | ExternalServer
        if self.nats_url:
            server = self.server = ExternalServer(self.nats_url)
            await server.start()
        else:
            config_file = self.prepare_security(children) if self.secure else None
            server = await self._start_own(config_file)
            # A restart must come back where the clients reconnect to.
            server.port = urlsplit(server.client_url).port
        self.url = server.client_url
        if self.secure and self.tls is not None:
            self.url = self.url.replace("nats://", "tls://", 1)

    async def _start_own(self, config_file: Path | None) -> NatsServer:
        """Our nats-server on `port`, or on a free port when that one is taken (kept in
        `server` from the first try, so a failed start is still shut down)."""
        store = self.home / "nats"
        self.server = NatsServer(
            store_dir=store, host=self.host, port=self.port, config_file=config_file
        )
        try:
            await self.server.start()
        except HybridgenError as exc:
            if self.port == -1 or "address already in use" not in exc.message:
                raise
            log.warning("port %s is taken; using a free port instead", self.port)
            self.server = NatsServer(
                store_dir=store, host=self.host, port=-1, config_file=config_file
            )
            await self.server.start()
        return self.server

    def prepare_security(self, children: list[ChildSpec]) -> Path:
        """Make (or reuse) the users' passwords and TLS files; write the server config.

        One user per child with a role (named after the child, bound to its node id),
        plus `launcher` and `operator`. Returns the config file's path.

        Raises:
            ChildFailed: TLS is needed but no certificate could be made.
        """
        ensure_secrets_dir(self.secrets_dir)
        wanted: list[tuple[str, Role, str | None]] = [
            (LAUNCHER_USER, "launcher", None),
            (OPERATOR_USER, "operator", None),
        ]
        wanted += [(s.nats_user, s.role, s.node_id) for s in children if s.role is not None]
        self.users = {}
        for name, role, node_id in wanted:
            if name in self.users:
                continue
            password = ensure_password(self.password_file(name))
            self.users[name] = User(name, password, role, node_id)
        if self.tls is None and not is_loopback(self.host):
            try:
                self.tls = self_signed_tls(self.secrets_dir / "tls", [self.host])
            except RuntimeError as exc:
                raise ChildFailed(str(exc)) from None
        config = ServerConfig(
            host=self.host,
            port=self.port,
            store_dir=self.home / "nats",
            users=list(self.users.values()),
            tls=self.tls,
        )
        write_secret(self.config_file, render(config))
        return self.config_file

    async def _connect(self, name: str) -> Client:
        """The launcher's own bus connection: as the `launcher` user when secured; on your
        server (`nats_url`) with your `HG_NATS_*` credentials, as its services."""
        if self.nats_url:
            return await connect_settings(BusSettings(url=self.url), name=name)
        if not self.secure:
            return await connect(self.url, name=name)
        return await connect_settings(self.bus_settings(LAUNCHER_USER), name=name)

    async def prepare_buckets(self) -> None:
        """Create the fleet-config KV bucket and the artifact store if they are missing.

        Services with read-only permissions (edges) can then bind them from the start.
        """
        nc = await self._connect("hybridgen-launcher-setup")
        try:
            await FleetConfig.open(nc)
            await ArtifactStore.open(nc)
        finally:
            await nc.close()

    def child_env(self, spec: ChildSpec) -> dict[str, str]:
        """The child's environment: ours, the bus URL, `HG_HOME`, its credentials, `env`.

        With a secured broker a child with a role gets its user name and the path of its
        password file (never the password), and the CA of the broker's TLS certificate.
        """
        env = {
            **os.environ,
            "HG_NATS_URL": self.url,
            "HG_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }
        env.pop(CONTEXT_ENV, None)  # the bus is given: a context picked for our shell is not it
        if self.secure:
            for name in _CREDENTIAL_ENV:
                env.pop(name, None)
            if self.tls is not None and self.tls.ca is not None:
                env["HG_NATS_TLS_CA"] = str(self.tls.ca)
            if spec.role is not None:
                if spec.nats_user not in self.users:
                    raise ChildFailed(
                        f"{spec.name}: no bus user {spec.nats_user!r} (children with a role "
                        "must be given to the Launcher before it starts)"
                    )
                env["HG_NATS_USER"] = spec.nats_user
                env["HG_NATS_PASSWORD_FILE"] = str(self.password_file(spec.nats_user))
        return {**env, **spec.env}

    async def stop_server(self) -> None:
        """Stop our nats-server (or let go of the external one) and remove the URL file."""
        if self.server is not None:
            await self.server.shutdown()
            self.server = None
            with contextlib.suppress(OSError):
                self.url_file.unlink()

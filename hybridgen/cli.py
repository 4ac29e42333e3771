"""The `hybridgen` command: a thin dispatcher to each part's own `main`.

Every part also runs alone (`python -m broker`, `python -m edge`, ...). Imports are lazy so
that `hybridgen edge` never loads torch and `hybridgen --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "up": ("hybridgen.up.cli", "main", "start broker, cloud worker, cloud API and edge node"),
    "broker": ("broker.cli", "main", "run a nats-server, or print a deployment config"),
    "models": ("models.cli", "main", "build, verify, list, publish and pull model sets"),
    "cloud": ("cloud.cli", "main", "run a cloud generation worker or the cloud API"),
    "edge": ("edge.cli", "main", "run an edge node (local OpenAI-compatible API)"),
    "tui": ("tui.cli", "main", "the operator console (Textual)"),
    "bench": ("hybridgen.benches", "main", "run a benchmark: hybridgen bench NAME [--json]"),
    "fleet": ("hybridgen.fleet", "main", "fleet operations: experiment, rollout, rollback"),
    "context": ("hybridgen.context", "main", "the saved ways to reach a bus: list, show, use, add"),
}


def _resolve(module: str, function: str) -> Callable[[list[str]], int]:
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: hybridgen COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "Run `hybridgen COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"hybridgen {version('hybridgen')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hybridgen: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[command]
    return _resolve(module, function)(rest)

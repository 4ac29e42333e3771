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
    "up": ("broker.launcher", "main", "start broker, cloud worker, cloud API and edge node"),
    "broker": ("broker.cli", "main", "run a nats-server, or print a deployment config"),
    "models": ("models.cli", "main", "build, verify, list, publish and pull model sets"),
    "cloud": ("cloud.cli", "main", "run a cloud generation worker or the cloud API"),
    "edge": ("edge.cli", "main", "run an edge node (local OpenAI-compatible API)"),
    "bench": ("hybridgen", "bench_main", "run a benchmark: hybridgen bench NAME [--json]"),
}

# bench name -> (module, function)
BENCHES: dict[str, tuple[str, str]] = {
    "hop": ("broker.bench", "main"),
    "edge-decode": ("models.bench", "main"),
    "cloud-batching": ("cloud.bench", "main"),
}


def _resolve(module: str, function: str) -> Callable[[list[str]], int]:
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: hybridgen COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "Run `hybridgen COMMAND --help` for a command's options."]
    return "\n".join(lines)


def bench_main(argv: list[str]) -> int:
    """Dispatch `hybridgen bench NAME [ARGS...]` to the part that owns the benchmark."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hybridgen bench NAME [--quick] [--json] [...]")
        print("benchmarks: " + ", ".join(BENCHES))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(
            f"hybridgen bench: unknown benchmark {name!r}; one of: {', '.join(BENCHES)}",
            file=sys.stderr,
        )
        return 2
    return _resolve(*BENCHES[name])(rest)


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


if __name__ == "__main__":
    sys.exit(main())

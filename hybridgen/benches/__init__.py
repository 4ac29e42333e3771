"""`hybridgen bench NAME`: the explicit table of benchmarks, and the ones that span parts.

Each benchmark lives with the part it measures and is listed here by module path, so this
table imports nothing until a benchmark is run (and `hybridgen bench --help` is instant).
A benchmark that spans parts (the `hop` bench adds the edge's fields to the bus's) is
composed here, at the top, instead of one part registering itself into another.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

#: bench name -> (module, function taking argv and returning an exit status)
BENCHES: dict[str, tuple[str, str]] = {
    "hop": ("hybridgen.benches", "hop"),
    "edge-decode": ("hybridgen.benches.edge_decode", "main"),
    "cloud-batching": ("cloud.bench", "main"),
    "console": ("hybridgen.benches.console", "main"),
    "prefix": ("hybridgen.benches.prefix", "main"),
    "constrained": ("hybridgen.benches.constrained", "main"),
    "personalization": ("hybridgen.benches.personalization", "main"),
    "load": ("hybridgen.benches.load", "main"),
    "routing": ("hybridgen.benches.routing", "main"),
    "fleet": ("hybridgen.benches.fleet", "main"),
}


def hop(argv: list[str]) -> int:
    """`hybridgen bench hop`: the bus's figures, plus the edge's where the edge is installed."""
    from broker import bench

    extra = []
    try:
        from edge.bench import hop_measurement
    except ImportError:  # a bus-only install
        pass
    else:
        extra.append(hop_measurement)
    return bench.main(argv, extra=extra)


def main(argv: list[str]) -> int:
    """Dispatch `hybridgen bench NAME [ARGS...]` to the benchmark's own `main`."""
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
    module, function = BENCHES[name]
    run: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    return run(rest)

"""`hybridgen bench NAME`: the explicit table of benchmarks, and the ones that span parts.

Benchmarks live here, at the top, where every part may be imported: each is a module of
this package, listed by module path, so this table imports nothing until a benchmark is run
(and `hybridgen bench --help` is instant). A benchmark that spans parts (the `hop` bench
adds the edge's fields, `edge_hop`, to the bus's, `bus_hop`) is composed here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

#: bench name -> (module, function taking argv and returning an exit status)
BENCHES: dict[str, tuple[str, str]] = {
    "hop": ("hybridgen.benches", "hop"),
    "edge-decode": ("hybridgen.benches.edge_decode", "main"),
    "cloud-batching": ("hybridgen.benches.cloud_batching", "main"),
    "console": ("hybridgen.benches.console", "main"),
    "prefix": ("hybridgen.benches.prefix", "main"),
    "constrained": ("hybridgen.benches.constrained", "main"),
    "personalization": ("hybridgen.benches.personalization", "main"),
    "load": ("hybridgen.benches.load", "main"),
    "routing": ("hybridgen.benches.routing", "main"),
    "fleet": ("hybridgen.benches.fleet", "main"),
    "quality": ("hybridgen.benches.quality", "main"),
    "speculative": ("hybridgen.benches.speculative", "main"),
}


def hop(argv: list[str]) -> int:
    """`hybridgen bench hop`: the bus's figures, plus the edge's where the edge is installed."""
    from hybridgen.benches import bus_hop

    extra = []
    try:
        from hybridgen.benches.edge_hop import hop_measurement
    except ImportError:  # a bus-only install
        pass
    else:
        extra.append(hop_measurement)
    return bus_hop.main(argv, extra=extra)


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

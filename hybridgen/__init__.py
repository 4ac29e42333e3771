"""hybridgen's top layer: the `hybridgen` command, the all-in-one launcher and the benchmarks.

Everything here may import every part; no part imports this package. `hybridgen.cli`
dispatches to each part's own `main`, `hybridgen.up` runs `hybridgen up`, and
`hybridgen.benches` is the explicit table of `hybridgen bench NAME`.
"""

from hybridgen.cli import main

__all__ = ["main"]

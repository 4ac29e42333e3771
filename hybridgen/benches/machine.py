"""What every benchmark records about the machine it ran on: the CPU (these machines differ:
AVX2 only, AVX-512, AMX) and the load average (they are shared)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

#: The vector/matrix extensions that matter to the kernels.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
             "amx_int8", "amx_bf16")  # fmt: skip


def cpu_info() -> dict[str, Any]:
    """`{"model", "flags": {flag: bool}, "logical_cpus"}` from /proc/cpuinfo (`unknown` and
    no flags elsewhere)."""
    model, flags = "unknown", set[str]()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "model": model,
        "flags": {f: f in flags for f in CPU_FLAGS},
        "logical_cpus": os.cpu_count(),
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]

"""Speed and memory of the int4 builds `hybridgen bench quality` compares.

Decode and prefill tokens/s come from the bare onnxruntime-genai loop of `hybridgen bench
edge-decode` (`raw_generate`: a short prompt, then new tokens, after the first; `raw_prefill`:
one long prompt), every build loaded at once and measured in alternation (each round runs
each build once, so drift on a shared machine hits them alike); the medians are reported,
and each build's ratio to the requantized build's over the same rounds.

Memory is measured in a fresh process that loads one build in the edge's own runtime: its RSS
once loaded (and warmed up, as an edge is when ready), and its peak RSS after answering one
request (the long prompt, then the new tokens): what an edge serving that build needs,
without this process's torch and the other build. MB are 10^6 bytes.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridgen.benches import edge_decode_measure as measure
from hybridgen.benches.quality_builds import REQUANTIZED


def speeds(
    folders: dict[str, Path], threads: int, prompt: list[int], long_prompt: list[int],
    new_tokens: int, runs: int, step: Callable[[], None],
) -> dict[str, dict[str, float | None]]:  # fmt: skip
    """Median decode and prefill tokens/s of each build, and the ratios to the build named
    `requantized` (`decode_vs_requantized`, `prefill_vs_requantized`: None without one);
    `step` after each round."""
    from models.ort_edge import load_model

    models = {name: load_model(folder, threads) for name, folder in folders.items()}
    for model in models.values():  # warm-up
        measure.raw_generate(model, prompt, min(8, new_tokens))
        measure.raw_prefill(model, long_prompt)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(runs):
        for name, model in models.items():
            decode = measure.raw_generate(model, prompt, new_tokens)["decode_tok_s"]
            prefill = measure.raw_prefill(model, long_prompt)["prefill_tok_s"]
            samples[name].append((decode, prefill))
        step()
    base = samples.get(REQUANTIZED)
    result: dict[str, dict[str, float | None]] = {}
    for name, values in samples.items():
        row: dict[str, float | None] = {
            "decode_tok_s": round(statistics.median(v[0] for v in values), 1),
            "prefill_tok_s": round(statistics.median(v[1] for v in values), 1),
            "decode_vs_requantized": None,
            "prefill_vs_requantized": None,
        }
        if base is not None:
            ratios = [(v[0] / b[0], v[1] / b[1]) for v, b in zip(values, base, strict=True)]
            row["decode_vs_requantized"] = round(statistics.median(r[0] for r in ratios), 3)
            row["prefill_vs_requantized"] = round(statistics.median(r[1] for r in ratios), 3)
        result[name] = row
    return result


def memory_mb(folder: Path, threads: int, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """`rss_loaded_mb` and `peak_rss_mb` of a fresh process serving the build (see the module).

    Raises:
        RuntimeError: the process failed (its stderr's end in the message).
    """
    request = json.dumps({"folder": str(folder), "threads": threads, "prompt": prompt,
                          "new_tokens": new_tokens})  # fmt: skip
    code = "from hybridgen.benches.quality_speed import serve_once; serve_once()"
    done = subprocess.run([sys.executable, "-c", code], input=request, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"the RSS probe failed: {done.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _status_mb(field: str) -> float:
    """A memory field of this process's /proc status (kB there), in MB."""
    status = Path("/proc/self/status").read_text(encoding="utf-8")
    kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))
    return round(kb * 1024 / 1e6, 1)


def serve_once() -> None:
    """The RSS probe's process: read the request (JSON on stdin), load the build in the edge's
    runtime, serve the request, print `{"rss_loaded_mb", "peak_rss_mb"}` (the RSS once
    loaded, and the kernel's high-water mark at the end)."""
    from edge.runtime import EdgeRuntime, SamplingParams

    request: dict[str, Any] = json.loads(sys.stdin.read())
    figures: dict[str, float] = {}

    async def serve() -> None:
        runtime = EdgeRuntime(Path(request["folder"]), threads=int(request["threads"]),
                              max_active=1, prefix_cache_mb=0)  # fmt: skip
        figures["rss_loaded_mb"] = _status_mb("VmRSS")
        options = SamplingParams(max_tokens=int(request["new_tokens"]), temperature=0,
                                 ignore_eos=True)  # fmt: skip
        async for _ in runtime.submit(list(request["prompt"]), options):
            pass
        await runtime.close()

    asyncio.run(serve())
    figures["peak_rss_mb"] = _status_mb("VmHWM")
    print(json.dumps(figures))

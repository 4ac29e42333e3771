"""`hybridgen bench speculative`: decode speed with and without drafting, at both ends.

A model set's int4 edge build (CURRENT, or `--set VERSION`) served by the edge's own runtime
(`edge.runtime.EdgeRuntime`, one slot, no prefix reuse), on three task sets
(`speculative_tasks`): input-grounded (the answer repeats the prompt's passage), open-ended
questions, and personalized continuation of a user's own text with that user's n-gram cache.

Every task is answered greedily with a fixed `max_tokens`, with drafting (`speculative: true`)
and without, the two runs back to back and their order alternating from task to task and round
to round, so drift on a shared machine hits both alike. For each set:

- `tok_s_without`, `tok_s_with`: decode tokens/s, the set's tokens after each answer's first
  over the time from its Prefill event to its Finished event, summed over the set (the median
  over rounds); `speedup`: the median over rounds of the round's with / without;
- `draft_tokens`, `accepted_tokens` (as each answer reports them) and `verifies` (the forward
  passes that checked a draft: the runtime's count, read around each answer), summed over the
  drafted runs; `acceptance_rate` (accepted / drafted), `accepted_per_verify` (accepted /
  verifies) and `accepted_per_step`, accepted tokens per decode step, plain or verifying
  (each step adds one token the model chose itself, so steps = completion tokens - accepted
  tokens); `plain_draft_tokens` (drafted without drafting) is 0;
- `identical_share`: the share of tasks whose every run, with and without drafting, gave the
  same answer (tokens, text, finish reason); a task that differs keeps each mode's texts.

Beside the sets, the drafted edge against llama.cpp, which is not installed here: the decode
figures of ../shared/FACTS.md (LLAMA_CPP_FACTS, llama.cpp Q4_0 and onnxruntime-genai int4 in
one rotated run, on an AVX-512 machine: `same_cpu_kind` says whether this one has AVX-512) as
constants. `drafted_vs_llama_cpp` scales llama.cpp's figure by this run's
plain decode on the input-grounded set (the input-grounded speedup times onnxruntime-genai's
rate over llama.cpp's), so the machine's load cancels; `drafted_vs_llama_cpp_facts` divides by
the FACTS figure as it stands. The issue's goals (GOALS) and whether each is met; the CPU, the
load average before and after, the thread count, the runtime's draft settings and the
versions. `--quick` answers two tasks
per set with a few tokens: a check that the bench runs, not a measurement.

The cloud half (`speculative_cloud`, under `cloud` in the JSON) measures the set's cloud
checkpoint in the cloud engine on the same task sets, alone and 4 rows at a time; `--ends`
picks the halves (both by default; the edge's keys are left out when it is not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from broker.errors import HybridgenError
from hybridgen.benches import speculative_tasks as st
from hybridgen.benches.machine import cpu_info, load_average
from hybridgen.benches.quality import progress_bar
from serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: The issue's goals: key -> (comparison, bound).
GOALS: dict[str, tuple[str, float]] = {
    "input_grounded_speedup": (">=", 2.0),
    "personalized_speedup": (">=", 1.3),
    "open_ended_speedup": (">=", 0.97),
    "identical_share": ("==", 1.0),  # the lowest of the sets
    "drafted_vs_llama_cpp": (">", 1.5),
}
#: ../shared/FACTS.md, "Same weights, this machine (AVX-512), batch 1, tokens/s decode /
#: prefill(256)", the line the figures below come from (SmolLM2-135M, the same weights).
FACTS_LINE = (
    "Re-measured 2026-12-07 against a llama.cpp 0.3.36 build with its AVX-512 paths on, "
    "rotated in one run (medians of 3): onnxruntime-genai int4 115 / 376 (1 thread), 176 / 713 "
    "(2); llama.cpp Q4_0 155 / 470 and 210 / 849"
)
#: Decode tokens/s of that line by thread count: llama.cpp Q4_0, onnxruntime-genai int4.
LLAMA_CPP_FACTS: dict[int, dict[str, float]] = {
    1: {"llama_cpp_q4_0": 155.0, "onnxruntime_genai_int4": 115.0},
    2: {"llama_cpp_q4_0": 210.0, "onnxruntime_genai_int4": 176.0},
}


@dataclass(frozen=True)
class Plan:
    """How much to measure: tasks per set (None: every one that fits), tokens, rounds."""

    tasks: int | None = None
    max_tokens: int = 128
    rounds: int = 2
    #: Tasks per set for the cloud half (None: every one that fits): the cloud model decodes
    #: a lone row on the CPU about ten times slower than the edge's int4 build.
    cloud_tasks: int | None = 8


QUICK = Plan(tasks=2, max_tokens=8, rounds=1, cloud_tasks=2)
#: `--ends` choices -> the halves measured.
ENDS = {"edge": ("edge",), "cloud": ("cloud",), "both": ("edge", "cloud")}


@dataclass(frozen=True)
class Run:
    """One answer: what it was, the runtime's drafting counts, and its decode time."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    completion_tokens: int
    draft_tokens: int
    accepted_tokens: int
    decode_s: float
    verifies: int
    #: Tokens that arrived before `decode_s` began: the first alone, but where a stream
    #: delivered the first few at once (not counted in the decode rate).
    first_tokens: int = 1

    @property
    def answer(self) -> tuple[tuple[int, ...], str, str]:
        return self.token_ids, self.text, self.finish_reason


async def answer(runtime: Any, task: st.Task, options: SamplingParams) -> Run:
    """`task` answered once by `runtime` (nothing else running on it); its decode time from
    Prefill to Finished, and the runtime's verify passes meanwhile."""
    from edge.runtime import Finished, Prefill, Token

    tokens: list[int] = []
    text, begun, verifies = "", time.perf_counter(), runtime.verifies
    async for event in runtime.submit(list(task.prompt_ids), options, adapter=task.adapter()):
        if isinstance(event, Prefill):
            begun = time.perf_counter()
        elif isinstance(event, Token):
            tokens.append(event.token_id)
            text += event.text
        elif isinstance(event, Finished):
            return Run(tuple(tokens), text + event.text, event.finish_reason,
                       event.completion_tokens, event.draft_tokens, event.accepted_tokens,
                       time.perf_counter() - begun, runtime.verifies - verifies)  # fmt: skip
    raise RuntimeError(f"task {task.id}: the generation ended without a Finished event")


#: One task's runs in each mode, a run per round: (without drafting, with drafting).
Runs = tuple[list[Run], list[Run]]


#: How a half answers one task: (runtime or engine, task, options) -> its run.
Answering = Callable[[Any, st.Task, SamplingParams], Awaitable[Run]]


async def measure(
    runtime: Any,
    sets: dict[str, list[st.Task]],
    plan: Plan,
    step: Callable[[], None],
    answering: Answering = answer,
) -> dict[str, list[Runs]]:
    """Every task of every set answered without and with drafting in each round, the pair's
    order alternating by task and round; `step` after each pair."""
    options = {
        mode: SamplingParams(max_tokens=plan.max_tokens, temperature=0, speculative=mode)
        for mode in (False, True)
    }
    first = next((tasks[0] for tasks in sets.values() if tasks), None)
    if first is not None:  # warm-up, both modes
        for mode in (False, True):
            await answering(runtime, first, options[mode])
    runs: dict[str, list[Runs]] = {name: [([], []) for _ in tasks] for name, tasks in sets.items()}
    turn = 0
    for _ in range(plan.rounds):
        for name, tasks in sets.items():
            for task, (plain, drafted) in zip(tasks, runs[name], strict=True):
                for mode in (False, True) if turn % 2 == 0 else (True, False):
                    done = await answering(runtime, task, options[mode])
                    (drafted if mode else plain).append(done)
                turn += 1
                step()
    return runs


def _rate(runs: list[Run]) -> float | None:
    """Decode tokens/s of runs taken together (tokens after each first); None without time."""
    seconds = sum(r.decode_s for r in runs)
    tokens = sum(max(0, r.completion_tokens - r.first_tokens) for r in runs)
    return tokens / seconds if seconds > 0 else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _round(value: float | None, places: int) -> float | None:
    return None if value is None else round(value, places)


def task_row(task: st.Task, plain: list[Run], drafted: list[Run]) -> dict[str, Any]:
    """One task's line: its prompt, its first plain answer's length and end, whether every run
    gave that answer (else the texts of each mode), its first drafted run's drafting counts,
    and the median over rounds of its own speedup."""
    reference = plain[0]
    identical = all(r.answer == reference.answer for r in [*plain, *drafted])
    row: dict[str, Any] = {
        "id": task.id,
        "kind": task.kind,
        "prompt_tokens": len(task.prompt_ids),
        "completion_tokens": reference.completion_tokens,
        "finish_reason": reference.finish_reason,
        "identical": identical,
        "draft_tokens": drafted[0].draft_tokens,
        "accepted_tokens": drafted[0].accepted_tokens,
        "verifies": drafted[0].verifies,
        "speedup": _round(
            _median([_ratio(_rate([d]), _rate([p])) for p, d in zip(plain, drafted, strict=True)]),
            3,
        ),
    }
    if not identical:  # each mode's texts, each once
        row["texts"] = {"without": list(dict.fromkeys(r.text for r in plain)),
                        "with": list(dict.fromkeys(r.text for r in drafted))}  # fmt: skip
    return row


def set_figures(selection: st.Selection, runs: list[Runs]) -> dict[str, Any]:
    """A set's figures (see the module) from its tasks' runs."""
    rows = [task_row(t, p, d) for t, (p, d) in zip(selection.tasks, runs, strict=True)]
    rounds = len(runs[0][0]) if runs else 0
    plain_rates = [_rate([p[r] for p, _ in runs]) for r in range(rounds)]
    drafted_rates = [_rate([d[r] for _, d in runs]) for r in range(rounds)]
    drafted = [run for _, d in runs for run in d]
    accepted = sum(r.accepted_tokens for r in drafted)
    drafts = sum(r.draft_tokens for r in drafted)
    verifies = sum(r.verifies for r in drafted)
    steps = sum(r.completion_tokens for r in drafted) - accepted
    identical = sum(row["identical"] for row in rows)
    return {
        "tasks": len(rows),
        "available": selection.available,
        "skipped": selection.skipped,
        "prompt_tokens_mean": _round(statistics.fmean(len(t.prompt_ids) for t in
                                                      selection.tasks), 1) if rows else None,
        "completion_tokens": sum(row["completion_tokens"] for row in rows),
        "tok_s_without": _round(_median(plain_rates), 1),
        "tok_s_with": _round(_median(drafted_rates), 1),
        "speedup": _round(
            _median([_ratio(d, p) for p, d in zip(plain_rates, drafted_rates, strict=True)]), 3
        ),
        "draft_tokens": drafts,
        "accepted_tokens": accepted,
        "verifies": verifies,
        "acceptance_rate": _round(_ratio(accepted, drafts), 4),
        "accepted_per_verify": _round(_ratio(accepted, verifies), 4),
        "accepted_per_step": _round(_ratio(accepted, steps), 4),
        "plain_draft_tokens": sum(r.draft_tokens for p, _ in runs for r in p),
        "identical": identical,
        "identical_share": round(identical / len(rows), 4) if rows else None,
        "per_task": rows,
    }  # fmt: skip


def llama_cpp(grounded: dict[str, Any], threads: int) -> dict[str, Any]:
    """The drafted edge's input-grounded decode beside FACTS' llama.cpp figure at `threads`."""
    found = bool(shutil.which("llama-cli") or importlib.util.find_spec("llama_cpp"))
    result: dict[str, Any] = {"facts": FACTS_LINE, "threads": threads, "installed": found,
                              "same_cpu_kind": cpu_info()["flags"]["avx512f"]}  # fmt: skip
    facts = LLAMA_CPP_FACTS.get(threads)
    if facts is None:
        result["note"] = f"FACTS has no llama.cpp figure at {threads} threads"
        return {**result, "drafted_vs_llama_cpp": None, "drafted_vs_llama_cpp_facts": None}
    llama, ours = facts["llama_cpp_q4_0"], facts["onnxruntime_genai_int4"]
    plain, drafted = grounded["tok_s_without"], grounded["tok_s_with"]
    return {
        **result,
        "llama_cpp_q4_0_tok_s": llama,
        "onnxruntime_genai_int4_tok_s": ours,
        "llama_cpp_estimated_tok_s": _round(None if plain is None else plain * llama / ours, 1),
        "drafted_tok_s": drafted,
        "drafted_vs_llama_cpp": _round(_ratio(grounded["speedup"], llama / ours), 3),
        "drafted_vs_llama_cpp_facts": _round(_ratio(drafted, llama), 3),
    }


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return {">=": value >= bound, ">": value > bound, "==": value == bound}[op]


def goals(sets: dict[str, dict[str, Any]], llama: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal's value in this run and whether it is met (None: not measured)."""
    shares = [s["identical_share"] for s in sets.values() if s["identical_share"] is not None]
    values = {f"{name}_speedup": sets[name]["speedup"] for name in st.SETS}
    values["identical_share"] = min(shares) if shares else None
    values["drafted_vs_llama_cpp"] = llama["drafted_vs_llama_cpp"]
    return {
        key: {"goal": f"{op} {bound}", "value": values[key], "met": _met(values[key], op, bound)}
        for key, (op, bound) in GOALS.items()
    }


def run_edge(model_set: Any, *, plan: Plan, threads: int, shown: bool) -> dict[str, Any]:
    """Measure `model_set`'s int4 edge build (see the module): the JSON's edge keys."""
    from edge.runtime import EdgeRuntime

    folder = model_set.edge_dir("int4")
    runtime = EdgeRuntime(folder, threads=threads, max_active=1, prefix_cache_mb=0)
    messages = st.load_messages()
    every = {name: st.chat_tasks(runtime, messages[name]) for name in messages}
    every["personalized"] = st.personalized_tasks(runtime.encode, quick=plan.tasks is not None)
    selections = {
        name: st.select(every[name], context=runtime.context_length,
                        max_tokens=plan.max_tokens, count=plan.tasks)
        for name in st.SETS
    }  # fmt: skip
    sets = {name: selections[name].tasks for name in st.SETS}
    total = plan.rounds * sum(len(tasks) for tasks in sets.values())

    async def timed() -> dict[str, list[Runs]]:
        try:
            with progress_bar(total, "speculative edge", shown) as step:
                return await measure(runtime, sets, plan, step)
        finally:
            await runtime.close()

    runs = asyncio.run(timed())
    figures = {name: set_figures(selections[name], runs[name]) for name in st.SETS}
    llama = llama_cpp(figures["input_grounded"], threads)
    return {
        "edge_dir": str(folder),
        "context_length": runtime.context_length,
        "drafting": asdict(runtime.drafting),
        "sets": figures,
        "llama_cpp": llama,
        "goals": goals(figures, llama),
    }


def run(
    model_set: Any,
    *,
    plan: Plan,
    threads: int,
    shown: bool = True,
    ends: tuple[str, ...] = ENDS["both"],
    cloud_dtype: str = "auto",
) -> dict[str, Any]:
    """Measure `model_set` at the `ends` asked for (see the module); the bench's JSON object."""
    from models.manifest import runtime_versions

    load_start = load_average()
    result: dict[str, Any] = {
        "set": model_set.version,
        "quick": plan.tasks is not None,
        "threads": threads,
        "plan": asdict(plan),
        "ends": list(ends),
    }
    if "edge" in ends:
        result.update(run_edge(model_set, plan=plan, threads=threads, shown=shown))
    if "cloud" in ends:  # torch and the engine load only here
        from hybridgen.benches import speculative_cloud

        result["cloud"] = speculative_cloud.run(
            model_set, plan=plan, threads=threads, dtype=cloud_dtype, shown=shown
        )
    return {
        **result,
        "cpu": cpu_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "versions": runtime_versions(),
    }


def _cell(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def set_line(name: str, row: dict[str, Any]) -> str:
    """One set's row of the table (SET_HEADER's columns)."""
    return (f"  {name:<15} {row['tasks']:>5} {_cell(row['tok_s_without'], '9.1f'):>9} "
            f"{_cell(row['tok_s_with'], '9.1f'):>9} {_cell(row['speedup'], '6.2f'):>6}x "
            f"{row['draft_tokens']:>8} {row['accepted_tokens']:>8} {row['verifies']:>8} "
            f"{_cell(row['accepted_per_verify'], '10.2f'):>10} "
            f"{_cell(row['accepted_per_step'], '8.2f'):>8} "
            f"{row['identical']:>4}/{row['tasks']:<4}")  # fmt: skip


SET_HEADER = (f"  {'set':<15} {'tasks':>5} {'tok/s off':>9} {'tok/s on':>9} {'speedup':>7} "
              f"{'drafted':>8} {'accepted':>8} {'verifies':>8} {'acc/verify':>10} "
              f"{'acc/step':>8} {'identical':>9}")  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    """The bench as a line per set, the llama.cpp comparison and the goals; then the cloud's
    lines."""
    cpu, plan = result["cpu"], result["plan"]
    flags = " ".join(f for f in ("avx2", "avx512f", "amx_tile") if cpu["flags"].get(f))
    print(f"speculative  set={result['set']}  threads={result['threads']}  max_tokens "
          f"{plan['max_tokens']}, {plan['rounds']} rounds  cpu {cpu['model']} ({flags})  "
          f"load {result['load_average_start']} -> {result['load_average_end']}")  # fmt: skip
    if "sets" in result:
        print_edge(result)
    if "cloud" in result:
        from hybridgen.benches.speculative_cloud import print_cloud

        print_cloud(result["cloud"])


def print_edge(result: dict[str, Any]) -> None:
    """The edge's lines: its sets, the llama.cpp comparison and the goals."""
    print("  edge drafts: " + ", ".join(f"{k} {v}" for k, v in result["drafting"].items()))
    print(SET_HEADER)
    for name, row in result["sets"].items():
        print(set_line(name, row))
        if row["skipped"]:
            print(f"    {len(row['skipped'])} left out, beyond the context (`skipped`)")
    llama = result["llama_cpp"]
    if llama["drafted_vs_llama_cpp"] is not None:
        kind = "" if llama["same_cpu_kind"] else " (FACTS: AVX-512; this CPU has none)"
        facts = _cell(llama["drafted_vs_llama_cpp_facts"], ".2f")
        print(f"  drafted input-grounded decode vs llama.cpp Q4_0 ({llama['llama_cpp_q4_0_tok_s']} "
              f"tok/s at {llama['threads']} threads in FACTS; not installed here): "
              f"{llama['drafted_vs_llama_cpp']:.2f}x scaled by this run's plain decode, "
              f"{facts}x as FACTS has it{kind}")  # fmt: skip
    else:
        print(f"  llama.cpp: {llama['note']}")
    for key, goal in result["goals"].items():
        mark = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        print(f"  {key:<24} {_cell(goal['value'], '.3f'):>8}  goal {goal['goal']:<7} {mark}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench speculative`."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench speculative",
        description="Greedy decode tokens/s with and without drafting, at the edge (int4 "
        "build) and in the cloud engine, on input-grounded, open-ended and personalized "
        "tasks (alternating runs in one process), accepted drafts, and whether the answers "
        "stay identical.",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="two tasks per set, a few tokens: checks the bench runs")  # fmt: skip
    parser.add_argument("--set", help="model-set version (default: CURRENT)")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of the edge's runtime and the cloud's torch "
                        "(default 1, the edge's own)")  # fmt: skip
    parser.add_argument("--ends", choices=tuple(ENDS), default="both",
                        help="the halves to measure (default both)")  # fmt: skip
    parser.add_argument("--cloud-tasks", type=int,
                        help="tasks per set in the cloud half, the shortest prompts (default 8, "
                        "--quick 2; 0: every one that fits)")  # fmt: skip
    parser.add_argument("--cloud-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="the cloud model's dtype (default auto, the worker's: bf16 where "
                        "the CPU does bf16 math)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        parser.error("--threads needs a positive count")
    if args.cloud_tasks is not None and args.cloud_tasks < 0:
        parser.error("--cloud-tasks needs a count (0: every task)")
    plan = QUICK if args.quick else Plan()
    if args.cloud_tasks is not None:
        plan = replace(plan, cloud_tasks=args.cloud_tasks or None)
    logging.basicConfig(level=logging.WARNING)
    from models.registry import resolve

    try:
        model_set = resolve(args.set)
    except HybridgenError as exc:  # none installed, or not that version: say so, no traceback
        print(f"hybridgen bench speculative: {exc}", file=sys.stderr)
        return 2
    result = run(model_set, plan=plan, threads=args.threads,
                 shown=not args.no_progress, ends=ENDS[args.ends],
                 cloud_dtype=args.cloud_dtype)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0

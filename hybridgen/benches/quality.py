"""`hybridgen bench quality`: does the edge answer as well as the cloud on the same weights?

A model set (CURRENT, or `--set VERSION`) measured at both ends in one run, for each int4
edge build (`quality_builds`: the set's own and, when its GGUF is at hand, the other one,
requantized or holding the GGUF's blocks, side by side):

- teacher forced on held-out text (CPython's help topics), against the fp32 checkpoint:
  `agreement` (top-1) and `nats_gap` (mean log-likelihood lost per token);
- greedy answers to the instructions of `data/instructions.json` (`quality_answers`), from
  the edge's runtime and from the cloud's engine (fp32): `stop_share`, `loop_share` (the
  loop rule is `quality_answers.find_loop`) and `same_answer_share` (the edge's text equal to
  the cloud's), without and with PENALTIES at both ends;
- decode and prefill tokens/s (alternated rounds) and peak RSS (`quality_speed`);
- the answers to "What is the capital of France?";
- the issue's goals (GOALS) and, for each build, whether it meets each.

The JSON also records the CPU, the load average before and after, and the versions.
`--quick` answers a few instructions with a few tokens, on little text: a check that the
bench runs, not a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker.errors import HybridgenError
from hybridgen.benches import quality_answers as qa
from hybridgen.benches import quality_builds as qb
from hybridgen.benches import quality_speed as qs
from hybridgen.benches.machine import cpu_info, load_average
from serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

#: The penalties of the second pass of answers, at both ends: llama.cpp's long-standing
#: default repetition penalty, which vLLM and transformers apply alike (`serving.penalties`).
PENALTIES: dict[str, Any] = {"repetition_penalty": 1.1}
#: The issue's goals: a floor, a ceiling, or a bound on the difference from the cloud.
GOALS = {
    "agreement_min": 0.95,
    "nats_gap_max": 0.03,
    "decode_vs_requantized_min": 0.95,
    "peak_rss_mb_max": 250.0,
    "stop_share_vs_cloud_within": 0.05,
    "loop_share_vs_cloud_max": 0.0,
}


@dataclass(frozen=True)
class Plan:
    """How much to measure."""

    text_tokens: int = 512  # teacher forced
    instructions: int | None = None  # None: all
    max_tokens: int = 96
    runs: int = 7  # speed rounds
    prompt_tokens: int = 32
    new_tokens: int = 128
    prefill_tokens: int = 256


QUICK = Plan(text_tokens=48, instructions=3, max_tokens=12, runs=1, new_tokens=16,
             prefill_tokens=64)  # fmt: skip


@contextlib.contextmanager
def progress_bar(total: int, desc: str, shown: bool) -> Iterator[Callable[[], None]]:
    """A tqdm bar on stderr over one long part; yields its step."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, file=sys.stderr, disable=not shown, leave=False) as bar:
        yield lambda: bar.update(1)


def resolve_set(version: str | None) -> Any:
    """The model set to measure: `version`, else CURRENT."""
    from models.registry import resolve

    return resolve(version)


def _text_tokens(folder: Path, plan: Plan) -> tuple[list[int], list[int], list[int], int]:
    """(teacher-forced text, short prompt, long prompt, new tokens), within the context."""
    config = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
    vocab, context = int(config["vocab_size"]), int(config["context_length"])
    text = qs.measure.prompt_ids(folder, min(plan.text_tokens, context), vocab)
    prompt = qs.measure.prompt_ids(folder, plan.prompt_tokens, vocab)
    long_prompt = qs.measure.prompt_ids(folder, min(plan.prefill_tokens, context - 2), vocab)
    new_tokens = min(plan.new_tokens, context - plan.prompt_tokens)
    return text, prompt, long_prompt, new_tokens


def _cloud_answers(
    model_set: Any, instructions: list[qa.Instruction], modes: dict[str, SamplingParams],
    shown: bool,
) -> dict[str, list[qa.Answer]]:  # fmt: skip
    """The cloud engine's answers in each mode (fp32, the checkpoint the cloud serves)."""
    from cloud.engine import Engine, EngineConfig

    config = EngineConfig(threads=os.cpu_count(), dtype="float32", max_batch_requests=16)
    engine = Engine.load(model_set.cloud_dir, config=config)

    async def answer() -> dict[str, list[qa.Answer]]:
        engine.start()
        try:
            result = {}
            for mode, sampling in modes.items():
                with progress_bar(len(instructions), f"cloud answers ({mode})", shown) as step:
                    result[mode] = await qa.cloud_answers(engine, instructions, sampling, step)
            return result
        finally:
            engine.close()

    return asyncio.run(answer())


def _edge_answers(
    folder: Path, name: str, threads: int, instructions: list[qa.Instruction],
    modes: dict[str, SamplingParams], shown: bool,
) -> dict[str, list[qa.Answer]]:  # fmt: skip
    result = {}
    for mode, sampling in modes.items():
        with progress_bar(len(instructions), f"{name} answers ({mode})", shown) as step:
            result[mode] = asyncio.run(
                qa.edge_answers(folder, threads, instructions, sampling, step)
            )
    return result


def goals_met(row: dict[str, Any], cloud: dict[str, Any]) -> dict[str, bool]:
    """Whether one build meets each goal (answers without penalties; `_penalized` with;
    `decode` only beside a requantized build)."""
    met = {
        "agreement": row["agreement"] >= GOALS["agreement_min"],
        "nats_gap": row["nats_gap"] <= GOALS["nats_gap_max"],
        "peak_rss": row["peak_rss_mb"] <= GOALS["peak_rss_mb_max"],
        "capital_of_france": row["capital_of_france"]["names_paris_and_stops"],
    }
    if row["decode_vs_requantized"] is not None:  # else no requantized build to compare
        met["decode"] = row["decode_vs_requantized"] >= GOALS["decode_vs_requantized_min"]
    for mode, suffix in (("plain", ""), ("penalized", "_penalized")):
        edge, reference = row["answers"][mode], cloud["answers"][mode]
        gap = abs(edge["stop_share"] - reference["stop_share"])
        met["stop_share" + suffix] = gap <= GOALS["stop_share_vs_cloud_within"] + 1e-9
        met["loop_share" + suffix] = (
            edge["loop_share"] - reference["loop_share"] <= GOALS["loop_share_vs_cloud_max"]
        )
    return met


def _fidelity(
    model_set: Any, measured: list[qb.Build], text: list[int], threads: int, shown: bool
) -> dict[str, dict[str, Any]]:
    """Each build's row, begun: whether it is the set's, `agreement`, `nats_gap`, repack."""
    reference = qb.reference_scores(model_set.edge_checkpoint_dir, text)
    rows: dict[str, dict[str, Any]] = {}
    for build in measured:
        with progress_bar(len(text), f"{build.name} teacher forced", shown) as step:
            scores = qb.edge_scores(build.folder, text, threads, step)
        rows[build.name] = {"in_set": build.in_set, **qb.fidelity(reference, scores)}
        if build.repack:
            rows[build.name]["repack"] = build.repack
    return rows


def _answers(
    model_set: Any, measured: list[qb.Build], rows: dict[str, dict[str, Any]],
    instructions: list[qa.Instruction], modes: dict[str, SamplingParams], threads: int,
    shown: bool, texts: bool,
) -> dict[str, Any]:  # fmt: skip
    """Each build's answer figures, into its row; the cloud's row (`texts`: with every
    answer)."""
    cloud = _cloud_answers(model_set, instructions, modes, shown)
    for build in measured:
        answers = _edge_answers(build.folder, build.name, threads, instructions, modes, shown)
        rows[build.name]["answers"] = {
            mode: qa.figures(instructions, answers[mode], cloud[mode], texts=texts)
            for mode in modes
        }
        rows[build.name]["capital_of_france"] = qa.capital_answer(instructions, answers["plain"])
    return {
        "checkpoint": str(model_set.cloud_dir),
        "dtype": "float32",
        "answers": {mode: qa.figures(instructions, cloud[mode], texts=texts) for mode in modes},
        "capital_of_france": qa.capital_answer(instructions, cloud["plain"]),
    }


def run(
    model_set: Any, *, plan: Plan, threads: int, shown: bool = True, texts: bool = False
) -> dict[str, Any]:
    """Measure `model_set` (see the module); the bench's JSON object (`texts`: with every
    answer's text)."""
    from models.manifest import runtime_versions

    load_start = load_average()
    instructions = qa.pick(qa.load_instructions(), plan.instructions)
    modes = {
        "plain": SamplingParams(max_tokens=plan.max_tokens, temperature=0),
        "penalized": SamplingParams(max_tokens=plan.max_tokens, temperature=0, **PENALTIES),
    }
    gguf, gguf_note = qb.source_gguf(model_set)
    with tempfile.TemporaryDirectory(prefix="hg-quality-") as tmp:
        if gguf is not None:
            print("building the other int4 build of the GGUF...", file=sys.stderr)
        measured = qb.builds(model_set, gguf, Path(tmp))
        text, prompt, long_prompt, new_tokens = _text_tokens(measured[0].folder, plan)
        rows = _fidelity(model_set, measured, text, threads, shown)
        cloud = _answers(model_set, measured, rows, instructions, modes, threads, shown, texts)
        folders = {build.name: build.folder for build in measured}
        with progress_bar(plan.runs, "speed rounds", shown) as step:
            timed = qs.speeds(folders, threads, prompt, long_prompt, new_tokens, plan.runs, step)
        for name, folder in folders.items():
            rows[name].update(timed[name])
            rows[name].update(qs.memory_mb(folder, threads, long_prompt, new_tokens))
    for row in rows.values():
        row["goals_met"] = goals_met(row, cloud)
    return {
        "set": model_set.version,
        "quick": plan != Plan(),
        "gguf": str(gguf) if gguf else None,
        "gguf_note": gguf_note,
        "same_weights": model_set.edge_checkpoint_dir == model_set.cloud_dir,
        "threads": threads,
        "plan": asdict(plan),
        "teacher_forced_tokens": len(text),
        "instructions": len(instructions),
        "max_tokens": plan.max_tokens,
        "penalties": PENALTIES,
        "loop_rule": {"ngram": qa.LOOP_NGRAM, "repeats": qa.LOOP_REPEATS, "run": qa.LOOP_RUN},
        "builds": rows,
        "cloud": cloud,
        "goals": GOALS,
        "cpu": cpu_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "versions": runtime_versions(),
    }


def _ratio(value: float | None) -> str:
    return f"{value:>5.2f}" if value is not None else f"{'-':>5}"


def _shares(answers: dict[str, Any]) -> str:
    """stop, loop and same-answer shares of one pass (blank where there is none)."""
    same = answers.get("same_answer_share")
    return (f"{answers['stop_share']:>5.2f} {answers['loop_share']:>5.2f} "
            f"{'' if same is None else f'{same:.2f}':>5}")  # fmt: skip


def print_table(result: dict[str, Any]) -> None:
    """The bench as a line per build and the cloud's, the capital answers, the goals."""
    cpu = result["cpu"]
    print(f"quality  set={result['set']}  threads={result['threads']}  "
          f"{result['instructions']} instructions, max_tokens {result['max_tokens']}, "
          f"penalties {result['penalties']}  cpu {cpu['model']}  load "
          f"{result['load_average_start']} -> {result['load_average_end']}")  # fmt: skip
    print(f"  {'':<12} {'agree':>6} {'nats':>6} {'dec/s':>6} {'x':>5} {'pre/s':>6} {'x':>5} "
          f"{'rss MB':>9} | {'stop':>5} {'loop':>5} {'same':>5} | penalized "
          f"{'stop':>5} {'loop':>5} {'same':>5}")  # fmt: skip
    for name, row in result["builds"].items():
        answers = row["answers"]
        print(f"  {name:<12} {row['agreement']:>6.3f} {row['nats_gap']:>6.3f} "
              f"{row['decode_tok_s']:>6.1f} {_ratio(row['decode_vs_requantized'])} "
              f"{row['prefill_tok_s']:>6.1f} {_ratio(row['prefill_vs_requantized'])} "
              f"{row['rss_loaded_mb']:>4.0f}/{row['peak_rss_mb']:<4.0f} | "
              f"{_shares(answers['plain'])} | {'':>9} {_shares(answers['penalized'])}")  # fmt: skip
    answers = result["cloud"]["answers"]
    print(f"  {'cloud fp32':<12} {'':>51} | {_shares(answers['plain'])} | {'':>9} "
          f"{_shares(answers['penalized'])}")  # fmt: skip
    print("  What is the capital of France?")
    for name, row in [*result["builds"].items(), ("cloud", result["cloud"])]:
        answer = row["capital_of_france"]
        print(f"    {name:<12} [{answer['finish_reason']}] {answer['text']!r}")
    for name, row in result["builds"].items():
        missed = [goal for goal, met in row["goals_met"].items() if not met]
        print(f"  {name} goals missed: {', '.join(missed) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench quality`."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench quality",
        description="The edge's int4 builds against the cloud's checkpoint on the same "
        "weights: teacher-forced agreement and nats lost, whole answers to fixed "
        "instructions (ending in stop, looping, equal to the cloud's) without and with "
        "penalties, decode/prefill speed and RSS.",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="a few instructions and tokens: checks the bench runs")  # fmt: skip
    parser.add_argument("--set", help="model-set version (default: CURRENT)")
    parser.add_argument("--threads", type=int, default=1,
                        help="the edge's intra-op threads (default 1, the edge's own)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--answers", action="store_true", help="in the JSON: every answer's text, by id"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        parser.error("--threads needs a positive count")
    logging.basicConfig(level=logging.WARNING)
    plan = QUICK if args.quick else Plan()
    try:
        model_set = resolve_set(args.set)
    except HybridgenError as exc:  # none installed, or not that version: say so, no traceback
        print(f"hybridgen bench quality: {exc}", file=sys.stderr)
        return 2
    result = run(model_set, plan=plan, threads=args.threads, shown=not args.no_progress,
                 texts=args.answers)  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0

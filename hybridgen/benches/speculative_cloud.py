"""The cloud half of `hybridgen bench speculative`: the cloud engine with and without drafting.

The model set's cloud checkpoint (`ModelSet.cloud_dir`) in the cloud engine
(`cloud.engine.Engine`, the worker's drafting settings and verify budget; `--cloud-dtype`,
by default the worker's own `auto`; torch threads = `--threads`), on the edge half's three
task sets (`speculative_tasks`), the chat tasks through the cloud model's own chat template.
The cloud keeps no user cache, so the personalized set (the user's own text continued) drafts
by prompt lookup alone there. Each set takes `Plan.cloud_tasks` tasks (the shortest prompts
that fit): a lone row on the CPU decodes about ten times slower than the edge's int4 build.

- `sets`: every task answered greedily, alone in the engine, with `max_tokens` of the plan,
  with drafting and without (`speculative` per request), the pair's order alternating as at
  the edge; the figures are the edge's (`speculative.set_figures`): decode tokens/s from
  each answer's first token (its first streamed delta) to its last, the speedup, drafts,
  accepted tokens, `verifies` (the engine's `verify_steps` around the answer),
  `accepted_per_verify`, `accepted_per_step` and `identical_share`;
- `batched`: the input-grounded set's tasks submitted BATCH_ROWS at a time (the cloud drafts
  only while rows x columns stay within its verify budget: 4 rows draft 1 token each, fewer
  rows more as the others finish), with drafting and without, alternating by group and
  round. `tok_s_*` are the engine's decode steps' tokens (each row's after its first) over
  their seconds (the engine's counters), `wall_tok_s_*` every token over the group's time
  from submission to its last answer; `rows_per_step_*` the mean live rows of a decode step;
  `verifies` the batched verify forwards, each checking every drafting row's draft.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from hybridgen.benches import speculative as sp
from hybridgen.benches import speculative_tasks as st
from hybridgen.benches.machine import load_average
from hybridgen.benches.quality import progress_bar
from serving.sampling import SamplingParams

#: Rows submitted at once for the batched figure.
BATCH_ROWS = 4
#: Tokens of the batched figure's warm-up answers.
WARM_UP = 8
PERSONALIZED_NOTE = (
    "the cloud keeps no user cache: its personalized set drafts by prompt lookup only "
    "(the prompt is the user's own text)"
)
_REQUEST_IDS = itertools.count()


class ChatView:
    """The engine as `speculative_tasks.chat_tasks` reads a runtime: the cloud model's chat
    template (the assistant's turn opened, as the worker renders messages) and its encoder."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.engine.tokenizer
        return str(tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True))  # fmt: skip

    def encode(self, text: str) -> list[int]:
        return list(self.engine.encode(text))


def every_task(engine: Any, plan: sp.Plan) -> dict[str, list[st.Task]]:
    """Each set's tasks in the cloud model's tokens (the personalized ones without a cache)."""
    messages = st.load_messages()
    every = {name: st.chat_tasks(ChatView(engine), messages[name]) for name in messages}
    personal = st.personalized_tasks(engine.encode, quick=plan.tasks is not None)
    every["personalized"] = [replace(task, cache=None) for task in personal]
    return every


async def answer(engine: Any, task: st.Task, options: SamplingParams) -> sp.Run:
    """`task` answered by `engine`; its decode time from its first delta to its last, and the
    engine's verify forwards meanwhile (the whole engine's: alone, the answer's own)."""
    tokens: list[int] = []
    text: list[str] = []
    first: float | None = None
    first_tokens = 0
    verifies = engine.stats()["verify_steps"]
    request_id = f"bench-speculative-{task.id}-{next(_REQUEST_IDS)}"
    async for delta in engine.generate(request_id, list(task.prompt_ids), options):
        if first is None and delta.token_ids:
            first, first_tokens = time.perf_counter(), len(delta.token_ids)
        tokens += delta.token_ids
        text.append(delta.text)
        if delta.finish_reason is not None:
            decode_s = time.perf_counter() - (first or time.perf_counter())
            return sp.Run(tuple(tokens), "".join(text), delta.finish_reason,
                          delta.completion_tokens, delta.draft_tokens, delta.accepted_tokens,
                          decode_s, int(engine.stats()["verify_steps"] - verifies),
                          first_tokens)  # fmt: skip
    raise RuntimeError(f"task {task.id}: the stream ended without a finish reason")


@dataclass(frozen=True)
class GroupRun:
    """BATCH_ROWS tasks answered together: their runs, the group's wall time and the engine's
    counters over it (decode seconds, steps, live rows summed over steps, verify forwards)."""

    runs: list[sp.Run]
    wall_s: float
    decode_s: float
    decode_steps: int
    live_rows: int
    verifies: int


async def answer_group(engine: Any, tasks: list[st.Task], options: SamplingParams) -> GroupRun:
    """`tasks` submitted at once and answered concurrently."""
    before, started = engine.stats(), time.perf_counter()
    runs = await asyncio.gather(*(answer(engine, task, options) for task in tasks))
    wall = time.perf_counter() - started
    after = engine.stats()
    delta = {key: after[key] - before[key] for key in
             ("decode_s", "decode_steps", "decode_live_rows", "verify_steps")}  # fmt: skip
    return GroupRun(list(runs), wall, delta["decode_s"], int(delta["decode_steps"]),
                    int(delta["decode_live_rows"]), int(delta["verify_steps"]))  # fmt: skip


#: Each group's runs per round, by mode: (without drafting, with drafting).
GroupRuns = tuple[list[GroupRun], list[GroupRun]]


async def measure_batched(
    engine: Any, tasks: list[st.Task], plan: sp.Plan, step: Any
) -> list[GroupRuns]:
    """The tasks in groups of BATCH_ROWS, each group without and with drafting in each round,
    the pair's order alternating by group and round (after a short warm-up of the first
    group in both modes); `step` after each pair."""
    options = {
        mode: SamplingParams(max_tokens=plan.max_tokens, temperature=0, speculative=mode)
        for mode in (False, True)
    }
    groups = [tasks[i : i + BATCH_ROWS] for i in range(0, len(tasks), BATCH_ROWS)]
    if groups:  # warm-up of the batch's shapes, both modes, a few tokens
        for mode in (False, True):
            await answer_group(engine, groups[0], replace(options[mode], max_tokens=WARM_UP))
    runs: list[GroupRuns] = [([], []) for _ in groups]
    turn = 0
    for _ in range(plan.rounds):
        for group, (plain, drafted) in zip(groups, runs, strict=True):
            for mode in (False, True) if turn % 2 == 0 else (True, False):
                (drafted if mode else plain).append(await answer_group(engine, group,
                                                                       options[mode]))  # fmt: skip
            turn += 1
            step()
    return runs


def _sum_rate(groups: list[GroupRun], wall: bool) -> float | None:
    """Tokens/s of groups taken together: decode steps' tokens over their seconds, or (`wall`)
    every token over the groups' wall time."""
    runs = [run for group in groups for run in group.runs]
    if wall:
        return sp._ratio(sum(r.completion_tokens for r in runs), sum(g.wall_s for g in groups))
    decoded = sum(max(0, r.completion_tokens - 1) for r in runs)
    return sp._ratio(decoded, sum(g.decode_s for g in groups))


def batched_figures(
    tasks: list[st.Task], left_out: list[str], runs: list[GroupRuns]
) -> dict[str, Any]:
    """The batched figures (see the module) from each group's runs."""
    rounds = len(runs[0][0]) if runs else 0
    by_round = {mode: [[pair[mode][r] for pair in runs] for r in range(rounds)] for mode in (0, 1)}
    rates = {mode: [_sum_rate(groups, wall=False) for groups in by_round[mode]] for mode in (0, 1)}
    walls = {mode: [_sum_rate(groups, wall=True) for groups in by_round[mode]] for mode in (0, 1)}
    drafted = [group for _, d in runs for group in d]
    answers = [run for group in drafted for run in group.runs]
    accepted, drafts = sum(r.accepted_tokens for r in answers), sum(r.draft_tokens for r in answers)
    verifies = sum(group.verifies for group in drafted)

    def rows_per_step(mode: int) -> float | None:
        groups = [group for pair in runs for group in pair[mode]]
        return sp._round(sp._ratio(sum(g.live_rows for g in groups),
                                   sum(g.decode_steps for g in groups)), 2)  # fmt: skip

    identical = 0
    for index in range(len(tasks)):  # every run of the task, in both modes, the same answer
        group, row = divmod(index, BATCH_ROWS)
        answered = [g.runs[row].answer for mode in runs[group] for g in mode]
        identical += all(a == answered[0] for a in answered)
    return {
        "set": "input_grounded",
        "rows": BATCH_ROWS,
        "tasks": len(tasks),
        "groups": len(runs),
        "task_ids": [task.id for task in tasks],
        "left_out": left_out,
        "completion_tokens": sum(r.completion_tokens for group in runs for r in group[0][0].runs),
        "tok_s_without": sp._round(sp._median(rates[0]), 1),
        "tok_s_with": sp._round(sp._median(rates[1]), 1),
        "speedup": sp._round(sp._median([sp._ratio(d, p) for p, d in zip(rates[0], rates[1],
                                                                         strict=True)]), 3),
        "wall_tok_s_without": sp._round(sp._median(walls[0]), 1),
        "wall_tok_s_with": sp._round(sp._median(walls[1]), 1),
        "rows_per_step_without": rows_per_step(0),
        "rows_per_step_with": rows_per_step(1),
        "draft_tokens": drafts,
        "accepted_tokens": accepted,
        "verifies": verifies,
        "acceptance_rate": sp._round(sp._ratio(accepted, drafts), 4),
        "accepted_per_verify": sp._round(sp._ratio(accepted, verifies), 4),
        "plain_draft_tokens": sum(r.draft_tokens for pair in runs for g in pair[0] for r in g.runs),
        "identical": identical,
        "identical_share": round(identical / len(tasks), 4) if tasks else None,
    }  # fmt: skip


def batch_tasks(
    grounded: list[st.Task], context: int, plan: sp.Plan
) -> tuple[list[st.Task], list[str]]:
    """The input-grounded tasks of the batched figure: the shortest `cloud_tasks` that fit
    (at least BATCH_ROWS), in whole groups; the ids of those a partial group left out."""
    count = None if plan.cloud_tasks is None else max(plan.cloud_tasks, BATCH_ROWS)
    fits = st.select(grounded, context=context, max_tokens=plan.max_tokens, count=count).tasks
    whole = len(fits) - len(fits) % BATCH_ROWS
    return fits[:whole], [task.id for task in fits[whole:]]


def run(model_set: Any, *, plan: sp.Plan, threads: int, dtype: str, shown: bool) -> dict[str, Any]:
    """Measure `model_set`'s cloud checkpoint in the cloud engine (see the module): the JSON's
    `cloud` object."""
    import torch

    from cloud.engine import Engine, EngineConfig

    torch.set_num_threads(threads)  # the engine's threads set their own the same
    load_start = load_average()
    config = EngineConfig(threads=threads, dtype=dtype)
    engine = Engine.load(model_set.cloud_dir, config=config)
    every = every_task(engine, plan)
    chosen = {
        name: st.select(every[name], context=engine.context_length,
                        max_tokens=plan.max_tokens, count=plan.cloud_tasks)
        for name in st.SETS
    }  # fmt: skip
    sets = {name: chosen[name].tasks for name in st.SETS}
    batched, left_out = batch_tasks(every["input_grounded"], engine.context_length, plan)
    total = plan.rounds * (sum(map(len, sets.values())) + len(batched) // BATCH_ROWS)

    async def timed() -> tuple[dict[str, list[sp.Runs]], list[GroupRuns]]:
        engine.start()
        try:
            with progress_bar(total, "speculative cloud", shown) as step:
                alone = await sp.measure(engine, sets, plan, step, answering=answer)
                return alone, await measure_batched(engine, batched, plan, step)
        finally:
            await asyncio.to_thread(engine.close)

    alone, together = asyncio.run(timed())
    return {
        "model_dir": str(model_set.cloud_dir),
        "device": str(engine.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "threads": threads,
        "context_length": engine.context_length,
        "drafting": asdict(config.drafting),
        "verify_tokens": config.verify_tokens,
        "plan": {
            "tasks": plan.cloud_tasks,
            "max_tokens": plan.max_tokens,
            "rounds": plan.rounds,
            "batch_rows": BATCH_ROWS,
        },
        "personalized": PERSONALIZED_NOTE,
        "sets": {name: sp.set_figures(chosen[name], alone[name]) for name in st.SETS},
        "batched": batched_figures(batched, left_out, together),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }


def print_cloud(cloud: dict[str, Any]) -> None:
    """The cloud's lines: its sets alone, then the batched input-grounded figure."""
    drafts = ", ".join(f"{k} {v}" for k, v in cloud["drafting"].items())
    print(f"  cloud: {cloud['dtype']} on {cloud['device']}, {cloud['threads']} threads, "
          f"{cloud['plan']['tasks']} tasks a set; drafts: {drafts}, verify_tokens "
          f"{cloud['verify_tokens']}; load {cloud['load_average_start']} -> "
          f"{cloud['load_average_end']}")  # fmt: skip
    print(f"  ({cloud['personalized']})")
    print(sp.SET_HEADER)
    for name, row in cloud["sets"].items():
        print(sp.set_line(name, row))
    b = cloud["batched"]
    rows = f"{b['rows_per_step_without']} / {b['rows_per_step_with']}"
    print(f"  {b['set']} x{b['rows']} rows: {b['groups']} groups, tok/s "
          f"{sp._cell(b['tok_s_without'], '.1f')} -> {sp._cell(b['tok_s_with'], '.1f')} "
          f"({sp._cell(b['speedup'], '.2f')}x; wall {sp._cell(b['wall_tok_s_without'], '.1f')} "
          f"-> {sp._cell(b['wall_tok_s_with'], '.1f')}), rows/step {rows}, accepted "
          f"{b['accepted_tokens']}/{b['draft_tokens']} in {b['verifies']} verifies, "
          f"identical {b['identical']}/{b['tasks']}")  # fmt: skip
    if b["left_out"]:
        print(f"    {len(b['left_out'])} left out of whole groups (`left_out`)")

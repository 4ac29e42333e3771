"""`hybridgen bench speculative`: its JSON on the session's tiny model set at both ends (every
count and share against the per-task rows it comes from), its figures from known runs, which
tasks a run measures, and the task sets in the repository. How much drafting gains (the
goals) is the bench's to report, not asserted here."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from cloud.settings import VERIFY_TOKENS
from edge.runtime.drafts import DraftSettings
from hybridgen.benches import BENCHES
from hybridgen.benches import main as bench_main
from hybridgen.benches import speculative as sp
from hybridgen.benches import speculative_cloud as sc
from hybridgen.benches import speculative_tasks as st
from hybridgen.benches.personalization_personas import PERSONAS
from tests.fixtures_models import TINY_VERSION

SET_KEYS = {
    "tasks", "available", "skipped", "prompt_tokens_mean", "completion_tokens", "tok_s_without",
    "tok_s_with", "speedup", "draft_tokens", "accepted_tokens", "verifies", "acceptance_rate",
    "accepted_per_verify", "accepted_per_step", "plain_draft_tokens", "identical",
    "identical_share", "per_task",
}  # fmt: skip
CLOUD_KEYS = {
    "model_dir", "device", "dtype", "threads", "context_length", "drafting", "verify_tokens",
    "plan", "personalized", "sets", "batched", "load_average_start", "load_average_end",
}  # fmt: skip
BATCHED_KEYS = {
    "set", "rows", "tasks", "groups", "task_ids", "left_out", "completion_tokens",
    "tok_s_without", "tok_s_with", "speedup", "wall_tok_s_without", "wall_tok_s_with",
    "rows_per_step_without", "rows_per_step_with", "draft_tokens", "accepted_tokens",
    "verifies", "acceptance_rate", "accepted_per_verify", "plain_draft_tokens", "identical",
    "identical_share",
}  # fmt: skip


def check_set(row: dict[str, Any], count: int, available: int, context: int, most: int) -> None:
    """One set's row of a quick one-round run: `count` tasks that fit `context`, each answered
    alike with and without drafting; totals, drafting counts and shares equal to what its
    per-task rows add up to; nothing drafted where drafting is off."""
    plan = sp.QUICK
    assert set(row) == SET_KEYS
    tasks = row["per_task"]
    assert (row["tasks"], len(tasks), row["available"]) == (count, count, available)
    ids = [t["id"] for t in tasks]
    assert not set(ids) & set(row["skipped"])
    for task in tasks:
        assert task["prompt_tokens"] + plan.max_tokens <= context
        assert task["identical"] is True and "texts" not in task
        assert task["accepted_tokens"] <= task["draft_tokens"]
        assert task["finish_reason"] in ("stop", "length")
        if task["finish_reason"] == "length":
            assert task["completion_tokens"] == plan.max_tokens
    # One round: the set's totals are its tasks' own.
    completion = sum(t["completion_tokens"] for t in tasks)
    drafted = sum(t["draft_tokens"] for t in tasks)
    accepted = sum(t["accepted_tokens"] for t in tasks)
    verifies = sum(t["verifies"] for t in tasks)
    assert (row["completion_tokens"], row["draft_tokens"], row["accepted_tokens"],
            row["verifies"]) == (completion, drafted, accepted, verifies)  # fmt: skip
    # Each verify checks one draft of 1 to `most` tokens.
    assert verifies <= drafted <= verifies * most
    assert row["plain_draft_tokens"] == 0
    assert (row["identical"], row["identical_share"]) == (count, 1.0)
    assert row["acceptance_rate"] == (round(accepted / drafted, 4) if drafted else None)
    assert row["accepted_per_verify"] == (round(accepted / verifies, 4) if verifies else None)
    assert row["accepted_per_step"] == round(accepted / (completion - accepted), 4)
    assert row["prompt_tokens_mean"] == round(sum(t["prompt_tokens"] for t in tasks) / count, 1)


def test_quick_json_counts_every_task_and_share_exactly(
    tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--quick --json` on the tiny set: one JSON object; each set measured on its two shortest
    prompts that fit the context, the rest named; totals, drafting counts and shares equal to
    what the per-task rows add up to; greedy answers identical with and without drafting;
    nothing drafted where drafting is off; the llama.cpp comparison from FACTS' constants; the
    goals' values are the figures."""
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    assert BENCHES["speculative"] == ("hybridgen.benches.speculative", "main")
    argv = ["speculative", "--quick", "--json", "--no-progress", "--cloud-dtype", "float32"]
    assert bench_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    plan = sp.QUICK
    assert (result["set"], result["quick"], result["threads"], result["plan"]) == (
        TINY_VERSION, True, 1, asdict(plan),
    )  # fmt: skip
    assert {"cpu", "load_average_start", "load_average_end"} <= set(result)
    assert result["ends"] == ["edge", "cloud"]
    assert result["versions"]["onnxruntime-genai"]
    assert result["drafting"] == asdict(DraftSettings())
    most = result["drafting"]["tokens"]
    context = result["context_length"]
    messages = st.load_messages()
    available = {"input_grounded": len(messages["input_grounded"]),
                 "open_ended": len(messages["open_ended"]),
                 "personalized": st.HELD_OUT_PER_USER * len(PERSONAS)}  # fmt: skip
    assert list(result["sets"]) == list(st.SETS)
    for name, row in result["sets"].items():
        check_set(row, plan.tasks, available[name], context, most)
    # The two shortest prompts of each set, in the set's order (personas' samples are all
    # SAMPLE_TOKENS long: the first persona's two).
    assert [t["id"] for t in result["sets"]["personalized"]["per_task"]] == [
        f"{next(iter(PERSONAS))}-0", f"{next(iter(PERSONAS))}-1",
    ]  # fmt: skip
    assert result["sets"]["personalized"]["per_task"][0]["prompt_tokens"] == st.SAMPLE_TOKENS
    llama = result["llama_cpp"]
    facts = (llama["facts"], llama["llama_cpp_q4_0_tok_s"], llama["onnxruntime_genai_int4_tok_s"])
    assert facts == (sp.FACTS_LINE, 155.0, 115.0)
    grounded = result["sets"]["input_grounded"]
    assert llama["drafted_vs_llama_cpp"] == round(grounded["speedup"] * 115.0 / 155.0, 3)
    assert llama["drafted_tok_s"] == grounded["tok_s_with"]
    goals = result["goals"]
    assert set(goals) == set(sp.GOALS)
    assert [goals[f"{name}_speedup"]["value"] for name in st.SETS] == [
        result["sets"][name]["speedup"] for name in st.SETS
    ]
    assert (goals["identical_share"]["value"], goals["identical_share"]["met"]) == (1.0, True)
    assert goals["drafted_vs_llama_cpp"]["value"] == llama["drafted_vs_llama_cpp"]
    for key, goal in goals.items():
        op, bound = sp.GOALS[key]
        assert goal["goal"] == f"{op} {bound}"
    check_cloud(result, available)


def check_cloud(result: dict[str, Any], available: dict[str, int]) -> None:
    """The cloud half of the quick run: the cloud engine on the set's cloud checkpoint, fp32,
    the worker's drafting settings; each set checked as the edge's, on the same tasks (the
    tiny set's edge and cloud share their tokenizer and chat template); the tiny model's
    greedy answers repeat one token, so each of its drafts is one token, always accepted, alone
    and in the batch; the batched figure on the 4 shortest input-grounded tasks, one group."""
    plan, cloud = sp.QUICK, result["cloud"]
    assert set(cloud) == CLOUD_KEYS
    assert cloud["model_dir"].endswith("/cloud")
    assert (cloud["device"], cloud["dtype"], cloud["threads"]) == ("cpu", "float32", 1)
    assert (cloud["drafting"], cloud["verify_tokens"]) == (asdict(DraftSettings()), VERIFY_TOKENS)
    assert cloud["plan"] == {"tasks": plan.cloud_tasks, "max_tokens": plan.max_tokens,
                             "rounds": plan.rounds, "batch_rows": sc.BATCH_ROWS}  # fmt: skip
    assert cloud["personalized"] == sc.PERSONALIZED_NOTE
    assert list(cloud["sets"]) == list(st.SETS)
    for name, row in cloud["sets"].items():
        check_set(row, 2, available[name], cloud["context_length"], 1)
        edge = result["sets"][name]["per_task"]
        assert [(t["id"], t["prompt_tokens"]) for t in row["per_task"]] == [
            (t["id"], t["prompt_tokens"]) for t in edge
        ]
        for task in row["per_task"]:
            assert task["draft_tokens"] == task["accepted_tokens"] == task["verifies"] > 0
    batched = cloud["batched"]
    assert set(batched) == BATCHED_KEYS
    grounded = [t["id"] for t in cloud["sets"]["input_grounded"]["per_task"]]
    assert (batched["set"], batched["rows"], batched["tasks"], batched["groups"]) == (
        "input_grounded", 4, 4, 1,
    )  # fmt: skip
    assert set(grounded) < set(batched["task_ids"]) and batched["left_out"] == []
    assert batched["completion_tokens"] == 4 * plan.max_tokens  # every answer runs to the end
    assert (batched["identical"], batched["identical_share"]) == (4, 1.0)
    drafted, accepted = batched["draft_tokens"], batched["accepted_tokens"]
    assert drafted == accepted > 0 and batched["plain_draft_tokens"] == 0
    assert 0 < batched["verifies"] <= drafted
    assert batched["acceptance_rate"] == 1.0
    assert batched["accepted_per_verify"] == round(accepted / batched["verifies"], 4)
    for mode in ("without", "with"):
        assert 0 < batched[f"rows_per_step_{mode}"] <= 4
        assert batched[f"tok_s_{mode}"] > 0 and batched[f"wall_tok_s_{mode}"] > 0
    assert batched["speedup"] == pytest.approx(
        batched["tok_s_with"] / batched["tok_s_without"], rel=0.01
    )


def test_ends_pick_the_halves(
    tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--ends edge` leaves the cloud out of the JSON; `--ends cloud` leaves the edge's keys
    out, and its table prints the cloud's lines: a row per set (`--cloud-tasks` tasks each),
    the note on the personalized set, the batched line (never fewer than 4 tasks)."""
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    assert sp.main(["--quick", "--json", "--no-progress", "--ends", "edge"]) == 0
    edge = json.loads(capsys.readouterr().out)
    assert edge["ends"] == ["edge"] and "cloud" not in edge and edge["sets"]
    assert sp.main(["--quick", "--no-progress", "--ends", "cloud", "--cloud-tasks", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("  cloud: ") and lines[2] == f"  ({sc.PERSONALIZED_NOTE})"
    assert [line.split()[:2] for line in lines[3:7]] == [
        ["set", "tasks"],
        *([name, "1"] for name in st.SETS),
    ]
    assert lines[7].startswith("  input_grounded x4 rows: 1 groups, tok/s ")
    assert lines[7].endswith("identical 4/4") and len(lines) == 8


def _group(
    runs: list[sp.Run], wall: float, decode: float, steps: int, verifies: int = 0
) -> sc.GroupRun:
    return sc.GroupRun(runs, wall, decode, steps, steps * len(runs), verifies)


def test_batched_figures_from_known_groups() -> None:
    """One group of 4, two rounds: tok/s are the decode steps' tokens (each row's after its
    first) over their seconds, wall tok/s every token over the group's time, the speedup the
    median of the rounds' ratios; drafting counts over the drafted runs, verifies the group's;
    a task with one answer that differs counts out of the identical share."""
    same, other = (7, 8, 9, 10, 11), (7, 8, 9, 10, 12)
    tasks = [st.Task(name, "quote", "test", (1, 2)) for name in "abcd"]
    plain = [_run(same, 0.0)] * 4
    drafted = [_run(same, 0.0, 3, 2)] * 3
    runs: list[sc.GroupRuns] = [(
        [_group(plain, 4.0, 2.0, 4), _group(plain, 5.0, 4.0, 4)],
        [_group([*drafted, _run(same, 0.0, 3, 2)], 2.5, 1.0, 2, 2),
         _group([*drafted, _run(other, 0.0, 3, 2)], 2.0, 1.0, 2, 2)],
    )]  # fmt: skip
    # round 1: 16 decoded tokens in 2 s without, in 1 s with (2x); round 2: in 4 s, in 1 s (4x)
    assert sc.batched_figures(tasks, ["e"], runs) == {
        "set": "input_grounded", "rows": 4, "tasks": 4, "groups": 1,
        "task_ids": ["a", "b", "c", "d"], "left_out": ["e"], "completion_tokens": 20,
        "tok_s_without": 6.0, "tok_s_with": 16.0, "speedup": 3.0,
        "wall_tok_s_without": 4.5, "wall_tok_s_with": 9.0,
        "rows_per_step_without": 4.0, "rows_per_step_with": 4.0,
        "draft_tokens": 24, "accepted_tokens": 16, "verifies": 4, "acceptance_rate": 0.6667,
        "accepted_per_verify": 4.0, "plain_draft_tokens": 0, "identical": 3,
        "identical_share": 0.75,
    }  # fmt: skip


def _run(
    tokens: tuple[int, ...], seconds: float, drafted: int = 0, accepted: int = 0, verifies: int = 0
) -> sp.Run:
    return sp.Run(tokens, "".join(map(str, tokens)), "length", len(tokens), drafted, accepted,
                  seconds, verifies)  # fmt: skip


def test_set_figures_from_known_runs() -> None:
    """Two tasks, two rounds: rates are the tokens after each first over the summed decode
    time, the speedup the median of the rounds' ratios; a task whose drafted answer differs
    counts out of the identical share and keeps each mode's texts; drafting counts add up over the
    drafted runs, accepted per verify = accepted / verifies, accepted per step = accepted /
    (completion - accepted)."""
    a, b = st.Task("a", "quote", "test", (1, 2, 3)), st.Task("b", "edit", "test", (4, 5))
    same, other = (7, 8, 9, 10, 11), (7, 8, 9, 10, 12)
    runs: list[sp.Runs] = [
        ([_run(same, 1.0), _run(same, 1.0)],
         [_run(same, 0.5, 4, 3, 2), _run(same, 0.25, 4, 3, 2)]),
        ([_run(same, 1.0), _run(same, 3.0)],
         [_run(same, 0.5, 2, 1, 1), _run(other, 1.0, 2, 1, 1)]),
    ]  # fmt: skip
    figures = sp.set_figures(st.Selection([a, b], available=3, skipped=["c"]), runs)
    rows = figures.pop("per_task")
    # round 1: 8 tokens in 2 s without, in 1 s with (2x); round 2: 8 in 4 s, in 1.25 s (3.2x)
    assert figures == {
        "tasks": 2, "available": 3, "skipped": ["c"], "prompt_tokens_mean": 2.5,
        "completion_tokens": 10, "tok_s_without": 3.0, "tok_s_with": 7.2, "speedup": 2.6,
        "draft_tokens": 12, "accepted_tokens": 8, "verifies": 6, "acceptance_rate": 0.6667,
        "accepted_per_verify": 1.3333, "accepted_per_step": round(8 / (20 - 8), 4),
        "plain_draft_tokens": 0, "identical": 1, "identical_share": 0.5,
    }  # fmt: skip
    assert rows[0] == {"id": "a", "kind": "quote", "prompt_tokens": 3, "completion_tokens": 5,
                       "finish_reason": "length", "identical": True, "draft_tokens": 4,
                       "accepted_tokens": 3, "verifies": 2, "speedup": 3.0}  # fmt: skip
    assert (rows[1]["identical"], rows[1]["speedup"]) == (False, 2.5)
    assert rows[1]["texts"] == {"without": ["7891011"], "with": ["7891011", "7891012"]}


def test_select_keeps_what_fits_and_the_shortest_in_order() -> None:
    """Prompts beyond context - max_tokens are left out by id; a count takes the shortest,
    ties in the set's order, and keeps the set's order."""
    tasks = [st.Task(name, "open", "test", (0,) * size)
             for name, size in (("a", 5), ("b", 3), ("c", 9), ("d", 3), ("e", 4))]  # fmt: skip
    chosen = st.select(tasks, context=12, max_tokens=4, count=3)
    assert ([t.id for t in chosen.tasks], chosen.available, chosen.skipped) == (
        ["b", "d", "e"], 5, ["c"],
    )  # fmt: skip
    assert [t.id for t in st.select(tasks, context=12, max_tokens=4, count=None).tasks] == [
        "a", "b", "d", "e",
    ]  # fmt: skip


def test_the_task_sets_in_the_repository() -> None:
    """At least 20 input-grounded tasks (each kind among them, each naming its passage's
    source) and 20 open questions, unique ids, the file a few tens of KB."""
    messages = st.load_messages()
    grounded, open_ended = messages["input_grounded"], messages["open_ended"]
    assert len(grounded) >= 20 and len(open_ended) >= 20
    assert {t["kind"] for t in grounded} == set(st.GROUNDED_KINDS)
    assert all(t["source"] for t in grounded)
    ids = [t["id"] for t in grounded + open_ended]
    assert len(set(ids)) == len(ids)
    assert st.TASKS_PATH.stat().st_size < 64_000


def test_a_set_not_installed_is_named_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HG_HOME", str(tmp_path))
    assert sp.main(["--quick", "--json", "--set", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("hybridgen bench speculative: ")

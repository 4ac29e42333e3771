"""`hybridgen bench speculative`: its JSON on the session's tiny model set (every count and
share against the per-task rows it comes from), its figures from known runs, which tasks a
run measures, and the task sets in the repository. How much drafting gains (the goals) is the
bench's to report, not asserted here."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from edge.runtime.drafts import DraftSettings
from hybridgen.benches import BENCHES
from hybridgen.benches import main as bench_main
from hybridgen.benches import speculative as sp
from hybridgen.benches import speculative_tasks as st
from hybridgen.benches.personalization_personas import PERSONAS
from tests.fixtures_models import TINY_VERSION

SET_KEYS = {
    "tasks", "available", "skipped", "prompt_tokens_mean", "completion_tokens", "tok_s_without",
    "tok_s_with", "speedup", "draft_tokens", "accepted_tokens", "verifies", "acceptance_rate",
    "accepted_per_verify", "accepted_per_step", "plain_draft_tokens", "identical",
    "identical_share", "per_task",
}  # fmt: skip


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
    assert bench_main(["speculative", "--quick", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    plan = sp.QUICK
    assert (result["set"], result["quick"], result["threads"], result["plan"]) == (
        TINY_VERSION, True, 1, asdict(plan),
    )  # fmt: skip
    assert {"cpu", "load_average_start", "load_average_end"} <= set(result)
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
        assert set(row) == SET_KEYS, name
        tasks = row["per_task"]
        assert (row["tasks"], len(tasks), row["available"]) == (plan.tasks, plan.tasks,
                                                                available[name])  # fmt: skip
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
        assert (row["identical"], row["identical_share"]) == (plan.tasks, 1.0)
        assert row["acceptance_rate"] == (round(accepted / drafted, 4) if drafted else None)
        assert row["accepted_per_verify"] == (round(accepted / verifies, 4) if verifies else None)
        assert row["accepted_per_step"] == round(accepted / (completion - accepted), 4)
        assert row["prompt_tokens_mean"] == round(sum(t["prompt_tokens"] for t in tasks) / 2, 1)
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

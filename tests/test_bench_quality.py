"""`hybridgen bench quality`: its JSON on a tiny set imported from a GGUF (both int4 builds,
side by side), the loop rule, and how the answer shares are counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridgen.benches import quality
from hybridgen.benches.quality_answers import (
    CAPITAL_ID,
    Answer,
    Instruction,
    figures,
    find_loop,
    load_instructions,
)
from models.registry import ModelSet
from tests.fixtures_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def gguf_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSet, Path]:
    """A tiny set whose both ends are one Q4_1 GGUF (Q8_0 embedding, as the bundled
    SmolLM2's), built the default way (requantized int4); and the GGUF."""
    from models.lab.build import BuildOptions, build_model_set
    from models.lab.random_model import make_random_llama

    tmp = tmp_path_factory.mktemp("quality")
    source = make_random_llama(tmp / "source", preset="tiny", context_length=128)
    path = write_tiny_gguf(source, tmp / "tiny.gguf", quant="Q4_1", embed_quant="Q8_0")
    # Requantized, so the bench makes the GGUF-blocks build itself and reports its repack.
    options = BuildOptions(version="q-test", home=tmp / "home", edge_from=path, cloud_from=path,
                           threads=1, progress=False, edge_weights="requantize")  # fmt: skip
    return build_model_set(options), path


def test_quick_json_measures_both_builds_of_the_gguf_beside_the_cloud(
    gguf_set: tuple[ModelSet, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`--quick --json`: one JSON object; the set's requantized build (`--edge-weights
    requantize`) and the GGUF-blocks build made from the same GGUF, each with its fidelity,
    answer shares, speed and RSS,
    the cloud's answers, the capital question, the goals and whether each is met; with
    `--answers`, every answer's text."""
    model_set, gguf = gguf_set
    monkeypatch.setenv("HG_HOME", str(model_set.root.parents[1]))
    argv = ["--quick", "--json", "--answers", "--set", model_set.version, "--no-progress"]
    assert quality.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    plan = quality.QUICK
    assert (result["set"], result["quick"], result["gguf"], result["same_weights"]) == (
        "q-test", True, str(gguf), True,
    )  # fmt: skip
    assert (result["instructions"], result["max_tokens"], result["teacher_forced_tokens"]) == (
        plan.instructions, plan.max_tokens, plan.text_tokens,
    )  # fmt: skip
    assert result["penalties"] == {"repetition_penalty": 1.1}
    assert result["loop_rule"] == {"ngram": 4, "repeats": 3, "run": 8}
    assert result["goals"] == quality.GOALS
    assert {"cpu", "load_average_start", "load_average_end"} <= set(result)
    assert result["versions"]["onnxruntime-genai"]
    requantized, blocks = result["builds"]["requantized"], result["builds"]["gguf_blocks"]
    assert list(result["builds"]) == ["requantized", "gguf_blocks"]
    assert (requantized["in_set"], blocks["in_set"]) == (True, False)
    # Two layers of five projections from Q4_1, each with its per-block minimum added back
    # (corrected); the LM head and the embedding from the Q8_0 table.
    assert blocks["repack"] == {"exact": 12, "corrected": 10, "requantized_nodes": {},
                                "gguf_types": {"Q4_1": 14, "Q8_0": 1}}  # fmt: skip
    assert abs(blocks["nats_gap"]) < abs(requantized["nats_gap"])
    assert (requantized["decode_vs_requantized"], requantized["prefill_vs_requantized"]) == (
        1.0, 1.0,
    )  # fmt: skip
    chosen = [i.id for i in load_instructions()[: plan.instructions]]
    assert chosen[0] == CAPITAL_ID
    shares = {"stop_share", "loop_share", "mean_tokens", "looped", "texts"}
    goals = {"agreement", "nats_gap", "decode", "peak_rss", "capital_of_france", "stop_share",
             "loop_share", "stop_share_penalized", "loop_share_penalized"}  # fmt: skip
    for row in (requantized, blocks):
        for mode in ("plain", "penalized"):
            answers = row["answers"][mode]
            assert set(answers) == shares | {"same_answer_share"}
            assert list(answers["texts"]) == chosen
            assert set(answers["looped"]) <= set(chosen)
            assert answers["loop_share"] == round(len(answers["looped"]) / len(chosen), 4)
        capital = row["capital_of_france"]
        assert set(capital) == {"text", "finish_reason", "tokens", "names_paris_and_stops"}
        assert row["answers"]["plain"]["texts"][CAPITAL_ID] == {
            "text": capital["text"], "finish_reason": capital["finish_reason"],
        }  # fmt: skip
        assert set(row["goals_met"]) == goals
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
        assert 0 < row["rss_loaded_mb"] <= row["peak_rss_mb"]
    cloud = result["cloud"]
    assert cloud["dtype"] == "float32"
    assert {mode: set(cloud["answers"][mode]) for mode in ("plain", "penalized")} == {
        "plain": shares, "penalized": shares,
    }  # fmt: skip


def test_a_set_not_installed_is_named_and_exits_2(
    gguf_set: tuple[ModelSet, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`--set` of a version not installed: exit 2, the message names it and the installed
    ones, and nothing is printed on stdout."""
    monkeypatch.setenv("HG_HOME", str(gguf_set[0].root.parents[1]))
    assert quality.main(["--quick", "--json", "--set", "nope"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "model set 'nope' is not installed" in err and "(installed: q-test)" in err


def test_the_loop_rule_on_tokens() -> None:
    """Eight equal tokens in a row loop, seven do not; the same four tokens three times
    without overlapping loop, twice do not, and overlapping occurrences count once."""
    assert find_loop([9, 5, 5, 5, 5, 5, 5, 5, 5]) == ("run", (5,))
    assert find_loop([5, 5, 5, 5, 5, 5, 5, 9]) is None
    assert find_loop([1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]) == ("ngram", (1, 2, 3, 4))
    assert find_loop([1, 2, 3, 4, 0, 1, 2, 3, 4]) is None
    assert find_loop([10, 11] * 5) is None  # (10, 11, 10, 11) at 0, 2, 4, 6: 0 and 4 count
    assert find_loop([10, 11] * 6) == ("ngram", (10, 11, 10, 11))


def test_the_loop_rule_on_text(gguf_set: tuple[ModelSet, Path]) -> None:
    """Through a real tokenizer: the issue's looping answers loop, normal answers do not."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gguf_set[0].edge_dir("int4") / "tokenizer.json"))

    def loops(text: str) -> bool:
        return find_loop(tokenizer.encode(text, add_special_tokens=False).ids) is not None

    assert loops("Subject: Awesome, Awesome, Awesome, Awesome, Awesome, Awesome, Awesome")
    assert loops("1. **C** 2. **C** 3. **C** 4. **C** 5. **C** 6. **C**")
    assert loops("She loves to sail\nShe loves to sail\nHi" + "i" * 40)
    assert not loops("The capital of France is Paris.")
    assert not loops(
        "1. Bananas are sweet.\n2. Lemons taste sour.\n3. Pineapples grow where it is warm."
    )


def test_answer_shares_are_counted_per_answer() -> None:
    """stop_share, loop_share, same_answer_share (whitespace around the text aside), the
    looping instructions' ids and the mean length, for known answers."""
    instructions = [Instruction(f"i{n}", "fact", "?") for n in range(4)]
    edge = [
        Answer(" Paris.\n", "stop", (1, 2)),
        Answer("ha ha", "length", (7,) * 8),
        Answer("yes", "stop", (3,)),
        Answer("no", "length", (4, 5, 6)),
    ]
    cloud = [
        Answer("Paris.", "stop", (1, 2)),
        Answer("ha", "stop", (7,)),
        Answer("no", "stop", (4,)),
        Answer("no", "stop", (4,)),
    ]
    assert figures(instructions, edge, cloud) == {
        "stop_share": 0.5,
        "loop_share": 0.25,
        "mean_tokens": 3.5,
        "looped": ["i1"],
        "same_answer_share": 0.5,
    }
    assert figures(instructions, cloud)["stop_share"] == 1.0


def test_the_instructions_are_at_least_fifty_with_the_capital_question() -> None:
    """The data file: 50 or more instructions, unique ids, the capital question among them."""
    instructions = load_instructions()
    assert len(instructions) >= 50
    assert len({i.id for i in instructions}) == len(instructions)
    assert next(i.prompt for i in instructions if i.id == CAPITAL_ID) == (
        "What is the capital of France?"
    )

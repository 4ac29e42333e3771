"""Whole answers for `hybridgen bench quality`: the instructions, each end's greedy answers,
the loop rule, and the shares the bench reports.

The instructions are a data file written for the project (`data/instructions.json`: short
questions and tasks of several kinds), each sent as one user message through each end's own
chat template, as a client's chat would be.

The loop rule (`find_loop`), on an answer's tokens (its end token left out): the answer loops
when the same LOOP_NGRAM tokens occur LOOP_REPEATS times without overlapping, or one token
repeats LOOP_RUN times in a row. Both catch an answer stuck repeating a phrase or a
character ("Awesome, Awesome, ...", "1. **C** 2. **C** ...", "Hiiiii..."), whatever its
period, once it has gone on for a few periods; a normal answer rarely says the same four
tokens three times in under a hundred.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.sampling import SamplingParams

INSTRUCTIONS_PATH = Path(__file__).parent / "data" / "instructions.json"
#: The loop rule's n-gram length, its repeats, and the single-token run (see the module).
LOOP_NGRAM = 4
LOOP_REPEATS = 3
LOOP_RUN = 8
#: The instruction also reported answer by answer (the issue's example).
CAPITAL_ID = "capital-france"


@dataclass(frozen=True)
class Instruction:
    """One instruction of the data file."""

    id: str
    kind: str
    prompt: str

    def messages(self) -> list[dict[str, str]]:
        """The chat a client would send: the instruction as one user message."""
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class Answer:
    """One greedy answer: its text, why it ended, and its tokens (end token left out)."""

    text: str
    finish_reason: str
    token_ids: tuple[int, ...]

    @property
    def loops(self) -> bool:
        return find_loop(self.token_ids) is not None


def load_instructions(path: Path = INSTRUCTIONS_PATH) -> list[Instruction]:
    """The instructions of the data file, in its order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Instruction(i["id"], i["kind"], i["prompt"]) for i in data["instructions"]]


def pick(instructions: list[Instruction], count: int | None) -> list[Instruction]:
    """The first `count` instructions (all when None), the capital question always among
    them (it is reported on its own)."""
    if count is None or count >= len(instructions):
        return instructions
    chosen = instructions[:count]
    capital = [i for i in instructions if i.id == CAPITAL_ID]
    if capital and capital[0] not in chosen:
        chosen = [capital[0], *chosen[: count - 1]]
    return chosen


def find_loop(tokens: Sequence[Any]) -> tuple[str, tuple[Any, ...]] | None:
    """Where an answer loops, by the module's rule: `("run", (token,))` for LOOP_RUN equal
    tokens in a row, else `("ngram", ngram)` for the first LOOP_NGRAM tokens found
    LOOP_REPEATS times without overlapping; None when it does not loop."""
    run = 1
    for index in range(1, len(tokens)):
        run = run + 1 if tokens[index] == tokens[index - 1] else 1
        if run >= LOOP_RUN:
            return "run", (tokens[index],)
    ends: dict[tuple[Any, ...], int] = {}  # n-gram -> end of its last counted occurrence
    counts: dict[tuple[Any, ...], int] = {}
    for start in range(len(tokens) - LOOP_NGRAM + 1):
        gram = tuple(tokens[start : start + LOOP_NGRAM])
        if start < ends.get(gram, 0):
            continue  # overlaps the occurrence counted last
        ends[gram] = start + LOOP_NGRAM
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= LOOP_REPEATS:
            return "ngram", gram
    return None


def _answer(text: str, finish_reason: str, ids: list[int]) -> Answer:
    kept = ids[:-1] if finish_reason == "stop" and ids else ids
    return Answer(text, finish_reason, tuple(kept))


async def edge_answers(
    folder: Path, threads: int, instructions: list[Instruction], sampling: SamplingParams,
    step: Callable[[], None],
) -> list[Answer]:  # fmt: skip
    """Each instruction answered by the edge's own runtime on the build in `folder`, one at a
    time (its chat template, its worker, its penalties); `step` after each answer."""
    from edge.runtime import EdgeRuntime, Finished, Token

    runtime = EdgeRuntime(folder, threads=threads, max_active=1, prefix_cache_mb=0)
    answers = []
    try:
        for instruction in instructions:
            ids = runtime.encode(runtime.render_chat(instruction.messages()))
            text, tokens, reason = "", [], "length"
            async for event in runtime.submit(ids, sampling):
                if isinstance(event, Token):
                    text += event.text
                    tokens.append(event.token_id)
                elif isinstance(event, Finished):
                    text += event.text
                    reason = event.finish_reason
            answers.append(_answer(text, reason, tokens))
            step()
    finally:
        await runtime.close()
    return answers


async def cloud_answers(
    engine: Any, instructions: list[Instruction], sampling: SamplingParams,
    step: Callable[[], None],
) -> list[Answer]:  # fmt: skip
    """Each instruction answered by the cloud's engine (`cloud.engine.Engine`, started), all
    submitted at once so its batch runs them as the cloud would; the prompt is what the
    cloud's worker makes of a chat (`cloud.prompts.prompt_ids_of`)."""
    from broker import wire
    from cloud.prompts import prompt_ids_of

    async def one(index: int, instruction: Instruction) -> Answer:
        request = wire.GenerateRequest.model_validate(
            {"request_id": f"quality-{index}", "model": "hg-cloud",
             "messages": instruction.messages(), **sampling.to_wire()}
        )  # fmt: skip
        text, tokens, reason = "", [], "length"
        async for delta in engine.generate(request.request_id, prompt_ids_of(engine, request),
                                           sampling):  # fmt: skip
            text += delta.text
            tokens += delta.token_ids
            reason = delta.finish_reason or reason
        step()
        return _answer(text, reason, tokens)

    return list(await asyncio.gather(*(one(i, x) for i, x in enumerate(instructions))))


def share(flags: Sequence[bool]) -> float:
    """The share of true flags, rounded to 4 places (0 of none)."""
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def figures(
    instructions: list[Instruction], answers: list[Answer], cloud: list[Answer] | None = None,
    *, texts: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """`stop_share`, `loop_share` (and the looping instructions' ids), mean answer tokens,
    and, beside the cloud's answers, `same_answer_share` (the same text, surrounding
    whitespace aside); with `texts`, every answer's text and finish reason by id."""
    result: dict[str, Any] = {
        "stop_share": share([a.finish_reason == "stop" for a in answers]),
        "loop_share": share([a.loops for a in answers]),
        "mean_tokens": round(sum(len(a.token_ids) for a in answers) / max(1, len(answers)), 1),
        "looped": [i.id for i, a in zip(instructions, answers, strict=True) if a.loops],
    }
    if cloud is not None:
        same = [a.text.strip() == c.text.strip() for a, c in zip(answers, cloud, strict=True)]
        result["same_answer_share"] = share(same)
    if texts:
        result["texts"] = {i.id: {"text": a.text, "finish_reason": a.finish_reason}
                           for i, a in zip(instructions, answers, strict=True)}  # fmt: skip
    return result


def capital_answer(instructions: list[Instruction], answers: list[Answer]) -> dict[str, Any]:
    """The answer to "What is the capital of France?": its text, finish reason, tokens, and
    whether it names Paris and ends in `stop` (the issue's goal)."""
    index = next(i for i, x in enumerate(instructions) if x.id == CAPITAL_ID)
    answer = answers[index]
    return {
        "text": answer.text,
        "finish_reason": answer.finish_reason,
        "tokens": len(answer.token_ids),
        "names_paris_and_stops": "Paris" in answer.text and answer.finish_reason == "stop",
    }

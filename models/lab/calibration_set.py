"""The held-out prompts the routing calibration scores, each with its true continuation.

`eval_set` builds a deterministic set from the corpus's held-out documents, inside and
outside the edge's domain: documentation passages of varied length and question-shaped chat
messages (the documents' own questions and answers, `models.lab.corpus`, in the lab's wording and
in a user's own, `free_form`). Each continuation is cut in two halves of whole edge tokens, so
the quality of each half can be compared. Every other prompt of each kind and side is in the
`fit` split (what the build calibrates on), the rest in `eval` (what `hybridgen bench routing`
measures the result on).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from models.lab.corpus import Corpus, _question_answer

#: Continuation tokens (edge tokenizer) scored per prompt, in two halves.
CONTINUATION_TOKENS = 32
#: Shortest / longest passage prompt (edge tokens).
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 6, 96


@dataclass
class EvalPrompt:
    """One held-out prompt and its true continuation (`first` + `second` half)."""

    kind: str  # "passage" (completion prompt) or "question" (a chat user message)
    in_domain: bool
    content: str
    first: str
    second: str
    split: str = "fit"
    #: Edge tokens of each half (the quality's denominator at both ends).
    first_tokens: int = 0
    second_tokens: int = 0
    #: A question in a user's own words, not the lab's training template (`free_form`).
    free_form: bool = False


def _halves(encode: Any, decode: Any, text: str) -> tuple[str, str, int, int] | None:
    """Cut `text` to CONTINUATION_TOKENS edge tokens, in two halves of whole tokens."""
    ids = encode(text)[:CONTINUATION_TOKENS]
    if len(ids) < 8:
        return None
    half = len(ids) // 2
    first, second = decode(ids[:half]), decode(ids[half:])
    n1, n2 = len(encode(first)), len(encode(second))
    if not first or not second or n1 == 0 or n2 == 0:
        return None
    return first, second, n1, n2


def eval_set(
    corpus: Corpus,
    encode: Any,
    decode: Any,
    *,
    limit: int = 400,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    seed: int = 0,
) -> list[EvalPrompt]:
    """Up to `limit` held-out prompts: per side, two thirds passages and a third questions.

    Deterministic given the corpus and the seed. Passages are cut round-robin over the
    held-out documents (prompt length drawn in MIN..`max_prompt_tokens` tokens, then the next
    CONTINUATION_TOKENS); questions are the documents' own (`models.lab.corpus`), answered by
    the document's first prose.
    """
    rng = random.Random(seed)
    top = max(MIN_PROMPT_TOKENS, max_prompt_tokens)
    out: list[EvalPrompt] = []
    for in_domain in (True, False):
        docs = [
            d for d in corpus.documents if d.held_out and (d.source in corpus.domain) == in_domain
        ]
        # Per document: its question as the lab models were taught to read it, and in a
        # user's own words (`free_form`); both fall in the same split.
        questions: list[list[EvalPrompt]] = []
        for doc in docs:
            pair = _question_answer(doc)
            cut = _halves(encode, decode, " ".join(pair[1].split())) if pair else None
            if pair and cut:
                asked = [EvalPrompt("question", in_domain, pair[0], *cut[:2], "", *cut[2:])]
                reworded = free_form(pair[0])
                if reworded:
                    asked.append(
                        EvalPrompt("question", in_domain, reworded, *cut[:2], "", *cut[2:], True)
                    )
                questions.append(asked)
        windows: list[list[EvalPrompt]] = []
        for doc in docs:
            ids = encode(doc.text)
            found, start = [], 0
            while True:
                size = rng.randint(MIN_PROMPT_TOKENS, top)
                if start + size + CONTINUATION_TOKENS > len(ids):
                    break
                cut = _halves(
                    encode, decode, decode(ids[start + size : start + size + CONTINUATION_TOKENS])
                )
                if cut:
                    prompt = decode(ids[start : start + size])
                    found.append(EvalPrompt("passage", in_domain, prompt, *cut[:2], "", *cut[2:]))
                start += size + CONTINUATION_TOKENS
            if found:
                windows.append(found)
        side = limit // 2
        asked_docs: list[list[EvalPrompt]] = []
        while questions and sum(map(len, asked_docs)) + len(questions[0]) <= side // 3:
            asked_docs.append(questions.pop(0))
        n_questions = sum(map(len, asked_docs))
        passages: list[EvalPrompt] = []
        depth = 0
        while len(passages) < side - n_questions and any(depth < len(w) for w in windows):
            for found in windows:
                if depth < len(found) and len(passages) < side - n_questions:
                    passages.append(found[depth])
            depth += 1
        for index, prompt in enumerate(passages):
            prompt.split = "fit" if index % 2 == 0 else "eval"
            out.append(prompt)
        for index, asked in enumerate(asked_docs):
            for prompt in asked:
                prompt.split = "fit" if index % 2 == 0 else "eval"
                out.append(prompt)
    return out


#: A lab question's wording (models.lab.corpus) -> a user's own wording of it.
_REWORDINGS = (
    (re.compile(r"^What does the (.+) licence say\?$"), "Can you sum up the {0} licence for me?"),
    (re.compile(r"^What does (.+) do\?$"), "How do I use {0}, and when would I need it?"),
    (
        re.compile(r"^Tell me about (.+) in (.+)\.$"),
        "I am reading the {1} manual: how does {0} work?",
    ),
    (re.compile(r"^Explain (.+) in Python\.$"), "Quick question: how does {0} work in Python?"),
    (re.compile(r"^What is the Python module (.+) for\?$"), "Why would I import {0} in Python?"),
)


def free_form(question: str) -> str | None:
    """The question in a user's words rather than the template the lab models trained on.

    Short questions in words the edge never saw score a high perplexity whatever their
    domain; the evaluation set has both wordings of every question to measure that.
    """
    for pattern, wording in _REWORDINGS:
        match = pattern.match(question)
        if match:
            return wording.format(*match.groups())
    return None

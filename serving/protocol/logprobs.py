"""Token log-probabilities: read from a worker's bus chunk, written in OpenAI's shapes.

`TokenLogprob` is one generated token's score; `chat_logprobs` and `completion_logprobs`
render a list of them as a chat choice's and a completion choice's `logprobs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker import wire


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its step.

    `token` is the token's text decoded alone (a token that holds part of a UTF-8 character
    decodes to U+FFFD); `top` lists (text, log-probability), most likely first.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def chunk_logprobs(chunk: wire.Chunk) -> tuple[TokenLogprob, ...]:
    """The token scores a worker's bus chunk carries (empty unless they were asked for)."""
    if chunk.logprobs is None or chunk.tokens is None:
        return ()
    tops = chunk.top_logprobs or [[] for _ in chunk.tokens]
    return tuple(
        TokenLogprob(token, logprob, tuple((t.token, t.logprob) for t in top))
        for token, logprob, top in zip(chunk.tokens, chunk.logprobs, tops, strict=False)
    )


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's `logprobs` in OpenAI's shape (`content`, `refusal`)."""

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
            for i in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """A completion choice's `logprobs` in OpenAI's legacy shape (`tokens`,
    `token_logprobs`, `top_logprobs`, `text_offset`); `offset`: characters of the answer
    before the first of `items` (the echoed prompt, earlier chunks)."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [dict(i.top) for i in items],
        "text_offset": offsets,
    }

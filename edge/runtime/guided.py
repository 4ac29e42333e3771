"""Constrained decoding at the edge: the request's grammar as an `llguidance.LLMatcher`.

The edge holds a constrained request's grammar state itself, as the cloud does
(`cloud.sampling`), rather than inside onnxruntime-genai's generator: so the edge's sampler
draws under it, speculative decoding checks drafts against it, and the text a grammar forces
(`compute_ff_tokens`: a JSON key, a closing bracket) becomes a draft by itself.

At each position the logits the token is drawn from are masked to what the grammar allows
(`compute_logit_bias`, one byte per token), and the drawn token is consumed. Once the
grammar is complete only an end token is allowed, so the answer ends as a normal `stop`.
A drafted token is consumed only once drawn, so a rejected draft needs no rollback.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from broker.errors import BadRequest
from serving.grammar import Grammar


def grammar_tokenizer(model_dir: Path, vocab_size: int, end_tokens: Iterable[int]) -> Any:
    """llguidance's view of the edge model's tokenizer (its `tokenizer.json`), with the
    model's end tokens as the grammar's end."""
    import llguidance

    text = (Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")
    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=sorted(end_tokens))


def new_matcher(tokenizer: Any, grammar: Grammar) -> Any:
    """A fresh matcher for one request (compiles the grammar: call it off the event loop).

    Raises:
        BadRequest: the grammar does not compile for this tokenizer (`response_format`).
    """
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer, grammar.llguidance(), log_level=0)
    if matcher.is_error():
        raise BadRequest(
            f"the edge model cannot decode under this {grammar.kind} grammar: "
            f"{matcher.get_error()}",
            param="response_format",
        )
    return matcher


def masked(matcher: Any, logits: np.ndarray) -> np.ndarray | None:
    """(V,) `logits` with every token the grammar forbids at -inf (a copy), or None when the
    grammar's state is broken or allows nothing (the answer then ends)."""
    if matcher.is_error():
        return None
    allowed = np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)
    vocab = logits.shape[-1]
    banned = np.ones(vocab, dtype=bool)
    shared = min(vocab, allowed.shape[0])
    banned[:shared] = allowed[:shared] == 0
    if banned.all():
        return None
    out = logits.copy()
    out[banned] = -np.inf
    return out


def grammar_draft(matcher: Any, lookup: list[int], limit: int) -> list[int]:
    """A draft under the grammar: the tokens it forces next, or else the longest prefix of
    `lookup` (a prompt-lookup draft) it allows; at most `limit` tokens."""
    if limit <= 0 or matcher.is_error():
        return []
    forced = [int(t) for t in matcher.compute_ff_tokens()[:limit]]
    if forced:
        return forced
    if not lookup:
        return []
    return lookup[: int(matcher.validate_tokens(lookup[:limit]))]

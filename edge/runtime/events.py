"""What a generation tells its caller: one Prefill, then Tokens, then one Finished."""

from __future__ import annotations

from dataclasses import dataclass

from broker.wire import FinishReason


@dataclass(frozen=True)
class Prefill:
    """First event of a generation: the prompt has been read."""

    prompt_tokens: int
    #: exp(mean negative log-likelihood) of the scored prompt tokens (the whole prompt but
    #: its first token, or the span given to `submit`); None when no token is scored.
    perplexity: float | None
    queue_wait_s: float
    prefill_s: float
    #: How many prompt tokens the perplexity averages over.
    scored_tokens: int = 0
    #: Prompt tokens taken from a kept persona prefix instead of being prefilled.
    reused_tokens: int = 0


@dataclass(frozen=True)
class Token:
    """One generated token. `text` may be "" while a possible stop sequence is held back."""

    token_id: int
    text: str
    logprob: float
    #: Only when the request asked for log-probabilities (`SamplingParams.logprobs`): the
    #: token's text decoded alone (None otherwise, and for the end token), and the
    #: `top_logprobs` most likely tokens of this step as (text, log-probability).
    token: str | None = None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """Last event of a generation."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text released at the end (held-back tail), usually ""
    #: Tokens drafted (proposed without the model) and how many of them the model accepted;
    #: both count toward `completion_tokens` only where accepted.
    draft_tokens: int = 0
    accepted_tokens: int = 0


Event = Prefill | Token | Finished

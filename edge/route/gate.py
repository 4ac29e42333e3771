"""The samples gate: whether a personalized request keeps the user's own samples in context.

A request that comes with its user's samples (`EdgeRequest.with_samples`) is prefilled with
and without them; it keeps them only when they make its own tokens more likely by more than
`personalize_sample_gain` nats in all (`edge.personal.personalizer.samples_help`). Both
prefills keep their persona/samples prefix for the runtime's prefix reuse, so the answer's
own prefill then costs only the request's tokens. The samples never go to the cloud.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from broker.errors import HybridgenError
from edge.personal.personalizer import samples_help
from edge.route.request import EdgeRequest
from edge.runtime import EdgeRuntime, Prefill, prefix_length
from models.scoring import encode_with_span

logger = logging.getLogger(__name__)


async def gate_samples(
    runtime: EdgeRuntime, request: EdgeRequest, trace: dict[str, Any], sample_gain: float
) -> tuple[EdgeRequest, float | None]:
    """The request with the user's samples in context when they help it, else without.

    Both versions are prefilled (held, then cancelled: their prefixes stay kept) and
    compared on the request's own tokens. A version that cannot be prefilled (too long
    with the samples, the queue full, a failure) leaves the request without the samples.

    Returns:
        The request to serve (`with_samples` cleared) and its perplexity without the
        samples (None when it could not be measured).
    """
    alternative = request.with_samples
    assert alternative is not None
    plain_request = dataclasses.replace(request, with_samples=None)
    plain = await _prefill_only(
        runtime, request, request.prompt, request.score_span, request.prefix_key,
        request.prefix_chars,
    )  # fmt: skip
    if plain is None:
        trace["samples_in_context"] = 0
        return plain_request, None
    with_samples = await _prefill_only(
        runtime, request, alternative.prompt, alternative.score_span,
        alternative.prefix_key, alternative.prefix_chars,
    )  # fmt: skip
    gain = 0.0
    if with_samples is not None and plain.perplexity and with_samples.perplexity:
        tokens = min(plain.scored_tokens, with_samples.scored_tokens)
        gain = tokens * (math.log(plain.perplexity) - math.log(with_samples.perplexity))
    use = with_samples is not None and samples_help(gain, sample_gain)
    trace["samples_in_context"] = alternative.count if use else 0
    logger.debug(
        "request %s: %d samples %s (gain %.2f nats)",
        request.request_id,
        alternative.count,
        "kept" if use else "left out",
        gain,
    )
    if not use:
        return plain_request, plain.perplexity
    served = dataclasses.replace(
        plain_request,
        prompt=alternative.prompt,
        score_span=alternative.score_span,
        prefix_key=alternative.prefix_key,
        prefix_chars=alternative.prefix_chars,
    )
    return served, plain.perplexity


async def _prefill_only(
    runtime: EdgeRuntime,
    request: EdgeRequest,
    prompt: str,
    score_span: tuple[int, int] | None,
    prefix_key: str | None,
    prefix_chars: int,
) -> Prefill | None:
    """Prefill `prompt` with the request's options and stop: its Prefill event (the
    perplexity of its scored tokens), or None when it cannot run now."""
    ids, span = encode_with_span(runtime.encode, prompt, score_span)
    prefix = prefix_of(runtime, prompt, ids, prefix_key, prefix_chars)
    try:
        generation = runtime.submit(
            ids, request.options, hold_after_prefill=True, score_span=span, **prefix
        )
    except HybridgenError:  # too long with the samples, or the queue is full
        return None
    try:
        event = await generation.next_event()
    except HybridgenError as exc:
        logger.warning("request %s: a prefill for the samples gate failed: %s",
                       request.request_id, exc)  # fmt: skip
        return None
    finally:
        generation.cancel()
    return event if isinstance(event, Prefill) and event.perplexity is not None else None


def prefix_of(
    runtime: EdgeRuntime,
    prompt: str,
    prompt_ids: list[int],
    prefix_key: str | None,
    prefix_chars: int,
) -> dict[str, Any]:
    """`prefix_key` and `prefix_len` (tokens) of a personalized prompt's persona/samples
    prefix for `EdgeRuntime.submit` ({} without one)."""
    if prefix_key is None or prefix_chars <= 0:
        return {}
    prefix_ids = runtime.encode(prompt[:prefix_chars])
    return {"prefix_key": prefix_key, "prefix_len": prefix_length(prompt_ids, prefix_ids)}

"""docs/api.md's request parameters, each checked for what it does, on the three live targets
of test_openai_api (the edge serving locally, the edge sending to a real cloud worker, the
cloud API), with the official `openai` client.

Each check compares two greedy answers that the docs say must be the same (a spelling and its
equivalent, a sampler cut to one token and plain greedy decoding), or an answer with an exact
length or text: a parameter that was ignored or misread changes the answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.test_openai_api import USER, Target, cloud_api, target  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}


def text_of(answer: Any) -> str:
    choice = answer.choices[0]
    return str(choice.text if hasattr(choice, "text") else choice.message.content)


def scores_of(answer: Any) -> list[float]:
    """The answer's token log-probabilities (rounded): the tiny models' greedy text is
    often the same for different prompts, the model's probabilities are not."""
    logprobs = answer.choices[0].logprobs
    values = logprobs.token_logprobs if hasattr(logprobs, "token_logprobs") else [
        entry.logprob for entry in logprobs.content
    ]  # fmt: skip
    return [round(value, 4) for value in values]


async def test_equivalent_spellings_get_the_same_answer(target: Target) -> None:  # noqa: F811
    """`developer` is read as `system`; content as `text` parts is their text joined; a
    completion's prompt may be a list holding one string: the same prompt, so the same
    answer with the same token log-probabilities."""
    scored = {**GREEDY, "logprobs": True}
    system = [{"role": "system", "content": "Be brief."}, *USER]
    developer = [{"role": "developer", "content": "Be brief."}, *USER]
    as_system, as_developer = [await target.chat(messages=m, **scored) for m in (system, developer)]
    assert scores_of(as_developer) == scores_of(as_system)
    assert text_of(as_developer) == text_of(as_system)

    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {
            "type": "text", "text": "the software license"}]}
    ]  # fmt: skip
    as_parts, as_string = [await target.chat(messages=m, **scored) for m in (parts, USER)]
    assert scores_of(as_parts) == scores_of(as_string)
    assert text_of(as_parts) == text_of(as_string)

    listed, plain = [
        await target.complete(prompt=p, logprobs=0, **GREEDY)
        for p in (["The software"], "The software")
    ]
    assert scores_of(listed) == scores_of(plain)
    assert text_of(listed) == text_of(plain)


async def test_max_completion_tokens_wins_and_echo_starts_with_the_prompt(
    target: Target,  # noqa: F811
) -> None:
    """`max_completion_tokens` wins over `max_tokens`; `echo` puts the prompt in front of
    the very answer the same request gets without it."""
    both = await target.chat(temperature=0, max_tokens=12, max_completion_tokens=5)
    assert (both.choices[0].finish_reason, both.usage.completion_tokens) == ("length", 5)

    prompt = "The software"
    echoed = await target.complete(prompt=prompt, echo=True, **GREEDY)
    plain = await target.complete(prompt=prompt, **GREEDY)
    assert text_of(echoed) == prompt + text_of(plain)
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    stream = await target.complete(prompt=prompt, echo=True, stream=True, **GREEDY)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == text_of(echoed)


async def test_top_k_one_and_a_tiny_top_p_decode_greedily(target: Target) -> None:  # noqa: F811
    """Sampling at temperature 1 from the one most likely token (`top_k: 1`, or a `top_p`
    that keeps only it) writes the greedy answer, whatever the seed. Its log-probabilities
    are the model's own, taken before temperature and top-k (docs/api.md): at temperature 2
    under `top_k: 1` they are the greedy answer's."""
    greedy_answer = await target.complete(logprobs=0, **GREEDY)
    greedy = text_of(greedy_answer)
    hot = await target.complete(
        temperature=2.0, max_tokens=8, seed=1, logprobs=0, extra_body={"top_k": 1}
    )
    assert (text_of(hot), scores_of(hot)) == (greedy, scores_of(greedy_answer))
    sampled = {"temperature": 1.0, "max_tokens": 8}
    for seed in (1, 2):
        one = await target.complete(seed=seed, extra_body={"top_k": 1}, **sampled)
        assert text_of(one) == greedy
        tiny = await target.complete(seed=seed, top_p=1e-6, **sampled)
        assert text_of(tiny) == greedy
    free = {text_of(await target.complete(seed=seed, **sampled)) for seed in (1, 2)}
    assert free != {greedy}, "sampling at temperature 1 wrote the greedy answer"


async def test_the_cloud_api_ignores_the_edge_extensions(
    cloud_api: str,  # noqa: F811
    start_worker: Callable[..., Awaitable[Any]],
) -> None:
    """`user`, `route` and `local_only` are the edge's; the cloud API accepts and ignores
    them (at the edge, `route` decides where: every answer's `served_by` is checked)."""
    await start_worker()
    cloud = Target("cloud", cloud_api, "hg-cloud", {}, served_by="cloud")
    plain = await cloud.chat(**GREEDY)
    extended = await cloud.chat(
        extra_body={"user": "alice", "route": "edge", "local_only": True}, **GREEDY
    )
    assert text_of(extended) == text_of(plain)
    assert cloud.validate_all() == 2

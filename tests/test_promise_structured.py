"""docs/edge.md, "Structured outputs": on the edge, a constrained request never reuses a kept
persona prefix (the guidance state lives in the generator), and a user's n-gram adapter
still mixes into the logits the grammar masks. On the edge runtime with the session's tiny
int4 model.
"""

from __future__ import annotations

import json

from edge.api.personal import user_span
from edge.personal.adapt import NgramCache
from edge.runtime import EdgeRuntime, Finished, Prefill, SamplingParams, Token, prefix_length
from models.scoring import encode_with_span
from serving.grammar import Grammar, json_schema_grammar

PERSONA = "You are Ada, a kind teacher."
GREEDY = SamplingParams(max_tokens=12, temperature=0)
NAME = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}},
    "required": ["name"],
    "additionalProperties": False,
}
LEARNED = '{"name":"purple walrus sings quietly"}'


async def run(
    runtime: EdgeRuntime, ids: list[int], options: SamplingParams, **kwargs: object
) -> tuple[Prefill, str]:
    """The Prefill event and the whole text of one generation."""
    events = [event async for event in runtime.submit(ids, options, **kwargs)]  # type: ignore[arg-type]
    prefill, finished = events[0], events[-1]
    assert isinstance(prefill, Prefill) and isinstance(finished, Finished)
    text = "".join(e.text for e in events if isinstance(e, Token)) + finished.text
    return prefill, text


async def test_a_constrained_request_reuses_a_kept_persona_prefix(
    runtime: EdgeRuntime,
) -> None:
    """The grammar's state lives in the request, not in the generator: a constrained request
    reuses a kept persona prefix, and answers what it answers with a full prefill."""
    messages = [{"role": "system", "content": PERSONA}, {"role": "user", "content": "List files?"}]
    rendered = runtime.render_chat(messages)
    ids, span = encode_with_span(runtime.encode, rendered, user_span(messages, rendered))
    persona_part = rendered[: rendered.index("List files?")]
    persona_part = persona_part[: persona_part.rindex("<|user|>")]
    prefix_len = prefix_length(ids, runtime.encode(persona_part))
    assert prefix_len > 0
    # Only the question is scored: the persona's prefill is all the runtime may reuse.
    keyed = {"prefix_key": "user:ada", "prefix_len": prefix_len, "score_span": span}
    grammar: Grammar = json_schema_grammar({"type": "object"})

    first, _ = await run(runtime, ids, GREEDY, **keyed)  # prefills and keeps the persona
    assert first.reused_tokens == 0
    whole, expected = await run(runtime, ids, GREEDY, grammar=grammar, score_span=span)
    assert whole.reused_tokens == 0  # no key: a full prefill
    constrained, text = await run(runtime, ids, GREEDY, grammar=grammar, **keyed)
    assert constrained.reused_tokens == prefix_len
    assert text == expected and text.startswith("{")  # (it ran under its grammar)
    assert runtime.prefix_hits == 1


async def test_a_users_learned_text_still_steers_a_constrained_answer(
    runtime: EdgeRuntime,
) -> None:
    ids = runtime.encode("The record of the user:")
    grammar = json_schema_grammar(NAME)
    options = SamplingParams(max_tokens=40, temperature=0)
    _, plain = await run(runtime, ids, options, grammar=grammar)
    learned = NgramCache.from_samples([runtime.encode(LEARNED)] * 3)
    _, free = await run(runtime, ids, options, adapter=learned)
    assert free != LEARNED  # unconstrained, the learned text is not valid by itself here
    _, adapted = await run(runtime, ids, options, grammar=grammar, adapter=learned)
    assert plain != LEARNED  # the model alone writes something else
    assert adapted == LEARNED  # the adapter's text, held to the grammar
    assert json.loads(adapted) == {"name": "purple walrus sings quietly"}

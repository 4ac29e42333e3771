"""Tool calling (`tools`, `tool_choice`, `parallel_tool_calls`) on the edge API and the cloud API.

Driven by the official `openai` client against the three live targets of test_openai_api
(the edge serving locally, the edge routing to a real cloud worker, the cloud API), whose
every body is validated against the vendored OpenAI schemas. The tiny models write
gibberish: a call whose arguments validate against the tool's schema is there only because
the decoder was constrained (the argument schemas are bounded so a call always ends).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import openai
import pytest

from serving.protocol import ChatCompletionRequest
from serving.tools import (
    CALL_MARKER,
    CallStream,
    ToolRequest,
    fallback_messages,
    split_calls,
    template_messages,
)
from tests.test_openai_api import Target, cloud_api, target  # noqa: F401 (fixtures)

# Short names, tiny schemas: the tiny edge model's window is 128 tokens of ~1.4 characters,
# and the prompt, the tools' listing and the call must fit in it.
WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"u": {"enum": ["c", "f"]}},
    "required": ["u"],
    "additionalProperties": False,
}
ADD_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "w", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "a", "parameters": ADD_PARAMS}},
]
PARAMS = {"w": WEATHER_PARAMS, "a": ADD_PARAMS}
ASK: Any = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER: Any = {"type": "function", "function": {"name": "w"}}
#: Room for one call on the tiny edge model (prompt + max_tokens within 128 tokens).
ONE_CALL = 45
#: A tool without arguments: a call of it is 29 tokens of the tiny models, so two fit the
#: tiny edge model's window after the prompt (65 tokens with `BARE` and `HUH`).
BARE: Any = [
    {
        "type": "function",
        "function": {
            "name": "a",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    }
]
BARE_PARAMS = {"a": BARE[0]["function"]["parameters"]}
HUH: Any = [{"role": "user", "content": "?"}]
#: Room for two calls of `BARE` on the tiny edge model (65 + 63 = its 128-token window).
TWO_CALLS = 63
#: The seed with which each end's tiny model, free to make parallel calls of `BARE`, makes
#: two (found by trying seeds: sampling is seeded, so it makes them on every run).
TWO_CALLS_SEED = {"edge": 13, "edge-to-cloud": 3, "cloud": 3}
#: The text of one call of `BARE`, as the grammar has the model write it.
BARE_CALL = f'{CALL_MARKER}{{"name":"a","arguments":{{}}}}'


def assert_calls(
    answer: Any, *, names: set[str], most: int, schemas: dict[str, Any] = PARAMS
) -> list[Any]:
    """The answer is only tool calls (1 to `most`), each of a tool in `names` with arguments
    valid against its schema (in `schemas`); returns them."""
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert 1 <= len(calls) <= most
    assert choice.message.content is None
    for call in calls:
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id), call.id
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert len({call.id for call in calls}) == len(calls)
    return calls


# ------------------------------------------------------------------------------- no model


def test_stream_splitter_matches_the_whole_answer() -> None:
    text = (
        f'hi{CALL_MARKER}{{"name":"add","arguments":{{"a":1}}}}'
        f'{CALL_MARKER}{{"name":"x","arguments":{{}}}}'
    )
    content, calls = split_calls(text)
    assert content == "hi" and [c["function"]["name"] for c in calls] == ["add", "x"]
    stream = CallStream()
    parts = [p for i in range(0, len(text), 3) for p in stream.feed(text[i : i + 3])]
    assert stream.close() == ""
    assert "".join(p for p in parts if isinstance(p, str)) == "hi"
    deltas = [d for p in parts if not isinstance(p, str) for d in p]
    assert [d["function"].get("name") for d in deltas if "id" in d] == ["add", "x"]
    arguments = [
        "".join(d["function"]["arguments"] for d in deltas if d["index"] == i) for i in (0, 1)
    ]
    assert arguments == [c["function"]["arguments"] for c in calls]
    # A call cut short (max_tokens) stays text.
    assert split_calls(text[:-3]) == (text[:-3], [])
    cut = CallStream()
    assert cut.feed(text[:-3]) and cut.close().startswith(CALL_MARKER)


def test_tool_turns_fall_back_to_plain_messages() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1}'}}
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "add one"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2"},
    ]
    plain = fallback_messages(history, TOOLS)
    assert plain[0]["role"] == "system" and "Tools: w(u); a(n)." in plain[0]["content"]
    assert plain[2] == {
        "role": "assistant",
        "content": f'{CALL_MARKER}{{"name": "add", "arguments": {{"a": 1}}}}',
    }
    assert plain[3] == {"role": "user", "content": "Tool result (add): 2"}
    # A template with tool support gets them as they are (arguments as an object).
    native, tools = template_messages(history, TOOLS, native=True)
    assert tools == TOOLS and native[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tools_name_their_param(body: dict[str, Any], param: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **body})
    assert caught.value.errors()[0]["loc"][0] == param


def test_tool_choice_picks_the_grammar() -> None:
    assert ToolRequest(TOOLS, "none").grammar() is None
    named = ToolRequest(TOOLS, "a", parallel=False).grammar()
    assert named is not None and named.kind == "lark" and '"const":"w"' not in named.data
    auto = ToolRequest(TOOLS, "auto").grammar()
    assert auto is not None and "start: TEXT | calls" in auto.data


# -------------------------------------------------------------------------------- live


@pytest.mark.slow
async def test_forced_call_then_tool_result(target: Target) -> None:  # noqa: F811
    answer = await target.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice=WEATHER,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=ONE_CALL,
    )
    (call,) = assert_calls(answer, names={"w"}, most=1)  # no parallel: one call
    history: list[dict[str, Any]] = [
        *ASK,
        answer.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    reply = await target.chat(
        messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=12
    )
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12
    assert reply.choices[0].message.content


def rebuild_calls(chunks: list[Any]) -> list[tuple[str, str, str]]:
    """The (id, name, arguments) of each call a stream made, in index order; the stream
    carries no text besides its calls."""
    rebuilt: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = rebuilt.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert call["id"] is None and delta.type == "function"
                call["id"] = delta.id
            if delta.function and delta.function.name:
                call["name"] += delta.function.name
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
        assert not chunk.choices[0].delta.content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert sorted(rebuilt) == list(range(len(rebuilt)))
    return [(c["id"], c["name"], c["arguments"]) for _, c in sorted(rebuilt.items())]


@pytest.mark.slow
async def test_required_and_parallel_calls(target: Target) -> None:  # noqa: F811
    """`required` with `parallel_tool_calls: false` is one call; left parallel, the model
    may make several: two on the seed that makes two (the edge included: two calls of a
    bare tool fit its window), and one on the same seed without parallel calls."""
    one = await target.chat(
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=5,
        max_tokens=ONE_CALL,
    )
    assert_calls(one, names={"w", "a"}, most=1)
    ask: dict[str, Any] = {
        "messages": HUH,
        "tools": BARE,
        "tool_choice": "required",
        "temperature": 1.0,
        "seed": TWO_CALLS_SEED[target.name],
        "max_tokens": TWO_CALLS,
    }
    many = await target.chat(**ask)
    calls = assert_calls(many, names={"a"}, most=4, schemas=BARE_PARAMS)
    assert [(c.function.name, c.function.arguments) for c in calls] == [("a", "{}")] * 2
    single = await target.chat(**ask, parallel_tool_calls=False)
    (call,) = assert_calls(single, names={"a"}, most=1, schemas=BARE_PARAMS)
    assert (call.function.name, call.function.arguments) == ("a", "{}")
    # Streamed: the same two calls, as indices 0 and 1 with an id each.
    streamed = rebuild_calls(await target.chat_stream(**ask))
    assert [(name, arguments) for _, name, arguments in streamed] == [("a", "{}")] * 2
    assert len({call_id for call_id, _, _ in streamed}) == 2
    assert all(call_id.startswith("call_") for call_id, _, _ in streamed)


@pytest.mark.slow
async def test_a_call_cut_short_by_max_tokens_stays_text(target: Target) -> None:  # noqa: F811
    """`max_tokens` ends the answer inside its second call: no `tool_calls`, the text as
    `content`, `finish_reason: length` (docs/api.md, "Tool calling"). Streamed, the first
    call went out as deltas once whole, and the second's text, held back, is sent as
    content at the end."""
    ask: dict[str, Any] = {
        "messages": HUH,
        "tools": BARE,
        "tool_choice": "required",
        "temperature": 1.0,
        "seed": TWO_CALLS_SEED[target.name],
        "max_tokens": 40,  # the first call is 29 tokens
    }
    whole = await target.chat(**ask)
    choice = whole.choices[0]
    assert (choice.finish_reason, choice.message.tool_calls) == ("length", None)
    assert choice.message.content == f'{BARE_CALL}{CALL_MARKER}{{"name'
    chunks = await target.chat_stream(**ask)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == f'{CALL_MARKER}{{"name'
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert {d.index for d in deltas} == {0} and deltas[0].function.name == "a"
    assert "".join(d.function.arguments or "" for d in deltas) == "{}"
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.slow
async def test_auto_answers_text_on_seeds_that_write_text(target: Target) -> None:  # noqa: F811
    """`auto`: the tiny models, free to call, answer in text on these seeds: text that never
    holds the call marker, no `tool_calls`. (No seed of theirs starts a call unforced; a
    call under `auto` is the grammar's `calls` branch, checked in
    test_tool_choice_picks_the_grammar.)"""
    for seed in (1, 2):
        answer = await target.chat(
            messages=ASK, tools=TOOLS, temperature=1.0, seed=seed, max_tokens=ONE_CALL
        )
        choice = answer.choices[0]
        assert (choice.finish_reason, choice.message.tool_calls) == ("length", None)
        assert choice.message.content and CALL_MARKER not in choice.message.content


@pytest.mark.slow
async def test_none_answers_as_if_there_were_no_tools(target: Target) -> None:  # noqa: F811
    """`none`: the tools are not shown to the model, so the answer is the one the same
    request without tools gets (greedy)."""
    none = await target.chat(
        messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=12
    )
    plain = await target.chat(messages=ASK, temperature=0, max_tokens=12)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


@pytest.mark.slow
async def test_streamed_calls_rebuild_the_whole_answer(target: Target) -> None:  # noqa: F811
    ask: dict[str, Any] = {
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,  # one call fits the tiny edge model's window
        "temperature": 0,
        "max_tokens": ONE_CALL,
    }
    whole = await target.chat(**ask)
    expected = assert_calls(whole, names={"w", "a"}, most=1)
    rebuilt = rebuild_calls(await target.chat_stream(**ask))
    assert [(name, arguments) for _, name, arguments in rebuilt] == [
        (c.function.name, c.function.arguments) for c in expected
    ]
    assert all(call_id.startswith("call_") for call_id, _, _ in rebuilt)


@pytest.mark.slow
async def test_tools_on_completions_are_refused(target: Target) -> None:  # noqa: F811
    with pytest.raises(openai.BadRequestError) as caught:
        await target.complete(extra_body={"tools": TOOLS})
    assert caught.value.param == "tools"

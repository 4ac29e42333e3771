"""A bus request's prompt as the cloud model reads it: its messages through the model's own
chat template (tools rendered as the template or the documented fallback says), or its
completion prompt as it is; and the field to blame when it does not fit."""

from __future__ import annotations

from broker import wire
from broker.errors import BadRequest, ContextLengthExceeded
from cloud.engine import Engine
from serving.context import too_long_for
from serving.tools import template_messages, template_supports_tools


def input_field(request: wire.GenerateRequest) -> str:
    """The request's input field, named when the input alone does not fit."""
    return "messages" if request.messages is not None else "prompt"


def prompt_ids_of(engine: Engine, request: wire.GenerateRequest) -> list[int]:
    """Token ids of the request: its messages through this model's own chat template
    (the assistant's turn opened), or its completion prompt as it is.

    Raises:
        BadRequest: an empty prompt, or messages the model's template refuses.
    """
    chars = len(request.prompt or "") + sum(len(m.content) for m in request.messages or [])
    if too_long_for(chars, engine.context_length):  # refused before the tokenizer runs
        raise ContextLengthExceeded(
            f"the input ({chars} characters) cannot fit the context window of "
            f"{engine.context_length} tokens",
            param=input_field(request),
        )
    if request.messages is None:
        prompt_ids = engine.encode(request.prompt or "")
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        return prompt_ids
    # Tools and tool turns: the template's own rendering when it has one, else the
    # documented fallback (`serving.tools.fallback_messages`).
    native = template_supports_tools(getattr(engine.tokenizer, "chat_template", None))
    messages, tools = template_messages(request.message_dicts(), request.tools, native)
    try:
        text = engine.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja's TemplateError and the template's own raise
        raise BadRequest(
            f"the cloud model's chat template refused the messages: {exc}", param="messages"
        ) from None
    return engine.encode(str(text))

"""The test-prompt screen: send one chat prompt to an edge's HTTP API and watch the answer.

The answer is streamed (`POST <api_url>/v1/chat/completions`, `stream: true`) and drawn as it
arrives, as plain text (a model's `[bold]` is shown as written, never parsed as markup).
Then come where it was served (`served_by`), why (`route_reason`), the request id, the time
to the first token, tokens per second and the total time. A refused connection, an HTTP
error envelope and an SSE error event are shown on the screen. Each prompt is recorded as an
`operator_action` event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from fleet.rollout import Recorder
from serving.headers import HEADER_REQUEST_ID, HEADER_ROUTE_REASON, HEADER_SERVED_BY

#: Operator-event action name.
TEST_PROMPT = "test-prompt"
#: Seconds the whole answer may take.
PROMPT_TIMEOUT_S = 120.0
#: Seconds to open the connection.
CONNECT_TIMEOUT_S = 5.0


@dataclass
class PromptAnswer:
    """What one test prompt gave: the text, where and why it was served, and timings."""

    text: str = ""
    served_by: str | None = None
    route_reason: str | None = None
    request_id: str | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    #: Completion tokens (the usage chunk), else the number of text pieces received.
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the answer arrived whole."""
        return self.error is None

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens per second over the whole request."""
        if not self.total_ms or not self.completion_tokens:
            return None
        return self.completion_tokens / (self.total_ms / 1e3)

    def lines(self) -> list[str]:
        """The figures, one per line."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f} ms"

        rate = self.tokens_per_s
        lines = [
            f"served_by: {self.served_by or '-'}",
            f"route_reason: {self.route_reason or '-'}",
            f"request id: {self.request_id or '-'}",
            f"TTFT: {ms(self.ttft_ms)}",
            f"tokens/s: {'-' if rate is None else f'{rate:.1f}'} ({self.completion_tokens} tokens)",
            f"total: {ms(self.total_ms)}",
        ]
        if self.finish_reason:
            lines.append(f"finish_reason: {self.finish_reason}")
        if self.error:
            lines.append(f"error: {self.error}")
        return lines

    def summary(self) -> str:
        """One line for the operator event."""
        if self.error:
            return f"failed: {self.error}"
        rate = self.tokens_per_s
        return (
            f"served_by {self.served_by} ({self.route_reason}), request {self.request_id}, "
            f"TTFT {self.ttft_ms or 0:.0f} ms, "
            f"{'-' if rate is None else f'{rate:.1f}'} tokens/s, total {self.total_ms or 0:.0f} ms"
        )


def error_message(raw: bytes | str) -> str:
    """The message of an OpenAI error envelope (`{"error": {"message": ...}}`), else the text."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300] or "(empty body)"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code") or error.get("type")
        message = str(error.get("message") or "no message")
        return f"{message} ({code})" if code else message
    return text.strip()[:300]


def _take_tags(answer: PromptAnswer, fields: Any) -> None:
    """Copy served_by / route_reason / request id from headers or a chunk, where present."""
    for name, key in (
        ("served_by", "served_by"),
        ("route_reason", "route_reason"),
        ("request_id", "request_id"),
        ("served_by", HEADER_SERVED_BY),
        ("route_reason", HEADER_ROUTE_REASON),
        ("request_id", HEADER_REQUEST_ID),
    ):
        value = fields.get(key)
        if value:
            setattr(answer, name, str(value))


async def stream_prompt(
    api_url: str,
    prompt: str,
    *,
    model: str,
    on_text: Callable[[str], None],
    api_key: str | None = None,
    cloud: bool = False,
    max_tokens: int = 64,
    timeout_s: float = PROMPT_TIMEOUT_S,
) -> PromptAnswer:
    """Stream one chat completion from an edge; never raises for network or HTTP trouble.

    Args:
        api_url: the edge's base URL (`http://host:port`).
        prompt: the user message.
        model: the model name to ask for.
        on_text: called with each piece of text as it arrives.
        api_key: bearer key, when the edge requires one.
        cloud: ask the edge to send it to the cloud (`route: cloud`).
        max_tokens: the longest answer.
        timeout_s: seconds the whole answer may take.
    """
    answer = PromptAnswer()
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        # Greedy: the same prompt gets the same answer from the same model, so two nodes or
        # two versions can be compared.
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cloud:
        body["route"] = "cloud"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{api_url.rstrip('/')}/v1/chat/completions"
    pieces = 0
    started = time.perf_counter()
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)) as http,
            http.stream("POST", url, json=body, headers=headers) as response,
        ):
            _take_tags(answer, response.headers)
            if response.status_code >= 400:
                raw = await response.aread()
                answer.error = f"HTTP {response.status_code}: {error_message(raw)}"
                return answer
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    answer.error = f"malformed stream event: {data[:200]}"
                    break
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk:
                    answer.error = f"stream failed: {error_message(data)}"
                    break
                _take_tags(answer, chunk)
                usage = chunk.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    answer.completion_tokens = int(usage["completion_tokens"])
                for choice in chunk.get("choices") or []:
                    if choice.get("finish_reason"):
                        answer.finish_reason = str(choice["finish_reason"])
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if answer.ttft_ms is None:
                            answer.ttft_ms = (time.perf_counter() - started) * 1e3
                        pieces += 1
                        answer.text += content
                        on_text(content)
            else:
                if answer.error is None:
                    answer.error = "the stream ended without [DONE]"
    except httpx.ConnectError as exc:
        answer.error = (
            f"cannot connect to {api_url} ({exc or 'refused'}): is the edge running there?"
        )
    except httpx.TimeoutException:
        answer.error = f"no complete answer from {api_url} within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__} talking to {api_url}: {exc}"
    finally:
        answer.total_ms = (time.perf_counter() - started) * 1e3
        if not answer.completion_tokens:
            answer.completion_tokens = pieces
    return answer


class PromptScreen(Screen[None]):
    """Send a test prompt to one edge and show the answer as it streams.

    Args:
        node_id: the edge.
        api_url: its HTTP API's base URL (its heartbeat's `api_url`).
        record: publishes the operator event.
        api_key: bearer key for an edge that requires one.
        model: the model name to ask for.
    """

    DEFAULT_CSS = """
    #prompt-target, #prompt-stats { height: auto; padding: 0 1; }
    #prompt-answer { height: auto; min-height: 3; border: round $accent; padding: 0 1; }
    """
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("ctrl+t", "toggle_cloud", "ask the cloud"),
    ]

    def __init__(
        self,
        node_id: str,
        api_url: str,
        record: Recorder,
        *,
        api_key: str | None = None,
        model: str = "hg-edge",
    ) -> None:
        super().__init__()
        self.node_id = node_id
        self.api_url = api_url
        self.record = record
        self.api_key = api_key
        self.model = model
        #: Ask the edge to send the prompt to the cloud (`route: cloud`).
        self.cloud = False
        #: The last answer (None before the first prompt).
        self.answer: PromptAnswer | None = None
        self.streaming = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="prompt-target")
        yield Input(placeholder="prompt (enter: send)", id="prompt-input")
        yield Static(id="prompt-answer")
        yield Static(id="prompt-stats")
        yield Footer()

    def on_mount(self) -> None:
        self.show_target()
        self.query_one("#prompt-input", Input).focus()

    def show_target(self) -> None:
        """Where the prompt goes and whether it asks for the cloud."""
        route = "route: cloud (ctrl+t: auto)" if self.cloud else "route: auto (ctrl+t: cloud)"
        self.query_one("#prompt-target", Static).update(
            Text(f"test prompt to {self.node_id} at {self.api_url} · {route}")
        )

    def action_toggle_cloud(self) -> None:
        """Ask for the cloud, or let the edge decide."""
        self.cloud = not self.cloud
        self.show_target()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt-input":
            return
        prompt = event.value.strip()
        if not prompt:
            self.notify("type a prompt first", severity="warning")
            return
        if self.streaming:
            self.notify("an answer is still streaming: wait for it", severity="warning")
            return
        self.send(prompt)

    @work(exclusive=True, group="test-prompt")
    async def send(self, prompt: str) -> None:
        """Stream the answer into the screen, then show its figures and record it."""
        self.streaming = True
        shown = self.query_one("#prompt-answer", Static)
        stats = self.query_one("#prompt-stats", Static)
        text = ""
        shown.update(Text(""))
        stats.update(Text(f"asking {self.api_url} ..."))

        def arrived(piece: str) -> None:
            nonlocal text
            text += piece
            shown.update(Text(text))

        try:
            answer = await stream_prompt(
                self.api_url,
                prompt,
                model=self.model,
                on_text=arrived,
                api_key=self.api_key,
                cloud=self.cloud,
            )
        finally:
            self.streaming = False
        self.answer = answer
        stats.update(Text("\n".join(answer.lines()), style="" if answer.ok else "bold red"))
        if not answer.ok:
            self.notify(f"test prompt: {answer.error}", severity="error", markup=False)
        route = " (route: cloud)" if self.cloud else ""
        await self.record(
            TEST_PROMPT,
            self.node_id,
            answer.ok,
            f"{TEST_PROMPT} {self.node_id}{route}: {answer.summary()}",
        )

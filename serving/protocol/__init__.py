"""OpenAI-compatible HTTP schemas shared by the cloud API and the edge API, torch-free.

Both APIs import this package (never copy it). Its rooms:

* `requests`: the request bodies (`CompletionRequest`, `ChatCompletionRequest` and their
  parts), validated strictly;
* `responses`: the response bodies (`Completion`, `ChatCompletion`, their chunks,
  `ModelList`);
* `builders`: ids, `system_fingerprint`, and the functions that fill the response bodies;
* `logprobs`: token log-probabilities, from a worker's bus chunk to OpenAI's shapes;
* `stream`: `StreamChunks`, every chunk of one streamed answer in order.

How an API uses it:

* parse bodies with `serving.bodies.json_body(CompletionRequest)` /
  `json_body(ChatCompletionRequest)` (400 envelope naming the field on bad input);
* read the common sampling knobs with `request.sampling(default)` (a
  `serving.sampling.SamplingParams`), and the extensions `user`, `route`
  (`"auto" | "edge" | "cloud"`) and `local_only` from the request (the cloud accepts and
  ignores them);
* answer with `completion_response` / `chat_response` (non-stream) and `StreamChunks` or
  `completion_chunk` / `chat_chunk` (stream): every builder takes extra keyword fields such
  as `served_by="edge"`, `route_reason="local"`, which land in the JSON body next to
  OpenAI's fields.
"""

from serving.protocol.builders import (
    chat_chunk,
    chat_completion_id,
    chat_response,
    completion_chunk,
    completion_id,
    completion_response,
    fingerprint,
    model_list,
)
from serving.protocol.logprobs import (
    TokenLogprob,
    chat_logprobs,
    chunk_logprobs,
    completion_logprobs,
)
from serving.protocol.requests import (
    MAX_INT32,
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    Route,
    StreamOptions,
    ToolCall,
    ToolCallFunction,
)
from serving.protocol.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    ModelCard,
    ModelList,
    Usage,
)
from serving.protocol.stream import StreamChunks

__all__ = [
    "MAX_INT32",
    "MAX_STOP_SEQUENCES",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "ChatMessageOut",
    "Completion",
    "CompletionChoice",
    "CompletionRequest",
    "ContentPart",
    "ModelCard",
    "ModelList",
    "Route",
    "StreamChunks",
    "StreamOptions",
    "TokenLogprob",
    "ToolCall",
    "ToolCallFunction",
    "Usage",
    "chat_chunk",
    "chat_completion_id",
    "chat_logprobs",
    "chat_response",
    "chunk_logprobs",
    "completion_chunk",
    "completion_id",
    "completion_logprobs",
    "completion_response",
    "fingerprint",
    "model_list",
]

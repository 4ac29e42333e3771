"""The edge's model runtime: one onnxruntime-genai model served to many async callers.

- `engine`: `EdgeRuntime`, the public side (submit, encode, render_chat, estimates, close);
- `worker`: its worker thread (the round-robin loop, prefill, one decode step, finish);
- `steps`: per-token math (log-probabilities, top-k scores, adapter mixing, search options;
  the log-softmax itself is `models.logits`);
- `prefix`: persona prefix reuse (the kept generators' LRU, bounded by KV bytes);
- `jobs`: one request inside the worker (`Job`) and the caller's handle (`Generation`);
- `events`: what a generation tells its caller (`Prefill`, `Token`, `Finished`).
"""

from edge.runtime.engine import OPEN_ANSWER_TOKENS, EdgeRuntime
from edge.runtime.events import Event, Finished, Prefill, Token
from edge.runtime.jobs import Generation
from edge.runtime.prefix import FORGET_GRACE_S, PREFIX_LENGTH_STEP, prefix_length
from serving.sampling import SamplingParams

__all__ = [
    "FORGET_GRACE_S",
    "OPEN_ANSWER_TOKENS",
    "PREFIX_LENGTH_STEP",
    "EdgeRuntime",
    "Event",
    "Finished",
    "Generation",
    "Prefill",
    "SamplingParams",
    "Token",
    "prefix_length",
]

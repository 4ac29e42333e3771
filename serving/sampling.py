"""How to sample one answer: the one sampling-parameters type of the edge and the cloud.

The HTTP schema produces it (`serving.protocol`'s `request.sampling()`),
the bus carries its fields (`to_wire` / `from_wire`), and both engines take it: the edge's
onnxruntime-genai runtime and the cloud's batching engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from broker import wire

#: Temperatures at or below this are greedy: every server picks the most likely token.
GREEDY_TEMPERATURE = 1e-5


def is_greedy(temperature: float) -> bool:
    """The one greedy rule: temperature 0, or close enough to it."""
    return temperature <= GREEDY_TEMPERATURE


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one answer. `temperature` 0 means greedy; `top_k` 0 disables top-k.

    Attributes:
        max_tokens: most tokens to generate; None: until the model stops or the context is
            full, at most the server's cap (`serving.context.settle_max_tokens`, applied by
            whoever generates).
        temperature, top_p, top_k: the usual knobs (OpenAI's meaning; `top_k` as vLLM's).
        stop: strings that end the answer (not shown).
        seed: makes a sampled answer repeat.
        ignore_eos: keep generating past the model's end tokens (benchmarks only).
        logprobs: report each generated token's log-probability (and its text).
        top_logprobs: with `logprobs`, also this many most likely tokens of each step
            (0-20).
        presence_penalty, frequency_penalty: OpenAI's additive penalties on the tokens the
            answer already holds (-2 to 2; 0: off); `repetition_penalty`: the multiplicative
            one of llama.cpp, vLLM and transformers on every token seen in the prompt or the
            answer ((0, 2]; 1: off). The rule is `serving.penalties`.
        speculative: let the server draft tokens (from the prompt, the conversation, the
            user's own text) and check them in one forward pass, each token still drawn from
            the model's own distribution. False: draft nothing.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    speculative: bool = True

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (else no token history is kept for it)."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or close enough): always the most likely token (`is_greedy`)."""
        return is_greedy(self.temperature)

    def with_max_tokens(self, max_tokens: int) -> SamplingParams:
        """The same parameters with another `max_tokens`."""
        return dataclasses.replace(self, max_tokens=max_tokens)

    def to_wire(self) -> dict[str, Any]:
        """The `wire.GenerateRequest` fields these parameters set."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop),
            "seed": self.seed,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs if self.logprobs else 0,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "speculative": self.speculative,
        }

    @classmethod
    def from_wire(cls, request: wire.GenerateRequest, max_tokens: int) -> SamplingParams:
        """The parameters a bus request asks for, with the `max_tokens` the worker settled
        (`serving.context.settle_max_tokens`)."""
        return cls(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            stop=tuple(request.stop),
            seed=request.seed,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs if request.logprobs else 0,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            speculative=request.speculative,
        )

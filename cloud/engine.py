"""The cloud generation engine: transformers' own continuous batching, streamed per request.

One persistent `ContinuousBatchingManager` runs the model in its background thread; every
request joins the running batch as soon as the scheduler has room (no waiting for a batch
to finish). Results come back per token through `register_result_handler` onto the asyncio
loop, are detokenized incrementally and checked against the request's stop sequences.

What transformers' CB manager does per request, and what this module adds:

* `max_new_tokens`, EOS ids: per request in the manager.
* temperature, top_k, top_p: per request through CB's per-request logits processors
  (`per_request_processors=True`; they only exist when the generation config sets a
  non-default value at creation, hence the placeholder values in `_generation_config`).
* greedy decoding (temperature 0) and `seed`: the manager samples every row with one
  shared RNG and a global `do_sample`, so both are done here by `_RowSampler`, an extra
  per-request processor appended last: for a greedy row it keeps only the argmax, for a
  seeded row it draws the token with the request's own `torch.Generator` and keeps only that
  one — the manager's own multinomial then picks it with probability 1. A seeded request
  repeats exactly when run alone; inside a batch the logits of a row can differ in the last
  bits from a batch of one (batched matmuls), so repeatability is "same text in practice",
  not bit-exact.
* stop sequences: matched here on the detokenized text (text that may be the start of a
  stop sequence is held back until it can be decided); a match finishes the request and
  cancels it in the manager.
* CUDA graphs and async batching are off on every device: `_RowSampler` is host-side
  logic inside the step (it could not be captured in a graph). On a GPU that costs some
  per-step overhead; a graph-friendly sampler is the way to win it back.
* cancellation: `cancel_request` frees the sequence's cache blocks at the scheduler's next
  step; a cancelled request gets no final output from the manager, so its result handler is
  removed here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ContinuousBatchingConfig,
    GenerationConfig,
)
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
)
from transformers.generation.continuous_batching.requests import RequestStatus

from broker.errors import BadRequest, Internal, Unavailable
from models.chat import END_OF_TURN, EOS_TOKEN

logger = logging.getLogger(__name__)

_NO_SLOT = -1
_GREEDY = -2


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options (temperature 0 = greedy; top_k 0 = off)."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Keep generating past EOS (benchmarks: every request makes exactly max_tokens).
    ignore_eos: bool = False


@dataclass
class Delta:
    """One step of a request's output: new text and token ids; `finish_reason` on the last."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes its batch and cache.

    Attributes:
        max_batch_requests: most sequences in one forward step.
        max_batch_tokens: most tokens (prefill + decode) in one forward step.
        cache_tokens: KV-cache capacity in tokens (on CPU; None on CUDA sizes it from free
            memory).
        page_size: tokens per cache page.
        threads: torch intra-op threads on CPU (None: all cores).
        device: "cpu", "cuda" or None (CUDA when available).
    """

    max_batch_requests: int = 32
    max_batch_tokens: int = 1024
    cache_tokens: int | None = 16384
    page_size: int = 32
    threads: int | None = None
    device: str | None = None


class _RowSampler(ContinuousBatchingLogitsProcessor):
    """Greedy and seeded rows (see the module docstring). Runs in the generation thread.

    The manager calls `prepare_tensor_args` (host side) right before the step that calls
    `__call__` (synchronous batching), so the row slots are read from the host list kept
    here, without a device sync.
    """

    supported_kwargs: dict[str, type] = {"sampler_slot": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.generators: dict[int, torch.Generator] = {}
        self._lock = threading.Lock()
        self._slots: list[int] | None = None

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(_NO_SLOT)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        slots = [
            r.state.logit_processor_kwargs.get("sampler_slot", _NO_SLOT)
            for r in requests_with_new_token
        ]
        self._slots = slots
        return torch.tensor(slots, dtype=torch.int32, device="cpu")

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = scores.size(0)  # [B, V]
        slots = self._slots[:rows] if self._slots is not None else None
        if slots is None or len(slots) != rows:
            slots = tensor_arg[:rows].tolist()
        forced_rows = [row for row, slot in enumerate(slots) if slot != _NO_SLOT]
        if not forced_rows:
            return scores
        chosen = scores.argmax(dim=-1)  # [B]
        for row, slot in enumerate(slots):
            if slot >= 0:
                with self._lock:
                    generator = self.generators.get(slot)
                if generator is not None:
                    probs = torch.softmax(scores[row].float(), dim=-1).cpu()  # [V]
                    chosen[row] = int(torch.multinomial(probs, 1, generator=generator))
        index = torch.tensor(forced_rows, device=scores.device)
        forced = torch.full_like(scores[index], float("-inf"))  # [R, V]
        forced.scatter_(1, chosen[index].unsqueeze(-1), 0.0)
        scores = scores.clone()
        scores[index] = forced
        return scores


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas (never splitting a UTF-8 char)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, new_ids: list[int]) -> str:
        """Add token ids; return the text they complete (may be "" while a char is partial)."""
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


class StopMatcher:
    """Finds stop sequences in streamed text, holding back what could start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Feed text; return (text safe to emit, whether a stop sequence was reached)."""
        if not self.stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self._pending) - self._hold)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text, at the end of a request that hit no stop sequence."""
        out, self._pending = self._pending, ""
        return out


def _generation_config(tokenizer: Any, eos_ids: list[int]) -> GenerationConfig:
    # Non-default placeholders make the per-request temperature/top-k/top-p processors
    # exist; every request overrides all three.
    return GenerationConfig(
        do_sample=True,
        temperature=0.5,
        top_k=50,
        top_p=0.9,
        max_new_tokens=128,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


def pick_device(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when available (or asked for), else CPU fp32."""
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    target = torch.device(name)
    return target, (torch.bfloat16 if target.type == "cuda" else torch.float32)


class Engine:
    """A loaded model behind one persistent continuous-batching manager.

    Build with `Engine.load(...)` (blocking: run it in a thread from async code), then
    `start()`; `generate(...)` from the asyncio loop that called `start()`; `close()` is
    idempotent.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig,
        *,
        model_dir: Path | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.model_dir = model_dir
        self.device = model.device
        eos = [tokenizer.convert_tokens_to_ids(t) for t in (EOS_TOKEN, END_OF_TURN)]
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = sorted({i for i in eos if isinstance(i, int) and i >= 0})
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length
        )
        self._sampler = _RowSampler()
        self._slots = itertools.count()
        self._manager: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        tokenizer_dir: Path | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Load a checkpoint with `from_pretrained` from a local folder (blocking).

        Raises:
            Unavailable: the folder is missing or not a loadable checkpoint.
        """
        config = config or EngineConfig()
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise Unavailable(f"no model checkpoint (config.json) in {model_dir}")
        device, dtype = pick_device(config.device)
        if device.type == "cpu":
            # Explicit, so a shared machine is not oversubscribed by accident (and the
            # generation thread, which is not the caller, uses the same count).
            torch.set_num_threads(config.threads or os.cpu_count() or 1)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, local_files_only=True
        ).to(device)  # type: ignore[arg-type]
        model.eval()
        logger.info(
            "loaded %s on %s (%s, %d threads)", model_dir, device, dtype, torch.get_num_threads()
        )
        return cls(model, tokenizer, config, model_dir=model_dir)

    # ----------------------------------------------------------------------- lifecycle

    def _cb_config(self) -> ContinuousBatchingConfig:
        cfg = self.config
        on_cpu = self.device.type == "cpu"
        num_blocks = None
        if cfg.cache_tokens is not None and (on_cpu or cfg.device is not None):
            num_blocks = max(4, -(-cfg.cache_tokens // cfg.page_size))
        return ContinuousBatchingConfig(
            page_size=cfg.page_size,
            num_blocks=num_blocks,
            max_batch_tokens=cfg.max_batch_tokens,
            max_requests_per_batch=cfg.max_batch_requests,
            # The per-row sampler is Python logic inside the step: no graph capture, and
            # synchronous batching so its host-side slots match the step being run.
            use_cuda_graph=False,
            use_async_batching=False,
            per_request_processors=True,
            allow_block_sharing=True,
        )

    def start(self) -> None:
        """Create the manager and start its generation thread (call from the asyncio loop)."""
        if self._manager is not None:
            return
        self._loop = asyncio.get_running_loop()
        manager = self.model.init_continuous_batching(
            generation_config=_generation_config(self.tokenizer, self.eos_ids),
            continuous_batching_config=self._cb_config(),
        )
        processors = manager.logit_processor
        processors.logits_processor.append(self._sampler)
        processors.tensors_required += 1
        processors.supported_keys.update(self._sampler.supported_kwargs)
        processors.do_processing = True
        manager.start()
        self._manager = manager

    def close(self, timeout: float = 10.0) -> None:
        """Stop the generation thread (pending requests fail). Idempotent."""
        if self._closed:
            return
        self._closed = True
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop(block=True, timeout=timeout, hard_stop=True)

    @property
    def healthy(self) -> bool:
        """The generation thread is alive."""
        return self._manager is not None and self._manager.is_running()

    # ------------------------------------------------------------------------- requests

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _processor_kwargs(self, sampling: SamplingParams, slot: int | None) -> dict[str, Any]:
        greedy = sampling.temperature <= 1e-5
        top_k = sampling.top_k if 0 < sampling.top_k < self.vocab_size else self.vocab_size
        return {
            "temperature": 1.0 if greedy else float(sampling.temperature),
            "top_k": self.vocab_size if greedy else int(top_k),
            "top_p": 1.0 if greedy else float(sampling.top_p),
            "sampler_slot": _GREEDY if greedy else (slot if slot is not None else _NO_SLOT),
        }

    def _forget(self, request_id: str, slot: int | None) -> None:
        manager = self._manager
        if manager is not None:
            with manager.output_router._lock:
                manager.output_router.result_handlers.pop(request_id, None)
        if slot is not None:
            with self._sampler._lock:
                self._sampler.generators.pop(slot, None)

    def cancel(self, request_id: str) -> None:
        """Stop a request: its cache blocks are freed at the scheduler's next step."""
        if self._manager is not None:
            self._manager.cancel_request(request_id)

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[Delta]:
        """Stream a request's output. Closing the iterator early cancels the request.

        Raises:
            BadRequest: empty prompt, or prompt + max_tokens beyond the context window.
            Unavailable: the engine is not running.
            Internal: the request failed inside the model.
        """
        manager = self._manager
        if manager is None or not manager.is_running():
            raise Unavailable("the generation engine is not running")
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        if len(prompt_ids) + sampling.max_tokens > self.context_length:
            raise BadRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) exceeds "
                f"the context window of {self.context_length} tokens",
                param="max_tokens",
            )
        slot: int | None = None
        if sampling.seed is not None and sampling.temperature > 1e-5:
            slot = next(self._slots) % (2**31 - 1)
            generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
            with self._sampler._lock:
                self._sampler.generators[slot] = generator
        queue: asyncio.Queue[Any] = asyncio.Queue()
        manager.register_result_handler(request_id, queue.put_nowait)
        finished = False
        try:
            accepted = manager.add_request(
                prompt_ids,
                request_id=request_id,
                max_new_tokens=sampling.max_tokens,
                streaming=True,
                eos_token_id=-1 if sampling.ignore_eos else self.eos_ids,
                **self._processor_kwargs(sampling, slot),
            )
            if accepted is None:
                finished = True
                raise Unavailable("the generation engine is not accepting requests")
            detok = IncrementalDetokenizer(self.tokenizer)
            stops = StopMatcher(sampling.stop)
            seen = 0
            while True:
                output = await queue.get()
                if output.status == RequestStatus.FAILED:
                    finished = True
                    raise Internal(f"generation failed: {output.error or 'unknown error'}")
                new_ids = list(output.generated_tokens[seen:])
                seen = len(output.generated_tokens)
                done = output.is_finished()
                hit_eos = (
                    done
                    and not sampling.ignore_eos
                    and bool(new_ids)
                    and new_ids[-1] in self.eos_ids
                )
                text_ids = new_ids[:-1] if hit_eos else new_ids
                text, stopped = stops.push(detok.push(text_ids))
                if stopped or done:
                    finished = done
                    if not stopped:
                        text += stops.flush()
                    reason = "stop" if stopped or hit_eos else "length"
                    yield Delta(
                        text=text,
                        token_ids=new_ids,
                        finish_reason=reason,
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=seen,
                    )
                    return
                if text or new_ids:
                    yield Delta(text=text, token_ids=new_ids)
        finally:
            if not finished:
                self.cancel(request_id)
            self._forget(request_id, slot)

"""The cloud generation engine: one loaded model behind step-level dynamic batching.

`Engine` loads a checkpoint (`pick_device`: CUDA when there is one; bf16 where the hardware
does bf16 math, else fp32), turns each request into a `Ticket` for its one generation thread
(`cloud.scheduler`) and streams the tokens back as `Delta`s, detokenized incrementally and
matched against stop strings (`cloud.text`, `serving.stops`), with log-probabilities when
asked for.

Why its own batching rather than transformers' `generate`: requests join and leave the
running batch between steps, so a new request does not wait for the running ones to end;
the KV cache is one preallocated slab per layer written in place, where transformers'
`DynamicLayer` copies the whole cache on every step (`cloud.batching`); each row samples
with its own settings, seed, penalties and grammar (`cloud.sampling`). The model is driven
through its forward with a transformers `Cache` of the engine's own layers, so only
full-attention models are served. Each round of the generation thread:

1. drops cancelled rows (marked dead; the slab is compacted once a quarter are dead);
2. admits waiting requests in FIFO order while the rows (`max_batch_requests`) and the
   tokens admitted (prompt + max_tokens, `cache_tokens`) allow; a request alone always
   gets in;
3. prefills the admitted requests in groups of similar prompt length, `max_batch_tokens`
   per forward, one chunk per round, then merges a finished group into the running batch;
4. runs one decode step for every running row (per-row `position_ids`; on SDPA models
   attention per range of rows of similar length, `cloud.attention`) and samples per row;
   when rows hold drafts, a step that checks them all in one forward (`cloud.speculative`).

Threads: `torch.set_num_threads(threads)` where the model is loaded and in the generation
thread; the model is loaded in a thread that ends (`call_in_fresh_thread`: idle OpenMP pools
that outnumber the cores slow every thread's parallel regions). `hybridgen bench
cloud-batching` (`hybridgen.benches.cloud_batching`) measures the engine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, DynamicLayer

from broker.errors import BadRequest, Unavailable
from broker.wire import FinishReason
from cloud import attention
from cloud.sampling import RowSampling, RowScore
from cloud.scheduler import Scheduler, Ticket, Timeline
from cloud.settings import VERIFY_TOKENS
from cloud.text import IncrementalDetokenizer, push_text
from serving.context import settle_max_tokens
from serving.drafts import DraftControl, DraftSettings
from serving.grammar import Grammar
from serving.penalties import TokenCounts
from serving.sampling import SamplingParams
from serving.stops import StopMatcher

__all__ = [
    "Delta",
    "Engine",
    "EngineConfig",
    "IncrementalDetokenizer",
    "SamplingParams",
    "StopMatcher",
    "call_in_fresh_thread",
    "cpu_supports_bf16",
    "pick_device",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Delta:
    """One step of a request's output: new text and token ids; `finish_reason` on the last."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: When asked for (`SamplingParams.logprobs`): per token of `token_ids` but an end token,
    #: (its text decoded alone, its log-probability, the top tokens as (text, log-prob)).
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] | None = None
    #: On the last: tokens drafted for the request, and how many the model accepted.
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes its batch and picks its device.

    Attributes:
        max_batch_requests: most rows in the running batch (prefilling rows included).
        max_batch_tokens: most prompt tokens (rows x columns) in one prefill forward; a
            longer prompt is prefilled in chunks, between decode steps of the running rows.
        cache_tokens: most tokens (prompt + max_tokens, summed) admitted at once; requests
            beyond it wait in FIFO order (None: no limit but the rows).
        threads: torch intra-op threads on CPU (None: all cores).
        device: "cpu", "cuda" or None (CUDA when available).
        dtype: "auto" (bf16 on CUDA and on CPUs with bf16 math, else fp32), "float32" or
            "bfloat16".
        bucketed_attention: on decode steps, attend per range of rows of similar length
            (`cloud.attention`; models on SDPA only).
        drafting: speculative decoding's drafts per row (`cloud.speculative`; 0 tokens: off).
        verify_tokens: most rows x columns of a step checking drafts (`speculative.propose`).
    """

    max_batch_requests: int = 32
    max_batch_tokens: int = 1024
    cache_tokens: int | None = 16384
    threads: int | None = None
    device: str | None = None
    dtype: str = "auto"
    bucketed_attention: bool = True
    drafting: DraftSettings = field(default_factory=DraftSettings)
    verify_tokens: int = VERIFY_TOKENS


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bf16 math natively (AVX512_BF16 or AMX, from /proc/cpuinfo)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).lower()
    if "amx" in capability:
        return True
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def pick_device(device: str | None = None, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) to run on: CUDA when available (or asked for), bf16 where supported.

    Raises:
        ValueError: `dtype` is not "auto", "float32" or "bfloat16".
    """
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        bf16 = target.type == "cuda" or (target.type == "cpu" and cpu_supports_bf16())
        return target, (torch.bfloat16 if bf16 else torch.float32)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, float32 or bfloat16")
    return target, DTYPES[dtype]


def _threads(config: EngineConfig) -> int:
    return config.threads or os.cpu_count() or 1


def call_in_fresh_thread(function: Callable[[], T]) -> T:
    """Run `function` in a new thread that ends with it; return its result (or raise).

    For torch work outside the generation thread (loading the model, a benchmark's
    reference run). libgomp keeps an OpenMP pool for every thread that ever ran a parallel
    region, and once its pools hold more threads than there are cores it cuts the spinning
    of idle workers short: each parallel region then waits for its workers to wake up, and
    the generation thread's decode steps slow down whenever the model was loaded in an
    asyncio worker thread that stays alive. A thread that ends frees its pool.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = function()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="hg-engine-torch")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The model's own stop tokens: generation config's eos ids plus the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(getattr(tokenizer, "eos_token_id", None))
    return sorted({int(i) for i in ids if isinstance(i, int) and i >= 0})


class Engine:
    """A loaded model behind one persistent step-level batching loop.

    Build with `Engine.load(...)` (blocking: run it in a thread from async code), then
    `start()`; `generate(...)` from any asyncio loop; `close()` is idempotent.
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
        self.eos_ids = _eos_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = int(
            getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length
        )
        pad = tokenizer.pad_token_id
        sdpa = attention.implementation(model) in ("sdpa", attention.NAME)
        buckets = sdpa and config.bucketed_attention and attention.install(model)
        self._scheduler = Scheduler(
            forward=self._forward,
            num_layers=_check_cache_layout(model),
            pad_id=int(pad if pad is not None else (self.eos_ids or [0])[0]),
            device=self.device,
            max_rows=config.max_batch_requests,
            max_tokens=config.cache_tokens,
            prefill_tokens=config.max_batch_tokens,
            threads=_threads(config) if self.device.type == "cpu" else None,
            sdpa_mask=sdpa,
            buckets=buckets,
            verify_tokens=config.verify_tokens,
        )
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._lltokenizer: Any = None  # llguidance's view of the tokenizer, made once
        self._lltokenizer_lock = threading.Lock()

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
        device, dtype = pick_device(config.device, config.dtype)

        def load_model() -> Any:
            if device.type == "cpu":
                # Explicit, so a shared machine is not oversubscribed by accident (the
                # generation thread sets the same count for itself).
                torch.set_num_threads(_threads(config))
            loaded = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, local_files_only=True
            ).to(device)  # type: ignore[arg-type]
            return loaded.eval()

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        model = call_in_fresh_thread(load_model)
        logger.info("loaded %s on %s (%s, %d threads)", model_dir, device, dtype, _threads(config))
        engine = cls(model, tokenizer, config, model_dir=model_dir)
        engine.grammar_tokenizer()  # ~1 s for a 49k vocabulary: at load, not on a request
        return engine

    def grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer for constrained rows (`llguidance.hf.from_tokenizer`),
        built on first use and kept (blocking; thread-safe)."""
        with self._lltokenizer_lock:
            if self._lltokenizer is None:
                import llguidance.hf

                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, eos_token=self.eos_ids or None
                )
            return self._lltokenizer

    def _matcher(self, grammar: Grammar) -> Any:
        """A fresh `LLMatcher` for one request (blocking: compiles the grammar).

        Raises:
            BadRequest: the grammar does not compile for this tokenizer (`response_format`).
        """
        import llguidance

        matcher = llguidance.LLMatcher(self.grammar_tokenizer(), grammar.llguidance(), log_level=0)
        if matcher.is_error():
            raise BadRequest(
                f"the cloud model cannot decode under this {grammar.kind} grammar: "
                f"{matcher.get_error()}",
                param="response_format",
            )
        return matcher

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the generation thread (idempotent; call from the asyncio loop)."""
        self._scheduler.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the generation thread; requests still in flight fail. Idempotent."""
        self._scheduler.close(timeout)

    @property
    def healthy(self) -> bool:
        """The generation thread is alive."""
        return self._scheduler.running

    def stats(self) -> dict[str, float]:
        """Requests in flight; waiting, pending, prefilling and running rows; batch rows and
        width; tokens admitted; cumulative prefill/decode/rebuild counters and seconds."""
        return self._scheduler.stats()

    # ------------------------------------------------------------------------- requests

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        cache: Any, logits_to_keep: int,
    ) -> torch.Tensor:  # fmt: skip
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kwarg: cache},
        )
        return out.logits  # type: ignore[no-any-return]

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (no special tokens added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def cancel(self, request_id: str) -> None:
        """Stop a request: its row leaves the batch at the next step boundary."""
        self._scheduler.cancel(request_id)

    def _logprobs(
        self, scores: list[RowScore], ids: list[int]
    ) -> list[tuple[str, float, list[tuple[str, float]]]] | None:
        """`Delta.logprobs` of some tokens: their ids and top ids decoded to text alone."""
        if not scores:
            return None
        decode = self.tokenizer.decode
        return [
            (decode([token]), logprob, [(decode([i]), lp) for i, lp in top])
            for token, (logprob, top) in zip(ids, scores, strict=False)
        ]

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        *,
        grammar: Grammar | None = None,
        timeline: Timeline | None = None,
    ) -> AsyncGenerator[Delta, None]:
        """Stream a request's output (`timeline`: filled with its admission and prefill
        times). Closing the iterator early cancels the request.

        `grammar` constrains the output (`serving.grammar`): the row gets its own
        `llguidance.LLMatcher` (`cloud.sampling`), and ends with `stop` once it is complete.

        Raises:
            BadRequest: empty prompt, a request id already in flight, or a grammar that does
                not compile (`response_format`).
            ContextLengthExceeded: prompt + max_tokens beyond the context window.
            Unavailable: the engine is not running.
            Internal: the request failed inside the model.
        """
        if not self._scheduler.running:
            raise Unavailable("the generation engine is not running")
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        # The worker settles max_tokens (with its cap); unset here, the window is the limit.
        window = self.context_length
        max_tokens = settle_max_tokens(
            sampling.max_tokens, len(prompt_ids), window, cap=window, input_field="prompt"
        )
        row = RowSampling.create(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=sampling.seed,
            device=self.device,
            top_logprobs=sampling.top_logprobs if sampling.logprobs else -1,
            penalties=TokenCounts.of(sampling, prompt_ids),
        )
        drafts = None
        if grammar is not None:
            row.matcher = await asyncio.to_thread(self._matcher, grammar)
            row.end_token = (self.eos_ids or [0])[0]
        elif sampling.speculative and self.config.drafting.tokens > 0:
            drafts = DraftControl(self.config.drafting, prompt_ids)
        ticket = Ticket(
            request_id=request_id,
            prompt=list(prompt_ids),
            max_tokens=max_tokens,
            eos=frozenset() if sampling.ignore_eos else frozenset(self.eos_ids),
            sampling=row,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            drafts=drafts,
            timeline=timeline or Timeline(),
        )
        self._scheduler.submit(ticket)
        try:
            async for delta in self._stream(ticket, StopMatcher(sampling.stop)):
                yield delta
        finally:
            if not ticket.done:  # closed early, or ended by a stop string
                self._scheduler.cancel(request_id)
            self._scheduler.forget(ticket)

    async def _stream(self, ticket: Ticket, stops: StopMatcher) -> AsyncGenerator[Delta, None]:
        """A submitted request's deltas, the last with its finish reason and counts; a stop
        string ends it at the token that completes it."""
        detok = IncrementalDetokenizer(self.tokenizer)
        count = 0
        while True:
            new_ids, reason, scores = await _next_output(ticket.queue)
            hit_eos = reason == "eos"
            text, used = push_text(detok, stops, new_ids[:-1] if hit_eos else new_ids)
            stopped = used is not None
            if stopped:
                new_ids, scores, hit_eos = new_ids[:used], scores[:used], False
            count += len(new_ids)
            logprobs = self._logprobs(scores[:-1] if hit_eos else scores, new_ids)
            if not stopped and reason is None:
                if text or new_ids:
                    yield Delta(text=text, token_ids=new_ids, logprobs=logprobs)
                continue
            counts = (ticket.drafts.drafted, ticket.drafts.accepted) if ticket.drafts else (0, 0)
            yield Delta(
                text=text if stopped else text + stops.flush(),
                token_ids=new_ids,
                finish_reason="stop" if stopped or hit_eos else "length",
                prompt_tokens=len(ticket.prompt),
                completion_tokens=count,
                logprobs=logprobs,
                draft_tokens=counts[0],
                accepted_tokens=counts[1],
            )
            return


async def _next_output(
    queue: asyncio.Queue[Any],
) -> tuple[list[int], str | None, list[RowScore]]:
    """Everything the generation thread has posted so far, coalesced: (new ids, reason, their
    scores: empty unless the request asked for log-probabilities).

    Raises:
        HybridgenError: the request failed (the error the thread posted).
    """
    ids: list[int] = []
    scores: list[RowScore] = []
    item = await queue.get()
    while True:
        if isinstance(item, BaseException):
            raise item
        new_ids, reason, new_scores = item
        ids.extend(new_ids)
        scores.extend(new_scores or ())
        if reason is not None or queue.empty():
            return ids, reason, scores
        item = queue.get_nowait()


def _check_cache_layout(model: Any) -> int:
    """Cache layers of the model; the engine's slab cache handles full attention only.

    Raises:
        Unavailable: the model has sliding-window, linear or otherwise special cache layers.
    """
    layers = DynamicCache(config=model.config).layers
    odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if odd:
        raise Unavailable(
            "the cloud engine supports full-attention models only (cache layers: "
            f"{', '.join(sorted(odd))})"
        )
    return len(layers) or int(model.config.get_text_config().num_hidden_layers)

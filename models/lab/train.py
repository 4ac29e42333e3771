"""Training and evaluation of the small Llama models on CPU.

Deterministic given the seed and the thread count: fixed step counts (never a time budget),
a seeded generator for batch sampling, `torch.set_num_threads` set explicitly. bf16 autocast
is used only where the CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere it is
slower than fp32.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from models.lab.profiles import ModelSpec

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (flags avx512_bf16 or amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def encode_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of `texts` concatenated, each document followed by EOS. Shape: (N,)."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
    ids: list[int] = []
    for encoding in backend.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def llama_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The LlamaConfig of a model spec, with the tokenizer's special ids."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.context_length,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def _sample_batch(
    stream: torch.Tensor, window: int, batch: int, gen: torch.Generator
) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - window - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + window + 1] for s in starts.tolist()])  # (B, window+1)


def train_model(
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    stream: torch.Tensor,
    *,
    seed: int,
    threads: int,
    desc: str,
    progress: bool = True,
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Train a fresh Llama model on random windows of `stream`.

    Args:
        spec: shape and schedule.
        tokenizer: the shared tokenizer (vocabulary and special ids).
        stream: training token ids, shape (N,), N > window.
        seed: seeds weights and batch order.
        threads: torch intra-op threads.
        desc: progress-bar label.
        progress: show a tqdm bar (step, loss, time left) on stderr.

    Returns:
        The model in eval mode (fp32) and training statistics.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    window = min(spec.window, stream.numel() - 2)
    model = LlamaForCausalLM(llama_config(spec, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    warmup = max(1, spec.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, spec.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    gen = torch.Generator().manual_seed(seed)
    use_bf16 = cpu_has_native_bf16()
    started = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(range(spec.steps), desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        batch = _sample_batch(stream, window, spec.batch_size, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    model.eval()
    stats = {
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "window": window,
        "tokens_seen": spec.steps * spec.batch_size * window,
        "train_tokens": int(stream.numel()),
        "final_loss": round(loss_value, 4),
        "seconds": round(time.perf_counter() - started, 1),
        "bf16_autocast": use_bf16,
        "threads": threads,
        "seed": seed,
    }
    logger.info("%s trained: %s", desc, stats)
    return model, stats


@torch.no_grad()
def negative_log_likelihood(
    model: torch.nn.Module, stream: torch.Tensor, window: int, max_windows: int
) -> tuple[float, int]:
    """Summed NLL and token count on non-overlapping windows of `stream` (at most
    `max_windows`); perplexity is `exp(nll / tokens)`."""
    model.eval()
    window = min(window, stream.numel() - 1)
    count = min(max_windows, (stream.numel() - 1) // window)
    if count < 1:
        raise ValueError("held-out text is shorter than one evaluation window")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, count * window, window * 8):
        rows = [
            stream[s : s + window + 1]
            for s in range(start, min(start + window * 8, count * window), window)
        ]
        batch = torch.stack(rows)  # (B, window+1)
        logits = model(input_ids=batch[:, :-1]).logits.float()  # (B, window, V)
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return total_nll, total_tokens


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

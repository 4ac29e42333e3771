"""Each end's quality on the held-out prompts (`calibration_set`), and what the edge reads.

- `score_edge`: the edge build (int4), through onnxruntime-genai exactly as the edge serves
  it (`models.ort_edge.EdgeModel`: its tokenizer, chat template and prefill chunks), gives
  each prompt's teacher-forced continuation log-likelihood and the signals it can read:
  prompt perplexity and length at prefill, and a greedy draft's mean log-probability, low
  quantile of token probabilities and entropy.
- `score_cloud`: the cloud's checkpoint (torch, its own tokenizer and chat template) gives
  its continuation log-likelihood. Both qualities are per edge token, so two tokenizers
  compare.
- `measure`: both, as per-prompt `Records` the calibration and the bench read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.errors import BadRequest
from models.lab.calibration_set import EvalPrompt
from models.logits import log_softmax, teacher_forced
from models.ort_edge import new_generator
from models.scoring import encode_with_span, scored_positions

#: Greedy draft tokens read for the draft signals.
DRAFT_TOKENS = 8
#: Low quantile of the draft's token probabilities (`draft_low_quantile`).
LOW_QUANTILE = 0.1


@dataclass
class EdgeScore:
    """What the edge reads on one prompt, and its continuation log-likelihood per half."""

    log_perplexity: float
    scored_tokens: int
    prompt_tokens: int
    draft_mean_logprob: float
    draft_low_quantile: float
    entropy: float
    loglik: tuple[float, float]


@dataclass
class Records:
    """Per-prompt figures of one pair: prompts, edge and cloud scores."""

    prompts: list[EvalPrompt]
    edge: list[EdgeScore]
    cloud: list[tuple[float, float]]
    seconds: dict[str, float] = field(default_factory=dict)

    def arrays(self, split: str | None = None) -> dict[str, np.ndarray]:
        """Per-prompt arrays (qualities, gaps, signal inputs) of one split (None: all)."""
        keep = [i for i, p in enumerate(self.prompts) if split is None or p.split == split]
        n1 = np.array([self.prompts[i].first_tokens for i in keep], dtype=np.float64)
        n2 = np.array([self.prompts[i].second_tokens for i in keep], dtype=np.float64)
        e1 = np.array([self.edge[i].loglik[0] for i in keep])
        e2 = np.array([self.edge[i].loglik[1] for i in keep])
        c1 = np.array([self.cloud[i][0] for i in keep])
        c2 = np.array([self.cloud[i][1] for i in keep])
        out = {
            "q_edge": (e1 + e2) / (n1 + n2),
            "q_cloud": (c1 + c2) / (n1 + n2),
            "gap_first": (c1 - e1) / n1,
            "gap_second": (c2 - e2) / n2,
            "question": np.array([self.prompts[i].kind == "question" for i in keep]),
            "free_form": np.array([self.prompts[i].free_form for i in keep], dtype=bool),
            "in_domain": np.array([self.prompts[i].in_domain for i in keep]),
        }
        out["gap"] = out["q_cloud"] - out["q_edge"]
        for name in (
            "log_perplexity",
            "scored_tokens",
            "prompt_tokens",
            "draft_mean_logprob",
            "draft_low_quantile",
            "entropy",
        ):
            out[name] = np.array([getattr(self.edge[i], name) for i in keep], dtype=np.float64)
        return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Whole-row log-softmax in float64 (`models.logits.log_softmax`)."""
    return np.asarray(log_softmax(np.asarray(logits, dtype=np.float64)))


def edge_logprobs(edge: Any, ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced `log p(ids[i] | ids[:i])` for i = 1..n-1, through onnxruntime-genai.

    The ids go in chunks, as the edge runtime prefills a prompt
    (`models.logits.teacher_forced`, as `models.scoring.prefill` does).
    """
    generator = new_generator(edge.model, min(edge.context_length, len(ids) + 1))
    out: list[float] = []
    for rows, targets in teacher_forced(generator, ids, range(1, len(ids))):
        out.extend(_log_softmax(rows)[np.arange(rows.shape[0]), targets].tolist())
    return np.asarray(out)


def edge_draft(
    edge: Any, prompt: Sequence[int], k: int = DRAFT_TOKENS
) -> list[tuple[float, float]]:
    """Greedy draft of up to `k` tokens: (log-probability, entropy of its distribution) each."""
    room = min(k, edge.context_length - len(prompt))
    if room < 1:
        return []
    generator = new_generator(edge.model, len(prompt) + room, do_sample=False)
    generator.append_tokens(list(prompt))
    steps: list[tuple[float, float]] = []
    for step in range(room):
        logits = np.asarray(generator.get_logits()).reshape(-1)[-edge.vocab_size :]
        logp = _log_softmax(logits)
        token = int(logp.argmax())
        steps.append((float(logp[token]), float(-(np.exp(logp) * logp).sum())))
        if token in edge.stop_token_ids or step + 1 == room:
            break
        generator.append_tokens([token])
    return steps


def _edge_prompt(edge: Any, prompt: EvalPrompt) -> tuple[list[int], tuple[int, int]]:
    """The prompt's ids and scored span, as the edge serves it (chat: content tokens only)."""
    if prompt.kind == "question":
        chat = edge.render_chat([{"role": "user", "content": prompt.content}])
        begin = chat.rindex(prompt.content)
        return encode_with_span(edge.encode, chat, (begin, begin + len(prompt.content)))
    return encode_with_span(edge.encode, prompt.content, None)


def fits(edge: Any, prompt: EvalPrompt) -> bool:
    """Whether the prompt and its continuation fit the edge's context window (a question
    for a model without a chat template does not)."""
    try:
        ids, _ = _edge_prompt(edge, prompt)
    except BadRequest:
        return False
    total = len(ids) + len(edge.encode(prompt.first)) + len(edge.encode(prompt.second))
    return bool(total < edge.context_length)


def score_edge(edge: Any, prompts: Sequence[EvalPrompt]) -> list[EdgeScore]:
    """The edge's signals and continuation log-likelihoods (see the module docstring)."""
    scores = []
    for prompt in prompts:
        ids, span = _edge_prompt(edge, prompt)
        first, second = edge.encode(prompt.first), edge.encode(prompt.second)
        lp = edge_logprobs(edge, ids + first + second)
        positions = scored_positions(len(ids), span)
        scored = lp[positions.start - 1 : positions.stop - 1]
        cont = lp[len(ids) - 1 :]
        draft = edge_draft(edge, ids)
        logps = np.array([s[0] for s in draft]) if draft else np.zeros(1)
        scores.append(
            EdgeScore(
                log_perplexity=float(-scored.mean()) if scored.size else 0.0,
                scored_tokens=len(positions),
                prompt_tokens=len(ids),
                draft_mean_logprob=float(logps.mean()),
                draft_low_quantile=float(np.quantile(np.exp(logps), LOW_QUANTILE)),
                entropy=float(np.mean([s[1] for s in draft])) if draft else 0.0,
                loglik=(float(cont[: len(first)].sum()), float(cont[len(first) :].sum())),
            )
        )
    return scores


def score_cloud(
    model: Any, tokenizer: Any, prompts: Sequence[EvalPrompt], *, context_length: int
) -> list[tuple[float, float]]:
    """The cloud checkpoint's teacher-forced log-likelihood of each continuation half.

    A question is wrapped by the cloud tokenizer's own chat template. The prompt is cut from
    the left when prompt and continuation overflow `context_length`.
    """
    import torch

    model.eval()
    out = []
    for prompt in prompts:
        text = prompt.content
        if prompt.kind == "question":
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.content}],
                tokenize=False,
                add_generation_prompt=True,
            )
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        first = tokenizer(prompt.first, add_special_tokens=False)["input_ids"]
        second = tokenizer(prompt.second, add_special_tokens=False)["input_ids"]
        head = head[max(0, len(head) + len(first) + len(second) - context_length) :] or head[-1:]
        ids = torch.tensor([head + first + second])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(head) - 1 :]
        out.append((float(picked[: len(first)].sum()), float(picked[len(first) :].sum())))
    return out


def measure(
    edge: Any,
    cloud: Any,
    tokenizer: Any,
    prompts: list[EvalPrompt],
    *,
    cloud_context: int,
) -> Records:
    """Score every prompt at both ends (those that fit the edge's context window)."""
    started = time.perf_counter()
    prompts = [p for p in prompts if fits(edge, p)]
    edge_scores = score_edge(edge, prompts)
    edge_s = time.perf_counter() - started
    cloud_scores = score_cloud(cloud, tokenizer, prompts, context_length=cloud_context)
    return Records(
        prompts,
        edge_scores,
        cloud_scores,
        {"edge_s": round(edge_s, 2), "cloud_s": round(time.perf_counter() - started - edge_s, 2)},
    )

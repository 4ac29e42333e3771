"""Routing quality measured on held-out prompts with their true continuations.

Used by the build (the edge's default routing signal and threshold, stored in the manifest's
`routing` section) and by `hybridgen bench routing` (the curves). Steps:

1. `eval_set`: a deterministic set of held-out prompts, each with its true continuation cut
   in two halves: documentation passages of varied length and question-shaped chat messages
   (the held-out documents' questions and answers, `models.corpus`), inside and outside the
   edge's domain. Every other prompt of each kind and side is in the `fit` split, the rest
   in `eval`.
2. `score_edge`: the edge build (int4), through onnxruntime-genai exactly as the edge serves
   it (`models.ort_edge.EdgeModel`: its tokenizer, chat template and prefill chunks), gives
   each prompt's teacher-forced continuation log-likelihood and the signals it can read:
   prompt perplexity and length at prefill, and a greedy draft's mean log-probability, low
   quantile of token probabilities and entropy.
3. `score_cloud`: the cloud's checkpoint (torch, its own tokenizer and chat template) gives
   its continuation log-likelihood. Both qualities are per edge token, so two tokenizers
   compare.
4. `calibrate_signal`: on the fit split, the edge's prefill signal (plain or
   length-normalised prompt perplexity) and the threshold that recovers the target share of
   the edge-to-cloud gap (`models.calibration_quality`).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker.errors import BadRequest
from models import calibration_quality as cq
from models.corpus import Corpus, _question_answer
from models.scoring import PREFILL_CHUNK, encode_with_span, scored_positions

logger = logging.getLogger(__name__)

#: Continuation tokens (edge tokenizer) scored per prompt, in two halves.
CONTINUATION_TOKENS = 32
#: Greedy draft tokens read for the draft signals.
DRAFT_TOKENS = 8
#: Low quantile of the draft's token probabilities (`draft_low_quantile`).
LOW_QUANTILE = 0.1
#: Shortest / longest passage prompt (edge tokens).
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 6, 96
#: Signals the edge's default policy can apply at prefill (the build chooses among them).
PREFILL_SIGNALS = ("prompt_perplexity", "perplexity_by_length", "prefill_learned")


@dataclass
class EvalPrompt:
    """One held-out prompt and its true continuation (`first` + `second` half)."""

    kind: str  # "passage" (completion prompt) or "question" (a chat user message)
    in_domain: bool
    content: str
    first: str
    second: str
    split: str = "fit"
    #: Edge tokens of each half (the quality's denominator at both ends).
    first_tokens: int = 0
    second_tokens: int = 0
    #: A question in a user's own words, not the lab's training template (`free_form`).
    free_form: bool = False


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


# --------------------------------------------------------------------------- data


def _halves(encode: Any, decode: Any, text: str) -> tuple[str, str, int, int] | None:
    """Cut `text` to CONTINUATION_TOKENS edge tokens, in two halves of whole tokens."""
    ids = encode(text)[:CONTINUATION_TOKENS]
    if len(ids) < 8:
        return None
    half = len(ids) // 2
    first, second = decode(ids[:half]), decode(ids[half:])
    n1, n2 = len(encode(first)), len(encode(second))
    if not first or not second or n1 == 0 or n2 == 0:
        return None
    return first, second, n1, n2


def eval_set(
    corpus: Corpus,
    encode: Any,
    decode: Any,
    *,
    limit: int = 400,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    seed: int = 0,
) -> list[EvalPrompt]:
    """Up to `limit` held-out prompts: per side, two thirds passages and a third questions.

    Deterministic given the corpus and the seed. Passages are cut round-robin over the
    held-out documents (prompt length drawn in MIN..`max_prompt_tokens` tokens, then the next
    CONTINUATION_TOKENS); questions are the documents' own (`models.corpus`), answered by
    the document's first prose.
    """
    rng = random.Random(seed)
    top = max(MIN_PROMPT_TOKENS, max_prompt_tokens)
    out: list[EvalPrompt] = []
    for in_domain in (True, False):
        docs = [
            d for d in corpus.documents if d.held_out and (d.source in corpus.domain) == in_domain
        ]
        # Per document: its question as the lab models were taught to read it, and in a
        # user's own words (`free_form`); both fall in the same split.
        questions: list[list[EvalPrompt]] = []
        for doc in docs:
            pair = _question_answer(doc)
            cut = _halves(encode, decode, " ".join(pair[1].split())) if pair else None
            if pair and cut:
                asked = [EvalPrompt("question", in_domain, pair[0], *cut[:2], "", *cut[2:])]
                reworded = free_form(pair[0])
                if reworded:
                    asked.append(
                        EvalPrompt("question", in_domain, reworded, *cut[:2], "", *cut[2:], True)
                    )
                questions.append(asked)
        windows: list[list[EvalPrompt]] = []
        for doc in docs:
            ids = encode(doc.text)
            found, start = [], 0
            while True:
                size = rng.randint(MIN_PROMPT_TOKENS, top)
                if start + size + CONTINUATION_TOKENS > len(ids):
                    break
                cut = _halves(
                    encode, decode, decode(ids[start + size : start + size + CONTINUATION_TOKENS])
                )
                if cut:
                    prompt = decode(ids[start : start + size])
                    found.append(EvalPrompt("passage", in_domain, prompt, *cut[:2], "", *cut[2:]))
                start += size + CONTINUATION_TOKENS
            if found:
                windows.append(found)
        side = limit // 2
        asked_docs: list[list[EvalPrompt]] = []
        while questions and sum(map(len, asked_docs)) + len(questions[0]) <= side // 3:
            asked_docs.append(questions.pop(0))
        n_questions = sum(map(len, asked_docs))
        passages: list[EvalPrompt] = []
        depth = 0
        while len(passages) < side - n_questions and any(depth < len(w) for w in windows):
            for found in windows:
                if depth < len(found) and len(passages) < side - n_questions:
                    passages.append(found[depth])
            depth += 1
        for index, prompt in enumerate(passages):
            prompt.split = "fit" if index % 2 == 0 else "eval"
            out.append(prompt)
        for index, asked in enumerate(asked_docs):
            for prompt in asked:
                prompt.split = "fit" if index % 2 == 0 else "eval"
                out.append(prompt)
    return out


#: A lab question's wording (models.corpus) -> a user's own wording of it.
_REWORDINGS = (
    (re.compile(r"^What does the (.+) licence say\?$"), "Can you sum up the {0} licence for me?"),
    (re.compile(r"^What does (.+) do\?$"), "How do I use {0}, and when would I need it?"),
    (
        re.compile(r"^Tell me about (.+) in (.+)\.$"),
        "I am reading the {1} manual: how does {0} work?",
    ),
    (re.compile(r"^Explain (.+) in Python\.$"), "Quick question: how does {0} work in Python?"),
    (re.compile(r"^What is the Python module (.+) for\?$"), "Why would I import {0} in Python?"),
)


def free_form(question: str) -> str | None:
    """The question in a user's words rather than the template the lab models trained on.

    Short questions in words the edge never saw score a high perplexity whatever their
    domain; the evaluation set has both wordings of every question to measure that.
    """
    for pattern, wording in _REWORDINGS:
        match = pattern.match(question)
        if match:
            return wording.format(*match.groups())
    return None


# --------------------------------------------------------------------------- edge


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    return np.asarray(rows - peak - np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)))


def edge_logprobs(edge: Any, ids: Sequence[int]) -> np.ndarray:
    """Teacher-forced `log p(ids[i] | ids[:i])` for i = 1..n-1, through onnxruntime-genai.

    The ids go in PREFILL_CHUNK-token chunks, as the edge runtime prefills a prompt
    (`models.scoring.prefill`), reading each chunk's logits.
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(edge.model)
    params.set_search_options(max_length=min(edge.context_length, len(ids) + 1))
    generator = og.Generator(edge.model, params)
    out: list[float] = []
    for first in range(0, len(ids), PREFILL_CHUNK):
        last = min(len(ids), first + PREFILL_CHUNK)
        generator.append_tokens(list(ids[first:last]))
        logits = np.asarray(generator.get_output("logits"))[0]  # (last - first, V)
        rows = logits[: min(last, len(ids) - 1) - first]
        if rows.shape[0]:
            targets = np.asarray(ids[first + 1 : first + 1 + rows.shape[0]])
            out.extend(_log_softmax(rows)[np.arange(rows.shape[0]), targets].tolist())
    return np.asarray(out)


def edge_draft(
    edge: Any, prompt: Sequence[int], k: int = DRAFT_TOKENS
) -> list[tuple[float, float]]:
    """Greedy draft of up to `k` tokens: (log-probability, entropy of its distribution) each."""
    import onnxruntime_genai as og

    room = min(k, edge.context_length - len(prompt))
    if room < 1:
        return []
    params = og.GeneratorParams(edge.model)
    params.set_search_options(max_length=len(prompt) + room, do_sample=False)
    generator = og.Generator(edge.model, params)
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


# --------------------------------------------------------------------------- cloud


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


# --------------------------------------------------------------------------- calibration


def prefill_features(data: dict[str, np.ndarray]) -> np.ndarray:
    """What the edge knows at prefill: ln perplexity, ln scored tokens, chat (1) or not (0)."""
    return np.column_stack(
        [
            data["log_perplexity"],
            np.log(np.maximum(1.0, data["scored_tokens"])),
            data["question"].astype(np.float64),
        ]
    )


@dataclass(frozen=True)
class PrefillRule:
    """A prefill signal, fitted: send when `ln ppl > log_threshold(n, chat)` where
    `log_threshold = threshold + intercept + slope * ln n + chat_offset * chat`."""

    signal: str
    values: np.ndarray  # the signal on the prompts it was fitted on (higher: send)
    intercept: float = 0.0
    slope: float = 0.0
    chat_offset: float = 0.0
    #: The learned rule's log-odds -> ln-perplexity terms (its threshold maps through them).
    learned: cq.Logistic | None = None

    def routing(self, threshold: float) -> dict[str, float]:
        """The manifest fields that make the edge send when the signal is above `threshold`."""
        if self.learned is None:
            return {
                "signal_threshold": threshold,
                "length_intercept": self.intercept,
                "length_slope": self.slope,
                "chat_offset": self.chat_offset,
            }
        # score = w . (x - mean) / scale + bias > threshold, solved for ln ppl (w_p > 0).
        (w_p, w_n, w_c), (m_p, m_n, m_c), (s_p, s_n, s_c) = (
            self.learned.weights,
            self.learned.mean,
            self.learned.scale,
        )
        k = s_p / w_p
        constant = m_p + k * (threshold - self.learned.bias + w_n * m_n / s_n + w_c * m_c / s_c)
        return {
            "signal_threshold": float(constant),
            "length_intercept": 0.0,
            "length_slope": float(-k * w_n / s_n),
            "chat_offset": float(-k * w_c / s_c),
        }


def prefill_rules(data: dict[str, np.ndarray]) -> list[PrefillRule]:
    """The candidate prefill signals fitted on `data` (PREFILL_SIGNALS, in that order).

    `prompt_perplexity`: ln perplexity. `perplexity_by_length`: its residual over a least
    squares fit on length and chat (`calibration_quality.length_fit`): short prompts and chat
    messages read higher whatever their domain. `prefill_learned`: a logistic model of "gap
    above the median" on the three (dropped when it does not weigh perplexity up).
    """
    log_ppl, n, chat = data["log_perplexity"], data["scored_tokens"], data["question"]
    fit = cq.length_fit(log_ppl, n, chat)
    rules = [
        PrefillRule("prompt_perplexity", log_ppl),
        PrefillRule("perplexity_by_length", cq.normalised_perplexity(log_ppl, n, fit, chat), *fit),
    ]
    gap = data["gap"]
    labels = gap > np.median(gap)
    if 0 < labels.sum() < labels.size:
        model = cq.fit_logistic(prefill_features(data), labels)
        if model.weights[0] > 1e-6:
            rules.append(
                PrefillRule("prefill_learned", model.score(prefill_features(data)), learned=model)
            )
    return rules


def calibrate_signal(
    data: dict[str, np.ndarray], *, target: float = cq.DEFAULT_TARGET
) -> dict[str, Any]:
    """The manifest's routing fields for the best prefill signal on calibration prompts.

    Args:
        data: `Records.arrays("fit")`.
        target: share of the edge-to-cloud gap the threshold should recover.

    Returns:
        `signal` (one of PREFILL_SIGNALS), `signal_threshold`, `length_intercept`,
        `length_slope` and `chat_offset` (the edge sends a prompt of n scored tokens when
        `ln ppl > signal_threshold + length_intercept + length_slope * ln n + chat_offset *
        chat`; see `edge.routing.signal_threshold`), `target_recovered`,
        `expected_cloud_share`, `perplexity_threshold` (the threshold at `reference_tokens`
        scored tokens, the median, of a completion prompt), and `quality` (each candidate's
        cpt at the target and AUC); or only `quality` with `signal_skipped` when the cloud is
        not better on these prompts.
    """
    gap = data["gap"]
    candidates: dict[str, dict[str, Any]] = {}
    rules = {rule.signal: rule for rule in prefill_rules(data)}
    for name, rule in rules.items():
        c = cq.curve(gap, rule.values)
        candidates[name] = {"cpt": cq.cpt(c, target), "auc": cq.auc(gap, rule.values)}
        found = cq.threshold_at(rule.values, c, target)
        if found is not None:
            candidates[name]["threshold"], candidates[name]["share"] = found
    out: dict[str, Any] = {
        "quality": {
            "prompts": int(gap.size),
            "mean_gap": round(float(gap.mean()), 4) if gap.size else None,
            "candidates": {
                k: {"cpt": v["cpt"], "auc": None if v["auc"] is None else round(v["auc"], 4)}
                for k, v in candidates.items()
            },
        }
    }
    usable = [k for k in PREFILL_SIGNALS if "threshold" in candidates.get(k, {})]
    if not usable or float(gap.sum()) <= 0:
        out["signal_skipped"] = "the cloud does not do better than the edge on these prompts"
        return out
    # The smallest share for the target; ties go to the simpler signal (listed first).
    best = min(usable, key=lambda k: (candidates[k]["cpt"], PREFILL_SIGNALS.index(k)))
    fields = rules[best].routing(float(candidates[best]["threshold"]))
    reference = int(np.median(data["scored_tokens"]))
    log_at_reference = (
        fields["signal_threshold"]
        + fields["length_intercept"]
        + fields["length_slope"] * math.log(max(1, reference))
    )
    out.update(
        signal=best,
        **{k: round(v, 6) for k, v in fields.items()},
        target_recovered=target,
        expected_cloud_share=round(float(candidates[best]["share"]), 4),
        reference_tokens=reference,
        perplexity_threshold=round(math.exp(min(log_at_reference, 700.0)), 3),
    )
    return out


def calibrate_quality(
    edge: Any,
    cloud: Any,
    tokenizer: Any,
    corpus: Corpus,
    *,
    cloud_context: int,
    seed: int = 0,
    limit: int = 400,
    target: float = cq.DEFAULT_TARGET,
) -> dict[str, Any]:
    """The build's quality calibration: `calibrate_signal` on the fit split of `eval_set`.

    Only the fit split is scored; `hybridgen bench routing` measures the result on the
    other split.
    """
    started = time.perf_counter()
    prompts = eval_set(
        corpus,
        edge.encode,
        edge.decode,
        limit=limit,
        max_prompt_tokens=min(MAX_PROMPT_TOKENS, edge.context_length - CONTINUATION_TOKENS - 16),
        seed=seed,
    )
    fit = [p for p in prompts if p.split == "fit"]
    if len(fit) < 8:
        return {"signal_skipped": f"too little held-out text ({len(fit)} calibration prompts)"}
    records = measure(edge, cloud, tokenizer, fit, cloud_context=cloud_context)
    if len(records.prompts) < 8:
        scored = len(records.prompts)
        return {"signal_skipped": f"too few calibration prompts fit the edge ({scored})"}
    out = calibrate_signal(records.arrays(), target=target)
    out["quality"]["seconds"] = round(time.perf_counter() - started, 2)
    logger.info(
        "routing quality calibration: signal %s, threshold %s, expected cloud share %s",
        out.get("signal"),
        out.get("signal_threshold"),
        out.get("expected_cloud_share"),
    )
    return out

"""Routing quality, computed: what a routing signal buys in cloud share against quality.

Pure numpy (torch-free, no model): the build's calibration (`models.lab.calibration_eval`) and
`hybridgen bench routing` both feed it per-prompt figures and read the same curves.

Definitions (see docs/models.md, "Routing quality"):

- The *quality* of a model on a prompt is the mean teacher-forced log-likelihood of the
  prompt's true continuation (nats/token). The *gap* of a prompt is `q_cloud - q_edge`.
- A *signal* is a per-prompt score where higher means "more likely worth sending"; a
  threshold on it sends the top-scoring prompts to the cloud.
- Sending the top `k` of `n` prompts: share `k / n`, gap recovered
  `sum(gap of those sent) / sum(gap)`, gain over edge-only `sum(gap of those sent) / n`.
- `cpt(x)`: the smallest share whose gap recovered reaches `x`.
- `auc`: ROC AUC of the signal for "the prompt's gap is above the median gap" (0.5: random).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

#: Shares the JSON reports the gain at (`gain_at`).
GAIN_SHARES = (0.1, 0.2, 0.3, 1.0)
#: The share of the gap the build's threshold aims to recover.
DEFAULT_TARGET = 0.8


@dataclass(frozen=True)
class Curve:
    """Sending the top-k prompts by a signal, for k = 0..n.

    Attributes:
        order: prompt indices, most likely sent first.
        shares: k / n for k = 0..n.
        recovered: gap recovered after sending the first k (nan when the total gap is 0).
        gain: quality gain over edge-only after sending the first k (nats/token).
    """

    order: np.ndarray
    shares: np.ndarray
    recovered: np.ndarray
    gain: np.ndarray


def curve(gap: ArrayLike, score: ArrayLike) -> Curve:
    """The share-to-cloud against gap-recovered curve of `score` on prompts of `gap`.

    Prompts are sent in descending score; ties keep their input order (stable sort).
    """
    gaps = np.asarray(gap, dtype=np.float64)
    scores = np.asarray(score, dtype=np.float64)
    if gaps.shape != scores.shape or gaps.ndim != 1 or gaps.size == 0:
        raise ValueError("gap and score must be non-empty 1-D sequences of the same length")
    order = np.argsort(-scores, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(gaps[order])])
    n = gaps.size
    total = cumulative[-1]
    recovered = cumulative / total if total != 0 else np.full(n + 1, np.nan)
    return Curve(order, np.arange(n + 1) / n, recovered, cumulative / n)


def cpt(c: Curve, target: float) -> float | None:
    """Smallest share whose gap recovered reaches `target` (None: no gap to recover)."""
    if np.isnan(c.recovered).any() or c.recovered[-1] <= 0:
        return None
    reached = np.nonzero(c.recovered >= target - 1e-12)[0]
    return float(c.shares[reached[0]])


def gain_at(c: Curve, share: float) -> float:
    """Gain over edge-only (nats/token) when the top `round(share * n)` prompts are sent."""
    n = c.order.size
    return float(c.gain[min(n, max(0, round(share * n)))])


def area(c: Curve) -> float | None:
    """Area under the gap-recovered curve (trapezoids; 0.5 for a random router)."""
    if np.isnan(c.recovered).any():
        return None
    return float(np.trapezoid(c.recovered, c.shares))


def auc(gap: ArrayLike, score: ArrayLike) -> float | None:
    """ROC AUC of `score` for "gap above the median gap" (ties count one half)."""
    gaps = np.asarray(gap, dtype=np.float64)
    scores = np.asarray(score, dtype=np.float64)
    median = float(np.median(gaps))
    positive, negative = scores[gaps > median], scores[gaps <= median]
    if positive.size == 0 or negative.size == 0:
        return None
    pos, neg = positive[None, :], negative[:, None]
    wins = (pos > neg).sum() + 0.5 * (pos == neg).sum()
    return float(wins / (pos.size * neg.size))


def summary(gap: ArrayLike, score: ArrayLike) -> dict[str, float | None]:
    """`{"cpt50", "cpt80", "auc"}` of one signal."""
    c = curve(gap, score)
    found = auc(gap, score)
    return {
        "cpt50": cpt(c, 0.5),
        "cpt80": cpt(c, 0.8),
        "auc": None if found is None else round(found, 4),
    }


def oracle_cpt(gap: ArrayLike, target: float = 0.8) -> float | None:
    """cpt of the oracle: prompts sorted by their true gap."""
    return cpt(curve(gap, gap), target)


def split_half_cpt(
    first_half_gap: ArrayLike, second_half_gap: ArrayLike, target: float = 0.8
) -> float | None:
    """cpt of the split-half oracle: ranked by the first half's gap, scored on the second's.

    The per-prompt gap is noisy; a router that knew the first half of each continuation
    still cannot predict the second half better than this. It is the honest ceiling.
    """
    return cpt(curve(second_half_gap, first_half_gap), target)


def threshold_at(score: ArrayLike, c: Curve, target: float) -> tuple[float, float] | None:
    """The signal threshold that sends what recovers `target` of the gap, and that share.

    Prompts scoring above the threshold go to the cloud. It lies halfway between the last
    prompt sent and the next one (above the top score when none is sent); prompts tied with
    the last one sent are sent too. None when the curve has no gap to recover.
    """
    share = cpt(c, target)
    if share is None:
        return None
    scores = np.asarray(score, dtype=np.float64)[c.order]
    k = round(share * scores.size)
    # A cut between equal scores cannot be drawn: send the whole tie.
    while 0 < k < scores.size and scores[k - 1] - scores[k] <= 1e-9 * max(1.0, abs(scores[k])):
        k += 1
    share = k / scores.size
    if k >= scores.size:
        return float(scores[-1]) - 1.0, 1.0
    upper = float(scores[k - 1]) if k > 0 else float(scores[0]) + 1.0
    return (upper + float(scores[k])) / 2, share


def length_fit(
    log_perplexity: ArrayLike, scored_tokens: ArrayLike, chat: ArrayLike | None = None
) -> tuple[float, float, float]:
    """Least squares `ln ppl = intercept + slope * ln(scored tokens) + chat_offset * chat`.

    Short prompts have a higher perplexity whatever their domain (less context), and a chat
    message reads differently from a document; the residual of this fit is the
    normalised perplexity (`normalised_perplexity`). `chat` (1 for a chat message, 0 for a
    completion prompt) is left out when None or the same for every prompt (offset 0).

    Returns:
        (intercept, slope, chat_offset).
    """
    y = np.asarray(log_perplexity, dtype=np.float64)
    if y.size == 0:
        return 0.0, 0.0, 0.0
    x = np.log(np.maximum(1, np.asarray(scored_tokens, dtype=np.float64)))
    c = np.zeros_like(y) if chat is None else np.asarray(chat, dtype=np.float64)
    columns = {"intercept": np.ones_like(y), "slope": x, "chat_offset": c}
    used = [k for k, v in columns.items() if k == "intercept" or float(np.ptp(v)) > 0]
    coef, *_ = np.linalg.lstsq(np.column_stack([columns[k] for k in used]), y, rcond=None)
    found = dict(zip(used, coef.tolist(), strict=True))
    return found["intercept"], found.get("slope", 0.0), found.get("chat_offset", 0.0)


def normalised_perplexity(
    log_perplexity: ArrayLike,
    scored_tokens: ArrayLike,
    fit: tuple[float, float, float],
    chat: ArrayLike | None = None,
) -> np.ndarray:
    """`ln ppl - (intercept + slope * ln n + chat_offset * chat)`: above its expectation."""
    intercept, slope, offset = fit
    x = np.log(np.maximum(1, np.asarray(scored_tokens, dtype=np.float64)))
    c = 0.0 if chat is None else np.asarray(chat, dtype=np.float64)
    expected = intercept + slope * x + offset * c
    return np.asarray(np.asarray(log_perplexity, dtype=np.float64) - expected)


@dataclass(frozen=True)
class Logistic:
    """A small logistic model on standardised features (`fit_logistic`)."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Log-odds of "worth sending" for each row of `features`."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return np.asarray(z @ self.weights + self.bias)


def fit_logistic(
    features: np.ndarray, labels: ArrayLike, *, l2: float = 1.0, steps: int = 50
) -> Logistic:
    """Logistic regression (Newton's method, L2 penalty on the weights) on standardised data."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = np.hstack([(x - mean) / scale, np.ones((x.shape[0], 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty) + 1e-9 * np.eye(z.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return Logistic(mean, scale, w[:-1], float(w[-1]))


def policy_outcome(
    gap: ArrayLike, sent: ArrayLike, *, mask: ArrayLike | None = None
) -> dict[str, float | int | None]:
    """What one fixed policy (`sent[i]`: prompt i goes to the cloud) achieves.

    Returns `{"prompts", "cloud_share", "recovered", "gain"}` over the prompts in `mask`
    (all by default); `recovered` is None when those prompts have no gap to recover.
    """
    gaps = np.asarray(gap, dtype=np.float64)
    sends = np.asarray(sent, dtype=bool)
    keep = np.ones(gaps.size, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    gaps, sends = gaps[keep], sends[keep]
    if gaps.size == 0:
        return {"prompts": 0, "cloud_share": None, "recovered": None, "gain": None}
    total = float(gaps.sum())
    won = float(gaps[sends].sum())
    return {
        "prompts": int(gaps.size),
        "cloud_share": round(float(sends.mean()), 4),
        "recovered": round(won / total, 4) if total > 0 else None,
        "gain": round(won / gaps.size, 4),
    }


def rounded(values: Mapping[str, float | None], digits: int = 4) -> dict[str, float | None]:
    """`values` with every finite float rounded (None and non-finite become None)."""
    return {
        k: (round(v, digits) if v is not None and math.isfinite(v) else None)
        for k, v in values.items()
    }

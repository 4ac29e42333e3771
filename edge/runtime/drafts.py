"""Drafts for speculative decoding at the edge: the rule of `serving.drafts`, which the cloud
shares (prompt lookup, the user's n-gram cache as a `Predictor`, the back-off after failed
drafts, the counts a request reports). Kept here so the edge's modules import it from the
runtime they run in; `edge.runtime.speculative` checks the drafts."""

from __future__ import annotations

from serving.drafts import (
    DRAFT_CACHE_MIN_PROB,
    DRAFT_MIN_MATCH,
    DRAFT_TOKENS,
    MAX_BACKOFF,
    DraftControl,
    DraftSettings,
    Predictor,
    PromptLookup,
    cache_draft,
)

__all__ = [
    "DRAFT_CACHE_MIN_PROB",
    "DRAFT_MIN_MATCH",
    "DRAFT_TOKENS",
    "MAX_BACKOFF",
    "DraftControl",
    "DraftSettings",
    "Predictor",
    "PromptLookup",
    "cache_draft",
]

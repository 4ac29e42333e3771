"""Users of `hybridgen bench personalization`, built from text already on the machine.

Each real-text user is one coherent source (`personalization_sources`: one package's docs, one
kind of document), read in sorted file order; its documents are shuffled with a fixed seed and
split BY DOCUMENT: the first documents give the held-out samples, the next ones the feedback
samples, so no held-out sample shares a document with the feedback. A sample is a run of
`sample_tokens` consecutive tokens of one document (at most a few per document, so one long
file cannot be a whole user).

Chat-persona users are sentences from templates in one fixed style and vocabulary
(`personalization_personas`); feedback and held-out samples come from different fillings (two
seeds, and no held-out sentence is also a feedback sentence). Generic text comes from sources
no user has. A source that is missing on this machine is skipped (the JSON lists the users
actually built).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from hybridgen.benches.personalization_personas import PERSONAS, persona_sentences
from hybridgen.benches.personalization_sources import GENERIC_SOURCES, REAL_SOURCES, Documents

#: At most this many samples from one document, held-out and feedback alike (relaxed only when
#: a source has too few documents).
MAX_SAMPLES_PER_DOC = 4
SEED = 11

Encode = Callable[[str], list[int]]


@dataclass
class User:
    """One user of the bench: its feedback and held-out samples (token ids) and provenance."""

    name: str
    kind: str  # "prose", "docs", "code" or "persona"
    source: str
    feedback: list[list[int]] = field(default_factory=list)
    held_out: list[list[int]] = field(default_factory=list)
    feedback_documents: list[str] = field(default_factory=list)
    held_out_documents: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- samples


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)]


def split_samples(
    documents: Documents,
    encode: Encode,
    *,
    feedback: int,
    held_out: int,
    sample_tokens: int,
    seed: int = SEED,
) -> tuple[list[list[int]], list[list[int]], list[str], list[str]]:
    """Held-out and feedback samples from disjoint documents.

    The documents are shuffled with `seed`; the first ones fill the held-out samples, the
    rest the feedback samples, at most `MAX_SAMPLES_PER_DOC` per document unless the source
    runs short (then the same documents give more).

    Returns:
        (feedback samples, held-out samples, feedback document names, held-out document names)
    """
    order = list(documents)
    random.Random(seed).shuffle(order)
    pools: dict[str, list[list[list[int]]]] = {"held_out": [], "feedback": []}
    names: dict[str, list[str]] = {"held_out": [], "feedback": []}
    wanted = {"held_out": held_out, "feedback": feedback}
    split = "held_out"
    for name, text in order:
        if split == "held_out" and sum(min(len(c), MAX_SAMPLES_PER_DOC) for c in
                                       pools["held_out"]) >= held_out:  # fmt: skip
            split = "feedback"
        chunks = _chunks(encode(text), sample_tokens)
        if not chunks:
            continue
        pools[split].append(chunks)
        names[split].append(name)
        if split == "feedback" and sum(min(len(c), MAX_SAMPLES_PER_DOC) for c in
                                       pools["feedback"]) >= feedback:  # fmt: skip
            break
    picked: dict[str, list[list[int]]] = {}
    for key, docs in pools.items():
        samples = [c for chunks in docs for c in chunks[:MAX_SAMPLES_PER_DOC]]
        if len(samples) < wanted[key]:  # too few documents: take more from each
            samples = [c for chunks in docs for c in chunks]
        picked[key] = samples[: wanted[key]]
    return picked["feedback"], picked["held_out"], names["feedback"], names["held_out"]


# ---------------------------------------------------------------------- persona users


def persona_user(
    name: str, encode: Encode, *, feedback: int, held_out: int, sample_tokens: int
) -> User:
    """A chat-persona user: feedback from one filling seed, held-out from another."""
    user = User(name, "persona", f"templates:{name}")
    seen: set[str] = set()

    def samples(seed: int, count: int, exclude: set[str]) -> list[list[int]]:
        out: list[list[int]] = []
        text = ""
        for sentence in persona_sentences(name, seed):
            if sentence in exclude:
                continue
            seen.add(sentence)
            text += sentence + " "
            ids = encode(text.strip())
            if len(ids) >= sample_tokens:
                out.append(ids[:sample_tokens])
                text = ""
                if len(out) == count:
                    return out
        return out  # pragma: no cover - the stream is endless

    user.feedback = samples(1, feedback, set())
    feedback_sentences = set(seen)
    user.held_out = samples(2, held_out, feedback_sentences)
    user.feedback_documents = [f"fillings seed 1 ({len(feedback_sentences)} sentences)"]
    user.held_out_documents = ["fillings seed 2 (no feedback sentence)"]
    return user


# ---------------------------------------------------------------------- all users


def build_users(
    encode: Encode, *, feedback: int, held_out: int, sample_tokens: int
) -> tuple[list[User], list[str]]:
    """The real-text and persona users (sources missing here are skipped, and named).

    Returns:
        (users, notes on the sources skipped)
    """
    users: list[User] = []
    notes: list[str] = []
    for name, (kind, description, reader) in REAL_SOURCES.items():
        try:
            documents = reader()
        except (OSError, SyntaxError, ValueError) as exc:
            notes.append(f"{name}: unreadable ({exc})")
            continue
        fb, ho, fb_docs, ho_docs = split_samples(
            documents, encode, feedback=feedback, held_out=held_out, sample_tokens=sample_tokens
        )
        if len(fb) < feedback or len(ho) < held_out:
            notes.append(f"{name}: skipped, only {len(fb)} feedback / {len(ho)} held-out samples")
            continue
        users.append(User(name, kind, description, fb, ho, fb_docs, ho_docs))
    for name in PERSONAS:
        users.append(
            persona_user(
                name, encode, feedback=feedback, held_out=held_out, sample_tokens=sample_tokens
            )
        )
    return users, notes


def generic_samples(
    encode: Encode, *, per_source: int, sample_tokens: int
) -> tuple[list[list[int]], list[str]]:
    """Generic held-out samples, `per_source` from each of `GENERIC_SOURCES` (none a user's)."""
    samples: list[list[int]] = []
    used: list[str] = []
    for name, reader in GENERIC_SOURCES.items():
        try:
            documents = reader()
        except (OSError, SyntaxError, ValueError):
            continue
        _, ho, _, _ = split_samples(
            documents, encode, feedback=0, held_out=per_source, sample_tokens=sample_tokens
        )
        if ho:
            samples += ho
            used.append(f"{name} ({len(ho)})")
    return samples, used

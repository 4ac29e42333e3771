"""The task sets of `hybridgen bench speculative`, and which of them a run measures.

- `input_grounded` and `open_ended` come from `data/speculative_tasks.json` (written for the
  project; the passages are local text, each task naming its source): one user message each,
  sent through the edge model's own chat template. An input-grounded message is the
  instruction, a blank line, then the passage its answer repeats (rewrite, extract, quote,
  edit).
- `personalized`: a user's own held-out text continued as it stands (no chat template), with
  that user's n-gram cache, learned from the user's feedback samples
  (`NgramCache.from_samples`), as the request's adapter, bounded by the request's own text
  as the edge bounds it (`NgramCache.bounded`). The users are the personalization bench's
  (`personalization_data`: real-text users and chat personas, feedback and held-out samples
  from different documents); a quick run takes the chat personas only, which are made from
  templates and read no file.

A task whose prompt and `max_tokens` do not fit the model's context is left out and named
(`Selection.skipped`); a run limited to `count` tasks per set takes the ones with the
shortest prompts (file order among equals), so a tiny test model's short context still has
tasks to measure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.personal.adapt import NgramCache

TASKS_PATH = Path(__file__).parent / "data" / "speculative_tasks.json"
#: The sets, in the order the bench reports them.
SETS = ("input_grounded", "open_ended", "personalized")
#: The kinds of an input-grounded task.
GROUNDED_KINDS = ("rewrite", "extract", "quote", "edit")
#: Personalized tasks: tokens of each held-out sample (the prompt), held-out prompts and
#: feedback samples (the cache) per user.
SAMPLE_TOKENS = 64
HELD_OUT_PER_USER = 2
FEEDBACK_PER_USER = 50


@dataclass(frozen=True)
class Task:
    """One prompt of a set, as the runtime takes it; `cache`: the user's, for a personalized
    task (None otherwise)."""

    id: str
    kind: str
    source: str
    prompt_ids: tuple[int, ...]
    cache: NgramCache | None = None

    def adapter(self) -> NgramCache | None:
        """The adapter a run of this task carries: the user's cache bounded by the prompt, as
        the edge bounds a personalized request by its own text (a fresh view per run)."""
        return None if self.cache is None else self.cache.bounded(self.prompt_ids)


@dataclass(frozen=True)
class Selection:
    """The tasks a run measures out of a set's `available`, and those left out because they
    do not fit the context (`skipped`, by id)."""

    tasks: list[Task]
    available: int
    skipped: list[str]


def load_messages(path: Path = TASKS_PATH) -> dict[str, list[dict[str, str]]]:
    """The data file's chat tasks by set: `{id, kind, source, message}` each (the user message:
    an input-grounded task's instruction and passage, an open question as written)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    grounded = [
        {"id": t["id"], "kind": t["kind"], "source": t["source"],
         "message": f"{t['instruction']}\n\n{t['passage']}"}
        for t in data["input_grounded"]
    ]  # fmt: skip
    open_ended = [
        {"id": t["id"], "kind": t["kind"], "source": "written for the project",
         "message": t["prompt"]}
        for t in data["open_ended"]
    ]  # fmt: skip
    return {"input_grounded": grounded, "open_ended": open_ended}


def chat_tasks(runtime: Any, messages: list[dict[str, str]]) -> list[Task]:
    """Each message as one user turn through the runtime's chat template, encoded."""
    tasks = []
    for entry in messages:
        text = runtime.render_chat([{"role": "user", "content": entry["message"]}])
        ids = tuple(runtime.encode(text))
        tasks.append(Task(entry["id"], entry["kind"], entry["source"], ids))
    return tasks


def personalized_tasks(encode: Callable[[str], list[int]], *, quick: bool) -> list[Task]:
    """HELD_OUT_PER_USER held-out samples of each user, each with the user's cache learned
    from FEEDBACK_PER_USER feedback samples (`quick`: the chat personas only)."""
    from hybridgen.benches.personalization_data import PERSONAS, build_users, persona_user

    sizes = {"feedback": FEEDBACK_PER_USER, "held_out": HELD_OUT_PER_USER,
             "sample_tokens": SAMPLE_TOKENS}  # fmt: skip
    if quick:
        users = [persona_user(name, encode, **sizes) for name in PERSONAS]
    else:
        users, _ = build_users(encode, **sizes)
    tasks = []
    for user in users:
        cache = NgramCache.from_samples(user.feedback)
        for index, sample in enumerate(user.held_out):
            tasks.append(Task(f"{user.name}-{index}", user.kind, user.source, tuple(sample),
                              cache))  # fmt: skip
    return tasks


def select(tasks: list[Task], *, context: int, max_tokens: int, count: int | None) -> Selection:
    """The tasks whose prompt and `max_tokens` fit `context`, all of them or the `count` with
    the shortest prompts (in the set's order); the rest that do not fit, by id."""
    fits = [t for t in tasks if len(t.prompt_ids) + max_tokens <= context]
    skipped = [t.id for t in tasks if len(t.prompt_ids) + max_tokens > context]
    if count is not None:
        shortest = sorted(range(len(fits)), key=lambda i: (len(fits[i].prompt_ids), i))[:count]
        fits = [fits[i] for i in sorted(shortest)]
    return Selection(fits, len(tasks), skipped)

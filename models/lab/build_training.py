"""Lab builds: the two models of a set, trained or the user's own, saved and evaluated.

Steps of models.lab.build: `load_checkpoints` (a user's checkpoints, before any other work: they
fail fast and may bring the tokenizer), `encode` (the corpus as token streams),
`train_models` (each model trained or taken from its checkpoint, then saved), `evaluate`
(held-out perplexity).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from broker.errors import BadRequest
from models.chat import stop_token_ids
from models.lab import corpus as corpus_mod
from models.lab import edge_build, train
from models.lab.build_steps import Stopwatch
from models.lab.profiles import ModelSpec, Profile
from models.manifest_schema import CLOUD_MODEL, EDGE_MODEL, Metrics, ModelEntry, Models

logger = logging.getLogger(__name__)

#: How many times the chat-formatted examples appear in the training text.
CHAT_REPEATS = 2


class Given(NamedTuple):
    """A user's checkpoint standing in for training one model."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    path: Path


@dataclass(frozen=True)
class TrainingData:
    """Token streams of the corpus, each of shape (N,)."""

    in_domain: torch.Tensor
    out_of_domain: torch.Tensor
    #: Held-out text by domain ("in_domain", "out_of_domain"), for evaluation and the probe.
    held: dict[str, torch.Tensor]

    @property
    def everything(self) -> torch.Tensor:
        return torch.cat([self.in_domain, self.out_of_domain])


def load_checkpoints(edge_from: Path | None, cloud_from: Path | None) -> dict[str, Given]:
    """The user's checkpoints by model name (either may be absent)."""
    given: dict[str, Given] = {}
    for role, path in ((EDGE_MODEL, edge_from), (CLOUD_MODEL, cloud_from)):
        if path is not None:
            model, tokenizer = load_checkpoint(Path(path).expanduser().resolve(), role)
            given[role] = Given(model, tokenizer, Path(path))
    return given


def load_checkpoint(path: Path, role: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a user's HF checkpoint (fp32) and its tokenizer, refusing what the edge can't run."""
    if role == EDGE_MODEL:
        edge_build.check_architecture(path)
    else:
        edge_build.checkpoint_architecture(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise BadRequest(f"checkpoint {path} has no usable tokenizer files: {exc}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as exc:
        raise BadRequest(f"checkpoint {path} cannot be loaded as a causal LM: {exc}") from None
    if tokenizer.eos_token_id is None:
        raise BadRequest(f"the tokenizer of checkpoint {path} has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def encode(tokenizer: PreTrainedTokenizerBase, corpus: corpus_mod.Corpus) -> TrainingData:
    """Training and held-out token streams of the corpus.

    Plain documents plus chat-formatted exchanges drawn from them (seen twice, ~10% of the
    text), so both models learn the chat format and to end a turn with <|end|>.
    """
    in_chats = corpus.chat_texts(in_domain=True)
    out_chats = corpus.chat_texts(in_domain=False)
    corpus.stats["chat_examples"] = {"in_domain": len(in_chats), "out_of_domain": len(out_chats)}

    def stream(texts: list[str]) -> torch.Tensor:
        return train.encode_stream(tokenizer, texts)

    return TrainingData(
        in_domain=stream(corpus.texts(in_domain=True, held_out=False) + in_chats * CHAT_REPEATS),
        out_of_domain=stream(
            corpus.texts(in_domain=False, held_out=False) + out_chats * CHAT_REPEATS
        ),
        held={
            "in_domain": stream(corpus.texts(in_domain=True, held_out=True)),
            "out_of_domain": stream(corpus.texts(in_domain=False, held_out=True)),
        },
    )


def train_models(
    staging: Path,
    profile: Profile,
    tokenizer: PreTrainedTokenizerBase,
    data: TrainingData,
    given: dict[str, Given],
    *,
    seed: int,
    threads: int,
    progress: bool,
    clock: Stopwatch,
) -> tuple[dict[str, torch.nn.Module], Models]:
    """Both models (trained, or the user's), saved as HF checkpoints into `staging`.

    The edge learns the in-domain text only, the cloud everything; the cloud trains with
    `seed + 1`. `clock` records `<model name>_s` for each.
    """
    models: dict[str, torch.nn.Module] = {}
    entries: dict[str, ModelEntry] = {}
    jobs = (
        (EDGE_MODEL, profile.edge, data.in_domain, seed),
        (CLOUD_MODEL, profile.cloud, data.everything, seed + 1),
    )
    for role, spec, stream, model_seed in jobs:
        model, entry = train_or_take(
            role,
            spec,
            tokenizer,
            stream,
            seed=model_seed,
            given=given.get(role),
            threads=threads,
            progress=progress,
        )
        save_checkpoint(model, tokenizer, staging / entry.checkpoint_dir, entry.context_length)
        models[role], entries[role] = model, entry
        clock.lap(f"{role}_s")
    return models, Models(edge=entries[EDGE_MODEL], cloud=entries[CLOUD_MODEL])


def train_or_take(
    role: str,
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    stream: torch.Tensor,
    *,
    seed: int,
    given: Given | None,
    threads: int,
    progress: bool,
) -> tuple[torch.nn.Module, ModelEntry]:
    """Model `role` and its manifest entry: the user's checkpoint, else trained on `stream`."""
    if given is not None:
        value = getattr(given.model.config, "max_position_embeddings", None)
        context = int(value) if value else spec.context_length
        model, source = given.model, "checkpoint"
        stats: dict[str, Any] = {"from": str(given.path)}
    else:
        model, stats = train.train_model(
            spec, tokenizer, stream, seed=seed, threads=threads,
            desc=f"train {role}", progress=progress,
        )  # fmt: skip
        stats["data"] = "in-domain" if role == EDGE_MODEL else "all"
        context, source = spec.context_length, "trained"
    config: Any = model.config  # a transformers PretrainedConfig
    entry = ModelEntry(
        source=source,
        checkpoint_dir="edge" if role == EDGE_MODEL else "cloud",
        architecture=(config.architectures or [type(model).__name__])[0],
        parameters=train.count_parameters(model),
        context_length=context,
        vocab_size=config.vocab_size,
        hidden_size=getattr(config, "hidden_size", None),
        num_layers=getattr(config, "num_hidden_layers", None),
        num_heads=getattr(config, "num_attention_heads", None),
        num_kv_heads=getattr(config, "num_key_value_heads", None),
        intermediate_size=getattr(config, "intermediate_size", None),
        training=stats,
    )
    return model, entry


def save_checkpoint(
    model: Any, tokenizer: PreTrainedTokenizerBase, out: Path, context_length: int
) -> None:
    """Save `model` with `tokenizer` as an HF checkpoint that stops at end of text and turn."""
    model.config.max_position_embeddings = max(
        context_length, getattr(model.config, "max_position_embeddings", 0) or 0
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def evaluate(
    models: dict[str, torch.nn.Module], streams: dict[str, torch.Tensor], profile: Profile
) -> Metrics:
    """Held-out perplexity per model, per domain and overall (equal windows from each domain)."""
    window = min(profile.edge.window, profile.cloud.window)
    results: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        nll: dict[str, tuple[float, int]] = {}
        for split, stream in streams.items():
            nll[split] = train.negative_log_likelihood(model, stream, window, profile.eval_windows)
        total = sum(v[0] for v in nll.values()) / sum(v[1] for v in nll.values())
        results[name] = {
            "overall": round(float(torch.tensor(total).exp()), 3),
            **{k: round(float(torch.tensor(v[0] / v[1]).exp()), 3) for k, v in nll.items()},
        }
    return Metrics(
        perplexity=results, eval_window=window, eval_windows_per_domain=profile.eval_windows
    )

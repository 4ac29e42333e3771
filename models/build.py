"""`hybridgen models build`: corpus -> tokenizer -> edge + cloud Llama -> ONNX edge builds.

Everything is written into a staging folder next to the final one and renamed into place
only when complete (manifest last), so a runtime never sees a half-built model set.
A user's own checkpoint (`edge_from` / `cloud_from`) replaces training for that model; its
tokenizer then becomes the set's shared tokenizer.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from broker.errors import BadRequest
from models import calibration, edge_build, manifest, registry, train
from models import corpus as corpus_mod
from models.chat import END_OF_TURN
from models.profiles import PRETRAINED_PROFILE, PROFILES, Profile
from models.registry import CLOUD_MODEL, EDGE_MODEL, ModelSet
from models.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

#: Held-out tokens used for the int4/int8 top-1 agreement check at build time.
AGREEMENT_TOKENS = 96
#: How many times the chat-formatted examples appear in the training text.
CHAT_REPEATS = 2


@dataclass
class BuildOptions:
    """What `build_model_set` builds. Defaults follow the profile."""

    profile: str = PRETRAINED_PROFILE
    seed: int = 0
    version: str | None = None
    home: Path | None = None
    edge_from: Path | None = None
    cloud_from: Path | None = None
    precisions: tuple[str, ...] | None = None
    domain: tuple[str, ...] = corpus_mod.DEFAULT_DOMAIN
    threads: int = 2
    force: bool = False
    set_current: bool = True
    progress: bool = True
    extra_manifest: dict[str, Any] = field(default_factory=dict)


def default_version(profile: str, seed: int) -> str:
    """`<profile>-s<seed>-<UTC timestamp>`, unique enough for local builds."""
    return f"{profile}-s{seed}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def _load_checkpoint(path: Path, role: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
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


def _context_length(model: torch.nn.Module, fallback: int) -> int:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if value else fallback


def _model_entry(
    model: Any, *, source: str, context_length: int, stats: dict[str, Any]
) -> dict[str, Any]:
    config = model.config
    return {
        "source": source,
        "architecture": (config.architectures or [type(model).__name__])[0],
        "parameters": train.count_parameters(model),
        "context_length": context_length,
        "vocab_size": config.vocab_size,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "num_heads": getattr(config, "num_attention_heads", None),
        "num_kv_heads": getattr(config, "num_key_value_heads", None),
        "intermediate_size": getattr(config, "intermediate_size", None),
        "training": stats,
    }


def _save_checkpoint(
    model: Any, tokenizer: PreTrainedTokenizerBase, out: Path, context_length: int
) -> None:
    model.config.max_position_embeddings = max(
        context_length, getattr(model.config, "max_position_embeddings", 0) or 0
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Stop at end-of-text and at end-of-turn (the chat format), where the tokenizer has both.
    stops = [tokenizer.eos_token_id]
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if END_OF_TURN in tokenizer.all_special_tokens and end_id not in stops:
        stops.append(end_id)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _evaluate(
    models: dict[str, torch.nn.Module], streams: dict[str, torch.Tensor], window: int, windows: int
) -> dict[str, dict[str, float]]:
    """Held-out perplexity per model, per domain and overall (equal windows from each domain)."""
    results: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        nll: dict[str, tuple[float, int]] = {}
        for split, stream in streams.items():
            nll[split] = train.negative_log_likelihood(model, stream, window, windows)
        total = sum(v[0] for v in nll.values()) / sum(v[1] for v in nll.values())
        results[name] = {
            "overall": round(float(torch.tensor(total).exp()), 3),
            **{k: round(float(torch.tensor(v[0] / v[1]).exp()), 3) for k, v in nll.items()},
        }
    return results


def _agreement(edge_model: torch.nn.Module, folder: Path, tokens: list[int], threads: int) -> float:
    """Top-1 agreement of an ONNX build with torch under teacher forcing on `tokens`."""
    from models import ort_edge

    with torch.no_grad():
        logits = edge_model(input_ids=torch.tensor([tokens])).logits[0]  # (T, V)
    reference = logits.argmax(-1).tolist()
    predicted = ort_edge.teacher_forced_argmax(ort_edge.load_model(folder, threads), tokens)
    same = sum(int(a == b) for a, b in zip(reference, predicted, strict=True))
    return round(same / len(tokens), 4)


def _make_readable(root: Path) -> None:
    """Folders 0755, files 0644 (temp folders and some writers default to owner-only)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_model_set(options: BuildOptions) -> ModelSet:
    """Build and install one model set; returns it (installed, and CURRENT unless told not).

    Raises:
        BadRequest: unknown profile/precision, bad checkpoint, version already installed.
    """
    if options.profile == PRETRAINED_PROFILE or (options.edge_from and options.cloud_from):
        from models.build_pretrained import build_pretrained_set

        name = PRETRAINED_PROFILE if options.profile == PRETRAINED_PROFILE else "pretrained"
        return build_pretrained_set(
            version=registry.check_version(
                options.version or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            ),
            home=options.home,
            edge_from=options.edge_from,
            cloud_from=options.cloud_from,
            precisions=tuple(dict.fromkeys(options.precisions or ("int4",))),
            threads=options.threads,
            force=options.force,
            set_current=options.set_current,
            progress=options.progress,
        )
    if options.profile not in PROFILES:
        known = ", ".join([PRETRAINED_PROFILE, *PROFILES])
        raise BadRequest(f"unknown profile {options.profile!r}; one of {known}")
    profile: Profile = PROFILES[options.profile]
    precisions = tuple(dict.fromkeys(options.precisions or profile.precisions))
    for precision in precisions:
        if precision not in edge_build.PRECISIONS:
            raise BadRequest(f"precision {precision!r} is not one of int4, int8, fp32")
    edge_build.check_head_size(profile.edge.hidden_size, profile.edge.num_heads)
    version = registry.check_version(options.version or default_version(profile.name, options.seed))
    final = registry.models_home(options.home) / version
    if final.exists() and not options.force:
        raise BadRequest(
            f"model set {version!r} is installed already at {final}; pass --force to replace it",
            param="version",
        )
    started = time.perf_counter()
    torch.set_num_threads(options.threads)
    if not options.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    # User checkpoints first: they fail fast and may bring the tokenizer.
    t = time.perf_counter()
    given: dict[str, tuple[torch.nn.Module, PreTrainedTokenizerBase, Path]] = {}
    for role, path in ((EDGE_MODEL, options.edge_from), (CLOUD_MODEL, options.cloud_from)):
        if path is not None:
            model, tok = _load_checkpoint(Path(path).expanduser().resolve(), role)
            given[role] = (model, tok, Path(path))

    staging = registry.staging_dir(version, options.home)
    try:
        try:
            corpus = corpus_mod.build_corpus(
                profile.budgets, options.domain, min_domain_bytes=profile.min_domain_bytes
            )
        except ValueError as exc:
            raise BadRequest(str(exc), param="domain") from None
        t = lap("corpus_s", t)
        tokenizer_dir = staging / "tokenizer"
        if given:
            tokenizer = next(iter(given.values()))[1]
            tokenizer.save_pretrained(str(tokenizer_dir))
            tokenizer_source = f"checkpoint {next(iter(given.values()))[2]}"
        else:
            max_len = max(profile.edge.context_length, profile.cloud.context_length)
            train_tokenizer(
                corpus.texts(held_out=False), profile.vocab_size, tokenizer_dir, max_length=max_len
            )
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            tokenizer_source = "trained"
        t = lap("tokenizer_s", t)

        # Plain documents plus chat-formatted exchanges drawn from them (seen twice, ~10% of
        # the text), so both models learn the chat format and to end a turn with <|end|>.
        in_chats = corpus.chat_texts(in_domain=True)
        out_chats = corpus.chat_texts(in_domain=False)
        corpus.stats["chat_examples"] = {
            "in_domain": len(in_chats),
            "out_of_domain": len(out_chats),
        }
        in_domain = train.encode_stream(
            tokenizer, corpus.texts(in_domain=True, held_out=False) + in_chats * CHAT_REPEATS
        )
        out_of_domain = train.encode_stream(
            tokenizer, corpus.texts(in_domain=False, held_out=False) + out_chats * CHAT_REPEATS
        )
        everything = torch.cat([in_domain, out_of_domain])
        held = {
            "in_domain": train.encode_stream(
                tokenizer, corpus.texts(in_domain=True, held_out=True)
            ),
            "out_of_domain": train.encode_stream(
                tokenizer, corpus.texts(in_domain=False, held_out=True)
            ),
        }
        t = lap("encode_s", t)

        models: dict[str, torch.nn.Module] = {}
        entries: dict[str, dict[str, Any]] = {}
        jobs = (
            (EDGE_MODEL, profile.edge, in_domain, options.seed),
            (CLOUD_MODEL, profile.cloud, everything, options.seed + 1),
        )
        for role, spec, stream, seed in jobs:
            if role in given:
                model, _, path = given[role]
                context = _context_length(model, spec.context_length)
                stats: dict[str, Any] = {"from": str(path)}
                source = "checkpoint"
            else:
                model, stats = train.train_model(
                    spec, tokenizer, stream, seed=seed, threads=options.threads,
                    desc=f"train {role}", progress=options.progress,
                )  # fmt: skip
                stats["data"] = "in-domain" if role == EDGE_MODEL else "all"
                context = spec.context_length
                source = "trained"
            models[role] = model
            entries[role] = _model_entry(model, source=source, context_length=context, stats=stats)
            folder = staging / ("edge" if role == EDGE_MODEL else "cloud")
            _save_checkpoint(model, tokenizer, folder, context)
            t = lap(f"{role}_s", t)

        window = min(profile.edge.window, profile.cloud.window)
        perplexity = _evaluate(models, held, window, profile.eval_windows)
        t = lap("eval_s", t)

        builds: dict[str, dict[str, Any]] = {}
        edge_context = entries[EDGE_MODEL]["context_length"]
        probe = held["in_domain"][: min(AGREEMENT_TOKENS, edge_context)].tolist()
        for precision in precisions:
            out = staging / f"edge-{precision}"
            edge_build.build_edge(staging / "edge", out, precision)
            builds[precision] = {
                "dir": out.name,
                "top1_agreement_teacher_forced": _agreement(
                    models[EDGE_MODEL], out, probe, options.threads
                ),
                "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            }
            t = lap(f"edge_{precision}_s", t)

        # The edge's default routing threshold, measured the way its router reads it.
        measured = "int4" if "int4" in precisions else precisions[0]
        routing = calibration.calibrate(
            staging / f"edge-{measured}",
            corpus.texts(in_domain=True, held_out=True),
            corpus.texts(in_domain=False, held_out=True),
            seed=options.seed,
            threads=options.threads,
            precision=measured,
        )
        t = lap("calibration_s", t)

        timings["total_s"] = round(time.perf_counter() - started, 1)
        _make_readable(staging)
        manifest.write_manifest(
            staging,
            {
                "version": version,
                "created": manifest.now_iso(),
                "profile": profile.name,
                "seed": options.seed,
                "models": entries,
                "tokenizer": {
                    "dir": "tokenizer",
                    "source": tokenizer_source,
                    "vocab_size": len(tokenizer),
                    "eos_token": tokenizer.eos_token,
                    "eos_token_id": tokenizer.eos_token_id,
                    "pad_token": tokenizer.pad_token,
                    "pad_token_id": tokenizer.pad_token_id,
                },
                "edge_builds": builds,
                "corpus": corpus.stats,
                "metrics": {
                    "perplexity": perplexity,
                    "eval_window": window,
                    "eval_windows_per_domain": profile.eval_windows,
                },
                "routing": routing,
                "timings": timings,
                "runtime": manifest.runtime_versions(),
                **options.extra_manifest,
            },
        )
        registry.install_dir(staging, version, options.home, replace=options.force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if options.set_current:
        registry.set_current(version, options.home)
    model_set = registry.resolve(version, options.home)
    logger.info("built model set %s in %.0f s: %s", version, timings["total_s"], perplexity)
    return model_set

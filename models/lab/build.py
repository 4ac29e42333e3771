"""`hybridgen models build`: corpus -> tokenizer -> edge + cloud Llama -> ONNX edge builds.

`build_model_set` is the entry point. A lab build runs one function per step, in order, in
`_build_lab_set`: `_read_corpus`, `_make_tokenizer`, then models.lab.build_training (`encode`,
`train_models`, `evaluate`), then the edge builds (models.lab.build_steps) and `_calibrate`. It
writes into a staging folder renamed into place only when complete (manifest last; see
models.lab.build_steps), so a runtime never sees a half-built model set. A user's own checkpoint
(`edge_from` / `cloud_from`) replaces training for that model; its tokenizer then becomes the
set's shared tokenizer. The default profile and two user checkpoints go to
models.lab.build_pretrained instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from broker.errors import BadRequest
from models import manifest, registry
from models.lab import build_steps, build_training, calibration, edge_build
from models.lab import corpus as corpus_mod
from models.lab.build_steps import Stopwatch
from models.lab.profiles import PRETRAINED_PROFILE, PROFILES, Profile
from models.lab.tokenizer import train_tokenizer
from models.manifest_schema import Manifest, Models, Routing, TokenizerEntry
from models.registry import CLOUD_MODEL, EDGE_MODEL, ModelSet

logger = logging.getLogger(__name__)

#: Held-out tokens used for the int4/int8 top-1 agreement check at build time.
AGREEMENT_TOKENS = 96


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
    #: A GGUF edge's int4 build: the builder's requantization, or the GGUF's own blocks.
    edge_weights: str = "gguf"
    domain: tuple[str, ...] = corpus_mod.DEFAULT_DOMAIN
    threads: int = 2
    force: bool = False
    set_current: bool = True
    progress: bool = True
    #: Extra top-level manifest fields (kept as they are, after the built ones).
    extra_manifest: dict[str, Any] = field(default_factory=dict)


def default_version(profile: str, seed: int) -> str:
    """`<profile>-s<seed>-<UTC timestamp>`, unique enough for local builds."""
    return f"{profile}-s{seed}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def build_model_set(options: BuildOptions) -> ModelSet:
    """Build and install one model set; returns it (installed, and CURRENT unless told not).

    Raises:
        BadRequest: unknown profile/precision, bad checkpoint, version already installed.
    """
    if options.profile == PRETRAINED_PROFILE or (options.edge_from and options.cloud_from):
        return _build_pretrained(options)
    profile = _profile(options.profile)
    precisions = _precisions(options.precisions or profile.precisions)
    edge_build.check_head_size(profile.edge.hidden_size, profile.edge.num_heads)
    version = registry.check_version(options.version or default_version(profile.name, options.seed))
    build_steps.refuse_installed(version, options.home, options.force)
    clock = Stopwatch()
    build_steps.prepare_torch(options.threads, options.progress)
    given = build_training.load_checkpoints(options.edge_from, options.cloud_from)
    with build_steps.staging_folder(version, options.home) as staging:
        built = _build_lab_set(staging, version, profile, precisions, given, options, clock)
        build_steps.install(staging, built, home=options.home, force=options.force)
    model_set = build_steps.activate(version, options.home, set_current=options.set_current)
    logger.info(
        "built model set %s in %.0f s: %s",
        version,
        model_set.manifest.timings.total_s,
        model_set.perplexity,
    )
    return model_set


def _build_pretrained(options: BuildOptions) -> ModelSet:
    """The default SmolLM2 set, or a set of two user checkpoints (models.lab.build_pretrained)."""
    from models.lab.build_pretrained import build_pretrained_set

    name = PRETRAINED_PROFILE if options.profile == PRETRAINED_PROFILE else "pretrained"
    return build_pretrained_set(
        version=registry.check_version(
            options.version or f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        ),
        home=options.home,
        edge_from=options.edge_from,
        cloud_from=options.cloud_from,
        precisions=tuple(dict.fromkeys(options.precisions or ("int4",))),
        edge_weights=options.edge_weights,
        threads=options.threads,
        force=options.force,
        set_current=options.set_current,
        progress=options.progress,
    )


def _profile(name: str) -> Profile:
    if name not in PROFILES:
        known = ", ".join([PRETRAINED_PROFILE, *PROFILES])
        raise BadRequest(f"unknown profile {name!r}; one of {known}")
    return PROFILES[name]


def _precisions(requested: tuple[str, ...]) -> tuple[str, ...]:
    precisions = tuple(dict.fromkeys(requested))
    for precision in precisions:
        if precision not in edge_build.PRECISIONS:
            raise BadRequest(f"precision {precision!r} is not one of int4, int8, fp32")
    return precisions


def _build_lab_set(
    staging: Path,
    version: str,
    profile: Profile,
    precisions: tuple[str, ...],
    given: dict[str, build_training.Given],
    options: BuildOptions,
    clock: Stopwatch,
) -> Manifest:
    """Run every step of a lab build into `staging`; returns the manifest to write."""
    corpus = _read_corpus(profile, options.domain)
    clock.lap("corpus_s")
    tokenizer, tokenizer_entry = _make_tokenizer(staging, profile, corpus, given)
    clock.lap("tokenizer_s")
    data = build_training.encode(tokenizer, corpus)
    clock.lap("encode_s")
    models, entries = build_training.train_models(
        staging,
        profile,
        tokenizer,
        data,
        given,
        seed=options.seed,
        threads=options.threads,
        progress=options.progress,
        clock=clock,
    )
    metrics = build_training.evaluate(models, data.held, profile)
    clock.lap("eval_s")
    probe = data.held["in_domain"][: min(AGREEMENT_TOKENS, entries.edge.context_length)]
    builds = build_steps.build_edges(
        staging / entries.edge.checkpoint_dir,
        staging,
        precisions,
        reference=models[EDGE_MODEL],
        probe=probe.tolist(),
        threads=options.threads,
        clock=clock,
    )
    routing = _calibrate(
        staging, precisions, corpus, options, models[CLOUD_MODEL], tokenizer, entries
    )
    clock.lap("calibration_s")
    fields = {
        "version": version,
        "created": manifest.now_iso(),
        "profile": profile.name,
        "seed": options.seed,
        "models": entries,
        "tokenizer": tokenizer_entry,
        "edge_builds": builds,
        "corpus": corpus.stats,
        "metrics": metrics,
        "routing": routing,
        "timings": clock.timings(),
        "runtime": manifest.runtime_versions(),
    }
    return Manifest.model_validate({**fields, **options.extra_manifest})


def _read_corpus(profile: Profile, domain: tuple[str, ...]) -> corpus_mod.Corpus:
    """The profile's corpus, `domain` being the sources the edge specialises in."""
    try:
        return corpus_mod.build_corpus(
            profile.budgets, domain, min_domain_bytes=profile.min_domain_bytes
        )
    except ValueError as exc:
        raise BadRequest(str(exc), param="domain") from None


def _make_tokenizer(
    staging: Path,
    profile: Profile,
    corpus: corpus_mod.Corpus,
    given: dict[str, build_training.Given],
) -> tuple[PreTrainedTokenizerBase, TokenizerEntry]:
    """The set's shared tokenizer in `staging/tokenizer`: a user checkpoint's, else trained."""
    folder = staging / "tokenizer"
    if given:
        first = next(iter(given.values()))
        tokenizer = first.tokenizer
        tokenizer.save_pretrained(str(folder))
        source = f"checkpoint {first.path}"
    else:
        max_len = max(profile.edge.context_length, profile.cloud.context_length)
        train_tokenizer(
            corpus.texts(held_out=False), profile.vocab_size, folder, max_length=max_len
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        source = "trained"
    entry = TokenizerEntry(
        dir=folder.name,
        source=source,
        vocab_size=len(tokenizer),
        eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, entry


def _calibrate(
    staging: Path,
    precisions: tuple[str, ...],
    corpus: corpus_mod.Corpus,
    options: BuildOptions,
    cloud: Any,
    tokenizer: PreTrainedTokenizerBase,
    entries: Models,
) -> Routing:
    """The edge's default routing, measured the way its router reads it: the domain-labelled
    perplexity thresholds (models.lab.calibration), then the signal and threshold chosen by the
    quality each end gives held-out continuations (models.lab.calibration_eval), which decide."""
    from models.lab import calibration_eval
    from models.ort_edge import EdgeModel

    measured = "int4" if "int4" in precisions else precisions[0]
    edge = EdgeModel(staging / f"edge-{measured}", options.threads)
    result = calibration.calibrate(
        edge,
        corpus.texts(in_domain=True, held_out=True),
        corpus.texts(in_domain=False, held_out=True),
        seed=options.seed,
        precision=measured,
    )
    quality = calibration_eval.calibrate_quality(
        edge,
        cloud,
        tokenizer,
        corpus,
        cloud_context=entries.cloud.context_length,
        seed=options.seed,
    )
    if quality.get("signal"):
        result.pop("skipped", None)
    return Routing.model_validate({"mode": "calibrated", **result, **quality})

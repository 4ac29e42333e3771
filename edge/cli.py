"""`hybridgen edge`: run an edge node (local OpenAI-compatible API with cloud fallback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.settings import EdgeSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen edge",
        description="Run an edge node: the local OpenAI-compatible API on the bundled int4 "
        "edge model (onnxruntime-genai), with routing to the cloud workers over NATS. Every "
        "option also reads HG_EDGE_<OPTION> (e.g. HG_EDGE_PORT); the bus URL also HG_NATS_URL.",
    )
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8400; 0 = any free)")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="any onnxruntime-genai model folder (builder output); default: the edge build "
        "of the current model set under $HG_HOME/models",
    )
    parser.add_argument("--model-version", help="model-set version (default: CURRENT)")
    parser.add_argument("--precision", choices=("int4", "int8", "fp32"), help="edge build")
    parser.add_argument("--threads", type=int, help="ONNX intra-op threads (default 1)")
    parser.add_argument("--max-active", type=int, help="requests generated at once (default 4)")
    parser.add_argument("--max-queue", type=int, help="requests waiting for a slot (default 32)")
    parser.add_argument("--nats", dest="nats_url", help="NATS URL (default $HG_NATS_URL)")
    parser.add_argument("--node-id", help="node id on the bus (default edge-<host>-<hex>)")
    parser.add_argument(
        "--no-cloud", action="store_true", default=None, help="never use the bus or the cloud"
    )
    parser.add_argument(
        "--policy",
        help="local routing policy as JSON, e.g. '{\"perplexity_threshold\": 40}' "
        "(the KV bucket's fleet and node policy override it)",
    )
    parser.add_argument(
        "--api-key", action="append", dest="api_keys", help="accepted bearer key (repeatable)"
    )
    parser.add_argument("--log-level", default="info", help="logging level")
    return parser


def settings_from_args(args: argparse.Namespace) -> EdgeSettings:
    """EdgeSettings from the environment, overridden by the options given."""
    overrides = {
        key: value
        for key, value in vars(args).items()
        if key not in ("log_level", "policy") and value is not None
    }
    if args.policy:
        overrides["policy"] = json.loads(args.policy)
    return EdgeSettings(**overrides)


def main(argv: list[str]) -> int:
    """Entry point of `hybridgen edge` and `python -m edge`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from_args(args)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"hybridgen edge: invalid option: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from broker.errors import HybridgenError
    from edge.app import create_app, resolve_model_dir

    try:
        model_dir, _ = resolve_model_dir(settings)
    except HybridgenError as exc:
        print(f"hybridgen edge: {exc.message}", file=sys.stderr)
        return 1
    print(f"hybridgen edge: serving {model_dir} on http://{settings.host}:{settings.port}")

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=10,
    )
    return 0

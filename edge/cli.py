"""`hybridgen edge`: run an edge node (local OpenAI-compatible API with cloud fallback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from broker.settings import (
    add_context_argument,
    add_settings_arguments,
    as_service,
    settings_overrides,
)
from edge.settings import EdgeSettings
from serving.slow_clients import add_slow_client_arguments
from serving.stopping import serve_http

#: EdgeSettings fields offered as options (help and defaults come from the fields).
OPTIONS = (
    "host",
    "port",
    "model_dir",
    "model_version",
    "precision",
    "threads",
    "max_active",
    "max_queue",
    "max_tokens_cap",
    "speculative",
    "draft_tokens",
    "nats_url",
    "node_id",
    "no_cloud",
    "api_keys",
    "user_keys",
    "allowed_hosts",
    "allowed_origins",
    "allow_open",
    "metrics_require_key",
    "key_limits",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen edge",
        description="Run an edge node: the local OpenAI-compatible API on the bundled int4 "
        "edge model (onnxruntime-genai), with routing to the cloud workers over NATS. Every "
        "option also reads HG_EDGE_<OPTION> (e.g. HG_EDGE_PORT); the bus URL also HG_NATS_URL.",
    )
    add_settings_arguments(
        parser,
        EdgeSettings,
        OPTIONS,
        flags={
            "nats_url": "--nats",
            "api_keys": "--api-key",
            "user_keys": "--user-key",
            "allowed_hosts": "--allowed-host",
            "allowed_origins": "--allowed-origin",
        },
    )
    parser.add_argument(
        "--policy",
        help="local routing policy as JSON, e.g. '{\"perplexity_threshold\": 40}' "
        "(the KV bucket's fleet and node policy override it)",
    )
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=10.0,
        help="on SIGTERM, how long open requests may finish before they are cancelled "
        "(default 10); the process then closes the bus link and the model, and exits at most "
        "5 s later",
    )
    add_slow_client_arguments(parser)  # --read-timeout-s, --write-timeout-s
    parser.add_argument("--log-level", default="info", help="logging level")
    add_context_argument(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> EdgeSettings:
    """EdgeSettings from the environment, overridden by the options given."""
    overrides = settings_overrides(args, OPTIONS)
    if args.policy:
        overrides["policy"] = json.loads(args.policy)
    return EdgeSettings(**overrides)


def main(argv: list[str]) -> int:
    """Entry point of `hybridgen edge` and `python -m edge`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    as_service(args.context)  # the context's URL and CA, never its operator's login
    try:
        settings = settings_from_args(args)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"hybridgen edge: invalid option: {exc}", file=sys.stderr)
        return 2
    try:
        settings.check_exposure()
    except ValueError as exc:
        print(f"hybridgen edge: {exc}", file=sys.stderr)
        return 2
    from broker.errors import HybridgenError
    from edge.api.app import resolve_model_dir

    try:
        model_dir, _ = resolve_model_dir(settings)
    except HybridgenError as exc:
        print(f"hybridgen edge: {exc.message}", file=sys.stderr)
        return 1
    print(f"hybridgen edge: serving {model_dir} on http://{settings.host}:{settings.port}")
    try:
        return serve_http(
            lambda: build_app(settings),
            name="edge",
            host=settings.host,
            port=settings.port,
            log_level=args.log_level.lower(),
            read_timeout_s=args.read_timeout_s,
            write_timeout_s=args.write_timeout_s,
            drain_timeout_s=args.drain_timeout_s,
        )
    except ValueError as exc:
        print(f"hybridgen edge: invalid option: {exc}", file=sys.stderr)
        return 2


def build_app(settings: EdgeSettings) -> Any:
    """The edge app `main` serves (`create_app` applies the exposure rule and the metrics
    key itself)."""
    from edge.api.app import create_app

    return create_app(settings)

"""`hybridgen cloud worker|api`: run a cloud generation worker or the cloud HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from broker.errors import HybridgenError
from broker.settings import (
    add_context_argument,
    add_settings_arguments,
    as_service,
    settings_overrides,
)
from cloud.settings import ApiSettings, WorkerSettings
from serving.slow_clients import add_slow_client_arguments
from serving.stopping import serve_http

#: Settings fields offered as options (help and defaults come from the fields).
WORKER_OPTIONS = (
    "model_dir",
    "model_set",
    "model",
    "node_id",
    "device",
    "threads",
    "max_queue_requests",
    "max_queue_tokens",
    "max_batch_requests",
    "max_batch_tokens",
    "cache_tokens",
    "max_tokens_cap",
    "speculative",
    "draft_tokens",
    "draft_min_match",
    "verify_tokens",
    "drain_timeout_s",
)
API_OPTIONS = (
    "host",
    "port",
    "api_keys",
    "admin_keys",
    "models",
    "request_timeout_s",
    "allow_open",
    "metrics_require_key",
    "key_limits",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen cloud",
        description="Cloud generation: workers (transformers, step-level batching) serving "
        "hg.gen.<model> over NATS, and the OpenAI-compatible cloud API in front of them. "
        "Settings also come from HG_CLOUD_* environment variables (flags win).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser(
        "worker",
        help="serve the cloud model over NATS",
        description="Load the cloud model and serve hg.gen.<model> in queue group "
        "cloud.<model>. Start several (on any machines reaching the same NATS) to share "
        "the load. SIGTERM drains: no new requests, in-flight ones finish, then exit.",
    )
    add_settings_arguments(worker, WorkerSettings, WORKER_OPTIONS)
    worker.add_argument(
        "--nats", help="NATS URL (default HG_NATS_URL, the context's, or nats://127.0.0.1:4222)"
    )
    add_context_argument(worker)

    api = sub.add_parser(
        "api",
        help="serve the OpenAI-compatible cloud API",
        description="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /healthz, /readyz, /metrics) forwarding to cloud workers over NATS.",
    )
    add_settings_arguments(
        api, ApiSettings, API_OPTIONS, flags={"api_keys": "--api-key", "admin_keys": "--admin-key"}
    )
    api.add_argument(
        "--nats", help="NATS URL (default HG_NATS_URL, the context's, or nats://127.0.0.1:4222)"
    )
    add_context_argument(api)
    api.add_argument(
        "--drain-timeout-s",
        type=float,
        default=10.0,
        help="on SIGTERM, how long open requests may finish before they are cancelled (default 10)",
    )
    add_slow_client_arguments(api)  # --read-timeout-s, --write-timeout-s
    return parser  # fmt: skip


def worker_settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings: `HG_CLOUD_*` from the environment, the flags given over them."""
    return WorkerSettings(**settings_overrides(args, WORKER_OPTIONS))


def _run_worker(args: argparse.Namespace) -> int:
    from cloud.worker import run_worker

    return asyncio.run(run_worker(worker_settings(args), args.nats))


def _run_api(args: argparse.Namespace) -> int:
    from cloud.api import create_app

    settings = ApiSettings(**settings_overrides(args, API_OPTIONS))
    # A bad option or an exposure the rule refuses: a ValueError, said by `main` (status 2).
    return serve_http(
        lambda: create_app(settings, nats_url=args.nats),
        name="cloud api",
        host=settings.host,
        port=settings.port,
        log_level="info",
        read_timeout_s=args.read_timeout_s,
        write_timeout_s=args.write_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
    )


def main(argv: list[str]) -> int:
    """Entry point of `hybridgen cloud`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    as_service(args.context)  # the context's URL and CA, never its operator's login
    try:
        if args.command == "worker":
            return _run_worker(args)
        return _run_api(args)
    except HybridgenError as exc:
        print(f"hybridgen cloud {args.command}: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"hybridgen cloud {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

"""`hybridgen cloud worker|api`: run a cloud generation worker or the cloud HTTP API."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from broker.errors import HybridgenError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen cloud",
        description="Cloud generation: workers (transformers continuous batching) serving "
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
    worker.add_argument(
        "--model-dir",
        type=Path,
        help="checkpoint folder (default: cloud/ of the current model set)",
    )
    worker.add_argument("--model-set", help="model-set version to load (default: CURRENT)")
    worker.add_argument("--model", help="model name served (default hg-cloud)")
    worker.add_argument("--nats", help="NATS URL (default HG_NATS_URL or nats://127.0.0.1:4222)")
    worker.add_argument("--node-id", help="node id (default cloud-<host>-<hex>)")
    worker.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when present")
    worker.add_argument("--threads", type=int, help="torch threads on CPU (default: all cores)")
    worker.add_argument("--max-queue-requests", type=int, help="admitted requests at most")
    worker.add_argument("--max-queue-tokens", type=int, help="admitted prompt+max_tokens at most")
    worker.add_argument("--max-batch-requests", type=int, help="sequences per forward step")
    worker.add_argument("--cache-tokens", type=int, help="KV-cache capacity in tokens (CPU)")
    worker.add_argument(
        "--drain-timeout",
        type=float,
        dest="drain_timeout_s",
        help="seconds in-flight requests get on SIGTERM (default 30)",
    )

    api = sub.add_parser(
        "api",
        help="serve the OpenAI-compatible cloud API",
        description="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /healthz, /readyz, /metrics) forwarding to cloud workers over NATS.",
    )
    api.add_argument("--host", help="address (default 127.0.0.1)")
    api.add_argument("--port", type=int, help="port (default 8500; 0 = any free port)")
    api.add_argument("--nats", help="NATS URL (default HG_NATS_URL or nats://127.0.0.1:4222)")
    api.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        help="accepted API key (repeat; default HG_CLOUD_API_KEYS; none = open)",
    )
    return parser  # fmt: skip


def _overrides(args: argparse.Namespace, names: list[str]) -> dict[str, object]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _run_worker(args: argparse.Namespace) -> int:
    from cloud.settings import WorkerSettings
    from cloud.worker import run_worker

    settings = WorkerSettings(
        **_overrides(  # type: ignore[arg-type]
            args,
            [
                "model_dir",
                "model_set",
                "model",
                "node_id",
                "device",
                "threads",
                "max_queue_requests",
                "max_queue_tokens",
                "max_batch_requests",
                "cache_tokens",
                "drain_timeout_s",
            ],
        )
    )
    return asyncio.run(run_worker(settings, args.nats))


def _run_api(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud.api import create_app
    from cloud.settings import ApiSettings

    settings = ApiSettings(
        **_overrides(  # type: ignore[arg-type]
            args, ["host", "port", "api_keys"]
        )
    )
    app = create_app(settings, nats_url=args.nats)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of `hybridgen cloud`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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

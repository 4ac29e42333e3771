"""`hybridgen up`: its arguments and `main`.

Builds the model set on first run, makes the default children, starts the broker and every
child in order, tells where everything is, and waits for Ctrl-C/SIGTERM (or for the console
to close); then stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from broker.addresses import is_loopback
from broker.cli import StopSignals
from broker.config import TLSFiles
from broker.contexts import DEFAULT_CONTEXT, check_name
from broker.errors import HybridgenError
from broker.settings import hg_home
from hybridgen.up import log
from hybridgen.up.bootstrap import ensure_models
from hybridgen.up.bus import DEFAULT_PORT
from hybridgen.up.children import (
    API_DRAIN_S,
    EDGE_DRAIN_S,
    STOP_MARGIN_S,
    WORKER_DRAIN_S,
    console_child,
    default_children,
    give_cloud_api_an_admin_key,
    give_edges_an_admin_key,
    wants_console,
)
from hybridgen.up.spec import ChildSpec
from hybridgen.up.supervisor import Launcher
from hybridgen.up.tell import _log_to_file, _tell, where_lines


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs 1 or more, got {value}")
    return value


def _context_name(text: str) -> str:
    try:
        return check_name(text)
    except HybridgenError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen up",
        description="Start everything locally: the embedded NATS broker (data under $HG_HOME) "
        "and the hybridgen services. A service that dies is restarted (with back-off) while "
        "the rest keep serving; Ctrl-C or SIGTERM drains and stops them all.",
    )
    _add_service_args(parser)
    _add_broker_args(parser)
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=None,
        help=f"on stop, how long each service may finish its open requests (default: workers "
        f"{WORKER_DRAIN_S:g}, the cloud API {API_DRAIN_S:g}, edges {EDGE_DRAIN_S:g}); each is "
        f"killed {STOP_MARGIN_S:g} s past it",
    )
    parser.add_argument("--home", type=Path, default=None, help="data directory (default $HG_HOME)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _add_service_args(parser: argparse.ArgumentParser) -> None:
    """Which services run, the model set they need, and where their HTTP APIs listen."""
    parser.add_argument(
        "--headless",
        action="store_true",
        help="do not open the operator console (it opens when this runs on a terminal); "
        "Ctrl-C or SIGTERM then stops everything",
    )
    parser.add_argument(
        "--broker-only", action="store_true", help="start only the NATS broker, no services"
    )
    parser.add_argument(
        "--profile",
        default="smollm2",
        choices=["smollm2", "tiny", "quick", "full"],
        help="model set built on first run when none is installed: smollm2 (default, the real "
        "SmolLM2-135M-Instruct, about a minute) or a trained lab profile",
    )
    parser.add_argument(
        "--workers", type=_count, default=1, help="cloud workers to start (default 1)"
    )
    parser.add_argument(
        "--edges",
        type=_count,
        default=1,
        help="edge nodes to start (default 1); edge i listens on --edge-port + i",
    )
    parser.add_argument("--api-port", type=int, default=8500, help="cloud API port (default 8500)")
    parser.add_argument(
        "--edge-port", type=int, default=8400, help="(first) edge API port (default 8400)"
    )
    parser.add_argument(
        "--http-host", default="127.0.0.1", help="address the HTTP APIs bind (default 127.0.0.1)"
    )


def _add_broker_args(parser: argparse.ArgumentParser) -> None:
    """The broker: external or our own, its address, and its security."""
    parser.add_argument(
        "--nats-url", default=None, help="use this NATS server instead of starting one"
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker listen address")
    parser.add_argument(
        "--context",
        type=_context_name,
        default=DEFAULT_CONTEXT,
        help=f"save how to reach this network as this context (default {DEFAULT_CONTEXT}) and "
        "make it current: `hybridgen tui`, `fleet` and `models` run by hand then use it",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"broker client port (default {DEFAULT_PORT}; a free one if it is taken)",
    )
    parser.add_argument(
        "--insecure-nats",
        action="store_true",
        help="run the broker without users, permissions or TLS (debugging only; by default "
        "every service connects as its own user, credentials under $HG_HOME/secrets)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        help="broker TLS certificate (with --tls-key and --tls-ca; by default a --host beyond "
        "loopback gets a private CA made under $HG_HOME/secrets/tls); it must name 127.0.0.1",
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="key of --tls-cert")
    parser.add_argument(
        "--tls-ca", type=Path, default=None, help="CA that signed --tls-cert (given to clients)"
    )


async def _up(args: argparse.Namespace) -> int:
    home = args.home or hg_home()
    children: list[ChildSpec] = []
    if not args.broker_only:
        status = await asyncio.to_thread(ensure_models, home, args.profile)
        if status != 0:
            print(f"hybridgen up: building the models failed (status {status})", file=sys.stderr)
            return status
        children = default_children(args)
        give_edges_an_admin_key(children, home / "secrets")
        give_cloud_api_an_admin_key(children, home / "secrets")
    console = wants_console(args)
    if not _broker_args_ok(args):
        return 2
    launcher = _launcher(args, home, children)
    signals = StopSignals()
    _log_to_file(home / "logs" / "launcher.log", only=console)
    if console:
        print("hybridgen: starting the network; the console opens when it is ready", flush=True)
        print(f"  launcher log: {home / 'logs' / 'launcher.log'}", flush=True)
    try:
        await launcher.start()
        await launcher.ready()
    except HybridgenError as exc:
        await launcher.stop()
        signals.close()
        log.error("hybridgen up: %s", exc.message)
        print(f"hybridgen up: {exc.message}", file=sys.stderr)
        return 1
    return await _serve(launcher, signals, console=console)


def _broker_args_ok(args: argparse.Namespace) -> bool:
    """False (said on stderr) when the TLS files are not given together; warns about a
    broker open beyond loopback."""
    tls_given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(tls_given) and not all(tls_given):
        print("hybridgen up: give --tls-cert, --tls-key and --tls-ca together", file=sys.stderr)
        return False
    if args.insecure_nats and not args.nats_url and not is_loopback(args.host):
        print(
            f"hybridgen up: WARNING: the broker listens on {args.host} without "
            "authentication or TLS (--insecure-nats)",
            file=sys.stderr,
        )
    return True


def _launcher(args: argparse.Namespace, home: Path, children: list[ChildSpec]) -> Launcher:
    """The launcher the arguments ask for."""
    tls_given = [args.tls_cert, args.tls_key, args.tls_ca]
    return Launcher(
        home=home,
        children=children,
        nats_url=args.nats_url,
        host=args.host,
        port=args.port,
        secure=not args.insecure_nats,
        tls=TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if all(tls_given) else None,
        context=args.context,
    )


async def _serve(launcher: Launcher, signals: StopSignals, *, console: bool) -> int:
    """Tell where everything is, open the console (if any), run until stopped, then stop."""
    try:
        for line in where_lines(launcher):
            _tell(line, terminal=not console)
        if console:  # the console owns the terminal until it exits
            await launcher.start_child(console_child())
        else:
            print("  Ctrl-C stops everything.", flush=True)
        return await launcher.wait(signals)
    finally:
        await launcher.stop()
        signals.close()
        _tell("hybridgen: stopped", terminal=True)


def main(argv: list[str]) -> int:
    """`hybridgen up`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_up(args))

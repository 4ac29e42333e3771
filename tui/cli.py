"""`hybridgen tui`: the operator console.

hybridgen tui [--context NAME] [--nats URL] [--user U --password P | --password-file F |
              --creds FILE] [--tls-ca FILE] [--stale-after S] [--gone-after S]
              [--edge-api-key KEY]

With none of the bus options, the console reads `HG_NATS_*`, else the current context (the
one `hybridgen up` saves): after `hybridgen up`, `hybridgen tui` finds its network.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from broker.errors import HybridgenError
from broker.settings import BusSettings, add_context_argument, settings_overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen tui",
        description="The operator console: fleet, events, node detail, drain and resume, "
        "routing policy, model roll-out and roll back, test prompts.",
    )
    add_context_argument(parser)
    parser.add_argument(
        "--nats", dest="url", default=None, help="NATS URL (env HG_NATS_URL, else the context's)"
    )
    parser.add_argument("--user", default=None, help="NATS user (env HG_NATS_USER)")
    parser.add_argument("--password", default=None, help="NATS password (env HG_NATS_PASSWORD)")
    parser.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="file holding the NATS password (env HG_NATS_PASSWORD_FILE)",
    )
    parser.add_argument("--creds", type=Path, default=None, help="NATS .creds file")
    parser.add_argument("--tls-ca", type=Path, default=None, help="CA bundle of the server cert")
    parser.add_argument(
        "--stale-after", type=float, default=5.0, help="seconds of silence before 'stale' (5)"
    )
    parser.add_argument(
        "--gone-after",
        type=float,
        default=60.0,
        help="seconds before a node leaves (60)",
    )
    parser.add_argument(
        "--edge-api-key",
        default=os.environ.get("HG_CONSOLE_EDGE_API_KEY") or None,
        help="bearer key for the edges' HTTP APIs, used by test prompts "
        "(env HG_CONSOLE_EDGE_API_KEY)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the console until the operator quits; 2 on bad arguments."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.stale_after <= 0 or args.gone_after < args.stale_after:
        print("hybridgen tui: need 0 < --stale-after <= --gone-after", file=sys.stderr)
        return 2
    # The console owns the terminal: keep library logs off it.
    logging.basicConfig(level=logging.WARNING, handlers=[logging.NullHandler()])
    from tui.app import HybridgenConsole
    from tui.event_log import EventLog
    from tui.state import FleetState

    given = ["context", "url", "user", "password", "password_file", "creds", "tls_ca"]
    try:
        bus = BusSettings.resolve(**settings_overrides(args, given))
    except HybridgenError as exc:
        print(f"hybridgen tui: {exc.message}", file=sys.stderr)
        return 1
    fleet = FleetState(stale_after=args.stale_after, gone_after=args.gone_after)
    HybridgenConsole(bus, fleet=fleet, events=EventLog(), edge_api_key=args.edge_api_key).run()
    return 0

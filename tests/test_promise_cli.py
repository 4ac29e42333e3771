"""The commands README.md and docs/edge.md tell a user to type exist, with the options named.

The command tables are read from the documents themselves, so a command or benchmark that
is renamed or dropped fails here until the document says so too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.bus import connect, connect_settings
from broker.config import self_signed_tls
from broker.errors import Unavailable
from broker.settings import BusSettings
from hybridgen.benches import BENCHES
from hybridgen.cli import COMMANDS
from hybridgen.up.cli import _parser
from tests.waits import BOUND_S

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
EDGE_MD = (REPO / "docs" / "edge.md").read_text(encoding="utf-8")
#: Benchmarks that size their run with their own options (README, "Benchmarks").
NO_QUICK = {"console", "load", "routing"}


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a Markdown document."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def help_text(module: str, function: str, argv: list[str]) -> str:
    """What `function(argv)` of `module` prints for `--help` (argparse exits 0)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        getattr(importlib.import_module(module), function)(argv)
    return out.getvalue()


def test_every_hybridgen_command_the_documents_name_exists() -> None:
    # In a code span, or at the start of a command line (after `&&` or variables).
    command = r"(?:`|^|&& |\S+=\S+ )hybridgen ([a-z][\w-]*)"
    named = set(re.findall(command, README + EDGE_MD, re.MULTILINE))
    named -= {"is"}  # the ready line: "hybridgen is ready: ..."
    assert named <= set(COMMANDS), sorted(named - set(COMMANDS))
    assert {"up", "broker", "models", "cloud", "edge", "tui", "bench", "fleet"} <= named


def test_the_benchmark_table_is_the_benchmarks_there_are() -> None:
    """README, "Benchmarks": each row is a `hybridgen bench NAME`, and every bench is a row;
    each prints one JSON object with `--json`, and all but three have `--quick`."""
    table = re.findall(r"^\| `([\w-]+)` \|", section(README, "Benchmarks"), re.MULTILINE)
    assert sorted(table) == sorted(BENCHES)
    listed = help_text("hybridgen.benches", "main", ["--help"]).splitlines()[-1]
    assert sorted(listed.removeprefix("benchmarks: ").split(", ")) == sorted(table)
    for name, (module, function) in BENCHES.items():
        options = help_text(module, function, ["--help"])
        assert "--json" in options, name
        assert ("--quick" in options) is (name not in NO_QUICK), name


def test_up_help_lists_the_options_the_readme_names() -> None:
    """README, "up": ports, `--profile`, `--broker-only`, `--headless`, `--workers`,
    `--edges`, `--edge-port`, `--host`, `--insecure-nats`, `--tls-*`."""
    text = _parser().format_help()
    for option in ("--port", "--api-port", "--edge-port", "--profile", "--broker-only",
                   "--headless", "--workers", "--edges", "--host", "--insecure-nats",
                   "--tls-cert", "--tls-key", "--tls-ca", "--drain-timeout-s"):  # fmt: skip
        assert re.search(rf"(^|\s){re.escape(option)}\b", text), option


def test_python_m_edge_is_the_same_program_as_hybridgen_edge() -> None:
    """docs/edge.md, "Running it": `python -m edge --help` is `hybridgen edge --help`."""

    def run(*argv: str) -> str:
        done = subprocess.run(
            [*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=BOUND_S
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    alone = run(sys.executable, "-m", "edge")
    assert alone == run(sys.executable, "-m", "hybridgen", "edge")
    for option in ("--port", "--node-id", "--nats", "--model-dir", "--precision", "--threads",
                   "--no-cloud", "--policy", "--api-key", "--user-key", "--allowed-origin",
                   "--allowed-host", "--read-timeout-s", "--write-timeout-s"):  # fmt: skip
        assert re.search(rf"(^|\s){re.escape(option)}\b", alone), option


@contextlib.asynccontextmanager
async def broker_only(home: Path, *options: str) -> AsyncIterator[str]:
    """`hybridgen up --broker-only` with `options`; yields what it printed up to its ready
    line, and stops it (SIGINT, status 0) after."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hybridgen", "up", "--broker-only", "--port", "-1",
        "--home", str(home), *options,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        output = ""
        async with asyncio.timeout(BOUND_S):
            while "Ctrl-C stops everything" not in output:
                line = await process.stdout.readline()
                assert line, output
                output += line.decode()
        yield output
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(BOUND_S):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def broker_url(output: str) -> str:
    return output.split("NATS broker at ", 1)[1].split()[0]


async def test_up_insecure_nats_runs_a_broker_that_lets_anyone_in(tmp_path: Path) -> None:
    """README, "Security": `up --insecure-nats` turns the users and passwords off (and
    without it an anonymous client is refused: tests/test_up.py)."""
    async with broker_only(tmp_path, "--insecure-nats") as output:
        anonymous = await connect(broker_url(output), name="anonymous")  # no user, no password
        await anonymous.close()
        assert "the bus has NO authentication" in output
    assert not list((tmp_path / "secrets").glob("*.password"))


async def test_up_runs_the_broker_with_your_own_tls_certificate(tmp_path: Path) -> None:
    """README, "Several machines": `up` takes your own certificate with
    `--tls-cert/--tls-key/--tls-ca` instead of making a private CA."""
    mine = self_signed_tls(tmp_path / "mine", ["127.0.0.1"])
    assert mine.ca is not None
    home = tmp_path / "home"
    options = ["--tls-cert", str(mine.cert), "--tls-key", str(mine.key), "--tls-ca", str(mine.ca)]
    async with broker_only(home, *options) as output:
        url = broker_url(output)
        assert url.startswith("tls://"), output
        settings = BusSettings(
            url=url,
            user="operator",
            password_file=home / "secrets" / "operator.password",
            tls_ca=mine.ca,
        )
        client = await connect_settings(settings, name="trusts-my-ca")
        await client.close()
        with pytest.raises(Unavailable):  # a client that trusts no CA of ours is refused
            await connect_settings(settings.model_copy(update={"tls_ca": None}), name="no-ca")
    assert not (home / "secrets" / "tls").exists()  # no private CA made

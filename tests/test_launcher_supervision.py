"""The launcher's supervision with real child processes and no services: restart back-off
(doubling, reset after a stable run), the stop sequence (SIGTERM in reverse start order while
the broker still serves, SIGKILL for a child that ignores it) and the children's logs.

Small scripts stand in for the services: what is tested is the launcher, and a script can be
made to crash, hang or ignore SIGTERM on cue. Time up is read from a clock the test moves
(`Backoff.clock`), so "up a minute" needs no real minute; every wait is on a condition.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hybridgen.up.children import console_child, default_children
from hybridgen.up.spec import ChildSpec
from hybridgen.up.supervisor import Backoff, Launcher
from hybridgen.up.tell import where_lines
from tests.waits import BOUND_S, eventually

#: A child that counts its runs in the file it is given: runs 1-3 and 5 crash at once
#: (status 3), runs 4 and 6 on stay up until killed.
FLAKY = """\
n=$(( $(cat "$1" 2>/dev/null || echo 0) + 1 )); echo $n > "$1"
case $n in 4|6) exec sleep 600 ;; esac
exit 3
"""

#: A child that says so in its log, and on SIGTERM writes its name (and whether the
#: broker at `HG_NATS_URL` still answers) to the file it is given, then dies of it.
POLITE = """\
import os, signal, socket, sys
from urllib.parse import urlsplit

name, record = sys.argv[1], sys.argv[2]
print(f"{name} serving", flush=True)


def on_term(signum, frame):
    url = urlsplit(os.environ["HG_NATS_URL"])
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        broker = sock.recv(4).decode()  # a nats-server greets with INFO
    with open(record, "a") as out:
        out.write(f"{name} {broker}\\n")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


signal.signal(signal.SIGTERM, on_term)
open(record + "." + name, "w").close()  # ready: the handler is in place
while True:
    signal.pause()
"""

#: A child that ignores SIGTERM, starts a helper in its process group, writes the helper's
#: pid to the file it is given, and waits forever.
STUBBORN = """\
import signal, subprocess, sys

signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen(["sleep", "600"])
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(str(helper.pid))
import os
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    signal.pause()
"""


def launcher_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hybridgen.launcher"]


def restart_lines(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[int, str, str]]:
    """(status, restart delay as logged, log file) of each death of `name` the launcher saw."""
    pattern = (
        rf"^{name} \(pid \d+\) exited with status (-?\d+); restarting it in (\S+) s \(log: (.+)\)$"
    )
    found = [re.match(pattern, line) for line in launcher_lines(caplog)]
    return [(int(m.group(1)), m.group(2), m.group(3)) for m in found if m]


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def stopped_at_end(tmp_path: Path) -> AsyncIterator[list[Launcher]]:
    """Launchers the test makes; each is stopped at the end, and nothing it ran survives."""
    made: list[Launcher] = []
    yield made
    for launcher in made:
        pids = [process.pid for _, process in launcher.processes]
        await asyncio.wait_for(launcher.stop(), BOUND_S)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("up_s", "after"),
    [
        pytest.param(60.0, ["0.1", "0.2"], id="up-a-minute-starts-over"),
        pytest.param(59.0, ["0.4", "0.4"], id="up-less-keeps-the-streak"),
    ],
)
async def test_backoff_doubles_on_quick_crashes_and_resets_after_a_stable_run(
    up_s: float,
    after: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stopped_at_end: list[Launcher],
) -> None:
    """Three quick crashes wait 0.1, 0.2 and 0.4 s (the maximum); then run 4 stays up
    `up_s` seconds (by the launcher's clock) and is killed. Up the stable minute, the streak
    starts over: 0.1 s, then 0.2 s for the quick crash of run 5. A second less, it goes on."""
    caplog.set_level(logging.INFO, logger="hybridgen.launcher")
    now = [0.0]  # the launcher's clock, moved by hand
    assert Backoff().stable_s == 60.0  # the documented default: a minute
    backoff = Backoff(initial=0.1, maximum=0.4, clock=lambda: now[0])
    launcher = Launcher(home=tmp_path, backoff=backoff, secure=False)
    stopped_at_end.append(launcher)
    runs, script = tmp_path / "runs", tmp_path / "flaky.sh"
    script.write_text(FLAKY)

    def at(run: int, restarts: int) -> bool:
        counted = runs.read_text().strip() if runs.exists() else ""
        return launcher.restarts.get("flaky") == restarts and counted == str(run)

    await launcher.start_child(ChildSpec("flaky", ["sh", str(script), str(runs)]))
    await eventually(lambda: at(4, 3), "run 4 up after three quick crashes")
    now[0] += up_s
    os.kill(launcher.processes[0][1].pid, signal.SIGKILL)
    await eventually(lambda: at(6, 5), "run 6 up after run 4's death and run 5's crash")

    log_file = str(tmp_path / "logs" / "flaky.log")
    assert restart_lines(caplog, "flaky") == [
        (3, "0.1", log_file),
        (3, "0.2", log_file),
        (3, "0.4", log_file),
        (-signal.SIGKILL, after[0], log_file),
        (3, after[1], log_file),
    ]


async def test_stop_sends_sigterm_in_reverse_order_while_the_broker_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, stopped_at_end: list[Launcher]
) -> None:
    """Children that honour SIGTERM get it last-started first, each while the broker still
    answers; none needs SIGKILL; each wrote to `$HG_HOME/logs/<name>.log`."""
    caplog.set_level(logging.INFO, logger="hybridgen.launcher")
    script, record = tmp_path / "polite.py", tmp_path / "stopped"
    script.write_text(POLITE)
    names = ["first", "second", "third"]
    children = [
        ChildSpec(name, [sys.executable, str(script), name, str(record)], stop_timeout=BOUND_S)
        for name in names
    ]
    launcher = Launcher(home=tmp_path / "home", children=children, port=-1, secure=False)
    stopped_at_end.append(launcher)
    await launcher.start()
    await eventually(
        lambda: all(Path(f"{record}.{name}").exists() for name in names), "SIGTERM handlers"
    )
    processes = [process for _, process in launcher.processes]
    await asyncio.wait_for(launcher.stop(), BOUND_S)

    assert record.read_text() == "third INFO\nsecond INFO\nfirst INFO\n"
    assert [p.returncode for p in processes] == [-signal.SIGTERM] * 3
    assert not [line for line in launcher_lines(caplog) if "ignored SIGTERM" in line]
    for name in names:
        log_file = tmp_path / "home" / "logs" / f"{name}.log"
        assert log_file.read_text() == f"{name} serving\n"
        assert log_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
async def test_a_child_that_ignores_sigterm_is_killed_after_its_stop_timeout(
    foreground: bool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stopped_at_end: list[Launcher],
) -> None:
    """SIGTERM, then SIGKILL once `stop_timeout` passes: the child dies of SIGKILL and the
    log says why. A background child's helpers (its process group) go with it."""
    caplog.set_level(logging.INFO, logger="hybridgen.launcher")
    script, helper_file = tmp_path / "stubborn.py", tmp_path / "helper.pid"
    script.write_text(STUBBORN)
    spec = ChildSpec(
        "stubborn", [sys.executable, str(script), str(helper_file)],
        foreground=foreground, stop_timeout=0.5,
    )  # fmt: skip
    launcher = Launcher(home=tmp_path, secure=False)
    stopped_at_end.append(launcher)
    process = await launcher.start_child(spec)
    await eventually(helper_file.exists, "the child ignores SIGTERM and has a helper")
    helper = int(helper_file.read_text())
    try:
        await asyncio.wait_for(launcher.stop(), BOUND_S)
        assert process.returncode == -signal.SIGKILL
        assert "stubborn ignored SIGTERM for 0.5 s; killing it" in launcher_lines(caplog)
        if not foreground:
            await eventually(lambda: not alive(helper), "the helper gone with its group")
    finally:
        if alive(helper):
            os.kill(helper, signal.SIGKILL)


async def test_the_foreground_child_leaving_stops_everything(
    tmp_path: Path, stopped_at_end: list[Launcher]
) -> None:
    """The foreground child (the console) exits: `wait()` returns its status at once, as
    leaving the console does, and `stop()` then ends the background ones."""
    launcher = Launcher(home=tmp_path, secure=False)
    stopped_at_end.append(launcher)
    background = await launcher.start_child(ChildSpec("service", ["sleep", "600"]))
    release = tmp_path / "leave"
    leave = f"while [ ! -e {release} ]; do sleep 0.05; done; exit 7"
    await launcher.start_child(ChildSpec("console", ["sh", "-c", leave], foreground=True))
    waiting = asyncio.ensure_future(launcher.wait())
    release.touch()
    assert await asyncio.wait_for(waiting, BOUND_S) == 7
    assert background.returncode is None  # nothing else was stopped by the exit itself
    await asyncio.wait_for(launcher.stop(), BOUND_S)
    assert background.returncode == -signal.SIGTERM
    assert launcher.restarts == {}  # the console is never restarted


def test_default_drain_times_and_kill_margins() -> None:
    """Edge and cloud API drain 10 s, workers 30 s, each killed 10 s past it; one
    `--drain-timeout-s` sets them all."""
    args = argparse.Namespace(
        workers=1, edges=1, api_port=8500, edge_port=8400, http_host="127.0.0.1"
    )
    children = default_children(args)
    assert [c.name for c in children] == ["cloud-worker", "cloud-api", "edge"]
    assert [c.stop_timeout for c in children] == [40.0, 20.0, 20.0]
    assert [c.argv[c.argv.index("--drain-timeout-s") + 1] for c in children] == ["30", "10", "10"]
    args.drain_timeout_s = 2.0
    children = default_children(args)
    assert [c.stop_timeout for c in children] == [12.0, 12.0, 12.0]
    assert [c.argv[c.argv.index("--drain-timeout-s") + 1] for c in children] == ["2", "2", "2"]
    console = console_child()
    assert console.foreground and console.role == "operator"


async def test_up_tells_each_child_pid_url_and_log(
    tmp_path: Path, stopped_at_end: list[Launcher]
) -> None:
    """What `up` prints: each service's pid, URL and log file, then the ready line."""
    launcher = Launcher(home=tmp_path, secure=False)
    stopped_at_end.append(launcher)
    url = "http://127.0.0.1:8400"
    edge = await launcher.start_child(ChildSpec("edge", ["sleep", "600"], url=url))
    worker = await launcher.start_child(ChildSpec("cloud-worker", ["sleep", "600"]))
    logs, launcher.url = tmp_path / "logs", "nats://127.0.0.1:4222"
    lines = where_lines(launcher)
    assert lines[1:3] == [
        f"  edge: pid {edge.pid}, serving {url}, output {logs / 'edge.log'}",
        f"  cloud-worker: pid {worker.pid}, output {logs / 'cloud-worker.log'}",
    ]
    ready = f"hybridgen is ready: edge {url} · NATS nats://127.0.0.1:4222 · logs {logs}"
    assert lines[-1] == ready

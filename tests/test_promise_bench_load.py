"""docs/edge.md, "Load": `hybridgen bench load` stops with every process it started on
SIGTERM or Ctrl-C, and a client answered 503 waits its `Retry-After`.

The first runs the bench as a real process on the session's tiny model set and reads the
processes it started from /proc; the second drives the bench's own client loop against a
real uvicorn server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from hybridgen.benches.load import Run, build_parser, client_loop
from models.registry import ModelSet
from tests.live import serve_app
from tests.waits import BOUND_S, wait_until

#: What the bench starts: a nats-server, a cloud worker and an edge (matched on argv).
STARTED = {
    "nats-server": lambda argv: Path(argv[0]).name == "nats-server",
    "cloud worker": lambda argv: argv[1:4] == ["-m", "cloud", "worker"],
    "edge": lambda argv: argv[1:3] == ["-m", "edge"],
}


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def descendants(root: int) -> dict[int, tuple[str, list[str]]]:
    """Every live process under `root`: pid -> (start time in clock ticks, argv)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: dict[int, tuple[str, list[str]]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        fields = _stat(pid)
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
            if fields is not None and argv:
                found[pid] = (fields[19], argv)
        todo += children.get(pid, [])
    return found


def running(pid: int, started: str) -> bool:
    """Whether the process `pid` that started at `started` still runs (a zombie is dead)."""
    fields = _stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


def ignore_sigint() -> None:
    """As a shell's background job starts: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_sigint() -> None:
    """As a foreground command starts: SIGINT (Ctrl-C) with its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "start"),
    [(signal.SIGTERM, ignore_sigint), (signal.SIGINT, default_sigint)],
    ids=["sigterm-in-the-background", "ctrl-c"],
)
def test_a_signal_stops_the_bench_and_every_process_it_started(
    sig: signal.Signals,
    start: Callable[[], None],
    tiny_models: ModelSet,
    tiny_models_home: Path,
    tmp_path: Path,
) -> None:
    """Once the bench has started its nats-server, worker and edge (and is far from its
    end: an hour to run), one signal ends it with status 130, and no process it started is
    left. SIGTERM is sent to a bench started as a background job (SIGINT ignored), where a
    supervisor's `kill` comes from; Ctrl-C to one started in the foreground."""
    argv = [sys.executable, "-m", "hybridgen", "bench", "load", "--streams", "2"]
    argv += ["--seconds", "3600", "--set", tiny_models.version, "--home", str(tiny_models_home)]
    err = tmp_path / "stderr"
    with err.open("wb") as out:
        bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out, preexec_fn=start)
    started: dict[int, tuple[str, list[str]]] = {}
    try:

        def all_started() -> bool:
            assert bench.poll() is None, err.read_text(errors="replace")[-3000:]
            started.update(descendants(bench.pid))
            return all(any(match(a) for _, a in started.values()) for match in STARTED.values())

        wait_until(all_started, "the bench's nats-server, worker and edge")
        bench.send_signal(sig)
        returncode = bench.wait(BOUND_S)
        stderr = err.read_text(errors="replace")
        assert returncode == 130, stderr[-3000:]
        assert "hybridgen bench load: interrupted; every process stopped" in stderr
        left = [argv for pid, (t, argv) in started.items() if running(pid, t)]
        assert left == []
    finally:  # whatever the test found, it leaves nothing running
        if bench.poll() is None:
            bench.kill()
        bench.wait()
        for pid, (t, _) in started.items():
            if running(pid, t):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


#: How long the client loop runs: it waits out a 3600 s Retry-After until then.
WINDOW_S = 4.0


def shedding_edge(retry_afters: list[str], seen: list[str]) -> FastAPI:
    """An edge that sheds every request: 503 with the next of `retry_afters` (the last one
    for every request after), appended to `seen` as it answers. A stand-in: a real edge
    decides its own Retry-After, and the test must choose the values (0, then an hour)."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def shed() -> JSONResponse:
        value = retry_afters[min(len(seen), len(retry_afters) - 1)]
        seen.append(value)
        error = {"message": "overloaded", "type": "overloaded_error", "code": "overloaded"}
        return JSONResponse({"error": error}, status_code=503, headers={"Retry-After": value})

    return app


async def test_a_client_answered_503_waits_its_retry_after() -> None:
    """Told `Retry-After: 0` the client comes back at once; told `Retry-After: 3600` it
    does not come back before its run ends: exactly two requests in the window, the
    second of which a client ignoring the header (or waiting a fixed second) would
    follow with more."""
    seen: list[str] = []
    args = build_parser().parse_args(["--cloud-every", "0"])
    run = Run()
    async with (
        serve_app(shedding_edge(["0", "3600"], seen)) as (_, url),
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as client,
    ):
        await client_loop(client, 1, args, time.monotonic() + WINDOW_S, run)
    assert seen == ["0", "3600"]
    assert [(r.status, r.retry_after, r.shed) for r in run.results] == [
        (503, 0.0, True),
        (503, 3600.0, True),
    ]

"""The model bootstrap of `hybridgen up`: the default model set, built once on first run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def ensure_models(home: Path, profile: str) -> int:
    """Install the default model set on first run (progress bars on this terminal).

    Returns:
        0 when a model set is installed (already, or now), else the build's exit status.
    """
    from broker.errors import NotFound
    from models.registry import resolve

    try:
        resolve(home=home)
        return 0
    except NotFound:
        pass
    print(
        f"hybridgen: no model set under {home / 'models'}; building the {profile!r} model set "
        "once (later runs reuse it)",
        flush=True,
    )
    argv = [sys.executable, "-m", "models", "build", "--profile", profile, "--home", str(home)]
    return subprocess.call(argv)

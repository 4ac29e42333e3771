"""What `hybridgen up` tells: the running network's URLs, logs and credentials, and the log
file those lines (and the launcher's own log lines) also go to.

The lines go to the terminal unless the console owns it, and always to `launcher.log`, never
twice on the terminal.
"""

from __future__ import annotations

import logging
from pathlib import Path

from broker.server import open_private_log, private_folder
from broker.settings import hg_home
from hybridgen.up.bus import OPERATOR_USER
from hybridgen.up.children import CLOUD_ADMIN_KEY, EDGE_ADMIN_KEY
from hybridgen.up.supervisor import Launcher

#: What `up` prints about the network; it also goes to the launcher log (never twice on the
#: terminal).
_where_log = logging.getLogger("hybridgen.up")


def _log_to_file(path: Path, *, only: bool) -> None:
    """Send the launcher's own log lines to `path` too (`only`: the console owns the terminal)."""
    private_folder(path.parent)
    open_private_log(path).close()  # created 0600: FileHandler keeps the mode
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    if only:
        for old in list(root.handlers):
            root.removeHandler(old)
    root.addHandler(handler)
    _where_log.propagate = False
    _where_log.setLevel(logging.INFO)
    _where_log.addHandler(handler)


def _tell(line: str, *, terminal: bool) -> None:
    """One line of what `up` says: on the terminal (unless the console owns it) and in the log."""
    _where_log.info("%s", line)
    if terminal:
        print(line, flush=True)


def where_lines(launcher: Launcher) -> list[str]:
    """What `up` tells about the running network: URLs, logs, and the ready line last."""
    apis = [spec for spec, _ in launcher.processes if spec.url]
    edges = [spec.url for spec in apis if spec.name.startswith("edge")]
    cloud = [spec.url for spec in apis if not spec.name.startswith("edge")]
    lines = [f"NATS broker at {launcher.url} (also in {launcher.url_file})"]
    for spec, process in launcher.processes:
        where = "terminal" if spec.foreground else launcher.log_path(spec.name)
        serving = f", serving {spec.url}" if spec.url else ""
        lines.append(f"  {spec.name}: pid {process.pid}{serving}, output {where}")
    lines.append(f"  logs in {launcher.logs_dir}")
    key_file = launcher.secrets_dir / EDGE_ADMIN_KEY
    if edges and key_file.is_file():  # as Jupyter shows its token, but not into the log
        lines.append(
            f"  users' data on the edge needs its admin key, e.g. curl -H \"Authorization: "
            f"Bearer $(cat {key_file})\" {edges[0]}/v1/users/<id>/export (keys for an app's "
            "own users: docs/edge.md)"
        )
    cloud_key = launcher.secrets_dir / CLOUD_ADMIN_KEY
    if cloud and cloud_key.is_file():
        lines.append(
            f'  usage on the cloud API needs its admin key: curl -H "Authorization: Bearer '
            f'$(cat {cloud_key})" {cloud[0]}/v1/usage (limits per key: docs/operations.md)'
        )
    lines += [_bus_line(launcher), _context_line(launcher)]
    parts = []
    if edges:
        parts.append(("edge " if len(edges) == 1 else "edges ") + ", ".join(map(str, edges)))
    if cloud:
        parts.append("cloud API " + ", ".join(map(str, cloud)))
    parts += [f"NATS {launcher.url}", f"logs {launcher.logs_dir}"]
    lines.append("hybridgen is ready: " + " · ".join(parts))
    return lines


def _context_line(launcher: Launcher) -> str:
    """Which context the commands run by hand use (and the HG_HOME they need, if another)."""
    home = launcher.home.absolute()
    other_home = home != hg_home().absolute()
    needs = f" with HG_HOME={home}" if other_home else ""
    return (
        f"  saved as context {launcher.context!r} (current): hybridgen tui, fleet and models "
        f"run by hand{needs} connect with it (hybridgen context show)"
    )


def _bus_line(launcher: Launcher) -> str:
    """How the bus is secured, and where the credentials are."""
    if not launcher.secure:
        return "  the bus has NO authentication (--insecure-nats or --nats-url)"
    tls = f"; TLS, CA {launcher.tls.ca}" if launcher.tls is not None else ""
    return (
        f"  bus users per role, credentials in {launcher.secrets_dir}{tls} (the context logs "
        f"in as {OPERATOR_USER})"
    )

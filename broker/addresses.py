"""Network addresses: whether a host is this machine only.

Both the bus (`hybridgen up` refuses plain NATS off loopback) and the HTTP APIs (an API
without keys is refused off loopback) ask it of the host they bind.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); wildcards are not."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

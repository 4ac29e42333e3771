"""Certificates for the bus, made with the `openssl` CLI: a private CA, and a certificate
per host signed by it.

- `self_signed_tls`: the CA and one server certificate (what `hybridgen up --host 0.0.0.0`
  uses; `broker.config.self_signed_tls` calls it).
- `host_certificate`: one more certificate signed by that CA, for one host of a deployment
  (each cluster node and each leaf node its own, docs/deploy.md). It is good for both ends
  of a TLS link (`serverAuth` and `clientAuth`): cluster routes verify both nodes, and so
  does a leaf-node listener that verifies its leaf nodes.

Keys are 0600 in an owner-only folder; nothing is remade when its files exist.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from broker.config import SECRET_FILE_MODE, TLSFiles, ensure_secrets_dir

#: The key usages of every certificate made here.
_LEAF_EXTENSIONS = (
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "basicConstraints=critical,CA:FALSE\n"
    "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
)


def _openssl() -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError(
            "TLS needs a certificate: install openssl (then hybridgen makes a private CA), "
            "or pass --tls-cert, --tls-key and --tls-ca"
        )
    return openssl


def _subject_alt_names(hosts: Sequence[str]) -> str:
    """`DNS:`/`IP:` entries for `hosts` (wildcard listen addresses left out)."""
    names = set(hosts) - {"", "0.0.0.0", "::", "[::]"}
    sans = []
    for name in sorted(names):
        try:
            sans.append(f"IP:{ipaddress.ip_address(name.strip('[]'))}")
        except ValueError:
            sans.append(f"DNS:{name}")
    return ",".join(sans)


def _run(steps: list[list[str]], folder: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise RuntimeError(
                    f"openssl failed making the TLS certificates in {folder}: "
                    f"{result.stderr.strip()[-400:]}"
                )
    finally:
        os.umask(old_umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(SECRET_FILE_MODE)


def _sign_steps(
    openssl: str, folder: Path, name: str, common_name: str, usage: str, hosts: Sequence[str]
) -> list[list[str]]:
    """openssl steps making `<name>.pem`/`<name>-key.pem` signed by the CA in `folder`."""
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={_subject_alt_names(hosts)}\nextendedKeyUsage={usage}\n" + _LEAF_EXTENSIONS
    )
    key, csr, cert = folder / f"{name}-key.pem", folder / f"{name}.csr", folder / f"{name}.pem"
    return [
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", f"/CN={common_name}"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(folder / "ca.pem"),
         "-CAkey", str(folder / "ca-key.pem"), "-CAcreateserial", "-days", "825",
         "-out", str(cert), "-extfile", str(ext)],
    ]  # fmt: skip


def self_signed_tls(folder: Path, hosts: Sequence[str] = ()) -> TLSFiles:
    """A private CA and a server certificate signed by it, made with the `openssl` CLI.

    Kept in `folder` (mode 0700; keys 0600) and reused when they exist. The server
    certificate names `localhost`, 127.0.0.1, ::1, this machine's hostname and `hosts`
    (names or IP addresses). Copy `ca.pem` to the other machines and point their
    `HG_NATS_TLS_CA` at it.

    Raises:
        RuntimeError: `openssl` is not installed or failed (the message says what to do).
    """
    files = TLSFiles(
        cert=folder / "server.pem", key=folder / "server-key.pem", ca=folder / "ca.pem"
    )
    if all(p is not None and p.is_file() for p in (files.cert, files.key, files.ca)):
        return files
    openssl = _openssl()
    ensure_secrets_dir(folder)
    names = ["localhost", socket.gethostname(), "127.0.0.1", "::1", *hosts]
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "825",
         "-keyout", str(folder / "ca-key.pem"), "-out", str(files.ca),
         "-subj", "/CN=hybridgen private CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        *_sign_steps(openssl, folder, "server", "hybridgen nats-server", "serverAuth", names),
    ]  # fmt: skip
    _run(steps, folder)
    return files


def host_certificate(ca_folder: Path, name: str, hosts: Sequence[str]) -> TLSFiles:
    """A certificate for one host, signed by the CA of `self_signed_tls(ca_folder)`.

    Written as `<name>.pem` and `<name>-key.pem` in `ca_folder` (reused when they exist);
    it names `hosts` only, and serves both ends of a link (`serverAuth`, `clientAuth`), so
    the same files make a cluster node's routes, its leaf-node listener and its clients'
    TLS. `verify` is on: routes use it as is.

    Raises:
        ValueError: `name` is not a plain file name, or no host is given.
        RuntimeError: `openssl` is missing or failed, or `ca_folder` holds no CA.
    """
    if not name or Path(name).name != name or name in ("ca", "server"):
        raise ValueError(f"certificate name {name!r}: use a plain name (not 'ca' or 'server')")
    if not hosts:
        raise ValueError("a host certificate needs the names or addresses of its host")
    files = TLSFiles(
        cert=ca_folder / f"{name}.pem",
        key=ca_folder / f"{name}-key.pem",
        ca=ca_folder / "ca.pem",
        verify=True,
    )
    if files.cert.is_file() and files.key.is_file():
        return files
    if not (ca_folder / "ca-key.pem").is_file():
        raise RuntimeError(f"no CA in {ca_folder}: make one with self_signed_tls first")
    openssl = _openssl()
    _run(_sign_steps(openssl, ca_folder, name, name, "serverAuth,clientAuth", hosts), ca_folder)
    return files

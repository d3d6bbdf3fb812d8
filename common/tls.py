"""TLS for Burla's own connections: the daemon's certificate, and what clients and agents trust it by.

`burlad serve` serves HTTPS itself when `[daemon] tls_cert` and `tls_key` are set (`server_files`
checks them before anything listens). Clients and agents verify the daemon's certificate against the
system's trust (httpx's default) or, given a CA file (`BURLA_CA_FILE`, `burla login --ca-file`,
`[agent] ca_file`), against that CA as well (`client_context`). Standard library only.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from burla.errors import ConfigError


def _read(path: str, key: str) -> str:
    try:
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"{key} = {path!r}: cannot read it ({why})") from None


def server_files(cert: str, key: str) -> tuple[str, str] | None:
    """The daemon's certificate chain and key files, checked; None when neither is set (plain HTTP).

    A ConfigError names the key at fault: one set without the other, a file unreadable, a
    certificate file with no PEM certificate, a key that is not the certificate's.
    """
    if not cert and not key:
        return None
    if not cert or not key:
        given, missing = ("daemon.tls_cert", "daemon.tls_key") if cert else ("daemon.tls_key", "daemon.tls_cert")
        raise ConfigError(
            f"{given} is set but {missing} is not: set both (a PEM certificate chain and its private key) "
            "to serve HTTPS, or neither to serve plain HTTP"
        )
    cert_text = _read(cert, "daemon.tls_cert")
    _read(key, "daemon.tls_key")
    probe = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        probe.load_verify_locations(cadata=cert_text)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(f"daemon.tls_cert = {cert!r} holds no PEM certificate ({e})") from None
    try:
        probe.load_cert_chain(str(Path(cert).expanduser()), str(Path(key).expanduser()))
    except ssl.SSLError as e:
        raise ConfigError(
            f"daemon.tls_key = {key!r} is not a PEM private key of the certificate in daemon.tls_cert ({e})"
        ) from None
    return str(Path(cert).expanduser()), str(Path(key).expanduser())


def client_context(ca_file: str, key: str) -> ssl.SSLContext | None:
    """What a client or agent verifies the daemon's certificate by: None for the default trust, or the
    system's trust plus the CA in `ca_file` (`key`: where the file was named, for the error)."""
    if not ca_file:
        return None
    text = _read(ca_file, key)
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(f"{key} = {ca_file!r} holds no PEM certificate ({e})") from None
    return context


def untrusted(error: BaseException) -> str:
    """Why the daemon's certificate was refused, if that is what `error` (or its cause) is; "" otherwise."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return str(e.verify_message or e.reason or e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            return str(e)
        e = e.__cause__ or e.__context__
    return ""


def read_ca(path: str, key: str) -> str:
    """A CA file's PEM text, for a node that must trust the daemon (its boot metadata)."""
    text = _read(path, key)
    # only the certificates: a file that also holds the daemon's private key must not hand it to every node
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----", text)
    if not blocks:
        raise ConfigError(f"{key} = {path!r} holds no PEM certificate")
    return "\n".join(blocks) + "\n"

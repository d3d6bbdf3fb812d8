"""Certificates the tests make themselves: a CA of their own and a server certificate it signs."""

from __future__ import annotations

from pathlib import Path

import trustme


def make_tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """(server certificate chain, its key, the CA) as PEM files, for 127.0.0.1 and localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = folder / "server.pem", folder / "server.key", folder / "ca.pem"
    server.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file

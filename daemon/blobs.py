"""Content-addressed blobs on disk: build contexts, environment manifests, code zips and packages.

A blob is named by the sha256 of its bytes and kept in one file under
``<payload dir>/.blobs/<first two hex digits>/<digest>``. The digest is checked
when a blob arrives and again where its path is built, so a name can never be
a path outside that folder. Who may read a blob is the control plane's
decision (`ControlPlane.blob`); this module only keeps them.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from burla.common import local

from .errors import BadRequest, NotFound, TooLarge

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        """Where the blob `digest` is kept (whether or not it is there)."""
        if not _DIGEST.match(digest):
            raise BadRequest(f"{digest!r} is not a sha256 digest")
        return self.root / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        path = self.path(digest)
        if not path.is_file():
            raise NotFound(f"no blob {digest}")
        return path.read_bytes()

    def put(self, digest: str, data: bytes) -> None:
        """Keep a blob whose bytes match its digest: complete or absent, never half written."""
        if len(data) > self.max_bytes:
            raise TooLarge(
                f"the upload is {len(data) / 1e6:.1f} MB, over this cluster's limit of "
                f"{self.max_bytes / 1e6:.0f} MB (daemon.max_blob_bytes)"
            )
        if hashlib.sha256(data).hexdigest() != digest:
            raise BadRequest("the upload does not match its digest (its sha256)")
        path = self.path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        local.write_file(tmp, data)
        os.replace(tmp, path)

"""Content-addressed blob files (daemon/blobs.py), on a real folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from burla.daemon.blobs import BlobStore
from burla.daemon.errors import BadRequest, NotFound, TooLarge


def test_a_blob_is_kept_only_whole_and_under_its_own_digest(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / ".blobs", max_bytes=10)
    data = b"manifest"
    digest = hashlib.sha256(data).hexdigest()
    assert not blobs.has(digest)
    with pytest.raises(NotFound):
        blobs.read(digest)
    with pytest.raises(BadRequest, match="does not match its digest"):
        blobs.put(digest, b"other")
    with pytest.raises(TooLarge, match="daemon.max_blob_bytes"):
        blobs.put(hashlib.sha256(b"x" * 11).hexdigest(), b"x" * 11)
    with pytest.raises(BadRequest, match="not a sha256 digest"):
        blobs.path("../../etc/passwd")
    blobs.put(digest, data)
    assert blobs.has(digest) and blobs.read(digest) == data
    assert blobs.path(digest) == tmp_path / ".blobs" / digest[:2] / digest
    assert not list((tmp_path / ".blobs").rglob("*.part"))

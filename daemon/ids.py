"""Ids and digests that arrive from the network, checked before they name a row or a file."""

from __future__ import annotations

import re
from typing import Any

from burla.schemas import wire

from .errors import BadRequest

_ID = re.compile(wire.ID)
_SHA256 = re.compile(wire.SHA256)


def valid_id(value: Any, what: str) -> str:
    """An id that names files and rows: only `wire.ID`'s alphabet, so it can never be a path."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise BadRequest(f"{what}: expected an id of 1 to 64 letters, digits, '-' or '_', got {str(value)[:80]!r}")
    return value


def valid_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BadRequest(f"{what}: expected a sha256 digest (64 lowercase hex digits), got {str(value)[:80]!r}")
    return value

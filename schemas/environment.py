"""The user's Python environment, as it travels from the client to the nodes.

The client describes what its function needs as an `Environment` manifest:

* every installed distribution, pinned (`Distribution`): those a package
  index can provide go as ``name==version`` (source "index"); those it cannot
  (built locally, private, editable, installed from a file) go as a tar of
  their installed files (source "files"), so replication works offline too;
* the user's local code that is not installed (a module beside the script, a
  project's src folder) as one zip (`code`), put first on the workers' path.

Manifests, code zips and file tars are content-addressed blobs: a node that
has seen one never fetches or installs it again. `digest()` names a manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from .wire import OPTIONAL_SHA256, Wire, field, loads

INDEX = "index"  # install `name==version` from a package index
FILES = "files"  # unpack `blob`, a tar of the installed files (paths relative to site-packages)

_NAME = re.compile(r"[-_.]+")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return _NAME.sub("-", name).lower()


@dataclasses.dataclass(frozen=True)
class Distribution(Wire):
    name: str = field(pattern=r"[a-z0-9](?:[a-z0-9._-]{0,198}[a-z0-9])?")  # normalized; names a folder on nodes
    version: str = field(pattern=r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}")  # names a folder on nodes too
    source: str = field(INDEX, pattern=f"{INDEX}|{FILES}")
    blob: str = field("", pattern=OPTIONAL_SHA256)  # for FILES: the digest of the tar of its installed files
    tags: tuple[str, ...] = field(
        (), max_items=256
    )  # wheel tags from its WHEEL file ("cp311-cp311-manylinux_2_17_x86_64"); () if unknown


@dataclasses.dataclass(frozen=True)
class Environment(Wire):
    python_version: str = field(max_len=16)  # "3.11"
    platform: str = field(max_len=128)  # sysconfig.get_platform() of the client, e.g. "linux-x86_64"
    distributions: tuple[Distribution, ...] = field((), max_items=100_000)
    code: str = field("", pattern=OPTIONAL_SHA256)  # digest of a zip of the client's local code, "" if none
    index_url: str = field("", max_len=4096)  # the client's package index, when not PyPI
    extra_index_urls: tuple[str, ...] = field((), max_items=64)

    def canonical(self) -> bytes:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @classmethod
    def loads(cls, data: bytes | str) -> Environment:
        wire: Any = loads(data)
        return cls.from_wire(wire)

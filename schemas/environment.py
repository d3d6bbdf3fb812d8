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

from .wire import Wire, nested

INDEX = "index"  # install `name==version` from a package index
FILES = "files"  # unpack `blob`, a tar of the installed files (paths relative to site-packages)

_NAME = re.compile(r"[-_.]+")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return _NAME.sub("-", name).lower()


@dataclasses.dataclass(frozen=True)
class Distribution(Wire):
    name: str  # normalized
    version: str
    source: str = INDEX
    blob: str = ""  # for FILES: the digest of the tar of its installed files
    tags: tuple[str, ...] = ()  # wheel tags from its WHEEL file ("cp311-cp311-manylinux_2_17_x86_64"); () if unknown


@dataclasses.dataclass(frozen=True)
class Environment(Wire):
    python_version: str  # "3.11"
    platform: str  # sysconfig.get_platform() of the client, e.g. "linux-x86_64"
    distributions: tuple[Distribution, ...] = ()
    code: str = ""  # digest of a zip of the client's local code, "" if none
    index_url: str = ""  # the client's package index, when not PyPI
    extra_index_urls: tuple[str, ...] = ()

    def canonical(self) -> bytes:
        return json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @classmethod
    def loads(cls, data: bytes | str) -> Environment:
        wire: Any = json.loads(data)
        return cls.from_wire(wire)


nested("Environment", "distributions", Distribution)

"""The client's Python environment, described so that every worker can replicate it.

`snapshot()` returns an `Environment` manifest (see `burla.schemas.environment`) and the blobs it names:

* Every installed distribution, pinned to its exact version. One installed from a package index (no PEP 610
  ``direct_url.json`` in its metadata directory) goes as ``name==version`` (source "index"). Any other one (a
  local wheel or sdist, a VCS or URL install, an editable install) goes as a tar of its files (source "files").
  Burla itself and installer tooling (pip, setuptools, wheel, uv) are left out.
* The user's local code that is not installed (every imported module outside the standard library and
  site-packages, and the ``.py`` files beside the main script) goes as one zip, put first on the workers' path.

Finding the distributions is `_distributions`, deciding what is local code `_local_code`, and building the
blobs `_packing`. Everything that can be is cached per process, so a second call only re-stats files. Blob bytes
are built on demand: `Snapshot.blobs` maps a digest to the bytes, or to a callable that builds them.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from burla.schemas import environment as env
from burla.schemas.environment import Distribution, Environment

from ._distributions import EDITABLE, FILES, INDEX, dirs_of, editable_files, record_files, scan
from ._local_code import MAX_CODE_BYTES, check_code_size, local_code_files
from ._packing import blob
from .errors import InvalidArgumentError

SKIPPED = frozenset(
    env.normalize(name) for name in ("burla", "pip", "setuptools", "wheel", "uv", "pkg-resources", "distribute")
)


@dataclasses.dataclass
class Snapshot:
    """An environment manifest and the blobs it names.

    `blobs` maps the digest of every blob the manifest names (the code zip, each distribution's tar) to its
    bytes, or to a zero-argument callable that builds them (so that a snapshot costs no reading of files the
    cluster already has). The manifest itself is not in `blobs`: upload ``manifest.canonical()`` as `digest`.
    """

    manifest: Environment
    digest: str
    blobs: dict[str, bytes | Callable[[], bytes]]


def snapshot(
    function: Callable[..., Any] | None = None,
    exclude: Iterable[str] = (),
    requirements: Iterable[str] = (),
    max_code_bytes: int = MAX_CODE_BYTES,
    paths: Sequence[str] | None = None,
) -> Snapshot:
    """The manifest of this process's environment, and its blobs.

    `exclude` names distributions (any spelling: case, "-", "_", "." are the same) to leave out; a name also
    leaves out a local top-level package or module of that name. `requirements` adds or replaces distributions
    by exact pins ("name==version"). `paths` is where distributions are looked for (default `sys.path`).
    Raises InvalidArgumentError for a bad `exclude` or `requirements` entry, and TooLargeError when the local
    code is over `max_code_bytes`.
    """
    excluded = _excluded(exclude)
    pins = _pins(requirements)
    search = list(sys.path) if paths is None else [os.fspath(p) for p in paths]
    found = scan(tuple(search), use_find_spec=paths is None)

    blobs: dict[str, bytes | Callable[[], bytes]] = {}
    dists: dict[str, Distribution] = {}
    for dist in found:
        if dist.name in SKIPPED or dist.name in excluded or dist.name in pins:
            continue
        if dist.kind == INDEX:
            dists[dist.name] = Distribution(dist.name, dist.version, INDEX, tags=dist.tags)
            continue
        files = editable_files(dist) if dist.kind == EDITABLE else record_files(dist)
        digest = blob("tar", files, blobs)
        dists[dist.name] = Distribution(dist.name, dist.version, FILES, blob=digest, tags=dist.tags)
    for name, version in pins.items():
        dists[name] = Distribution(name, version, INDEX)

    owned, install_dirs = dirs_of(found)
    code_files = local_code_files(function, excluded, owned, install_dirs)
    code = ""
    if code_files:
        check_code_size(code_files, max_code_bytes)
        code = blob("zip", code_files, blobs)

    index_url = os.environ.get("PIP_INDEX_URL", "").strip()
    manifest = Environment(
        python_version=f"{sys.version_info[0]}.{sys.version_info[1]}",
        platform=sysconfig.get_platform(),
        distributions=tuple(dists[name] for name in sorted(dists)),
        code=code,
        index_url=index_url,
        extra_index_urls=tuple(os.environ.get("PIP_EXTRA_INDEX_URL", "").split()),
    )
    return Snapshot(manifest=manifest, digest=_digest_of(manifest), blobs=blobs)


# One entry: a process calls snapshot() for every job, and its environment rarely changes.
_DIGEST_MEMO: list[Any] = [None, ""]


def _digest_of(manifest: Environment) -> str:
    if _DIGEST_MEMO[0] != manifest:  # frozen dataclasses compare by value, far faster than hashing JSON
        _DIGEST_MEMO[:] = [manifest, manifest.digest()]
    return str(_DIGEST_MEMO[1])


# --------------------------------------------------------------------------- arguments


def _entries(values: Iterable[str], argument: str) -> list[str]:
    if isinstance(values, str):
        values = [values]  # one name, not an iterable of characters
    try:
        entries = list(values)
    except TypeError:
        raise InvalidArgumentError(f"{argument} must be a list of strings, not {type(values).__name__}") from None
    for entry in entries:
        if not isinstance(entry, str):
            raise InvalidArgumentError(f"{argument} must hold strings, but holds {type(entry).__name__} {entry!r}")
    return entries


def _excluded(exclude: Iterable[str]) -> frozenset[str]:
    names = set()
    for entry in _entries(exclude, "exclude"):
        if not entry.strip():
            raise InvalidArgumentError(f"exclude holds an empty name {entry!r}: give distribution names")
        names.add(env.normalize(entry.strip()))
    return frozenset(names)


_PIN = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*==\s*([A-Za-z0-9][A-Za-z0-9.+!_-]*)\s*")


def _pins(requirements: Iterable[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for entry in _entries(requirements, "requirements"):
        match = _PIN.fullmatch(entry)
        if match is None:
            raise InvalidArgumentError(
                f"requirements entry {entry!r} is not an exact pin: write each one as 'name==version' "
                "(e.g. 'numpy==1.26.4'); ranges, extras, markers and URLs are not supported"
            )
        name, version = env.normalize(match.group(1)), match.group(2)
        if pins.get(name, version) != version:
            raise InvalidArgumentError(
                f"requirements pins {name!r} twice, to {pins[name]!r} and {version!r}: keep one of them"
            )
        pins[name] = version
    return pins

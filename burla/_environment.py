"""The client's Python environment, described so that every worker can replicate it.

`snapshot()` returns an `Environment` manifest (see `burla.schemas.environment`) and the blobs it names:

* Every installed distribution, pinned to its exact version. One installed from a package index (no PEP 610
  ``direct_url.json`` in its metadata directory) goes as ``name==version`` (source "index"). Any other one (a
  local wheel or sdist, a VCS or URL install, an editable install) goes as a tar of its files (source "files").
  Burla itself and installer tooling (pip, setuptools, wheel, uv) are left out.
* The user's local code that is not installed (every imported module outside the standard library and
  site-packages, and the ``.py`` files beside the main script) goes as one zip, put first on the workers' path.

Blob formats, both built deterministically (same files -> same bytes -> same sha256 digest):

* A distribution's tar is an uncompressed pax tar; entries are regular files only, sorted by name, with mtime 0,
  uid/gid 0, empty user/group names, mode 0o755 when any executable bit is set else 0o644. Names are relative to
  the directory to unpack into and put on ``sys.path`` (a site-packages directory): for an installed
  distribution, the files its RECORD lists (minus ``__pycache__``, ``*.pyc`` and anything outside its
  site-packages, such as ``../../bin`` scripts); for an editable install, its metadata directory plus the source
  of every top-level package or module it provides, laid out under their import names.
* The local code zip is a ZIP_DEFLATED zip, entries sorted by name, dated 1980-01-01 00:00:00, with an entry for
  every directory (zipimport needs them for namespace packages), so ``sys.path.insert(0, zip)`` imports it.

Everything that can be is cached per process, keyed on the paths searched and the mtimes of their directories
(distributions) or on (path, mtime_ns, size) of every file (blob digests): a second call only re-stats files.
Blob bytes are built on demand: `Snapshot.blobs` maps a digest to the bytes, or to a callable that builds them.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import stat
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from burla.schemas import environment as env
from burla.schemas.environment import Distribution, Environment

from ._units import size_text
from .errors import BurlaError, InvalidArgumentError, TooLargeError

MAX_CODE_BYTES = 50 * 1000**2  # default limit of the local code, in file bytes before compression
MAX_CODE_FILE_BYTES = 10 * 1000**2  # a data file bigger than this in a local package is left out
SKIPPED = frozenset(
    env.normalize(name) for name in ("burla", "pip", "setuptools", "wheel", "uv", "pkg-resources", "distribute")
)
INDEX: str = env.INDEX
FILES: str = env.FILES
EDITABLE = "editable"  # internal kind: sent as FILES, packed from its source tree
LARGEST_SHOWN = 5  # how many files and folders a TooLargeError names
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

_File = tuple[str, str, int, int, bool]  # (name in the blob, path on disk, st_mtime_ns, st_size, executable)
_Unit = tuple[str, str, bool]  # (name in the blob, path on disk, is a directory to pack whole)


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
    found = _scan(tuple(search), use_find_spec=paths is None)

    blobs: dict[str, bytes | Callable[[], bytes]] = {}
    dists: dict[str, Distribution] = {}
    for dist in found:
        if dist.name in SKIPPED or dist.name in excluded or dist.name in pins:
            continue
        if dist.kind == INDEX:
            dists[dist.name] = Distribution(dist.name, dist.version, INDEX, tags=dist.tags)
            continue
        files = _editable_files(dist) if dist.kind == EDITABLE else _record_files(dist)
        digest = _blob("tar", files, blobs)
        dists[dist.name] = Distribution(dist.name, dist.version, FILES, blob=digest, tags=dist.tags)
    for name, version in pins.items():
        dists[name] = Distribution(name, version, INDEX)

    owned, install_dirs = _dirs_of(found)
    code_files = _local_code_files(function, excluded, owned, install_dirs)
    code = ""
    if code_files:
        _check_code_size(code_files, max_code_bytes)
        code = _blob("zip", code_files, blobs)

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


# One entry each: a process calls snapshot() for every job, and its environment rarely changes.
_DIRS_MEMO: list[Any] = [None, None]
_DIGEST_MEMO: list[Any] = [None, ""]


def _dirs_of(found: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Source folders of editable installs, and the install folders, of a (cached) scan."""
    if _DIRS_MEMO[0] is not found:
        owned = tuple(sorted({os.path.realpath(u[1]) for d in found if d.kind == EDITABLE for u in d.units}))
        install_dirs = tuple(
            sorted(
                {os.path.realpath(d.site) for d in found if d.kind != EDITABLE and d.meta_dir.endswith(".dist-info")}
            )
        )
        _DIRS_MEMO[:] = [found, (owned, install_dirs)]
    return _DIRS_MEMO[1]  # type: ignore[no-any-return]


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


# --------------------------------------------------------------------------- installed distributions


@dataclasses.dataclass(frozen=True)
class _Found:
    name: str  # normalized
    version: str
    kind: str  # INDEX, FILES or EDITABLE
    meta_dir: str  # the .dist-info or .egg-info directory ("" when not on the file system)
    site: str  # the directory holding meta_dir
    tags: tuple[str, ...]
    record: tuple[str, ...]  # the files RECORD lists, relative to `site`
    units: tuple[_Unit, ...]  # EDITABLE: the packages and modules it provides


_SCANS: dict[tuple[Any, ...], tuple[_Found, ...]] = {}


def _scan(paths: tuple[str, ...], use_find_spec: bool) -> tuple[_Found, ...]:
    """Every distribution on `paths`, the first of each name (as the import system would), cached per process."""
    key = (paths, tuple(_mtime(p) for p in paths), os.getcwd() if "" in paths else "", use_find_spec)
    cached = _SCANS.get(key)
    if cached is not None:
        return cached
    first: dict[str, _Found] = {}
    develop: dict[str, _Found] = {}  # .egg-info directories in source trees: used when nothing else has the name
    for dist in importlib.metadata.distributions(path=list(paths)):
        found = _describe(dist, use_find_spec)
        if found is None:
            continue
        if found.kind == EDITABLE and found.meta_dir.endswith(".egg-info"):
            develop.setdefault(found.name, found)
        else:
            first.setdefault(found.name, found)
    for name, found in develop.items():
        first.setdefault(name, found)
    result = tuple(first[name] for name in sorted(first))
    if len(_SCANS) > 32:
        _SCANS.clear()
    _SCANS[key] = result
    return result


def _mtime(path: str) -> int:
    try:
        return os.stat(path or ".").st_mtime_ns
    except OSError:
        return -1


def _describe(dist: importlib.metadata.Distribution, use_find_spec: bool) -> _Found | None:
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or dist.read_text("") or ""
    headers = _headers(text)
    name, version = headers.get("name", ""), headers.get("version", "")
    if not name or not version:
        return None  # a broken or half-removed install: the import system would not use it either
    name = env.normalize(name)
    location = getattr(dist, "_path", None)
    meta_dir = os.path.abspath(os.fspath(location)) if isinstance(location, (str, os.PathLike)) else ""
    site = os.path.dirname(meta_dir) if meta_dir else ""
    tags = tuple(
        line.partition(":")[2].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.partition(":")[0].strip().lower() == "tag"
    )
    kind = _kind(dist, meta_dir)
    if kind != INDEX and not os.path.isdir(meta_dir):
        kind = INDEX  # inside a zip or an egg file: nothing to pack
    record: tuple[str, ...] = ()
    units: tuple[_Unit, ...] = ()
    if kind != INDEX:
        try:
            record = tuple(str(p) for p in dist.files or ())
        except Exception:  # a malformed RECORD
            record = ()
    if kind == EDITABLE:
        top_level = [line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines()]
        units = _editable_units(name, meta_dir, site, record, [t for t in top_level if t.isidentifier()], use_find_spec)
    return _Found(name, version, kind, meta_dir, site, tags, record, units)


def _headers(text: str) -> dict[str, str]:
    """The first value of each header of a core metadata file, with lowercase keys; the body is not parsed."""
    headers: dict[str, str] = {}
    for line in text.partition("\n\n")[0].splitlines():  # the headers end at the first empty line
        if not line.strip():
            break
        if line[0] in " \t":
            continue
        key, sep, value = line.partition(":")
        if sep:
            headers.setdefault(key.strip().lower(), value.strip())
    return headers


def _kind(dist: importlib.metadata.Distribution, meta_dir: str) -> str:
    text = dist.read_text("direct_url.json")
    if text is None:
        if meta_dir.endswith(".egg-info") and os.path.isdir(meta_dir) and not _is_installed_path(meta_dir):
            return EDITABLE  # `setup.py develop`: the .egg-info sits in the source tree, which a .pth put on the path
        return INDEX
    try:
        info = json.loads(text)
    except ValueError:
        return FILES
    dir_info = info.get("dir_info") if isinstance(info, dict) else None
    if isinstance(dir_info, dict) and dir_info.get("editable"):
        return EDITABLE
    return FILES  # a local file or directory, a VCS checkout, an http(s) archive the index may not have


# --------------------------------------------------------------------------- editable installs


def _editable_units(
    name: str, meta_dir: str, site: str, record: tuple[str, ...], top_level: list[str], use_find_spec: bool
) -> tuple[_Unit, ...]:
    """The packages and modules an editable install provides, as (import path in the tar, source, is_dir)."""
    mapping: dict[str, str] = {}  # module name -> source path, from setuptools' or `editables`' finders
    source_dirs: list[str] = []  # directories a .pth file puts on the path
    helpers: list[str] = []
    if meta_dir.endswith(".egg-info"):
        source_dirs.append(site)
    for rel in record:
        path = os.path.normpath(os.path.join(site, rel))
        base = os.path.basename(path)
        if base.endswith(".pth"):
            for line in _read_text(path).splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith(("import ", "import\t")):
                    for module in re.findall(r"\bimport\s+([A-Za-z_][\w.]*)", line):
                        helpers.append(os.path.join(site, module.replace(".", os.sep) + ".py"))
                else:
                    directory = os.path.normpath(os.path.join(site, line))
                    if os.path.isdir(directory) and directory not in source_dirs:
                        source_dirs.append(directory)
        elif base.endswith(".py") and os.path.dirname(rel) == "" and "editable" in base:
            helpers.append(path)
    for helper in dict.fromkeys(helpers):
        mapping.update(_finder_mapping(helper))

    units: list[_Unit] = []
    for module, path in sorted(mapping.items()):
        parts = module.split(".")
        if os.path.isdir(path):
            units.append(("/".join(parts), path, True))
        elif os.path.basename(path).split(".")[0] == "__init__":
            units.append(("/".join(parts), os.path.dirname(path), True))
        else:  # setuptools maps a module to its path without the suffix: ".../flatmod" for flatmod.py
            for candidate in (path, *(path + suffix for suffix in _module_suffixes())):
                if os.path.isfile(candidate):
                    base = os.path.basename(candidate)
                    suffix = base[base.index(".") :] if "." in base else ""
                    units.append(("/".join([*parts[:-1], parts[-1] + suffix]), candidate, False))
                    break
    covered = {module.split(".")[0] for module in mapping}
    names = top_level or ([] if mapping else _guess_top_level(name, source_dirs))
    for top in names:
        if top in covered:
            continue
        found = _find_in(top, source_dirs)
        if not found and use_find_spec:
            found = _find_with_spec(top)
        units.extend(found)
    # the deepest mapping wins when two put a file at the same name: `a.b` -> /x/b overrides `a` -> /y/a's b/
    units.sort(key=lambda unit: -unit[0].count("/"))
    return tuple(units)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _finder_mapping(path: str) -> dict[str, str]:
    """What an editable finder module maps: setuptools' `MAPPING = {...}`, or `editables`' `F.map_module(...)`."""
    try:
        tree = ast.parse(_read_text(path))
    except (SyntaxError, ValueError):
        return {}
    mapping: dict[str, str] = {}
    for node in tree.body:
        target, value = None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and target.id == "MAPPING" and value is not None:
            try:
                literal = ast.literal_eval(value)
            except ValueError:
                continue
            if isinstance(literal, dict):
                mapping.update({k: v for k, v in literal.items() if isinstance(k, str) and isinstance(v, str)})
    for call in ast.walk(tree):
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr in ("map", "map_module")
            and len(call.args) == 2
            and all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in call.args)
        ):
            mapping[call.args[0].value] = call.args[1].value  # type: ignore[attr-defined]
    return {module: os.path.normpath(os.path.join(os.path.dirname(path), source)) for module, source in mapping.items()}


def _module_suffixes() -> tuple[str, ...]:
    return tuple(importlib.machinery.all_suffixes())


def _find_in(top: str, directories: list[str]) -> list[_Unit]:
    for directory in directories:
        candidate = os.path.join(directory, top)
        if os.path.isdir(candidate):
            return [(top, candidate, True)]
        for suffix in _module_suffixes():
            if os.path.isfile(candidate + suffix):
                return [(top + suffix, candidate + suffix, False)]
    return []


def _find_with_spec(top: str) -> list[_Unit]:
    try:
        spec = importlib.util.find_spec(top)
    except Exception:  # a parent that fails to import, a module with no spec: nothing to find
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [(top, location, True) for location in spec.submodule_search_locations if os.path.isdir(location)]
    if spec.has_location and spec.origin and os.path.isfile(spec.origin):
        base = os.path.basename(spec.origin)
        return [(base, spec.origin, False)] if base.split(".")[0] == top else []
    return []


_NOT_PACKAGES = frozenset({"setup", "conftest", "noxfile", "tests", "test", "docs", "doc", "examples", "build"})


def _guess_top_level(name: str, directories: list[str]) -> list[str]:
    """With no top_level.txt and no finder: the distribution's own name if a directory has it, else its packages."""
    own = name.replace("-", "_")
    if _find_in(own, directories):
        return [own]
    names: set[str] = set()
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            stem = entry.name.split(".")[0]
            if not stem.isidentifier() or stem in _NOT_PACKAGES:
                continue
            if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
                names.add(entry.name)
            elif entry.is_file() and entry.name.endswith(".py"):
                names.add(stem)
    return sorted(names)


def _editable_files(dist: _Found) -> tuple[_File, ...]:
    meta_name = os.path.basename(dist.meta_dir)
    units = [(meta_name, dist.meta_dir, True), *dist.units]
    return _collect(units, walk_limit=None)


# --------------------------------------------------------------------------- installed files


def _record_files(dist: _Found) -> tuple[_File, ...]:
    """The files RECORD lists that lie inside the distribution's directory, as they are on disk now."""
    site = os.path.normpath(dist.site)
    files: dict[str, _File] = {}
    if not dist.record:  # no RECORD: its metadata is all there is to send
        return _collect([(os.path.basename(dist.meta_dir), dist.meta_dir, True)], walk_limit=None)
    for rel in dist.record:
        parts = rel.replace("\\", "/").split("/")
        if "__pycache__" in parts or rel.endswith((".pyc", ".pyo")):
            continue
        path = os.path.normpath(os.path.join(site, rel))
        if not path.startswith(site + os.sep):
            continue  # ../../bin/script, an absolute path: not part of site-packages
        entry = _stat_file(os.path.relpath(path, site).replace(os.sep, "/"), path)
        if entry is not None:
            files.setdefault(entry[0], entry)
    return tuple(files[name] for name in sorted(files))


def _stat_file(name: str, path: str) -> _File | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # removed since it was installed
    if not stat.S_ISREG(st.st_mode):
        return None
    return (name, path, st.st_mtime_ns, st.st_size, bool(st.st_mode & 0o111))


def _collect(units: Iterable[_Unit], walk_limit: int | None) -> tuple[_File, ...]:
    """The files of `units`: whole directory trees (no __pycache__, *.pyc or hidden folders) or single files.

    The first unit to give a name keeps it. Files over `walk_limit` bytes inside directories are left out.
    """
    files: dict[str, _File] = {}
    for name, path, is_dir in units:
        if not is_dir:
            entry = _stat_file(name, path)
            if entry is not None:
                files.setdefault(name, entry)
            continue
        for directory, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(directory, path)
            prefix = name if rel == "." else f"{name}/{rel.replace(os.sep, '/')}"
            for filename in filenames:
                if filename.endswith((".pyc", ".pyo")):
                    continue
                entry = _stat_file(f"{prefix}/{filename}", os.path.join(directory, filename))
                if entry is None or (walk_limit is not None and entry[3] > walk_limit):
                    continue
                files.setdefault(entry[0], entry)
    return tuple(files[name] for name in sorted(files))


# --------------------------------------------------------------------------- local code


def _real_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(key, "") for key in ("stdlib", "platstdlib", "purelib", "platlib")} | {
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
    }
    return tuple(sorted({os.path.realpath(root) for root in roots if root}))


_INSTALLED_ROOTS = _real_roots()
_INSTALL_DIR_NAMES = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _is_installed_path(path: str) -> bool:
    """Whether `path` is in the standard library, an installation prefix or a site-packages directory."""

    def installed(candidate: str) -> bool:
        return _under(candidate, _INSTALLED_ROOTS) or any(part in candidate + os.sep for part in _INSTALL_DIR_NAMES)

    return installed(os.path.abspath(path)) or installed(os.path.realpath(path))  # most are: skip realpath


# (module name, __file__) -> (top-level name, unit, real path of the file), or None when not local code
_MODULES: dict[tuple[str, str], tuple[str, _Unit, str] | None] = {}


def _local_module(name: str, file: str) -> tuple[str, _Unit, str] | None:
    key = (name, file)
    if key not in _MODULES:
        _MODULES[key] = _module_unit(name, file)
    return _MODULES[key]


def _module_unit(name: str, file: str) -> tuple[str, _Unit, str] | None:
    """What to pack for a local module: its top-level package's whole directory, or the module's one file."""
    if name in ("__main__", "__mp_main__", "builtins") or name == "burla" or name.startswith("burla."):
        return None
    path = os.path.abspath(file)
    if _is_installed_path(path):
        return None
    parts = name.split(".")
    base = os.path.basename(path)
    stem = base.split(".")[0]
    directory = os.path.dirname(path)
    if stem == "__init__":
        above = parts
    elif stem == parts[-1]:
        above = parts[:-1]
    else:
        return None  # loaded under a name its location does not give: an import would not find it
    for part in reversed(above):
        if os.path.basename(directory) != part:
            return None
        directory = os.path.dirname(directory)
    top = parts[0]
    unit: _Unit = (top, os.path.join(directory, top), True) if above else (base, path, False)
    return top, unit, os.path.realpath(path)


def _local_code_files(
    function: Callable[..., Any] | None,
    excluded: frozenset[str],
    owned: tuple[str, ...],
    install_dirs: tuple[str, ...],
) -> tuple[_File, ...]:
    modules: list[tuple[str, str]] = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and file:
            modules.append((name, file))
    if function is not None:
        module_name = getattr(function, "__module__", None) or getattr(type(function), "__module__", None)
        globals_ = getattr(function, "__globals__", None)
        file = globals_.get("__file__") if isinstance(globals_, dict) else None
        if isinstance(module_name, str) and module_name not in sys.modules and isinstance(file, str):
            modules.append((module_name, file))

    order = {os.path.abspath(p or "."): i for i, p in reversed(list(enumerate(sys.path)))}
    units: dict[_Unit, tuple[int, str]] = {}
    for name, file in modules:
        local = _local_module(name, file)
        if local is None:
            continue
        top, unit, real = local
        if env.normalize(top) in excluded or _under(real, owned) or _under(real, install_dirs):
            continue
        units.setdefault(unit, (order.get(os.path.dirname(unit[1]), len(order)), unit[0]))
    ordered = sorted(units, key=lambda unit: units[unit])
    ordered.extend(_beside_main(excluded, owned, install_dirs))
    return _collect(ordered, walk_limit=MAX_CODE_FILE_BYTES)


def _beside_main(excluded: frozenset[str], owned: tuple[str, ...], install_dirs: tuple[str, ...]) -> list[_Unit]:
    """The top-level .py files beside the main script, which the function may import in its body."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not isinstance(main_file, str) or not main_file:
        return []
    main_file = os.path.abspath(main_file)
    directory = os.path.dirname(main_file)
    if _is_installed_path(main_file) or _under(os.path.realpath(main_file), install_dirs):
        return []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    units: list[_Unit] = []
    for entry in entries:
        stem = entry.name[: -len(".py")]
        if (
            not entry.name.endswith(".py")
            or entry.path == main_file
            or not stem.isidentifier()
            or env.normalize(stem) in excluded
            or not entry.is_file()
            or _under(os.path.realpath(entry.path), owned)
        ):
            continue
        units.append((entry.name, entry.path, False))
    return units


def _check_code_size(files: tuple[_File, ...], max_bytes: int) -> None:
    total = sum(f[3] for f in files)
    if total <= max_bytes:
        return
    by_top: dict[str, int] = {}
    where: dict[str, str] = {}
    for name, path, _, size, _ in files:
        top = name.split("/")[0]
        by_top[top] = by_top.get(top, 0) + size
        if top not in where:
            where[top] = path[: len(path) - len(name)] + top if path.endswith(name) else path
    tops = sorted(by_top, key=lambda top: (-by_top[top], top))[:LARGEST_SHOWN]
    biggest = sorted(files, key=lambda f: (-f[3], f[0]))[:LARGEST_SHOWN]
    raise TooLargeError(
        f"the local code to send to the cluster is {size_text(total)}, over max_code_bytes ({size_text(max_bytes)}). "
        "Local code is every imported module of yours that is not installed, with the whole folder of its "
        "package, and the .py files beside your script. Biggest: "
        + ", ".join(f"{where[top]} ({size_text(by_top[top])})" for top in tops)
        + "; biggest files: "
        + ", ".join(f"{f[1]} ({size_text(f[3])})" for f in biggest)
        + ". Move data files out of the code folders (read them inside the function from shared storage, or pass "
        f'them as inputs), or leave a package or module out with exclude=["{tops[0].split(".")[0]}"].'
    )


# --------------------------------------------------------------------------- blobs

_DIGESTS: dict[tuple[str, tuple[_File, ...]], str] = {}


def _blob(kind: str, files: tuple[_File, ...], blobs: dict[str, bytes | Callable[[], bytes]]) -> str:
    """The digest of the tar or zip of `files` (cached on their stat), and its bytes or builder added to `blobs`."""
    key = (kind, files)
    digest = _DIGESTS.get(key)
    if digest is None:
        if kind == "zip":
            data = _zip_bytes(files)  # at most max_code_bytes: keep the bytes, the caller likely sends them
            digest = hashlib.sha256(data).hexdigest()
            blobs[digest] = data
        else:
            sink = _Sink(keep=False)  # a tar of installed files can be big: hash it as it streams
            _write_tar(files, sink)
            digest = sink.hash.hexdigest()
        if len(_DIGESTS) > 1024:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    blobs.setdefault(digest, functools.partial(_build, kind, files, digest))
    return digest


def _build(kind: str, files: tuple[_File, ...], digest: str) -> bytes:
    if kind == "zip":
        data = _zip_bytes(files)
    else:
        sink = _Sink(keep=True)
        _write_tar(files, sink)
        data = b"".join(sink.chunks)
    if hashlib.sha256(data).hexdigest() != digest:
        raise BurlaError("files of your environment changed while it was being sent to the cluster: run the job again")
    return data


class _Sink:
    """A write-only file that hashes what is written, and keeps it if asked."""

    def __init__(self, keep: bool) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.keep = keep
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.keep:
            self.chunks.append(bytes(data))
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass


def _open_unchanged(entry: _File) -> IO[bytes]:
    f = open(entry[1], "rb")
    st = os.fstat(f.fileno())
    if (st.st_mtime_ns, st.st_size) != (entry[2], entry[3]):
        f.close()
        raise BurlaError(f"{entry[1]} changed while your environment was being packed: run the job again")
    return f


def _write_tar(files: tuple[_File, ...], sink: _Sink) -> None:
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for entry in files:
            info = tarfile.TarInfo(entry[0])
            info.size = entry[3]
            info.mtime = 0
            info.mode = 0o755 if entry[4] else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with _open_unchanged(entry) as f:
                tar.addfile(info, f)


def _zip_bytes(files: tuple[_File, ...]) -> bytes:
    directories = {name.rsplit("/", i)[0] + "/" for name, *_ in files for i in range(1, name.count("/") + 1)}
    entries: list[tuple[str, _File | None]] = [(d, None) for d in directories] + [(f[0], f) for f in files]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, entry in sorted(entries, key=lambda e: e[0]):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.create_system = 3  # unix, so external_attr holds the mode on every platform
            if entry is None:
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b"")
                continue
            info.external_attr = (0o100755 if entry[4] else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with _open_unchanged(entry) as f:
                data = f.read()
            zf.writestr(info, data)
    return buf.getvalue()

"""The distributions installed in the client's environment: found on the path, and listed file by file.

`scan()` finds every distribution on the path, the first of each name as the import system would, and tells
how each is to be replicated: one installed from a package index (no PEP 610 ``direct_url.json`` in its
metadata directory) by its pin (INDEX); any other one (a local wheel or sdist, a VCS or URL install) by a tar
of the files its RECORD lists (FILES: `record_files`, minus ``__pycache__``, ``*.pyc`` and anything outside its
site-packages, such as ``../../bin`` scripts); an editable install by a tar of its metadata directory plus the
source of every top-level package or module it provides, laid out under their import names (EDITABLE:
`editable_files`). Scans are cached per process, keyed on the paths searched and the mtimes of their directories.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
from typing import Any

from burla.schemas import environment as env

from ._local_code import is_installed_path
from ._packing import File, Unit, collect, stat_file

INDEX: str = env.INDEX
FILES: str = env.FILES
EDITABLE = "editable"  # internal kind: sent as FILES, packed from its source tree


@dataclasses.dataclass(frozen=True)
class Found:
    name: str  # normalized
    version: str
    kind: str  # INDEX, FILES or EDITABLE
    meta_dir: str  # the .dist-info or .egg-info directory ("" when not on the file system)
    site: str  # the directory holding meta_dir
    tags: tuple[str, ...]
    record: tuple[str, ...]  # the files RECORD lists, relative to `site`
    units: tuple[Unit, ...]  # EDITABLE: the packages and modules it provides


_SCANS: dict[tuple[Any, ...], tuple[Found, ...]] = {}


def scan(paths: tuple[str, ...], use_find_spec: bool) -> tuple[Found, ...]:
    """Every distribution on `paths`, the first of each name (as the import system would), cached per process."""
    key = (paths, tuple(_mtime(p) for p in paths), os.getcwd() if "" in paths else "", use_find_spec)
    cached = _SCANS.get(key)
    if cached is not None:
        return cached
    first: dict[str, Found] = {}
    develop: dict[str, Found] = {}  # .egg-info directories in source trees: used when nothing else has the name
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


def _describe(dist: importlib.metadata.Distribution, use_find_spec: bool) -> Found | None:
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
    units: tuple[Unit, ...] = ()
    if kind != INDEX:
        try:
            record = tuple(str(p) for p in dist.files or ())
        except Exception:  # a malformed RECORD
            record = ()
    if kind == EDITABLE:
        top_level = [line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines()]
        units = _editable_units(name, meta_dir, site, record, [t for t in top_level if t.isidentifier()], use_find_spec)
    return Found(name, version, kind, meta_dir, site, tags, record, units)


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
        if meta_dir.endswith(".egg-info") and os.path.isdir(meta_dir) and not is_installed_path(meta_dir):
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
) -> tuple[Unit, ...]:
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

    units: list[Unit] = []
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


def _find_in(top: str, directories: list[str]) -> list[Unit]:
    for directory in directories:
        candidate = os.path.join(directory, top)
        if os.path.isdir(candidate):
            return [(top, candidate, True)]
        for suffix in _module_suffixes():
            if os.path.isfile(candidate + suffix):
                return [(top + suffix, candidate + suffix, False)]
    return []


def _find_with_spec(top: str) -> list[Unit]:
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


def editable_files(dist: Found) -> tuple[File, ...]:
    meta_name = os.path.basename(dist.meta_dir)
    units = [(meta_name, dist.meta_dir, True), *dist.units]
    return collect(units, walk_limit=None)


# --------------------------------------------------------------------------- installed files


def record_files(dist: Found) -> tuple[File, ...]:
    """The files RECORD lists that lie inside the distribution's directory, as they are on disk now."""
    site = os.path.normpath(dist.site)
    files: dict[str, File] = {}
    if not dist.record:  # no RECORD: its metadata is all there is to send
        return collect([(os.path.basename(dist.meta_dir), dist.meta_dir, True)], walk_limit=None)
    for rel in dist.record:
        parts = rel.replace("\\", "/").split("/")
        if "__pycache__" in parts or rel.endswith((".pyc", ".pyo")):
            continue
        path = os.path.normpath(os.path.join(site, rel))
        if not path.startswith(site + os.sep):
            continue  # ../../bin/script, an absolute path: not part of site-packages
        entry = stat_file(os.path.relpath(path, site).replace(os.sep, "/"), path)
        if entry is not None:
            files.setdefault(entry[0], entry)
    return tuple(files[name] for name in sorted(files))


# One entry: a process calls snapshot() for every job, and its environment rarely changes.
_DIRS_MEMO: list[Any] = [None, None]


def dirs_of(found: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
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

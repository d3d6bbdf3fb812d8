"""The user's local code: which modules are theirs rather than installed, and the files to send of them.

One definition for the whole client: `is_local_module` decides which modules cloudpickle sends by value
(`_pickling`), and `local_code_files` which files go into the local code zip (`_environment`). A module is
local code when it is not Burla's, not ``__main__``, and its file lies outside the standard library, every
installation prefix and every site-packages (or dist-packages) directory.

What is sent of it: the whole folder of a local package (minus ``__pycache__``, ``*.pyc``, hidden folders and
data files over `MAX_CODE_FILE_BYTES`), a local top-level module's one file, and the ``.py`` files beside the
main script, which the function may import in its body.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from burla.schemas import environment as env

from ._packing import File, Unit, collect
from ._units import size_text
from .errors import TooLargeError

MAX_CODE_BYTES = 50 * 1000**2  # default limit of the local code, in file bytes before compression
MAX_CODE_FILE_BYTES = 10 * 1000**2  # a data file bigger than this in a local package is left out
LARGEST_SHOWN = 5  # how many files and folders a TooLargeError names


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


def under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def is_installed_path(path: str) -> bool:
    """Whether `path` is in the standard library, an installation prefix or a site-packages directory."""

    def installed(candidate: str) -> bool:
        return under(candidate, _INSTALLED_ROOTS) or any(part in candidate + os.sep for part in _INSTALL_DIR_NAMES)

    return installed(os.path.abspath(path)) or installed(os.path.realpath(path))  # most are: skip realpath


# (module name, __file__) -> (top-level name, unit, real path of the file), or None when not local code
_MODULES: dict[tuple[str, str], tuple[str, Unit, str] | None] = {}


def is_local_module(module: ModuleType | None) -> bool:
    """A module of the user's own code (not installed, not the standard library, not Burla)."""
    if module is None:
        return False
    file = getattr(module, "__file__", None)
    name = module.__name__
    if name == "__mp_main__":  # the script, in a multiprocessing child: not importable there, so by value
        return isinstance(file, str) and bool(file) and not is_installed_path(file)
    return isinstance(file, str) and bool(file) and _is_local_name(name) and not is_installed_path(file)


def _is_local_name(name: str) -> bool:
    return name not in ("__main__", "__mp_main__", "builtins") and name != "burla" and not name.startswith("burla.")


def _local_module(name: str, file: str) -> tuple[str, Unit, str] | None:
    key = (name, file)
    if key not in _MODULES:
        _MODULES[key] = _module_unit(name, file)
    return _MODULES[key]


def _module_unit(name: str, file: str) -> tuple[str, Unit, str] | None:
    """What to pack for a local module: its top-level package's whole directory, or the module's one file."""
    if not _is_local_name(name):
        return None
    path = os.path.abspath(file)
    if is_installed_path(path):
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
    unit: Unit = (top, os.path.join(directory, top), True) if above else (base, path, False)
    return top, unit, os.path.realpath(path)


def local_code_files(
    function: Callable[..., Any] | None,
    excluded: frozenset[str],
    owned: tuple[str, ...],
    install_dirs: tuple[str, ...],
) -> tuple[File, ...]:
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
    units: dict[Unit, tuple[int, str]] = {}
    for name, file in modules:
        local = _local_module(name, file)
        if local is None:
            continue
        top, unit, real = local
        if env.normalize(top) in excluded or under(real, owned) or under(real, install_dirs):
            continue
        units.setdefault(unit, (order.get(os.path.dirname(unit[1]), len(order)), unit[0]))
    ordered = sorted(units, key=lambda unit: units[unit])
    ordered.extend(_beside_main(excluded, owned, install_dirs))
    return collect(ordered, walk_limit=MAX_CODE_FILE_BYTES)


def _beside_main(excluded: frozenset[str], owned: tuple[str, ...], install_dirs: tuple[str, ...]) -> list[Unit]:
    """The top-level .py files beside the main script, which the function may import in its body."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if not isinstance(main_file, str) or not main_file:
        return []
    main_file = os.path.abspath(main_file)
    directory = os.path.dirname(main_file)
    if is_installed_path(main_file) or under(os.path.realpath(main_file), install_dirs):
        return []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    units: list[Unit] = []
    for entry in entries:
        stem = entry.name[: -len(".py")]
        if (
            not entry.name.endswith(".py")
            or entry.path == main_file
            or not stem.isidentifier()
            or env.normalize(stem) in excluded
            or not entry.is_file()
            or under(os.path.realpath(entry.path), owned)
        ):
            continue
        units.append((entry.name, entry.path, False))
    return units


def check_code_size(files: tuple[File, ...], max_bytes: int) -> None:
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

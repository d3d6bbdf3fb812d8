"""The layers of docs/ARCHITECTURE.md, checked from the imports in the source.

Every `import` and `from ... import` of every module counts, at any depth (inside functions and
`if TYPE_CHECKING:` too): a layer may import its own modules and those of the layers below it.

    client (burla.*)    daemon (burla.daemon)    node agent (burla.node_agent)
                  \\             |                  /
                   shared: burla.common, burla.errors
                               |
                     wire protocol: burla.schemas
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

SCHEMAS, SHARED, CLIENT, DAEMON, AGENT, ROOT_LAYER = "schemas", "shared", "client", "daemon", "agent", "root"
MAY_IMPORT = {
    SCHEMAS: {SCHEMAS},
    SHARED: {SCHEMAS, SHARED},
    CLIENT: {SCHEMAS, SHARED, CLIENT},
    DAEMON: {SCHEMAS, SHARED, DAEMON},
    AGENT: {SCHEMAS, SHARED, AGENT},
    ROOT_LAYER: {ROOT_LAYER, CLIENT, SHARED, SCHEMAS},  # burla/__init__.py: the public names, loaded lazily
}
# The one module above the layers: `burlad` is one binary, and `burlad agent` runs the node agent.
ENTRY_POINTS = {"burla.daemon.cli": {AGENT}}
# The worker shim runs inside the user's container: the standard library, cloudpickle and schemas only.
SHIM = "burla.node_agent.worker_shim"


def layer(module: str) -> str | None:
    """The layer of one of our modules (None: not ours)."""
    if module == "burla":
        return ROOT_LAYER
    if module == "burla._source_layout":
        return SHARED  # imports only the standard library; the root needs it first
    parts = module.split(".")
    if parts[0] != "burla":
        return None
    sub = parts[1]
    return {
        "schemas": SCHEMAS,
        "common": SHARED,
        "errors": SHARED,
        "daemon": DAEMON,
        "node_agent": AGENT,
    }.get(sub, CLIENT)


def modules() -> Iterator[tuple[str, Path]]:
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            yield name, path


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of everything `path` imports, with `from X import name` as X.name too."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def ours(name: str) -> str | None:
    """The name as one of our modules or packages, or None (a name imported from a module, not a module)."""
    known = {m for m, _ in modules()}
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


ALL = list(modules())


def test_every_module_of_every_package_is_checked() -> None:
    names = {m for m, _ in ALL}
    assert {"burla", "burla.schemas.messages", "burla.common.config", "burla.daemon.app", SHIM} <= names
    assert all(layer(m) is not None for m in names)


@pytest.mark.parametrize(("module", "path"), ALL, ids=[m for m, _ in ALL])
def test_imports_go_only_downward(module: str, path: Path) -> None:
    own = layer(module)
    assert own is not None
    allowed = MAY_IMPORT[own] | ENTRY_POINTS.get(module, set())
    wrong: list[str] = []
    for line, name in imports(module, path):
        target = ours(name)
        if target is None or target == "burla" and own != ROOT_LAYER:
            continue  # not ours; or `from burla import __version__`, which the root defines itself
        if target == "burla._source_layout" or layer(target) in allowed:
            continue
        if f"{path.relative_to(ROOT)}:{line} " not in "".join(wrong):
            wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({layer(target)} layer)")
    assert not wrong, f"{module} is in the {own} layer, which may import {sorted(allowed)}:\n" + "\n".join(wrong)


def test_the_worker_shim_imports_only_the_standard_library_cloudpickle_and_schemas() -> None:
    path = dict(ALL)[SHIM]
    outside = set()
    for _, name in imports(SHIM, path):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "cloudpickle" or name.startswith("burla.schemas"):
            continue
        if name.rpartition(".")[0] in (n for _, n in imports(SHIM, path)) and ours(name) is None:
            continue  # `from X import name`: X is what counts
        outside.add(name)
    assert outside <= {"burla"}, outside  # `burla` itself: the package the shim tree carries (its root only)


def _loaded(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sorted(sys.modules)))"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.split() if name.startswith("burla")]


def test_import_burla_loads_nothing_but_its_root() -> None:
    assert _loaded("import burla") == ["burla", "burla._source_layout"]


def test_the_daemon_and_the_agent_load_no_client_module() -> None:
    loaded = _loaded("import burla.daemon.cli, burla.daemon.server, burla.node_agent.agent")
    assert [name for name in loaded if layer(name) in (CLIENT,)] == []

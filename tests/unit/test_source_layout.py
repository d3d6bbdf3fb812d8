"""A Python started in the root of a source checkout imports the same names as the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

from burla import _source_layout

ROOT = Path(__file__).resolve().parents[2]


def test_the_finder_maps_what_pyproject_maps() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapped = config["tool"]["setuptools"]["package-dir"]
    assert {name: folder for name, folder in mapped.items() if name != folder} == _source_layout.FOLDERS


def test_import_burla_from_the_root_of_a_checkout() -> None:
    """As `python -c "import burla"` in the checkout, with Burla's dependencies installed but no editable hook."""
    code = (
        "import burla, burla.schemas.messages, burla.common.config, burla.node_agent.worker_shim\n"
        "print(burla.__file__); print(burla.schemas.__file__); print(burla.daemon.__file__)\n"
        "print(burla.node_agent.worker_shim.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]  # the dependencies; -S: no .pth, so no editable finder
    result = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(ROOT / "burla" / "__init__.py"),
        str(ROOT / "schemas" / "__init__.py"),
        str(ROOT / "daemon" / "__init__.py"),
        str(ROOT / "node_agent" / "worker_shim.py"),
    ]

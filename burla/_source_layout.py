"""Let a source checkout resolve the same names as the installed package.

The wheel puts the checkout's top-level folders `daemon/`, `node_agent/` and `schemas/` inside
the package as `burla.daemon`, `burla.node_agent` and `burla.schemas` (pyproject.toml's
`[tool.setuptools.package-dir]`). A Python started in the root of a checkout imports `burla` from
the `burla/` folder there, which has no such subfolders: without this finder `import burla` failed
there with "No module named 'burla.schemas'", even with Burla installed. When `burla` is
imported from a checkout, a finder maps the three names to their folders; an installed `burla`
has them inside and installs nothing.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

# os.path, not pathlib, and no importlib.abc: `import burla` stays cheap
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {
    "burla.common": "common",
    "burla.daemon": "daemon",
    "burla.node_agent": "node_agent",
    "burla.schemas": "schemas",
}


class SourceLayoutFinder:
    """A meta path finder of `burla.daemon`, `burla.node_agent` and `burla.schemas` in a checkout's folders."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        folder = FOLDERS.get(fullname)
        if folder is None:
            return None
        from importlib.util import spec_from_file_location

        package = os.path.join(ROOT, folder)
        return spec_from_file_location(
            fullname, os.path.join(package, "__init__.py"), submodule_search_locations=[package]
        )


def install() -> None:
    """Add the finder when `burla` comes from a source checkout rather than an installed package."""
    if os.path.isdir(os.path.join(os.path.dirname(__file__), "schemas")):
        return  # installed: the subpackages are inside
    if not os.path.isfile(os.path.join(ROOT, "pyproject.toml")):
        return
    if not all(os.path.isfile(os.path.join(ROOT, folder, "__init__.py")) for folder in FOLDERS.values()):
        return
    if not any(isinstance(finder, SourceLayoutFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceLayoutFinder())


install()

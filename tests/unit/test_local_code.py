"""burla._local_code: the one definition of the user's local code, for pickling and for the code zip."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import pytest

from burla import _local_code, _pickling
from burla._local_code import is_installed_path, is_local_module, under


def module(name: str, file: str | None) -> types.ModuleType:
    mod = types.ModuleType(name)
    if file is not None:
        mod.__file__ = file
    return mod


def test_installed_paths() -> None:
    assert is_installed_path(os.path.dirname(os.__file__))  # the standard library
    assert is_installed_path(pytest.__file__)  # site-packages
    assert is_installed_path("/opt/x/lib/python3/dist-packages/pkg/mod.py")
    assert not is_installed_path("/home/someone/project/mod.py")


def test_under() -> None:
    assert under("/a/b", ["/a"]) and under("/a", ["/a"]) and under("/a/b", ["/a/"])
    assert not under("/ab", ["/a"]) and not under("/a", [])


@pytest.mark.parametrize(
    ("name", "file", "local"),
    [
        ("mymod", "/home/someone/project/mymod.py", True),
        ("pkg.sub", "/home/someone/project/pkg/sub.py", True),
        ("burlafoo", "/home/someone/project/burlafoo.py", True),  # not Burla, whatever its name starts with
        ("burla._x", "/home/someone/project/burla/_x.py", False),
        ("burla", "/home/someone/project/burla/__init__.py", False),
        ("__main__", "/home/someone/project/script.py", False),
        ("__mp_main__", "/home/someone/project/script.py", True),  # the script in a multiprocessing child: by value
        ("builtins", None, False),
        ("nofile", None, False),
        ("installed", "/usr/lib/python3/site-packages/installed.py", False),
    ],
)
def test_is_local_module(name: str, file: str | None, local: bool) -> None:
    assert is_local_module(module(name, file)) is local


def test_pickling_and_the_code_zip_use_the_same_definition() -> None:
    assert _pickling.is_local_module is _local_code.is_local_module
    assert not is_local_module(None)
    assert not is_local_module(pickle) and not is_local_module(_pickling)


def test_a_local_module_the_zip_sends_is_one_pickling_sends_by_value(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("X = 1\n")
    mod = module("mine", str(tmp_path / "mine.py"))
    assert is_local_module(mod)
    unit = _local_code._module_unit("mine", str(tmp_path / "mine.py"))
    assert unit is not None and unit[1] == ("mine.py", str(tmp_path / "mine.py"), False)
    assert sys.modules.get("mine") is None

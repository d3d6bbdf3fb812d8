"""Fixtures for every tier: an isolated Burla home per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test sees the user's clusters, logins or config, or another test's."""
    home = tmp_path_factory.mktemp("burla-home")
    monkeypatch.setenv("BURLA_HOME", str(home / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    for var in list(os.environ):
        if var.startswith("BURLA_") and var != "BURLA_HOME":
            monkeypatch.delenv(var)
    return home

"""End-to-end fixtures: real burlad and agent processes, the client as a user calls it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two agents with two workers each, shared by a module's non-destructive tests."""
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), agents=2, workers=2)
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(shared_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """The shared cluster, chosen by BURLA_CLUSTER_URL / BURLA_API_KEY as a user would."""
    shared_cluster.use(monkeypatch)
    return shared_cluster


@pytest.fixture
def own_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A cluster of this test's own, for tests that kill or restart parts of it.

    Parametrize indirectly with a dict of Cluster arguments to change its shape.
    """
    kwargs = getattr(request, "param", {})
    cluster = Cluster(tmp_path / "cluster", **kwargs)
    cluster.use(monkeypatch)
    yield cluster
    cluster.stop()

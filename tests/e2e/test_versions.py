"""Parts of different Burla versions: compared, and refused or replaced, never mixed silently.

A part "of another version" is this install with BURLA_TEST_REPORTED_VERSION (and
BURLA_TEST_REPORTED_PROTOCOL) set: burla._version states those instead of its own.
"""

from __future__ import annotations

import time

import pytest

import burla
from burla import VersionMismatchError, remote_parallel_map
from burla.schemas import messages as m
from tests.cluster import Cluster

pytestmark = pytest.mark.e2e

OLD_VERSION = "0.0.1.test"
SAME_PROTOCOL = {"BURLA_TEST_REPORTED_VERSION": OLD_VERSION}  # another version, stating our protocol
OTHER_PROTOCOL = {**SAME_PROTOCOL, "BURLA_TEST_REPORTED_PROTOCOL": str(m.PROTOCOL_VERSION + 100)}


# ---- a configured cluster and its agents ---------------------------------------------------


@pytest.mark.parametrize("own_cluster", [{"agents": 1, "env": OTHER_PROTOCOL}], indirect=True)
def test_a_cluster_of_an_incompatible_version_is_refused_at_once_naming_both(own_cluster: Cluster) -> None:
    began = time.monotonic()
    with pytest.raises(VersionMismatchError) as refused:
        remote_parallel_map(abs, [-1], spinner=False)
    assert time.monotonic() - began < 10
    message = str(refused.value)
    assert f"at {own_cluster.url} runs Burla {OLD_VERSION} (protocol {m.PROTOCOL_VERSION + 100})" in message
    assert f"this process Burla {burla.__version__} (protocol {m.PROTOCOL_VERSION})" in message
    assert f"Install burla=={OLD_VERSION} here" in message
    assert own_cluster.status()["jobs"] == []  # nothing was sent


@pytest.mark.parametrize("own_cluster", [{"agents": 1, "env": SAME_PROTOCOL}], indirect=True)
def test_a_cluster_of_another_version_stating_the_same_protocol_is_used(own_cluster: Cluster) -> None:
    assert remote_parallel_map(abs, [-1, -2], spinner=False) == [1, 2]


@pytest.mark.parametrize("own_cluster", [{"agents": 1, "workers": 1}], indirect=True)
def test_an_agent_of_an_incompatible_version_exits_refused_naming_both(own_cluster: Cluster) -> None:
    args = ["agent", own_cluster.url, f"--token={own_cluster.node_token}", "--workers", "1",
            "--state-dir", str(own_cluster.root / "old-agent")]  # fmt: skip
    agent = own_cluster._spawn("old-agent", args, extra_env=OTHER_PROTOCOL)
    try:
        code = agent.wait(30)  # before: it registered (or, refused, would retry forever)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    log = (own_cluster.root / "old-agent.log").read_text()
    assert code == 1, log
    assert f"runs Burla {OLD_VERSION} (protocol {m.PROTOCOL_VERSION + 100})" in log
    assert f"this daemon Burla {burla.__version__} (protocol {m.PROTOCOL_VERSION})" in log
    assert len(own_cluster.status()["nodes"]) == 1  # only the agent of this version

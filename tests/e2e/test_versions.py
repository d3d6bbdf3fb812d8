"""Parts of different Burla versions: compared, and refused or replaced, never mixed silently.

A part "of another version" is this install with BURLA_TEST_REPORTED_VERSION (and
BURLA_TEST_REPORTED_PROTOCOL) set: burla.common.version states those instead of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import burla
from burla import VersionMismatchError, _local, remote_parallel_map
from burla.common.local import local_cluster_home
from burla.schemas import messages as m
from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.e2e

OLD_VERSION = "0.0.1.test"
SAME_PROTOCOL = {"BURLA_TEST_REPORTED_VERSION": OLD_VERSION}  # another version, stating our protocol
OTHER_PROTOCOL = {**SAME_PROTOCOL, "BURLA_TEST_REPORTED_PROTOCOL": str(m.PROTOCOL_VERSION + 100)}

Blocker = Callable[[dict[str, str]], tuple[subprocess.Popen[str], Path]]

BLOCKING_CLIENT = """
import os, time
from burla import remote_parallel_map
def wait_for_go(x):
    open(STARTED, "w").close()
    while not os.path.exists(GO):
        time.sleep(0.05)
    return x
print(remote_parallel_map(wait_for_go, [7], spinner=False), flush=True)
"""


@pytest.fixture
def local_home() -> Iterator[Path]:
    yield local_cluster_home()
    _local.stop()


def daemon_pid(home: Path) -> int:
    return int(json.loads((home / "daemon.json").read_text())["pid"])


@pytest.fixture
def block_the_local_cluster(tmp_path: Path) -> Iterator[Blocker]:
    """Run a client of a version's `env`: it starts the local cluster and keeps one worker busy until `go`."""
    clients: list[subprocess.Popen[str]] = []

    def block(env: dict[str, str]) -> tuple[subprocess.Popen[str], Path]:
        started, go = tmp_path / "started", tmp_path / "go"
        script = tmp_path / "blocking_client.py"
        script.write_text(f"STARTED = {str(started)!r}\nGO = {str(go)!r}\n{BLOCKING_CLIENT}")
        client = subprocess.Popen(
            [sys.executable, str(script)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        clients.append(client)
        wait_for(lambda: started.exists() or client.poll() is not None, 60, "the blocking job to start")
        assert client.poll() is None, client.communicate()
        return client, go

    yield block
    for client in clients:
        if client.poll() is None:
            client.kill()
        client.communicate()


def finish(client: subprocess.Popen[str], go: Path) -> None:
    go.touch()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert out.strip() == "[7]"


# ---- the local cluster --------------------------------------------------------------------


def test_an_idle_local_cluster_of_another_version_is_restarted_on_this_one(local_home: Path) -> None:
    env = {**os.environ, **SAME_PROTOCOL}
    subprocess.run([sys.executable, "-m", "burla.cli", "local", "start"], env=env, check=True, timeout=60)
    old = daemon_pid(local_home)

    assert remote_parallel_map(abs, [-1, -2], spinner=False) == [1, 2]

    info = json.loads((local_home / "daemon.json").read_text())
    assert info["pid"] != old, "the local cluster of another version was reused"
    assert info["version"] == burla.__version__
    log = (local_home / "daemon.log").read_text()
    assert log.count("stopping on SIGTERM") == 1 and "stopped: exit code 0" in log  # the old one, cleanly


def test_a_busy_local_cluster_of_a_compatible_version_is_used_then_replaced_once_idle(
    local_home: Path, block_the_local_cluster: Blocker
) -> None:
    client, go = block_the_local_cluster(SAME_PROTOCOL)  # one of its two workers stays busy
    old = daemon_pid(local_home)

    assert remote_parallel_map(abs, [-3], spinner=False) == [3]  # it states our protocol: used as it is
    assert daemon_pid(local_home) == old

    finish(client, go)
    assert remote_parallel_map(abs, [-4], spinner=False) == [4]
    assert daemon_pid(local_home) != old, "the idle local cluster of another version was reused"


def test_a_busy_local_cluster_of_an_incompatible_version_is_waited_for_then_replaced(
    local_home: Path,
    block_the_local_cluster: Blocker,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, go = block_the_local_cluster(OTHER_PROTOCOL)
    old = daemon_pid(local_home)

    monkeypatch.setattr(_local, "BUSY_WAIT", 1.0, raising=False)
    began = time.monotonic()
    with pytest.raises(VersionMismatchError) as refused:
        remote_parallel_map(abs, [-5], spinner=False)  # before: ran on the other version's free worker
    assert time.monotonic() - began < 30
    message = str(refused.value)
    assert f"runs Burla {OLD_VERSION}" in message and f"not this process's {burla.__version__}" in message
    assert "wait_for_go: 0 of 1 done" in message and "burla local stop" in message
    assert "waiting up to 1s for it to finish" in capsys.readouterr().err
    assert daemon_pid(local_home) == old  # nothing was stopped under its job

    monkeypatch.setattr(_local, "BUSY_WAIT", 60.0, raising=False)
    threading.Timer(1.0, go.touch).start()  # its job ends while this call waits for it
    assert remote_parallel_map(abs, [-6], spinner=False) == [6]
    assert daemon_pid(local_home) != old
    finish(client, go)


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
    args = ["agent", own_cluster.url, "--workers", "1", "--state-dir", str(own_cluster.root / "old-agent")]
    agent = own_cluster._spawn(
        "old-agent", args, extra_env={**OTHER_PROTOCOL, "BURLA_AGENT_TOKEN": own_cluster.node_token}
    )
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

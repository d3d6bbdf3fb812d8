"""A cluster whose daemon starts its own nodes, with the local provider: each node a `burlad agent` process.

Real `burlad serve`, real agents, the real client; the same node life and scaling code as Compute Engine.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from burla import remote_parallel_map
from tests.cluster import Cluster, wait_for

pytestmark = pytest.mark.e2e


def square(x: int) -> int:
    return x * x


def config(tmp_path: Path, standby: int, idle_timeout: str = "3s", max_cpus: int = 8) -> Path:
    path = tmp_path / "burla.toml"
    path.write_text(
        f'[cluster]\nprovider = "local"\nname = "t"\nidle_timeout = "{idle_timeout}"\nmax_cpus = {max_cpus}\n'
        f'[[cluster.groups]]\nmachine_type = "e2-standard-2"\ncpus = 1\nstandby = {standby}\n'
    )
    return path


def kill_nodes(root: Path) -> None:
    """Local nodes outlive their daemon on purpose (a restart adopts them): the test ends them."""
    for pid_file in (root / "daemon" / "nodes").glob("*/pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def cluster_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(standby: int, **kwargs: Any) -> Cluster:
        path = config(tmp_path, standby, **kwargs)
        cluster = Cluster(tmp_path / "cluster", agents=0, env={"BURLA_CONFIG": str(path)})
        cluster.use(monkeypatch)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        try:
            cluster.stop()
        finally:
            kill_nodes(cluster.root)


def nodes(cluster: Cluster) -> dict[str, Any]:
    r = httpx.get(f"{cluster.url}/v1/cluster/nodes", headers={"authorization": f"Bearer {cluster.admin_token}"})
    r.raise_for_status()
    return dict(r.json())


def states(cluster: Cluster) -> list[str]:
    return sorted(n["state"] for n in nodes(cluster)["nodes"])


def burla(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.client_env()}
    return subprocess.run(
        [sys.executable, "-m", "burla.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_standby_nodes_start_register_and_serve_a_job_then_stop_deletes_them(cluster_of: Any) -> None:
    cluster = cluster_of(standby=2)
    wait_for(lambda: states(cluster) == ["READY", "READY"], 90, "2 standby nodes READY")
    assert len(cluster.status()["nodes"]) == 2
    assert remote_parallel_map(square, range(20), spinner=False) == [x * x for x in range(20)]
    listed = burla(cluster, "cluster", "nodes")
    assert listed.returncode == 0, listed.stderr
    assert "READY" in listed.stdout or "IDLE" in listed.stdout or "BUSY" in listed.stdout
    stopped = burla(cluster, "cluster", "stop")
    assert stopped.returncode == 0 and "every node deleted" in stopped.stdout, stopped.stderr
    wait_for(lambda: nodes(cluster)["nodes"] == [], 30, "every node deleted")
    assert list((cluster.root / "daemon" / "nodes").glob("*/pid")) == []
    started = burla(cluster, "cluster", "start")
    assert started.returncode == 0, started.stderr
    wait_for(lambda: states(cluster) == ["READY", "READY"], 90, "standby back")


def test_a_job_with_grow_starts_its_nodes_and_they_go_after_the_idle_timeout(cluster_of: Any) -> None:
    cluster = cluster_of(standby=0)
    assert nodes(cluster)["nodes"] == []
    results = remote_parallel_map(square, range(30), grow=True, max_parallelism=3, spinner=False)
    assert results == [x * x for x in range(30)]  # every input once, in order
    assert len(nodes(cluster)["nodes"]) >= 1
    wait_for(lambda: nodes(cluster)["nodes"] == [], 60, "grown nodes deleted once idle")


def test_a_restarted_daemon_adopts_its_running_nodes(cluster_of: Any) -> None:
    cluster = cluster_of(standby=1, idle_timeout="10min")
    wait_for(lambda: states(cluster) == ["READY"], 90, "a standby node READY")
    (before,) = [n["name"] for n in nodes(cluster)["nodes"]]
    cluster.restart_daemon()
    wait_for(lambda: [n["name"] for n in nodes(cluster)["nodes"]] == [before] and states(cluster) == ["READY"],
             90, "the node adopted and registered again")  # fmt: skip
    assert remote_parallel_map(square, [3], spinner=False) == [9]


def test_the_spec_changes_while_burlad_runs_and_is_kept_across_a_restart(cluster_of: Any, tmp_path: Path) -> None:
    cluster = cluster_of(standby=0)
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(
        '[cluster]\nmax_cpus = 4\n[[cluster.groups]]\nmachine_type = "e2-standard-2"\ncpus = 1\nstandby = 1\n'
    )
    done = burla(cluster, "cluster", "spec", "set", str(spec_file))
    assert done.returncode == 0, done.stderr
    assert "max_cpus = 4" in done.stdout and "e2-standard-2: standby 1" in done.stdout
    wait_for(lambda: states(cluster) == ["READY"], 90, "the new standby node READY")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[cluster.groups]]\nmachine_type = "E2 standard"\n')
    refused = burla(cluster, "cluster", "spec", "set", str(bad))
    assert refused.returncode == 1 and "machine_type" in refused.stderr  # names the field; nothing changed
    # burla.toml of this test names no standby: the spec set above is what a restarted burlad keeps
    (cluster.root.parent / "burla.toml").write_text('[cluster]\nprovider = "local"\nname = "t"\nidle_timeout = "3s"\n')
    cluster.restart_daemon()
    shown = burla(cluster, "cluster", "spec", "show")
    assert shown.returncode == 0 and "max_cpus = 4" in shown.stdout, shown.stderr
    wait_for(lambda: states(cluster) == ["READY"], 90, "the standby node adopted")


def test_a_node_changes_hands_between_users_with_no_call_preempted(cluster_of: Any) -> None:
    """Two single-tenant nodes, and no room for a third: user A's long job holds both; when user B's job
    comes, one node is handed to B once A's calls there are done (fair share), and B's job runs on it."""
    import threading

    from burla import Client

    cluster = cluster_of(standby=2, max_cpus=2)
    wait_for(lambda: states(cluster) == ["READY", "READY"], 120, "two standby nodes")
    keys = {}
    for name in ("ann", "bob"):
        r = httpx.post(f"{cluster.url}/v1/users", json={"name": name},
                       headers={"authorization": f"Bearer {cluster.admin_token}"}, timeout=10)  # fmt: skip
        keys[name] = r.json()["api_key"]
    results: list[Any] = []

    def run_ann() -> None:
        with Client(cluster.url, keys["ann"]) as client:
            results.extend(client.map(naps, range(120), spinner=False))

    thread = threading.Thread(target=run_ann)
    thread.start()
    wait_for(lambda: [n["state"] for n in nodes(cluster)["nodes"]] == ["BUSY", "BUSY"], 60, "ann's job on both")
    with Client(cluster.url, keys["bob"]) as client:
        assert client.map(square, range(6), spinner=False) == [x * x for x in range(6)]
    ann = [j for j in cluster.status()["jobs"] if j["owner"] == "ann"]
    assert ann and ann[0]["state"] == "running", "bob's job ran while ann's still did, not after it"
    thread.join(120)
    assert results == list(range(120))  # every call of ann's once: nothing preempted or lost
    with sqlite3.connect(f"file:{cluster.root / 'daemon' / 'burla.db'}?mode=ro", uri=True) as db:
        handed = db.execute("SELECT name, why FROM node_events WHERE why LIKE '%fair share%'").fetchall()
    assert handed, "no node changed hands"  # one of ann's nodes went to bob


def naps(x: int) -> int:
    import time

    time.sleep(0.1)
    return x

"""A cluster on "Compute Engine": real burlad with the real google-cloud-compute client, against the fake
Compute Engine of tests/fake_compute.py, whose instances run the daemon's startup script for real.

As root (CI), each instance has its own network namespace and address on a bridge, so its agent reaches
the daemon over a real interface (no 127.0.0.1 shortcut). One test installs Burla on the node from the
daemon's /v1/dist (with a wheelhouse of its dependencies, as a node without a package index would); the
others give the nodes this test run's virtual environment as their boot image's (BURLA_NODE_VENV), so
they boot in seconds. Deleting or preempting an instance kills its processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from burla import remote_parallel_map
from burla.errors import NodeStartError
from tests.cluster import BackgroundMap, Cluster, free_port, wait_for

pytest.importorskip("google.cloud.compute_v1")
from tests.fake_compute import FakeCompute  # noqa: E402

pytestmark = pytest.mark.e2e
ZONES = ["us-central1-a", "us-central1-b"]
NETNS = os.geteuid() == 0 and subprocess.run(["which", "ip"], capture_output=True).returncode == 0
VENV = Path(sys.executable).parent.parent


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    import time

    time.sleep(0.5)
    return x * x


class GceCluster:
    def __init__(self, root: Path, gce: FakeCompute, standby: int, idle_timeout: str, wheelhouse: str = "") -> None:
        self.gce = gce
        port = free_port()  # known before the daemon starts: its URL goes into the nodes' metadata
        config = root / "burla.toml"
        config.write_text(
            f'[cluster]\nprovider = "gce"\nname = "t"\nproject = "{gce.project}"\nregion = "us-central1"\n'
            f'zones = {ZONES!r}\napi_endpoint = "{gce.endpoint}"\nidle_timeout = "{idle_timeout}"\n'
            f'node_url = "http://{gce.host_ip}:{port}"\nmax_cpus = 16\nwheelhouse = "{wheelhouse}"\n'
            f'[[cluster.groups]]\nmachine_type = "e2-standard-2"\nstandby = {standby}\n'
        )
        env = {"BURLA_CONFIG": str(config), "BURLA_DAEMON_HOST": "0.0.0.0"}
        self.cluster = Cluster(root / "cluster", agents=0, env=env, port=port)

    def nodes(self) -> dict[str, Any]:
        r = httpx.get(f"{self.cluster.url}/v1/cluster/nodes", headers=self.cluster_headers(), timeout=10)
        r.raise_for_status()
        return dict(r.json())

    def cluster_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.cluster.admin_token}"}

    def states(self) -> list[str]:
        return sorted(n["state"] for n in self.nodes()["nodes"])


@pytest.fixture
def gce_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    made: list[tuple[FakeCompute, GceCluster]] = []

    def make(
        standby: int = 0, idle_timeout: str = "3s", real_install: bool = False, wheelhouse: str = ""
    ) -> GceCluster:
        env = {"BURLA_NODE_HOME": "node"}  # relative: in the instance's own directory
        if not real_install:
            env["BURLA_NODE_VENV"] = str(VENV)
        gce = FakeCompute(project="p", zones=ZONES, netns=NETNS, env=env, boot_delay=0.2)
        try:
            cluster = GceCluster(tmp_path, gce, standby, idle_timeout, wheelhouse)
        except BaseException:
            gce.close()
            raise
        cluster.cluster.use(monkeypatch)
        # the nodes reach no package index (a network namespace each): they run the test venv's packages
        monkeypatch.setenv("BURLA_CLIENT_REPLICATE_ENVIRONMENT", "false")
        made.append((gce, cluster))
        return cluster

    yield make
    for gce, cluster in made:
        cluster.cluster.stop()
        gce.close()


def test_standby_starts_instances_whose_agents_register_across_a_network(gce_cluster: Any) -> None:
    c = gce_cluster(standby=2)
    wait_for(lambda: c.states() == ["READY", "READY"], 120, "2 standby instances READY")
    instances = c.gce.instances()
    assert len(instances) == 2 and {i.labels["burla-cluster"] for i in instances.values()} == {"t"}
    if NETNS:
        assert all(i.ip.startswith("10.231.") for i in instances.values())  # each its own address
    assert remote_parallel_map(square, range(10), spinner=False) == [x * x for x in range(10)]


def test_a_job_with_grow_runs_on_new_instances_which_go_when_idle(gce_cluster: Any) -> None:
    c = gce_cluster(standby=0)
    assert remote_parallel_map(square, range(40), grow=True, max_parallelism=4, spinner=False) == [
        x * x for x in range(40)
    ]
    assert len(c.gce.instances()) >= 1
    wait_for(lambda: c.gce.instances() == {} and c.nodes()["nodes"] == [], 60, "grown instances deleted")


def test_an_exhausted_zone_is_skipped_and_a_quota_reaches_the_caller(gce_cluster: Any) -> None:
    c = gce_cluster(standby=0)
    c.gce.exhaust("us-central1-a")
    assert remote_parallel_map(square, [2], grow=True, spinner=False) == [4]
    assert {i.zone for i in c.gce.instances().values()} == {"us-central1-b"}
    wait_for(lambda: c.gce.instances() == {}, 60, "the grown instance deleted once idle")  # no free node left
    c.gce.quota_exceeded("CPUS", region="us-central1", limit=2.0)
    with pytest.raises(NodeStartError) as info:
        remote_parallel_map(square, range(8), grow=True, func_cpu=2, spinner=False)
    message = str(info.value)
    assert "QUOTA_EXCEEDED" in message and "e2-standard-2" in message and "us-central1-b" in message


@pytest.mark.timeout(300)
def test_a_preempted_instance_mid_job_loses_no_result_and_standby_is_replaced(gce_cluster: Any) -> None:
    c = gce_cluster(standby=2, idle_timeout="10min")
    wait_for(lambda: c.states() == ["READY", "READY"], 120, "2 standby instances READY")
    job = BackgroundMap(slow_square, list(range(40)))
    wait_for(lambda: "BUSY" in c.states(), 60, "the job holding a node")
    victim = next(n["name"] for n in c.nodes()["nodes"] if n["state"] == "BUSY")
    c.gce.preempt(victim)
    job.join(240)
    assert not job.errors and job.results == [x * x for x in range(40)]

    def restored() -> bool:
        free = [n for n in c.nodes()["nodes"] if n["state"] in ("READY", "IDLE")]
        return victim not in c.gce.instances() and len(free) >= 2

    wait_for(restored, 120, "the preempted node gone and 2 free nodes for the next job")


def test_a_restarted_daemon_adopts_its_instances(gce_cluster: Any) -> None:
    c = gce_cluster(standby=1, idle_timeout="10min")
    wait_for(lambda: c.states() == ["READY"], 120, "a standby instance READY")
    (name,) = c.gce.instances()
    c.cluster.restart_daemon()
    wait_for(lambda: [n["name"] for n in c.nodes()["nodes"]] == [name] and c.states() == ["READY"], 120,
             "the instance adopted, its agent registered again")  # fmt: skip
    assert list(c.gce.instances()) == [name]
    assert remote_parallel_map(square, [5], spinner=False) == [25]


def test_the_startup_script_installs_burla_from_the_daemon(gce_cluster: Any, tmp_path: Path) -> None:
    """The real boot: a venv, `pip install burla==VERSION` from the daemon's /v1/dist (its dependencies
    from the daemon's wheelhouse: the node reaches no package index), then `burlad agent`."""
    wheelhouse = tmp_path / "wheelhouse"
    deps = ["cloudpickle", "httpx", "httpx-ws", "hypercorn", "quart-trio", "rich", "sqlite-utils", "trio"]
    got = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(wheelhouse), *deps],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if got.returncode != 0:
        pytest.skip(f"no package index to fill the wheelhouse from: {got.stderr[-300:]}")
    c = gce_cluster(standby=1, real_install=True, wheelhouse=str(wheelhouse))
    wait_for(lambda: c.states() == ["READY"], 300, "the node installed Burla and registered")
    (inst,) = c.gce.instances().values()
    assert (inst.dir / "node" / "venv" / "bin" / "burlad").exists()
    assert remote_parallel_map(square, [7], spinner=False) == [49]

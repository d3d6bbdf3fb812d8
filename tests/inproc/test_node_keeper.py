"""The node keeper carries out the scaling plan with a provider, and keeps each node's life in SQLite.

The provider here is an in-memory stand-in for a cloud (the real ones are tested in test_providers.py and
test_gce_provider.py, and end to end); the store is a real SQLite file.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from burla.common.config import ClusterConfig, DaemonConfig, NodeGroupConfig
from burla.daemon.cluster_link import PlaneCluster
from burla.daemon.node_keeper import NodeKeeper, NodeState, StoreBook
from burla.daemon.providers import Boot, Instance, ProviderError
from burla.daemon.scaling import Demand
from burla.daemon.service import ControlPlane
from burla.daemon.store import Store, hash_token
from burla.schemas import messages as m


class Cloud:
    """Instances in memory; `refuse` makes the next creates fail as a quota would."""

    name = "memory"

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.boots: dict[str, Boot] = {}
        self.refuse = ""
        self.blip = 0

    async def machine(self, group: NodeGroupConfig) -> tuple[int, int]:
        return 4, 16 * 10**9

    async def create(self, name: str, group_index: int, group: NodeGroupConfig, boot: Boot) -> Instance:
        await trio.sleep(1)
        if self.blip:
            self.blip -= 1
            raise ConnectionError("network blip")  # not a ProviderError: anything a client library raises
        if self.refuse:
            raise ProviderError(self.refuse, "QUOTA_EXCEEDED", ("z-a",))
        self.instances[name] = Instance(name, group_index, "z-a")
        self.boots[name] = boot
        return self.instances[name]

    async def delete(self, name: str) -> None:
        await trio.sleep(1)
        self.instances.pop(name, None)

    async def list(self) -> list[Instance]:
        return list(self.instances.values())

    async def aclose(self) -> None:
        pass


class Plane:
    """What the control plane hears from the keeper."""

    def __init__(self) -> None:
        self.wants: list[Demand] = []
        self.held: dict[str, str] = {}
        self.gone: list[str] = []
        self.failed: dict[str, str] = {}
        self.notes: dict[str, str] = {}

    def demands(self) -> list[Demand]:
        return list(self.wants)

    def hold(self, agent_id: str, job_id: str) -> None:
        self.held[agent_id] = job_id

    def release(self, agent_id: str) -> None:
        self.held.pop(agent_id, None)

    def node_gone(self, agent_id: str, why: str) -> None:
        self.gone.append(agent_id)

    def growth_failed(self, job_id: str, why: str) -> None:
        self.failed[job_id] = why
        self.wants = [d for d in self.wants if d.job_id != job_id]  # the control plane fails the job

    def note(self, job_id: str, text: str) -> None:
        self.notes[job_id] = text


def keeper(tmp_path: Path, cloud: Cloud, standby: int = 2, **cluster: object) -> tuple[NodeKeeper, Plane, Store]:
    store = Store(tmp_path / "state" / "burla.db")
    config = ClusterConfig(
        provider="memory", groups=[NodeGroupConfig(machine_type="e2-standard-4", standby=standby)], **cluster
    )  # type: ignore[arg-type]
    k = NodeKeeper(
        config, cloud, StoreBook(store, trio.current_time), "http://d:1", "0.1.0", hash_token, trio.current_time
    )
    plane = Plane()
    k.cluster = plane
    return k, plane, store


def states(k: NodeKeeper) -> list[str]:
    return sorted(n.state.value for n in k.records.values())


async def test_standby_is_started_and_each_node_joins_with_its_own_token(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    k, plane, store = keeper(tmp_path, cloud)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        await trio.sleep(3)
        assert states(k) == ["BOOTING", "BOOTING"] and len(cloud.instances) == 2
        tokens = {name: boot.token for name, boot in cloud.boots.items()}
        assert len(set(tokens.values())) == 2 and all(t.startswith("burla_instance_") for t in tokens.values())
        for i, (name, token) in enumerate(tokens.items()):
            assert k.instance_of(token) == name
            k.registered(name, f"agent{i}")
        assert k.instance_of("burla_instance_forged") is None
        await trio.sleep(2)
        assert states(k) == ["READY", "READY"] and len(cloud.instances) == 2
        rows = {r["name"]: r for r in store.node_rows()}
        assert {r["state"] for r in rows.values()} == {"READY"}
        assert all(token not in str(store.node_rows()) for token in tokens.values())  # only hashes are kept
        assert [e[2] for e in reversed(store.node_events(next(iter(rows))))] == ["BOOTING", "BOOTING", "READY"]
        nursery.cancel_scope.cancel()


async def test_a_growing_job_holds_the_free_nodes_and_boots_more_then_they_go_when_idle(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    k, plane, _ = keeper(tmp_path, cloud, standby=1, idle_timeout=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        await trio.sleep(3)
        (first,) = k.records
        k.registered(first, "a0")
        await trio.sleep(2)
        plane.wants = [Demand("job1", calls=12, func_cpu=1, grow=True)]  # 3 nodes of 4 CPUs
        k.wake()
        await trio.sleep(3)
        assert plane.held == {"a0": "job1"}
        booting = [n for n in k.records.values() if n.state == NodeState.BOOTING]
        assert sorted(n.job or "standby" for n in booting) == ["job1", "job1", "standby"]
        for i, node in enumerate(booting):
            k.registered(node.name, f"a{i + 1}")
        await trio.sleep(2)
        assert sorted(plane.held.values()) == ["job1"] * 3 and states(k) == ["BUSY", "BUSY", "BUSY", "READY"]
        plane.wants = []  # the job ended
        k.wake()
        await trio.sleep(2)
        assert plane.held == {} and states(k) == ["IDLE", "IDLE", "IDLE", "READY"]
        await trio.sleep(65)
        assert len(k.records) == 1 and len(cloud.instances) == 1  # one kept for standby, the rest deleted
        nursery.cancel_scope.cancel()


async def test_a_growth_the_cloud_refuses_fails_the_job_with_the_clouds_reason(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    cloud.refuse = "Quota 'CPUS' exceeded. Limit: 4.0 in region r."
    k, plane, store = keeper(tmp_path, cloud, standby=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        plane.wants = [Demand("job1", calls=8, grow=True)]
        k.wake()
        await trio.sleep(3)
        assert "Quota 'CPUS' exceeded" in plane.failed["job1"]
        assert k.records == {} and store.node_rows() == []
        assert "could not be created" in store.node_events()[0][3]
        nursery.cancel_scope.cancel()


async def test_a_node_the_cloud_takes_away_is_gone_and_standby_is_restored(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: object
) -> None:
    import burla.daemon.node_keeper as nk

    nk.WATCH_SECONDS = 5.0  # type: ignore[misc]
    cloud = Cloud()
    k, plane, store = keeper(tmp_path, cloud, standby=1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(k.run)
            await trio.sleep(3)
            (name,) = k.records
            k.registered(name, "a0")
            del cloud.instances[name]  # preempted, or deleted by hand
            await trio.sleep(8)
            assert plane.gone == ["a0"]
            assert name not in k.records and len(cloud.instances) == 1  # a new standby node
            events = [(e[2], e[3]) for e in store.node_events(name)]
            assert ("FAILED", "its instance is gone (deleted outside Burla, or never created)") in events
            nursery.cancel_scope.cancel()
    finally:
        nk.WATCH_SECONDS = 10.0  # type: ignore[misc]


async def test_a_restarted_keeper_adopts_the_instances_and_forgets_what_is_gone(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    k, plane, store = keeper(tmp_path, cloud, standby=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    names = sorted(k.records)
    cloud.instances[names[0]] = Instance(names[0], 0, "z-a", status="TERMINATED")  # stopped while we were away
    cloud.instances["burla-burla-adopt"] = Instance("burla-burla-adopt", 0, "z-a")  # ours, unknown to the book
    store.close()
    k2, plane2, store2 = keeper(tmp_path, cloud, standby=2)
    assert sorted(k2.records) == names
    async with trio.open_nursery() as nursery:
        await nursery.start(k2.run)
        await trio.sleep(3)
        assert names[0] not in k2.records and "burla-burla-adopt" in k2.records
        assert len([n for n in k2.records.values() if n.state != NodeState.FAILED]) == 2
        nursery.cancel_scope.cancel()


async def test_a_startup_script_that_fails_marks_its_node_failed_with_its_log(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    k, plane, store = keeper(tmp_path, cloud, standby=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        await trio.sleep(3)
        (name,) = k.records
        k.boot_failed(name, "pip install burla==0.1.0", "Collecting burla\nERROR: No matching distribution")
        await trio.sleep(0)
        why = [e[3] for e in store.node_events(name) if e[2] == "FAILED"][0]
        assert "pip install burla==0.1.0" in why and "No matching distribution" in why
        await trio.sleep(5)
        assert name not in cloud.instances and len(cloud.instances) == 0  # deleted; the group backs off
        await trio.sleep(40)
        assert len(cloud.instances) == 1  # replaced after the backoff (30 s), not in a loop
        nursery.cancel_scope.cancel()


async def test_a_growing_job_fails_once_its_group_s_nodes_fail_to_come_up_three_times_in_a_row(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    k, plane, store = keeper(tmp_path, cloud, standby=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        plane.wants = [Demand("job1", calls=4, grow=True)]  # one node of 4 CPUs
        for _ in range(3):
            k.wake()
            await wait_until(lambda: any(n.state == NodeState.BOOTING for n in k.records.values()))
            await trio.sleep(2)  # created
            (name,) = [n.name for n in k.records.values() if n.state == NodeState.BOOTING]
            k.boot_failed(name, "burlad agent", "no route to the daemon")
            await trio.sleep(1)
        assert "3 nodes in a row did not come up" in plane.failed["job1"]
        assert "no route to the daemon" in plane.failed["job1"]
        nursery.cancel_scope.cancel()


async def wait_until(predicate: object, timeout: float = 120.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.5)


async def test_standby_the_cloud_refuses_is_retried_with_backoff_not_every_round(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    cloud.refuse = "Quota 'CPUS' exceeded."
    k, plane, store = keeper(tmp_path, cloud, standby=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        await trio.sleep(100)
        tries = len([e for e in store.node_events(limit=1000) if e[2] == "BOOTING"])
        assert 2 <= tries <= 4  # at 0 s, 30 s, 90 s: not 100 times
        cloud.refuse = ""
        await trio.sleep(300)
        assert len(cloud.instances) == 1
        nursery.cancel_scope.cancel()


async def test_an_unexpected_error_of_the_provider_is_retried_and_does_not_stop_the_keeper(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    cloud.blip = 1
    k, plane, store = keeper(tmp_path, cloud, standby=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        plane.wants = [Demand("job1", calls=4, grow=True)]
        k.wake()
        await trio.sleep(60)
        assert "job1" not in plane.failed  # a blip is no reason to fail the job
        assert len(cloud.instances) >= 1 and any("ConnectionError" in f for f in k.failures)
        nursery.cancel_scope.cancel()


async def test_a_user_below_its_fair_share_gets_a_busy_node_handed_over_and_it_goes_back_when_done(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    cloud = Cloud()
    k, plane, store = keeper(tmp_path, cloud, standby=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(k.run)
        await trio.sleep(3)
        first = sorted(k.records)
        for i, name in enumerate(first):
            k.registered(name, f"a{i}")
        plane.wants = [Demand("huge", calls=1000, user="alice")]
        k.wake()
        await trio.sleep(2)
        assert plane.held == {"a0": "huge", "a1": "huge"}  # both standby nodes; 2 more boot for standby
        plane.wants.append(Demand("small", calls=8, user="bob"))  # no free node: first come would starve it
        k.wake()
        await trio.sleep(2)
        assert sorted(plane.held.values()) == ["huge", "small"]
        (handed,) = [n for n in k.records.values() if n.job == "small"]
        assert handed.state == NodeState.BUSY and handed.name in first
        assert "handed from job huge to job small (fair share between users)" in handed.reason
        assert store.node_rows() and {r["job"] for r in store.node_rows() if r["name"] == handed.name} == {"small"}
        await trio.sleep(5)  # rounds go by: the shares are even, nothing moves back and forth
        assert sorted(plane.held.values()) == ["huge", "small"]
        plane.wants = plane.wants[:1]  # bob's job ended
        k.wake()
        await trio.sleep(2)
        assert plane.held == {"a0": "huge", "a1": "huge"}  # the node it gave back is alice's again
        nursery.cancel_scope.cancel()


def test_the_cluster_link_names_each_jobs_user(tmp_path: Path) -> None:
    plane = ControlPlane(Store(tmp_path / "burla.db"), DaemonConfig(), clock=lambda: 1000.0)
    try:
        for job_id, owner in [("j-alice", "alice"), ("j-admin", "")]:
            plane.scheduler.add_job(m.JobSpec(job_id, "f", "0" * 64, "3.11"), 1000.0, owner=owner)
            plane.scheduler.add_batches(job_id, [m.BatchMeta(0, 0, 5)], final_count=5)
        demands = PlaneCluster(plane).demands()
        assert [(d.job_id, d.user, d.calls) for d in demands] == [("j-alice", "alice", 5), ("j-admin", "", 5)]
    finally:
        plane.store.close()

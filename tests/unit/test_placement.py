"""burla.daemon.placement: what a node holds, and why no node fits a job (as facts)."""

from __future__ import annotations

from burla.daemon.placement import NeedsContainers, NodeState, NoPython, TooLarge, unfit
from burla.schemas import messages as m

GB = 10**9


def node(node_id: str, cpus: int = 4, ram_gb: int = 16, py: str = "3.11", runtime: str = "process") -> NodeState:
    info = m.NodeInfo(node_id, f"host-{node_id}", cpus, ram_gb * GB, py, cpus, runtime=runtime)
    return NodeState(f"a-{node_id}", info, 0.0, ready_workers=cpus)


def spec(py: str = "3.11", func_cpu: float = 1.0, func_ram: float = 1.0, image: str = "") -> m.JobSpec:
    return m.JobSpec("j1", "square", "hash-1", py, func_cpu, func_ram, image=image)


def test_hold_and_release_reserve_a_worker_cpu_and_ram() -> None:
    n = node("n1")
    n.hold(7, "", spec(func_cpu=1.5, func_ram=2.0))
    assert n.leases == {7} and n.pool_leases[m.PROCESS_POOL] == 1
    assert (n.cpu_used, n.ram_used) == (1.5, 2 * GB)
    assert n.pick_pool(spec(func_cpu=2.5)) == m.PROCESS_POOL
    assert n.pick_pool(spec(func_cpu=3.0)) is None  # 1.5 of 4 CPUs held
    n.release(8, "", spec(func_cpu=1.5, func_ram=2.0))  # not held here: nothing changes
    assert n.leases == {7} and n.cpu_used == 1.5
    n.release(7, "", spec(func_cpu=1.5, func_ram=2.0))
    assert n.leases == set() and n.pool_leases[m.PROCESS_POOL] == 0
    assert (n.cpu_used, n.ram_used) == (0.0, 0)


def test_unfit_facts() -> None:
    assert unfit([], spec(func_cpu=1000)) is None  # no node yet: the job waits for one
    nodes = [node("n1", py="3.10"), node("n2", py="3.12"), node("n3", py="3.12")]
    assert unfit(nodes, spec(py="3.11")) == NoPython("3.11", (("3.10", 1), ("3.12", 2)))
    assert unfit(nodes, spec(image="ghcr.io/x/y:1")) == NeedsContainers(build=False, nodes=3)
    nodes = [node("n1", cpus=4, ram_gb=16), node("n2", cpus=16, ram_gb=64), node("n3", cpus=96, py="3.12")]
    assert unfit(nodes, spec(func_cpu=32)) == TooLarge(32, 1.0, 16, 64 * GB)
    assert unfit(nodes, spec(func_cpu=16)) is None


def test_a_prefetched_lease_reserves_nothing_until_the_lease_it_follows_ends() -> None:
    n = node("n1", cpus=2)
    job = spec(func_cpu=1.0, func_ram=2.0)
    n.hold(1, "", job)
    n.hold(2, "", job, after=1)
    assert n.leases == {1, 2} and n.queued == {2: 1} and n.successor == {1: 2}
    assert n.running == 1 and n.pool_leases[m.PROCESS_POOL] == 1
    assert (n.cpu_used, n.ram_used) == (1.0, 2 * GB)
    assert n.job_leases["j1"] == 2  # a prefetched lease of the job still runs here: the handover waits for it
    assert n.release(1, "", job) == 2  # it takes over lease 1's worker, CPU and RAM
    assert n.leases == {2} and n.queued == {} and n.successor == {}
    assert n.running == 1 and n.pool_leases[m.PROCESS_POOL] == 1 and n.cpu_used == 1.0
    assert n.release(2, "", job) is None
    assert (n.running, n.cpu_used, n.ram_used, n.pool_leases[m.PROCESS_POOL]) == (0, 0.0, 0, 0)


def test_a_prefetched_lease_dropped_first_leaves_the_one_before_as_it_was() -> None:
    n = node("n1", cpus=2)
    job = spec()
    n.hold(1, "", job)
    n.hold(2, "", job, after=1)
    n.hold(3, "", job, after=2)  # two deep: 3 follows 2, which follows 1
    assert n.tails(2) == [] and n.tails(3) == [3]
    assert n.release(2, "", job) is None  # cancelled or requeued while it waited
    assert n.queued == {3: 1} and n.successor == {1: 3} and n.cpu_used == 1.0
    assert n.release(1, "", job) == 3
    assert n.queued == {} and n.running == 1 and n.cpu_used == 1.0


def test_a_lease_follows_only_a_lease_held_here_and_not_yet_followed() -> None:
    n = node("n1", cpus=4)
    job = spec()
    n.hold(1, "", job)
    n.hold(2, "", job, after=9)  # what it follows is not here (restored, or ended): it holds a worker
    n.hold(3, "", job, after=1)
    n.hold(4, "", job, after=1)  # lease 1 has a follower already
    assert n.queued == {3: 1} and n.running == 3 and n.cpu_used == 3.0
    assert n.tails(1) == [2, 4]


def test_could_serve_ignores_what_other_calls_reserve() -> None:
    n = node("n1", cpus=2)
    n.hold(1, "", spec(func_cpu=2.0))
    assert n.pick_pool(spec(func_cpu=1.0)) is None
    assert n.could_serve(spec(func_cpu=1.0)) and n.could_serve(spec(func_cpu=2.0))
    assert not n.could_serve(spec(func_cpu=3.0)) and not n.could_serve(spec(py="3.12"))
    assert n.pool_ready("") and n.pool_ready(m.PROCESS_POOL) and not n.pool_ready("other")

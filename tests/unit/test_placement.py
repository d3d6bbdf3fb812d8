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

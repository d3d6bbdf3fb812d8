"""burla.daemon.placement: what a node holds."""

from __future__ import annotations

from burla.daemon.placement import NodeState
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

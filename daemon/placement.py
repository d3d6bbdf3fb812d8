"""Where a call can run: a node's pools, its free CPU and RAM, what it could hold.

A node is plain state the scheduler keeps per agent: the pools the agent
reports (or, on a process node, the one pool of its processes), the leases it
holds, and the CPU and RAM those leases reserve. `unfit` says why no node at
all could run a job, as facts; `status_text` puts them in words.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Collection

from burla.schemas import messages as m

EPSILON = 1e-9
PROCESS_POOL = m.PROCESS_POOL


def ram_bytes(spec: m.JobSpec) -> int:
    """The RAM one call of `spec` reserves."""
    return int(spec.func_ram * 1e9)


@dataclasses.dataclass
class NodeState:
    agent_id: str
    info: m.NodeInfo
    last_seen: float
    ready_workers: int
    leases: set[int] = dataclasses.field(default_factory=set)
    cpu_used: float = 0.0
    ram_used: int = 0
    stats: dict[str, object] = dataclasses.field(default_factory=dict)
    pools: dict[str, m.PoolState] = dataclasses.field(default_factory=dict)  # as the agent reports them
    job_phases: dict[str, str] = dataclasses.field(default_factory=dict)  # what it does for a job (installing)
    pool_leases: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    job_leases: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # job -> leases here
    # A cluster node (the daemon started it) is single-tenant: it runs only the job holding it, if any. It
    # changes hands between leases: a new tenant's leases start once the leases of the job before are done.
    single_tenant: bool = False
    tenant: str | None = None
    # Prefetched leases: each waits on the node for the lease before it in its slot (`Lease.after`), and
    # reserves nothing until that one ends, when it takes over its worker, CPU and RAM (`release`).
    queued: dict[int, int] = dataclasses.field(default_factory=dict)  # lease -> the lease it follows
    successor: dict[int, int] = dataclasses.field(default_factory=dict)  # lease -> the lease that follows it

    @property
    def running(self) -> int:
        """Leases that hold a worker here (the prefetched ones wait for one)."""
        return len(self.leases) - len(self.queued)

    @property
    def containers(self) -> bool:
        """Workers are containers of given images and shapes (not processes sharing the node)."""
        return self.info.runtime != "process"

    def pool_views(self) -> list[m.PoolState]:
        if self.pools or self.containers:  # a container node has only the pools it reports: none at first
            return list(self.pools.values())
        return [
            m.PoolState(PROCESS_POOL, python_version=self.info.python_version, slots=self.info.workers,
                        ready=self.ready_workers, default=True)
        ]  # fmt: skip

    def pool_fits(self, pool: m.PoolState, spec: m.JobSpec, reserved: bool = True) -> bool:
        """Could `pool` run calls of `spec` (free slots aside; with `reserved` False, what other calls
        reserve of a shared pool's CPU and RAM aside too)?"""
        if pool.state != "ready":
            return False
        if pool.job_id:  # made for one job, in its shape
            return pool.job_id == spec.job_id
        if (spec.image or spec.build) and pool.image != spec.image:
            return False
        if not (spec.image or spec.build) and not pool.default:
            return False
        if pool.python_version and pool.python_version != spec.python_version:
            return False
        ram = ram_bytes(spec)
        if pool.cpus <= 0:  # shared by every call on the node: reserve per call
            cpu_used, ram_used = (self.cpu_used, self.ram_used) if reserved else (0.0, 0)
            return cpu_used + spec.func_cpu <= self.info.cpus + EPSILON and ram_used + ram <= self.info.ram_bytes
        return spec.func_cpu <= pool.cpus + EPSILON and (pool.ram_bytes <= 0 or ram <= pool.ram_bytes)

    def pick_pool(self, spec: m.JobSpec) -> str | None:
        """A pool with a free worker for one more call of `spec`, if any."""
        if self.single_tenant and not self.serves(spec.job_id):
            return None
        for pool in self.pool_views():
            if pool.ready - self.pool_leases[pool.key] > 0 and self.pool_fits(pool, spec):
                return pool.key
        return None

    def serves(self, job_id: str) -> bool:
        """Whether a single-tenant node takes a lease of `job_id` now: it holds that job, and no lease of
        another job (the tenant before) still runs there."""
        return self.tenant == job_id and all(j == job_id for j in self.job_leases)

    def fits(self, spec: m.JobSpec) -> bool:
        return self.pick_pool(spec) is not None

    def capacity_for(self, spec: m.JobSpec) -> int:
        """How many calls of `spec` this node could run at once, when idle (after reshaping its pools)."""
        if not self.containers:
            if self.info.python_version != spec.python_version or spec.image or spec.build:
                return 0
            limit = self.info.workers
        else:
            known = {p.python_version for p in self.pools.values() if p.image == spec.image and p.python_version}
            if spec.image and known and spec.python_version not in known:
                return 0
            limit = 1 << 30
        ram = ram_bytes(spec)
        by_cpu = math.floor(self.info.cpus / spec.func_cpu + EPSILON) if spec.func_cpu > 0 else limit
        by_ram = math.floor(self.info.ram_bytes / ram + EPSILON) if ram > 0 else limit
        return max(0, min(limit, by_cpu, by_ram))

    def hold(self, lease_id: int, pool: str, spec: m.JobSpec, after: int = 0) -> None:
        """Reserve a worker of `pool` and one call's CPU and RAM for a lease.

        `after`: a prefetched lease, which runs in the slot of lease `after` once that one ends (a lease of
        the same job, so of the same pool and shape): it reserves nothing until then.
        """
        self.leases.add(lease_id)
        self.job_leases[spec.job_id] += 1
        if after and after in self.leases and after not in self.successor:
            self.queued[lease_id] = after
            self.successor[after] = lease_id
            return
        self.pool_leases[pool or PROCESS_POOL] += 1
        self.cpu_used += spec.func_cpu
        self.ram_used += ram_bytes(spec)

    def release(self, lease_id: int, pool: str, spec: m.JobSpec) -> int | None:
        """Give back what `hold` reserved (nothing if this node does not hold the lease).

        Returns the prefetched lease that took over its reservation, if one followed it: it runs now.
        """
        if lease_id not in self.leases:
            return None
        self.leases.discard(lease_id)
        self.job_leases[spec.job_id] -= 1
        if self.job_leases[spec.job_id] <= 0:
            del self.job_leases[spec.job_id]
        follower = self.successor.pop(lease_id, None)
        before = self.queued.pop(lease_id, None)
        if before is not None:  # it was waiting itself: what followed it follows the lease before it now
            del self.successor[before]
            if follower is not None:
                self.queued[follower] = before
                self.successor[before] = follower
            return None
        if follower is not None:  # it takes over the worker, CPU and RAM this lease held
            del self.queued[follower]
            return follower
        self.pool_leases[pool or PROCESS_POOL] -= 1
        self.cpu_used = max(0.0, self.cpu_used - spec.func_cpu)
        self.ram_used = max(0, self.ram_used - ram_bytes(spec))
        return None

    def tails(self, depth: int) -> list[int]:
        """For each running lease whose slot has fewer than `depth` leases queued after it, the last of them."""
        out = []
        for lease_id in sorted(self.leases):
            if lease_id in self.queued:
                continue
            tail, n = lease_id, 0
            while tail in self.successor:
                tail, n = self.successor[tail], n + 1
            if n < depth:
                out.append(tail)
        return out

    def could_serve(self, spec: m.JobSpec) -> bool:
        """Could a slot of this node take a call of `spec` once it frees (other calls' CPU and RAM aside)?"""
        if self.single_tenant and not self.serves(spec.job_id):
            return False
        return any(self.pool_fits(p, spec, reserved=False) for p in self.pool_views())

    def pool_ready(self, key: str) -> bool:
        return any(p.key == (key or PROCESS_POOL) and p.state == "ready" for p in self.pool_views())


def slots_for(nodes: Collection[NodeState], spec: m.JobSpec) -> int:
    """Worker slots `spec` can use cluster-wide (at least one)."""
    slots = sum(n.capacity_for(spec) for n in nodes)
    if spec.max_parallelism is not None:
        slots = min(slots, spec.max_parallelism)
    return max(1, slots)


# ---- why no node could ever run a job -------------------------------------------


@dataclasses.dataclass(frozen=True)
class NeedsContainers:
    """The job names an image or a dockerfile, and every node runs plain processes."""

    build: bool  # dockerfile= (else image=)
    nodes: int


@dataclasses.dataclass(frozen=True)
class NoPython:
    """No process node runs the client's Python."""

    wanted: str
    have: tuple[tuple[str, int], ...]  # (Python version, how many nodes run it), by version


@dataclasses.dataclass(frozen=True)
class TooLarge:
    """One call asks for more CPU or RAM than the largest node that could run it has."""

    func_cpu: float
    func_ram: float  # GB, as asked
    cpus: int  # of the largest candidate node
    ram_bytes: int


Unfit = NeedsContainers | NoPython | TooLarge


def unfit(nodes: Collection[NodeState], spec: m.JobSpec) -> Unfit | None:
    """Why none of `nodes` could ever run `spec`, or None.

    With no node registered at all the job waits for one instead.
    """
    if not nodes:
        return None
    if any(n.capacity_for(spec) > 0 for n in nodes):
        return None
    if (spec.image or spec.build) and not any(n.containers for n in nodes):
        return NeedsContainers(build=bool(spec.build), nodes=len(nodes))
    versions = collections.Counter(n.info.python_version for n in nodes if not n.containers)
    if versions and spec.python_version not in versions:
        return NoPython(spec.python_version, tuple(sorted(versions.items())))
    same = [n for n in nodes if n.containers or n.info.python_version == spec.python_version]
    best = max(same or nodes, key=lambda n: (n.info.cpus, n.info.ram_bytes))
    return TooLarge(spec.func_cpu, spec.func_ram, best.info.cpus, best.info.ram_bytes)

"""Which pools of warm workers a node should have: plain logic, no I/O.

A pool is a number of workers of one image and one shape (CPUs and RAM per
worker). A process-runtime node has one pool of processes sharing the node.
A container node keeps its standby pools (per image, `per_cpu` containers per
CPU, one CPU's share each), and makes a pool for a job that no standby
container fits when the daemon wants one.

Pools stay warm after their job, as the standby containers do while a job
runs: they are parked (running, taking no leases) within the node's room for
containers, and the next job of the same image (or the same dockerfile= build)
and shape takes the parked pool as it is. A job's pool is keyed by image,
build, shape and Python, never by job, so that second job asks for the same
key. When room is short, the job that runs gets it first; then standby's
pools; then parked pools of recent jobs, most recently used first: the least
recently used are the ones stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from burla.schemas import messages as m

from .pool import DEFAULT_POOL


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    key: str
    image: str = ""  # "" for process workers
    build: str = ""  # digest of a build context to make `image` from (dockerfile=)
    cpus: float = 0.0  # per worker; 0: workers share the node
    ram_bytes: int = 0  # per worker; 0: shared
    count: int = 0
    job_id: str = ""  # "" for standby pools
    default: bool = False  # takes jobs that name no image
    python_version: str = ""  # the Python minor version the image must have ("": any)
    parked: bool = False  # kept warm for a later job, taking no leases now


def job_pool_key(want: m.PoolWant) -> str:
    """A job's pool, by what its containers are: any later job asking for the same reuses it."""
    return f"job-{_key(want.image, want.build, want.cpus, want.ram_bytes, want.python_version)}"


def parked(spec: PoolSpec) -> PoolSpec:
    """`spec` kept warm after its job: for no job, taking no leases."""
    return dataclasses.replace(spec, job_id="", parked=True)


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def plan(
    containers: bool,
    cpus: int,
    ram_bytes: int,
    workers: int,
    standby: Sequence[m.StandbyImage],
    wants: Sequence[m.PoolWant],
    recent: Sequence[PoolSpec] = (),
    room: int | None = None,
) -> list[PoolSpec]:
    """The pools a node should have now.

    `recent`: pools of jobs that ran here, most recently used first. `room`: how many containers the node
    keeps running in all (None: no limit). The pools wanted for jobs are always planned; standby's are
    parked while a job's pool is wanted, and like `recent` pools they are left out (stopped) when they do
    not fit in what room the pools before them leave.
    """
    if not containers:
        return [PoolSpec(DEFAULT_POOL, count=workers, default=True)]
    earlier = {spec.key: spec for spec in recent}
    active = []
    for w in wants:
        key = job_pool_key(w)
        count = max(w.count, earlier[key].count if key in earlier else 0)  # a parked pool is taken whole
        active.append(PoolSpec(key, w.image, w.build, w.cpus, w.ram_bytes, count, w.job_id,
                               python_version=w.python_version))  # fmt: skip
    keep = []
    for image in standby:
        per_container, ram_per_container, count = image.shape(cpus, ram_bytes)
        keep.append(
            PoolSpec(
                key=f"standby-{_key(image.image, image.per_cpu)}",
                image=image.image,
                cpus=per_container,
                ram_bytes=ram_per_container,
                count=count,
                default=image.image == m.default_image(standby),
                python_version=image.python_version,
                parked=bool(active),
            )
        )
    planned = {spec.key for spec in active} | {spec.key for spec in keep}
    keep.extend(parked(spec) for spec in recent if spec.key not in planned)
    if not active:  # standby's pools take leases, and stay whatever the room
        pools, keep = keep[: len(standby)], keep[len(standby) :]
    else:
        pools = active
    left = None if room is None else room - sum(spec.count for spec in pools)
    for spec in keep:
        if left is None or spec.count <= left:
            pools.append(spec)
            left = None if left is None else left - spec.count
    return pools

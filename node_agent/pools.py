"""Which pools of warm workers a node should have: plain logic, no I/O.

A pool is a number of workers of one image and one shape (CPUs and RAM per
worker). A process-runtime node has one pool of processes sharing the node.
A container node keeps its standby pools (per image, `per_cpu` containers per
CPU, one CPU's share each) unless the daemon wants a pool for a job that no
standby container fits; then that pool is all it wants until the job ends.
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


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def plan(
    containers: bool,
    cpus: int,
    ram_bytes: int,
    workers: int,
    standby: Sequence[m.StandbyImage],
    wants: Sequence[m.PoolWant],
) -> list[PoolSpec]:
    """The pools a node should have now."""
    if not containers:
        return [PoolSpec(DEFAULT_POOL, count=workers, default=True)]
    if wants:
        return [
            PoolSpec(
                key=f"job-{_key(w.job_id, w.image, w.build, w.cpus, w.ram_bytes)}",
                image=w.image,
                build=w.build,
                cpus=w.cpus,
                ram_bytes=w.ram_bytes,
                count=w.count,
                job_id=w.job_id,
                python_version=w.python_version,
            )
            for w in wants
        ]
    pools = []
    for image in standby:
        per_container, ram_per_container, count = image.shape(cpus, ram_bytes)
        pools.append(
            PoolSpec(
                key=f"standby-{_key(image.image, image.per_cpu)}",
                image=image.image,
                cpus=per_container,
                ram_bytes=ram_per_container,
                count=count,
                default=image.image == m.default_image(standby),
                python_version=image.python_version,
            )
        )
    return pools

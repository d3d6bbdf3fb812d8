"""Pool reconciliation: from the pools the node should have and those it runs, the steps between them.

`pools.plan` says which pools a node should have (from the daemon's standby spec and wants);
`converge` compares them with the pools being prepared or running and their worker slots, and says
what to do: retire the slots of pools no longer wanted, prepare new pools, add workers to ready pools
that lack them, forget pools that are gone. A parked pool (kept warm for a later job) is kept as it is:
never prepared or filled, so a job's containers never wait on containers no job uses.
`pool_state` is how a pool is reported. No I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from burla.schemas import messages as m

from .pool import Slot
from .pools import PoolSpec

PREPARING, READY, FAILED, DRAINING, PARKED = "preparing", "ready", "failed", "draining", "parked"


@dataclasses.dataclass
class PoolRun:
    """A pool's progress on this node."""

    spec: PoolSpec
    state: str = PREPARING  # preparing, ready, failed
    phase: str = ""
    python: str = ""
    error: str = ""

    @classmethod
    def start(cls, spec: PoolSpec) -> PoolRun:
        return cls(spec, phase=f"preparing image {spec.image}" if spec.image else "")


@dataclasses.dataclass(frozen=True)
class Steps:
    """What to do to converge on the desired pools."""

    retire: list[int]  # slots of pools no longer wanted, not yet retired
    prepare: list[str]  # wanted pools not yet started: prepare their images
    fill: list[tuple[str, int]]  # (pool, how many workers to add) of ready pools short of workers
    forget: list[str]  # pools no longer wanted whose workers are all gone


def converge(desired: Mapping[str, PoolSpec], runs: Mapping[str, PoolRun], slots: Iterable[Slot]) -> Steps:
    slots = list(slots)
    retire = [s.index for s in slots if s.pool not in desired and not s.retired]
    prepare = [key for key, spec in desired.items() if key not in runs and not spec.parked]
    fill = []
    for key, spec in desired.items():
        run = runs.get(key)
        if run is not None and run.state == READY and not spec.parked:
            have = sum(1 for s in slots if s.pool == key and not s.retired)
            if spec.count > have:
                fill.append((key, spec.count - have))
    forget = [key for key in runs if key not in desired and not any(s.pool == key for s in slots)]
    return Steps(retire, prepare, fill, forget)


def pool_state(
    run: PoolRun, wanted: bool, ready: int, containers: Sequence[tuple[str | None, str]] = ()
) -> m.PoolState:
    """How the daemon hears of a pool: `ready` workers, and per worker its container id and slot state.

    A parked pool is reported as such, for no job and with no ready worker: the scheduler gives it no
    lease until the agent is asked for it again."""
    spec = run.spec
    state = DRAINING if not wanted else PARKED if spec.parked and run.state == READY else run.state
    return m.PoolState(
        key=spec.key,
        image=spec.image,
        python_version=run.python or spec.python_version,
        cpus=spec.cpus,
        ram_bytes=spec.ram_bytes,
        slots=spec.count,
        ready=ready if state == READY else 0,
        state=state,
        phase=run.phase,
        job_id=spec.job_id,
        default=spec.default,
        containers=tuple([container, slot_state] for container, slot_state in containers),
    )

"""Which running calls are past their timeout: the agent's clock of calls, as plain state. No I/O.

A lease of a job with `timeout=` names its limit (`Lease.timeout`). While it runs, the supervisor
reads each of its worker's progress files (the index of the input being called, `proto.IDLE`
between calls) every `poll_interval` and tells `Deadlines` what it saw; a call's clock starts when
its index is first seen, so the agent never kills a call early, and late by at most two intervals.
The deadline lives on the node, not in the client: it holds while the client is away.
"""

from __future__ import annotations

import dataclasses

from burla.schemas import worker as proto

MAX_POLL = 0.1  # seconds between two looks at a running call's progress
MIN_POLL = 0.005


def poll_interval(timeout: float) -> float:
    """How often calls of this limit are looked at: a tenth of it, between `MIN_POLL` and `MAX_POLL`."""
    return max(MIN_POLL, min(MAX_POLL, timeout / 10))


@dataclasses.dataclass
class Clock:
    lease_id: int
    index: int  # the input seen running (proto.IDLE: none)
    since: float  # when it was first seen


@dataclasses.dataclass(frozen=True)
class Overdue:
    slot: int
    index: int
    limit: float
    ran: float


class Deadlines:
    def __init__(self) -> None:
        self.clocks: dict[int, Clock] = {}  # worker slot -> its call's clock

    def observe(self, slot: int, lease_id: int, lo: int, hi: int, index: int, now: float) -> None:
        """Slot `slot` runs lease `lease_id` ([lo, hi)); its progress file says `index` now."""
        if not lo <= index < hi:
            index = proto.IDLE  # loading its inputs, pickling its results, or a stale value: no call runs
        clock = self.clocks.get(slot)
        if clock is None or clock.lease_id != lease_id or clock.index != index:
            self.clocks[slot] = Clock(lease_id, index, now)

    def overdue(self, limits: dict[int, float], now: float) -> list[Overdue]:
        """The calls past their limit, of the slots in `limits` (slot -> its lease's timeout); the clocks of
        slots not in it (their lease ended) are forgotten."""
        for slot in [s for s in self.clocks if s not in limits]:
            del self.clocks[slot]
        out = []
        for slot, clock in self.clocks.items():
            if clock.index != proto.IDLE and now - clock.since > limits[slot]:
                out.append(Overdue(slot, clock.index, limits[slot], now - clock.since))
        return out

    def forget(self, slot: int) -> None:
        self.clocks.pop(slot, None)

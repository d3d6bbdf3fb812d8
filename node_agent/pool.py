"""Which worker runs which lease: the agent's worker pool as plain state.

The agent tells the pool what happens (a worker became ready, a lease
arrived, a worker finished or died, a job was cancelled) and the pool answers
what to do (start this lease on that worker, kill these workers). No I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from burla.schemas import messages as m


class SlotState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"  # killed on purpose (cancel, memory); its lease is already settled


@dataclasses.dataclass
class Slot:
    index: int
    state: SlotState = SlotState.STARTING
    lease: m.Lease | None = None
    lease_started: float = 0.0
    memory_kill: tuple[int, int] | None = None  # (rss, limit) when we killed it for memory
    deaths: int = 0  # consecutive deaths before becoming ready


class WorkerPool:
    def __init__(self, n_slots: int) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self.queue: collections.deque[m.Lease] = collections.deque()

    # ---- views -----------------------------------------------------------------

    def ready(self) -> int:
        """Workers that can take a lease now or when their current one ends."""
        return sum(s.state in (SlotState.IDLE, SlotState.BUSY) for s in self.slots)

    def held(self) -> set[int]:
        """Leases this agent holds: queued or running."""
        return {lease.lease_id for lease in self.queue} | {s.lease.lease_id for s in self.slots if s.lease}

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.state == SlotState.BUSY]

    def statistics(self) -> dict[str, int]:
        counts = collections.Counter(s.state.value for s in self.slots)
        return {"workers": len(self.slots), "queued_leases": len(self.queue), **counts}

    # ---- events ----------------------------------------------------------------

    def worker_ready(self, index: int) -> list[tuple[Slot, m.Lease]]:
        slot = self.slots[index]
        slot.state = SlotState.IDLE
        slot.lease = None
        slot.memory_kill = None
        slot.deaths = 0
        return self._fill()

    def offer(self, leases: list[m.Lease]) -> list[tuple[Slot, m.Lease]]:
        """New leases: start what fits on idle workers, queue the rest."""
        self.queue.extend(leases)
        return self._fill()

    def finished(self, index: int) -> list[tuple[Slot, m.Lease]]:
        """The worker in `index` answered its lease."""
        slot = self.slots[index]
        if slot.state == SlotState.BUSY:
            slot.state = SlotState.IDLE
        slot.lease = None
        return self._fill()

    def died(self, index: int) -> tuple[m.Lease | None, tuple[int, int] | None]:
        """The worker in `index` exited. Returns the lease it ran, if that lease is unsettled."""
        slot = self.slots[index]
        lease = slot.lease if slot.state == SlotState.BUSY else None
        memory = slot.memory_kill
        slot.state = SlotState.STARTING
        slot.lease = None
        slot.memory_kill = None
        slot.deaths += 1
        return lease, memory

    def kill_for_memory(self, index: int, rss: int, limit: int) -> None:
        slot = self.slots[index]
        if slot.state == SlotState.BUSY:
            slot.memory_kill = (rss, limit)

    def cancel_job(self, job_id: str) -> list[Slot]:
        """Drop a job's queued leases; returns the workers running it, to kill."""
        self.queue = collections.deque(lease for lease in self.queue if lease.job_id != job_id)
        victims = [s for s in self.slots if s.state == SlotState.BUSY and s.lease and s.lease.job_id == job_id]
        for slot in victims:
            slot.state = SlotState.STOPPING
        return victims

    def _fill(self) -> list[tuple[Slot, m.Lease]]:
        started = []
        for slot in self.slots:
            if not self.queue:
                break
            if slot.state == SlotState.IDLE:
                lease = self.queue.popleft()
                slot.state = SlotState.BUSY
                slot.lease = lease
                started.append((slot, lease))
        return started

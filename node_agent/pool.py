"""Which worker runs which lease: the agent's worker pool as plain state.

The agent tells the pool what happens (a worker became ready, a lease
arrived, a worker finished or died, a job was cancelled, a worker is no
longer wanted) and the pool answers what to do (start this lease on that
worker, kill these workers). No I/O.

Each worker slot belongs to a pool (`Slot.pool`): all process workers are
in one pool; container workers are grouped by image and shape. A lease names
its pool and runs only on a worker of it (a lease naming none runs anywhere).

A worker runs one environment (`Slot.env`: the import path it was started
with). A lease goes to an idle worker of its environment if there is one;
else to a fresh worker of none (started with no extra path, and has run no
lease), which adopts the lease's: the path is put first before the run, the
same state as a worker started with it; otherwise an idle worker is switched:
restarted with the lease's environment, the lease waiting on it. A worker
never carries one job's packages into another's.

A prefetched lease names the lease it follows in its slot (`Lease.after`): while that one is held here
(running or queued), it waits behind it, and it joins the queue the moment that one ends, so the worker
goes straight on to it. The daemon counted it as taking that lease's worker, CPU and RAM only then.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools

from burla.schemas import messages as m

DEFAULT_POOL = m.PROCESS_POOL


class SlotState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"  # killed on purpose (cancel, memory, retired); its lease is already settled
    SWITCHING = "switching"  # being restarted with another environment for the lease it holds


@dataclasses.dataclass
class Slot:
    index: int
    pool: str = DEFAULT_POOL
    state: SlotState = SlotState.STARTING
    lease: m.Lease | None = None
    lease_started: float = 0.0
    memory_kill: tuple[int, int] | None = None  # (rss, limit) when we killed it for memory
    timed_out: tuple[int, float, float] | None = None  # (input, limit, seconds run) when we killed it for its timeout
    deaths: int = 0  # consecutive deaths before becoming ready
    retired: bool = False  # its pool is no longer wanted: stop it once idle
    env: str = ""  # the environment (import path) its worker runs with
    fresh: bool = False  # its worker has run no lease yet: with env "", it can adopt a lease's environment


class WorkerPool:
    def __init__(self, n_slots: int = 0, pool: str = DEFAULT_POOL) -> None:
        self._next = itertools.count()
        self.slots: dict[int, Slot] = {}
        self.queue: collections.deque[m.Lease] = collections.deque()
        self.following: dict[int, list[m.Lease]] = {}  # lease id -> prefetched leases that start when it ends
        self.followed = 0  # prefetched leases that waited here for the lease before them, and went on after it
        for _ in range(n_slots):
            self.add_slot(pool)

    # ---- views -----------------------------------------------------------------

    def ready(self, pool: str | None = None) -> int:
        """Workers that can take a lease now or when their current one ends."""
        return sum(
            s.state in (SlotState.IDLE, SlotState.BUSY, SlotState.SWITCHING)
            and not s.retired
            and (pool is None or s.pool == pool)
            for s in self.slots.values()
        )

    def held(self) -> set[int]:
        """Leases this agent holds: queued (prefetched ones too) or running."""
        following = {lease.lease_id for leases in self.following.values() for lease in leases}
        return (
            {lease.lease_id for lease in self.queue} | {s.lease.lease_id for s in self.slots.values() if s.lease}
        ) | following

    def busy(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state == SlotState.BUSY]

    def in_pool(self, pool: str) -> list[Slot]:
        return [s for s in self.slots.values() if s.pool == pool and not s.retired]

    def statistics(self) -> dict[str, int]:
        counts = collections.Counter(s.state.value for s in self.slots.values())
        queued = len(self.queue) + sum(len(leases) for leases in self.following.values())
        return {"workers": len(self.slots), "queued_leases": queued, **counts}

    # ---- slots come and go -------------------------------------------------------

    def add_slot(self, pool: str = DEFAULT_POOL, env: str = "") -> Slot:
        """A new worker slot of `pool`, its worker to start with `env` (the one its pool last ran, say)."""
        slot = Slot(next(self._next), pool, env=env)
        self.slots[slot.index] = slot
        return slot

    def retire(self, index: int) -> bool:
        """Its pool is no longer wanted. True if the worker is idle and can be stopped now."""
        slot = self.slots[index]
        slot.retired = True
        if slot.state in (SlotState.IDLE, SlotState.STARTING):
            slot.state = SlotState.STOPPING
            return True
        return False

    def remove(self, index: int) -> None:
        self.slots.pop(index, None)

    # ---- events ----------------------------------------------------------------

    def worker_ready(self, index: int) -> list[tuple[Slot, m.Lease]]:
        slot = self.slots[index]
        slot.memory_kill = None
        slot.timed_out = None
        slot.deaths = 0
        slot.fresh = True
        if slot.lease is not None and not slot.retired:  # restarted for the lease it holds: run it now
            slot.state = SlotState.BUSY
            slot.fresh = False
            return [(slot, slot.lease), *self._fill()]
        slot.state = SlotState.STOPPING if slot.retired else SlotState.IDLE
        slot.lease = None
        return self._fill()

    def offer(self, leases: list[m.Lease]) -> list[tuple[Slot, m.Lease]]:
        """New leases: start what fits on idle workers, queue the rest (a prefetched one behind its lease)."""
        for lease in leases:
            if lease.after and lease.after in self.held():
                self.following.setdefault(lease.after, []).append(lease)
            else:  # what it follows has ended already (or never came): it runs like any other
                self.queue.append(lease)
        return self._fill()

    def start_queued(self) -> list[tuple[Slot, m.Lease]]:
        """Give queued leases to idle workers (after a death freed what waited on its lease)."""
        return self._fill()

    def _ended(self, lease: m.Lease | None) -> None:
        """`lease` is settled here: the leases that followed it go first in the queue."""
        if lease is not None and lease.lease_id in self.following:
            following = self.following.pop(lease.lease_id)
            self.queue.extendleft(reversed(following))
            self.followed += len(following)

    def finished(self, index: int) -> list[tuple[Slot, m.Lease]]:
        """The worker in `index` answered its lease."""
        slot = self.slots[index]
        if slot.state == SlotState.BUSY:
            # Killed for its timeout or memory just as it answered: the answer stands, and the kill is on its
            # way, so the worker takes no next lease (a death would be blamed on that one).
            doomed = slot.timed_out is not None or slot.memory_kill is not None
            slot.state = SlotState.STOPPING if slot.retired or doomed else SlotState.IDLE
        slot.timed_out = None
        slot.memory_kill = None
        self._ended(slot.lease)
        slot.lease = None
        return self._fill()

    def died(self, index: int) -> tuple[m.Lease | None, tuple[int, int] | None]:
        """The worker in `index` exited. Returns the lease it ran, if that lease is unsettled."""
        slot = self.slots[index]
        if slot.state == SlotState.SWITCHING:  # stopped on purpose: its lease waits for the new worker
            slot.state = SlotState.STARTING
            return None, None
        lease = slot.lease if slot.state == SlotState.BUSY else None
        memory = slot.memory_kill
        slot.state = SlotState.STOPPING if slot.retired else SlotState.STARTING
        self._ended(slot.lease)  # what followed it waits for a worker now (`start_queued`)
        slot.lease = None
        slot.memory_kill = None
        slot.timed_out = None
        slot.deaths += 1
        return lease, memory

    def kill_for_memory(self, index: int, rss: int, limit: int) -> None:
        slot = self.slots[index]
        if slot.state == SlotState.BUSY:
            slot.memory_kill = (rss, limit)

    def kill_for_timeout(self, index: int, at: int, limit: float, ran: float) -> None:
        slot = self.slots[index]
        if slot.state == SlotState.BUSY:
            slot.timed_out = (at, limit, ran)

    def cancel_job(self, job_id: str) -> list[Slot]:
        """Drop a job's queued leases; returns the workers running it, to kill."""
        self.queue = collections.deque(lease for lease in self.queue if lease.job_id != job_id)
        for before, leases in list(self.following.items()):
            self.following[before] = [lease for lease in leases if lease.job_id != job_id]
            if not self.following[before]:
                del self.following[before]
        victims = [s for s in self.slots.values() if s.state == SlotState.BUSY and s.lease and s.lease.job_id == job_id]
        for slot in victims:
            slot.state = SlotState.STOPPING
        for slot in self.slots.values():
            if slot.lease is not None and slot.lease.job_id == job_id and slot.state != SlotState.BUSY:
                slot.lease = None  # a switch for a cancelled job: the new worker just becomes idle
        held = self.held()
        for before in [b for b in self.following if b not in held]:
            self.queue.extend(self.following.pop(before))  # what they followed was dropped: they wait no more
        return victims

    def _fill(self) -> list[tuple[Slot, m.Lease]]:
        """Give queued leases to idle workers: of their environment first, else a fresh one adopts it, else
        switch one.

        Returned slots in state SWITCHING must have their worker stopped; the others run the lease now (a
        slot whose `env` is not yet its worker's puts that environment's path first: see `Run.paths`).
        """
        started = []
        waiting: collections.deque[m.Lease] = collections.deque()
        idle = [s for s in self.slots.values() if s.state == SlotState.IDLE and not s.retired]
        while self.queue:
            lease = self.queue.popleft()
            fitting = [s for s in idle if not lease.pool or s.pool == lease.pool]
            slot = next((s for s in fitting if s.env == lease.env), None)
            if slot is None:
                slot = next((s for s in fitting if s.fresh and not s.env), None)
                if slot is not None:
                    slot.env = lease.env  # adopted: no restart
            if slot is None and fitting:
                slot = fitting[0]
                slot.state = SlotState.SWITCHING
                slot.env = lease.env
            if slot is None:
                waiting.append(lease)
                continue
            idle.remove(slot)
            if slot.state != SlotState.SWITCHING:
                slot.state = SlotState.BUSY
                slot.fresh = False
            slot.lease = lease
            started.append((slot, lease))
        self.queue = waiting
        return started

"""Each job's event feed: who follows the job, and the events handed to them as they are recorded.

The control plane records every event in SQLite (the record) and, once its
transaction commits, hands the event with its payload to the job's followers
here (the live push): a follower that keeps up never reads the database. A
follower that has just subscribed (or resubscribed with the last sequence it
saw), or that fell more than a websocket frame's worth behind, catches up from
SQLite and goes back to the live push from there.

A payload over `SPILL_BYTES` is never pushed: its event names the payload's
file (`ref`, `size`), and the client fetches it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import trio

from burla.schemas import messages as m

from .errors import NotFound
from .store import Store

SPILL_BYTES = 8 * 1024**2  # an event payload larger than this is fetched by its reader, not pushed
FRAME_BYTES = 8 * 1024**2  # of payloads handed to a follower at once; past it, the follower reads SQLite

Events = list[tuple[m.Event, bytes | None]]


@dataclasses.dataclass
class JobFeed:
    """A running job's output, counted against daemon.max_log_bytes_per_job."""

    log_bytes: int = 0
    dropped_bytes: int = 0
    dropped_lines: int = 0


@dataclasses.dataclass(eq=False)
class Follower:
    """One reader of a job's events (a websocket subscription), and what waits for it."""

    job_id: str
    after: int  # the last sequence it has
    behind: bool = True  # its next events come from SQLite (it starts by catching up)
    pending: Events = dataclasses.field(default_factory=list)
    pending_bytes: int = 0
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)

    def push(self, event: m.Event, payload: bytes | None) -> None:
        if not self.behind:
            size = len(payload) if payload is not None else 0
            if self.pending and self.pending_bytes + size > FRAME_BYTES:  # a slow reader: SQLite keeps them
                self.behind, self.pending, self.pending_bytes = True, [], 0
            else:
                self.pending.append((event, payload))
                self.pending_bytes += size
        self.wake.set()


class Feeds:
    """The feeds of every job the daemon keeps: followers, their live push, and who stopped following."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.jobs: dict[str, JobFeed] = {}  # running jobs (and finished ones not yet forgotten)
        self._following: dict[str, set[Follower]] = {}
        self.followers: collections.Counter[str] = collections.Counter()  # job -> events websockets following it
        self.unfollowed_since: dict[str, float] = {}  # job -> since when nobody follows it

    # ---- jobs -----------------------------------------------------------------------

    def open(self, job_id: str, now: float, log_bytes: int = 0) -> None:
        self.jobs[job_id] = JobFeed(log_bytes=log_bytes)
        if not self.followers[job_id]:  # a client usually subscribes before its job exists
            self.unfollowed_since.setdefault(job_id, now)

    def close(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    # ---- who follows ------------------------------------------------------------------

    def follow_started(self, job_id: str) -> None:
        self.followers[job_id] += 1
        self.unfollowed_since.pop(job_id, None)

    def follow_ended(self, job_id: str, now: float) -> None:
        self.followers[job_id] -= 1
        if self.followers[job_id] <= 0:
            del self.followers[job_id]
            self.unfollowed_since[job_id] = now

    def unfollowed(self, now: float, grace: float) -> list[str]:
        """Jobs nobody has followed for over `grace` seconds."""
        return [j for j, since in self.unfollowed_since.items() if now - since > grace and not self.followers[j]]

    def stop_watching(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.unfollowed_since.pop(job_id, None)

    # ---- events -----------------------------------------------------------------------

    def publish(self, job_id: str, event: m.Event, payload: bytes | memoryview | None) -> None:
        """Hand a recorded (committed) event to the job's followers."""
        followers = self._following.get(job_id)
        if followers:
            data = bytes(payload) if payload is not None else None  # the request it came in may go
            for follower in followers:
                follower.push(event, data)

    def notify(self, job_id: str) -> None:
        """The job changed without a new event (its status did): its followers look again."""
        for follower in self._following.get(job_id, ()):
            follower.wake.set()

    @contextlib.contextmanager
    def follow(self, job_id: str, after: int) -> Iterator[Follower]:
        """A follower of `job_id` from sequence `after`, for as long as the block runs."""
        follower = Follower(job_id, after)
        self._following.setdefault(job_id, set()).add(follower)
        try:
            yield follower
        finally:
            followers = self._following[job_id]
            followers.discard(follower)
            if not followers:
                del self._following[job_id]

    async def wait(self, follower: Follower, timeout: float) -> Events:
        """The follower's next events; waits up to `timeout` for the first one."""
        events = self._take(follower)
        if events:
            return events
        if follower.job_id not in self.jobs:  # finished before a restart, or forgotten: nothing more comes
            if not self.store.job_exists(follower.job_id):
                raise NotFound(f"no job {follower.job_id}")
            return []
        if not follower.wake.is_set():
            with trio.move_on_after(timeout):
                await follower.wake.wait()
        return self._take(follower)

    def _take(self, follower: Follower) -> Events:
        if follower.wake.is_set():
            follower.wake = trio.Event()
        if follower.behind:  # SQLite has everything it lacks
            follower.pending, follower.pending_bytes = [], 0
            events = self.store.events_after(follower.job_id, follower.after, FRAME_BYTES, spill=SPILL_BYTES)
            follower.behind = sum(len(p) for _, p in events if p is not None) >= FRAME_BYTES  # more to read
        else:
            events, follower.pending, follower.pending_bytes = follower.pending, [], 0
            if events and events[0][0].seq <= follower.after:  # it said it has later ones already
                events = [(e, p) for e, p in events if e.seq > follower.after]
        if events:
            follower.after = events[-1][0].seq
        return events

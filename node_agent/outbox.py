"""Results and printed lines waiting to go from an agent to the daemon."""

from __future__ import annotations

import dataclasses
import pickle

import trio

from burla.schemas import envelope
from burla.schemas import messages as m

OUTBOX_BYTES = 64 * 1024**2  # printed output waiting to be sent; past it, workers wait
NO_RESULTS = pickle.dumps([])  # the results blob of a lease that failed before any of its calls returned


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A lease's outcome with its blobs: a `messages.LeaseResult` once a report gives the blobs their places."""

    lease_id: int
    job_id: str
    lo: int
    n_ok: int
    elapsed: float
    error: m.CallError | None
    results: envelope.Blob  # the pickled list of the n_ok results
    exception: envelope.Blob | None = None  # the exception tree of `error`, if it has one

    @classmethod
    def failed(cls, lease_id: int, job_id: str, lo: int, error: m.CallError) -> Outcome:
        """A lease that ends in `error` before any of its calls returned."""
        return cls(lease_id, job_id, lo, 0, 0.0, error, NO_RESULTS)

    def result(self, blobs: envelope.Blobs) -> m.LeaseResult:
        """The report's entry for it, its blobs added to `blobs`."""
        results_blob = blobs.add(self.results)
        error = self.error
        if error is not None and (self.exception is not None or error.exc_blob is not None):
            exc_blob = blobs.add(self.exception) if self.exception is not None else None  # never the worker's index
            error = dataclasses.replace(error, exc_blob=exc_blob)
        return m.LeaseResult(self.lease_id, self.job_id, self.lo, self.n_ok, self.elapsed, results_blob, error)


@dataclasses.dataclass(frozen=True)
class Lines:
    """Printed lines of one job, with their blob (a pickled list of (index, stream, text))."""

    job_id: str
    lines: int
    nbytes: int
    blob: envelope.Blob

    def chunk(self, blobs: envelope.Blobs) -> m.LogChunk:
        return m.LogChunk(self.job_id, self.lines, self.nbytes, blobs.add(self.blob))


@dataclasses.dataclass(frozen=True)
class Taken:
    """What one `Outbox.take` took: the report's pieces, and what `put_back` needs to undo it."""

    results: tuple[m.LeaseResult, ...]
    logs: tuple[m.LogChunk, ...]
    blobs: envelope.Blobs
    outcomes: list[Outcome]
    lines: list[Lines]
    log_bytes: int


class Outbox:
    """Results and log lines waiting to go to the daemon."""

    def __init__(self, max_log_bytes: int = OUTBOX_BYTES) -> None:
        self.results: list[Outcome] = []
        self.logs: list[Lines] = []
        self.log_bytes = 0
        self.max_log_bytes = max_log_bytes
        self.dirty = False  # the agent's state changed: worth a report even if empty
        self._wake = trio.Event()
        self._space = trio.Event()

    def add_result(self, outcome: Outcome) -> None:
        self.results.append(outcome)
        self._wake.set()

    async def add_logs(self, lines: Lines) -> None:
        while self.log_bytes > self.max_log_bytes:  # backpressure: the worker waits, nothing is dropped
            await self._space.wait()
        self.logs.append(lines)
        self.log_bytes += len(lines.blob)
        self._wake.set()

    def mark_dirty(self) -> None:
        self.dirty = True
        self._wake.set()

    async def wait(self) -> None:
        while not (self.results or self.logs or self.dirty):
            self._wake = trio.Event()
            await self._wake.wait()

    def lease_ids(self) -> set[int]:
        return {outcome.lease_id for outcome in self.results}

    def take(self) -> Taken:
        """Everything queued, as report fields and their blobs; `put_back` undoes it."""
        outcomes, lines, log_bytes = self.results, self.logs, self.log_bytes
        self.results, self.logs, self.log_bytes, self.dirty = [], [], 0, False
        blobs = envelope.Blobs()
        results = tuple(outcome.result(blobs) for outcome in outcomes)
        logs = tuple(chunk.chunk(blobs) for chunk in lines)
        self._space.set()
        self._space = trio.Event()
        return Taken(results, logs, blobs, outcomes, lines, log_bytes)

    def put_back(self, taken: Taken) -> None:
        self.results[:0] = taken.outcomes
        self.logs[:0] = taken.lines
        self.log_bytes += taken.log_bytes
        self._wake.set()

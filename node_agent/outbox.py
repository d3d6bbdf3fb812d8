"""Results and printed lines waiting to go from an agent to the daemon."""

from __future__ import annotations

from typing import Any

import trio

OUTBOX_BYTES = 64 * 1024**2  # printed output waiting to be sent; past it, workers wait


class Outbox:
    """Results and log lines waiting to go to the daemon."""

    def __init__(self, max_log_bytes: int = OUTBOX_BYTES) -> None:
        self.results: list[tuple[dict[str, Any], list[Any]]] = []
        self.logs: list[tuple[dict[str, Any], Any]] = []
        self.log_bytes = 0
        self.max_log_bytes = max_log_bytes
        self.dirty = False  # the agent's state changed: worth a report even if empty
        self._wake = trio.Event()
        self._space = trio.Event()

    def add_result(self, result: dict[str, Any], blobs: list[Any]) -> None:
        self.results.append((result, blobs))
        self._wake.set()

    async def add_logs(self, chunk: dict[str, Any], blob: Any) -> None:
        while self.log_bytes > self.max_log_bytes:  # backpressure: the worker waits, nothing is dropped
            await self._space.wait()
        self.logs.append((chunk, blob))
        self.log_bytes += len(blob)
        self._wake.set()

    def mark_dirty(self) -> None:
        self.dirty = True
        self._wake.set()

    async def wait(self) -> None:
        while not (self.results or self.logs or self.dirty):
            self._wake = trio.Event()
            await self._wake.wait()

    def lease_ids(self) -> set[int]:
        return {result["lease_id"] for result, _ in self.results}

    def take(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Any], Any]:
        """Everything queued, as report fields and blobs; `put_back` undoes it."""
        taken = (self.results, self.logs, self.log_bytes)
        self.results, self.logs, self.log_bytes, self.dirty = [], [], 0, False
        blobs: list[Any] = []
        results = []
        for result, rblobs in taken[0]:
            wire = dict(result)
            base = len(blobs)
            blobs.extend(rblobs)
            wire["results_blob"] = base
            if wire.get("error") and wire["error"].get("exc_blob") is not None:
                wire["error"] = dict(wire["error"], exc_blob=base + 1)
            results.append(wire)
        logs = []
        for chunk, blob in taken[1]:
            logs.append(dict(chunk, blob=len(blobs)))
            blobs.append(blob)
        self._space.set()
        self._space = trio.Event()
        return results, logs, blobs, taken

    def put_back(self, taken: Any) -> None:
        results, logs, log_bytes = taken
        self.results[:0] = results
        self.logs[:0] = logs
        self.log_bytes += log_bytes
        self._wake.set()

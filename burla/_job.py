"""One call of remote_parallel_map: upload inputs, stream events, hand out results.

`JobRun` lives in the portal's event loop. Two tasks run side by side:

* the uploader creates the job with the first batch of inputs, then sends the
  rest (at most `UPLOADS_IN_FLIGHT` requests at a time, so memory stays
  bounded), pulling and pickling batches in a worker thread; a job whose
  inputs all fit in a small first batch is created on the event stream
  instead (one websocket frame creates and subscribes: no HTTP request);
* the client's `EventStream` (one websocket for all its jobs) hands the job
  its events: it prints what calls print as it arrives, feeds the spinner,
  and queues results and failures for the caller's thread. After a daemon
  restart the stream resubscribes from the last event the job saw.

The caller's thread (`collect` or `ResultIterator`) takes from that queue,
unpickles results, raises failures, and turns Ctrl-C into a cancelled job.

A detached job (``detach=True``) runs the uploader alone: once every input is
uploaded the caller gets a `burla.Job` (`_handle.py`) and nothing here follows
the job; until then Ctrl-C (or the process exiting) cancels it.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import pickle
import queue
import sys
import weakref
from pathlib import Path
from typing import Any

import httpx
import trio

from burla.common import local
from burla.common.retry import Backoff
from burla.common.trace import trace
from burla.schemas import envelope
from burla.schemas import messages as m

from ._events import EventStream
from ._pickling import FILE_BATCH_BYTES, InputBatcher
from ._remote_errors import rebuild
from ._responses import RECONNECT_SECONDS, error_from_response
from ._spinner import Spinner
from .errors import BurlaError, ClusterUnavailableError, JobCancelledError

UPLOADS_IN_FLIGHT = 2
STREAM_CREATE_BYTES = 1024**2  # a job of one batch up to this size is created on the event stream
CANCEL_SECONDS = 3.0
_TERMINAL = (m.DONE, m.FAILED, m.CANCELLED)


class JobRun:
    def __init__(
        self,
        portal: Any,
        http: httpx.AsyncClient,
        stream: EventStream,
        spec: m.JobSpec,
        function_blob: bytes,
        first: tuple[m.BatchMeta, bytes],
        batcher: InputBatcher,
        spinner: bool = True,
        local_payloads: tuple[str, str, int] | None = None,
    ) -> None:
        self.portal = portal
        self.http = http
        self.stream = stream
        self.spec = spec
        self.function_blob = function_blob
        self.first = first
        self.batcher = batcher
        self.local_payloads = local_payloads  # (dir, proof, inline limit): large batches go as files
        self.spinner = Spinner(spinner, spec.function_name)
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.after = 0  # the last event seen
        self.create: tuple[dict[str, Any], list[bytes]] | None = None  # the create frame (header, blobs), sent
        # on the event stream until the daemon answers for the job
        self._scope: trio.CancelScope | None = None
        self._created = False
        self._ended = trio.Event()  # the job's final event arrived (or it failed here)
        self.finished = False
        self.return_exceptions = spec.return_exceptions  # failed inputs' slots hold their errors

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    def start(self) -> None:
        _watch_for_exit(self)
        self.spinner.start()
        self.portal.start_soon(self._run)

    # ---- in the caller's thread --------------------------------------------------------------

    def get(self) -> tuple[Any, ...]:
        while True:
            try:
                return self.queue.get(timeout=0.1)
            except queue.Empty:
                continue

    def cancel(self, reason: str) -> None:
        """Cancel the job on the cluster (best effort, bounded in time)."""
        if self.finished:
            return
        self.finished = True
        _LIVE.discard(self)
        try:
            self.portal.run(self._cancel, reason)
        except (BurlaError, trio.RunFinishedError) as e:  # the cluster or this process's loop is gone
            trace("client", f"cancel of {self.job_id[:8]} not sent: {e!r}")
        finally:
            self.spinner.stop()

    # ---- in the portal ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            with trio.CancelScope() as self._scope:
                if self.spec.detach:
                    self._created = True  # as good as: a cancel while the first batch goes up is sent after it
                    await self._upload()
                    self.queue.put(("uploaded",))
                    return
                async with trio.open_nursery() as nursery:
                    if not self._create_on_stream():
                        nursery.start_soon(self._upload)
                    await self.stream.follow(self)
                    await self._ended.wait()
                    nursery.cancel_scope.cancel()
                await self.stream.ack(self.job_id)
        except BaseException as e:  # noqa: BLE001 - everything goes to the caller's thread
            self.stream.forget(self.job_id)
            error = _first_error(e)
            try:
                if self._created and not isinstance(error, (JobCancelledError, trio.Cancelled)):
                    # whatever ended it here (a Burla error, the caller's inputs raising), the job must not run on
                    reason = str(error) if isinstance(error, BurlaError) else f"the client's inputs raised {error!r}"
                    with trio.move_on_after(CANCEL_SECONDS):
                        try:
                            await self._post_json(f"/v1/jobs/{self.job_id}/cancel", {"reason": reason[:500]})
                        except BurlaError as refused:  # a create refused: no job to cancel (404), as wanted
                            trace("client", f"cancel of {self.job_id[:8]} after {error!r}: {refused}")
            finally:
                self.queue.put(("error", error))  # the caller's thread must always hear how it ended
            if not isinstance(e, Exception) and not isinstance(e, BaseExceptionGroup):
                raise

    def fail(self, error: BurlaError) -> None:
        """The event stream gave up on this job (lost the daemon, refused)."""
        self.queue.put(("error", error))
        self._ended.set()

    async def take_message(self, header: dict[str, Any], blobs: list[memoryview]) -> None:
        """A message of the event stream for this job."""
        self.create = None  # the daemon has the job (or said why not)
        if "error" in header:
            e = header["error"]
            status = e.get("status")
            if isinstance(status, bool) or not isinstance(status, int):
                status = {"not_found": 404, "conflict": 409, "unauthorized": 401}.get(e.get("code"), 400)
            self.fail(error_from_response(status, json.dumps({"error": e}), "follow the job"))
            return
        self.spinner.update(header.get("status"))
        for wire in header.get("events", []):
            event = m.Event.from_wire(wire)
            if event.seq <= self.after:
                continue  # seen before a reconnect
            trace("client", f"event {event.kind} [{event.lo},{event.hi})")
            blob: bytes | bytearray | None = bytes(blobs[event.blob]) if event.blob is not None else None
            if blob is None and event.size:
                blob = await self._fetch_payload(event)  # before later events: "done" must follow its results
                if blob is None:
                    return  # this job failed (said so); the stream goes on for the others
            self.after = event.seq
            self._take(event, blob)
            if event.kind in _TERMINAL:
                self._ended.set()

    async def _fetch_payload(self, event: m.Event) -> bytes | bytearray | None:
        """A payload too large for the websocket: from the daemon's file on this host, or streamed over HTTP.

        A lost connection propagates: the event stream reconnects and the event comes again, as
        `after` has not moved past it. A refusal fails this job alone (None), not every job followed.
        """
        blob = await fetch_payload(self.http, self.job_id, event, self.local_payloads)
        if isinstance(blob, BurlaError):
            self.fail(blob)
            return None
        return blob

    async def _cancel(self, reason: str) -> None:
        if self.spec.detach and self._scope is not None:
            self._scope.cancel()  # the upload stops first: a create still on its way must not outlive the cancel
        with trio.move_on_after(CANCEL_SECONDS):
            if self._created:
                # a job created on the stream may not be made yet: its cancel waits for it. A detached one whose
                # create was cut off on its way is not waited for: made after this, it has not all its inputs,
                # and the daemon cancels it after client_grace (a Ctrl-C must not hang for it).
                await self._post_json(f"/v1/jobs/{self.job_id}/cancel", {"reason": reason},
                                      missing_retried=self.create is not None)  # fmt: skip
        if self._scope is not None:
            self._scope.cancel()

    async def _post(
        self, path: str, content: bytes, content_type: str, what: str, missing_retried: bool = False
    ) -> httpx.Response:
        """POST with retries while the daemon is unreachable (e.g. restarting), and while it answers 404 with
        `missing_retried` (the job's create frame is still on its way)."""
        deadline = trio.current_time() + RECONNECT_SECONDS
        backoff = Backoff(first=0.02, cap=1.0)
        while True:
            trace("client", f"post {path[-20:]} {len(content)}")
            try:
                r = await self.http.post(path, content=content, headers={"content-type": content_type})
                trace("client", f"posted {path[-20:]} {r.status_code}")
            except httpx.TransportError as e:
                if trio.current_time() > deadline:
                    raise ClusterUnavailableError(f"lost the Burla cluster at {self.http.base_url}: {e}") from None
            else:
                if r.status_code == 404 and missing_retried and self.create is not None:
                    pass  # retried: the daemon has not taken the job's create frame yet
                elif r.status_code < 500:
                    if r.status_code != 200:
                        raise error_from_response(r.status_code, r.text, what)
                    return r
                if trio.current_time() > deadline:
                    raise error_from_response(r.status_code, r.text, what)
            await backoff.wait()

    async def _post_json(self, path: str, body: dict[str, Any], missing_retried: bool = False) -> None:
        await self._post(path, json.dumps(body).encode(), "application/json", "cancel the job", missing_retried)

    def _place(self, batch: tuple[m.BatchMeta, bytes]) -> tuple[m.BatchMeta, list[bytes]]:
        """A batch as it goes up: in the body, or as a file in the daemon's payload dir (same host)."""
        meta, payload = batch
        if self.local_payloads is None or len(payload) <= self.local_payloads[2]:
            return meta, [payload]
        ref = local.batch_ref(self.job_id, meta.seq)
        local.write_file(Path(self.local_payloads[0]) / ref, payload)
        return dataclasses.replace(meta, payload_ref=ref), []

    def _header(self, metas: list[m.BatchMeta], final: int | None) -> dict[str, Any]:
        header: dict[str, Any] = {"batches": [meta.to_wire() for meta in metas], "final_count": final}
        if self.local_payloads is not None and any(meta.payload_ref for meta in metas):
            header["payload_proof"] = self.local_payloads[1]
        return header

    def _create_on_stream(self) -> bool:
        """Create the job on the event stream if it is small and all there is; whether it is."""
        meta, payload = self.first
        if (
            self.spec.detach
            or not self.batcher.exhausted
            or len(payload) + len(self.function_blob) > STREAM_CREATE_BYTES
        ):
            return False
        header = {"spec": self.spec.to_wire(), **self._header([meta], self.batcher.count), "after": 0}
        self.create = (header, [self.function_blob, payload])
        self._created = True  # as good as: a cancel waits for it (see _cancel)
        self.first = (meta, b"")
        return True

    async def _upload(self) -> None:
        meta, blobs = self._place(self.first)
        final = self.batcher.count if self.batcher.exhausted else None
        header = {"spec": self.spec.to_wire(), **self._header([meta], final)}
        await self._post("/v1/jobs", envelope.pack(header, [self.function_blob, *blobs]),
                         envelope.CONTENT_TYPE, "create the job")  # fmt: skip
        self._created = True
        self.first = (meta, b"")  # let the first batch go
        if final is not None:
            return
        if self.local_payloads is not None:
            # batches go as files: larger ones cost no HTTP body and save a request, a lease and a report each
            self.batcher.target_bytes = FILE_BATCH_BYTES
        slots = trio.Semaphore(UPLOADS_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            while final is None:
                await slots.acquire()
                placed = await trio.to_thread.run_sync(self._next_placed)
                final = self.batcher.count if self.batcher.exhausted else None
                nursery.start_soon(self._send_batch, placed, final, slots)

    def _next_placed(self) -> tuple[m.BatchMeta, list[bytes]] | None:
        batch = self.batcher.next_batch()
        return None if batch is None else self._place(batch)

    async def _send_batch(
        self, placed: tuple[m.BatchMeta, list[bytes]] | None, final: int | None, slots: trio.Semaphore
    ) -> None:
        try:
            metas, blobs = ([placed[0]], placed[1]) if placed else ([], [])
            body = envelope.pack(self._header(metas, final), blobs)
            await self._post(f"/v1/jobs/{self.job_id}/inputs", body, envelope.CONTENT_TYPE, "upload inputs")
        finally:
            slots.release()

    def _take(self, event: m.Event, blob: bytes | bytearray | None) -> None:
        if event.kind == m.RESULTS:
            self.queue.put(("results", event.lo, event.hi, blob))
        elif event.kind == m.LOGS and blob is not None:
            print_lines(pickle.loads(blob))
        elif event.kind == m.FAILED:
            self.queue.put(("failed", rebuild(event.data, blob)))
        elif event.kind == m.CALL_FAILED:  # return_exceptions: each input of [lo, hi) gets its error
            errors = [rebuild({**event.data, "index": i}, blob) for i in range(event.lo, event.hi)]
            self.queue.put(("call_failed", event.lo, event.hi, errors))
        elif event.kind == m.RETRY:
            trace("client", f"retry [{event.lo},{event.hi}) attempt {event.data.get('attempt')}")
        elif event.kind == m.DONE:
            self.queue.put(("done", event.data.get("n_inputs")))
        elif event.kind == m.CANCELLED:
            reason = event.data.get("reason", "cancelled")
            self.queue.put(("error", JobCancelledError(f"the job was cancelled on the cluster: {reason}")))
        elif event.kind == m.NOTICE:
            print(f"burla: {event.data.get('message', '')}", file=sys.stderr, flush=True)


async def fetch_payload(
    http: httpx.AsyncClient, job_id: str, event: m.Event, local_payloads: tuple[str, str, int] | None
) -> bytes | bytearray | BurlaError:
    """A payload too large for the websocket: from the daemon's file on this host, or streamed over HTTP.

    A lost connection (or a restarting daemon's 5xx) raises, for the caller to retry; a refusal is
    returned as the error it means.
    """
    if local_payloads is not None and event.ref:
        path = Path(local_payloads[0]) / event.ref
        try:
            return await trio.to_thread.run_sync(path.read_bytes)
        except OSError:
            pass  # not readable after all: over HTTP
    buffer = bytearray()
    async with http.stream("GET", f"/v1/jobs/{job_id}/events/{event.seq}/payload") as r:
        if r.status_code != 200:
            await r.aread()
            if r.status_code >= 500:
                raise httpx.RemoteProtocolError(f"HTTP {r.status_code}")  # the daemon restarting: retried
            return error_from_response(r.status_code, r.text, "fetch a result")
        async for chunk in r.aiter_raw():
            buffer += chunk
    if len(buffer) != event.size:
        raise httpx.RemoteProtocolError(f"a result arrived cut short: {len(buffer)} of {event.size} bytes")
    return buffer  # unpickled as it is: no second copy of a big result


def print_lines(entries: list[tuple[int, int, str]]) -> None:
    """Write what remote calls printed to this process's stdout and stderr."""
    out, err = sys.stdout, sys.stderr
    wrote_out = wrote_err = False
    for _index, stream, text in entries:
        if stream == m.STDERR:
            err.write(text)
            wrote_err = True
        else:
            out.write(text)
            wrote_out = True
    if wrote_out:
        out.flush()
    if wrote_err:
        err.flush()


def _first_error(e: BaseException) -> BaseException:
    while isinstance(e, BaseExceptionGroup):
        burla = [x for x in e.exceptions if isinstance(x, BurlaError)]
        e = burla[0] if burla else e.exceptions[0]
    return e


_LIVE: weakref.WeakSet[JobRun] = weakref.WeakSet()  # jobs of this process still running


def _watch_for_exit(job: JobRun) -> None:
    if not _LIVE and not getattr(_watch_for_exit, "registered", False):
        atexit.register(_cancel_at_exit)
        _watch_for_exit.registered = True  # type: ignore[attr-defined]
    _LIVE.add(job)


def _cancel_at_exit() -> None:
    """The process exits with jobs still running (an exception in a loop over results, sys.exit): cancel them."""
    for job in list(_LIVE):
        job.cancel("the client process exited")


def _finish(job: JobRun) -> None:
    _LIVE.discard(job)
    job.finished = True
    job.spinner.stop()


def collect(job: JobRun) -> list[Any]:
    """Wait for every result; return them in input order."""
    chunks: dict[int, bytes] = {}
    try:
        while True:
            item = job.get()
            kind = item[0]
            if kind in ("results", "call_failed"):
                chunks[item[1]] = item[3]
            elif kind == "done":
                break
            else:
                _finish(job)
                raise item[1]
    except KeyboardInterrupt:
        job.cancel("cancelled by Ctrl-C in the client")
        raise
    finally:
        _finish(job)
    trace("client", "collected")
    results: list[Any] = []
    for lo in sorted(chunks):
        if lo != len(results):
            raise BurlaError(f"results are missing for inputs {len(results)} to {lo - 1}: this is a bug in Burla")
        chunk = chunks.pop(lo)
        results.extend(chunk if isinstance(chunk, list) else pickle.loads(chunk))  # a list: errors in their slots
    _check_all_arrived(job, len(results))
    return results


def _check_all_arrived(job: JobRun, received: int) -> None:
    """Never a short list: the cluster said done, so every input sent must have its result."""
    sent = job.batcher.count
    if received != sent:
        raise BurlaError(
            f"the cluster reported job {job.job_id} done with {received} results for {sent} inputs: "
            "results were lost on the way (this is a bug in Burla; please report it)"
        )


class ResultIterator:
    """Results as they arrive (not in input order), for ``generator=True``."""

    def __init__(self, job: JobRun) -> None:
        self._job = job
        self._buffer: collections.deque[Any] = collections.deque()
        self._done = False
        self._received = 0

    def __iter__(self) -> ResultIterator:
        return self

    def __next__(self) -> Any:
        while not self._buffer:
            if self._done:
                raise StopIteration
            try:
                item = self._job.get()
            except KeyboardInterrupt:
                self._job.cancel("cancelled by Ctrl-C in the client")
                raise
            kind = item[0]
            if kind in ("results", "call_failed"):
                values = item[3] if kind == "call_failed" else pickle.loads(item[3])
                self._received += len(values)
                self._buffer.extend(values)
            elif kind == "done":
                self._done = True
                _finish(self._job)
                _check_all_arrived(self._job, self._received)
            else:
                self._done = True
                _finish(self._job)
                raise item[1]
        return self._buffer.popleft()

    def close(self) -> None:
        """Stop early: the job is cancelled on the cluster."""
        if not self._done:
            self._done = True
            self._job.cancel("the caller stopped reading results")

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - a finalizer must never raise (at exit, modules may be half gone)
            pass

"""`burla.Job`: a job on the cluster, by its id, from any process of its owner.

``remote_parallel_map(..., detach=True)`` returns one as soon as every input is
uploaded, and ``burla.job(ID)`` makes one for a job made elsewhere (another
process, another machine, before a restart of either side). Reattaching reads
what the daemon keeps of the job: its results and output are events in the
daemon's SQLite (large ones as files), read from the first one each time, so
a handle can fetch the results again, as often as it likes, until the daemon
deletes the finished job after ``daemon.job_retention``. Reading never changes
the job: it does not forget it (as a plain call's client does once it has
everything), and stopping a read (Ctrl-C, a generator closed) only stops
following; `Job.cancel` is the one way to stop the job.

Results come over the client's events websocket (`_events.EventStream`), as a
plain call's do, so a daemon restart is ridden out and each event is taken
once, by its sequence number; output comes over ``GET /v1/jobs/ID/logs``.
"""

from __future__ import annotations

import pickle
import queue
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ._responses import RECONNECT_SECONDS, error_from_response
from .errors import (
    BurlaError,
    ClusterError,
    ClusterUnavailableError,
    InvalidArgumentError,
    JobCancelledError,
    JobNotFoundError,
)

if TYPE_CHECKING:
    from burla.schemas import messages as m

    from ._client import Client

_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
LOGS_WAIT = 20.0  # seconds one GET of a followed job's output waits for more


def job(job_id: str, api_key: str | None = None) -> Job:
    """The job `job_id` of the cluster this process uses (as `remote_parallel_map` would), to reattach to it.

    Only the job's owner (and the cluster's admins) may: another user's job, a job that never
    existed and one deleted after the daemon's ``job_retention`` raise `burla.JobNotFoundError`.
    """
    from ._client import Client

    handle = Job(Client.default(api_key), job_id)
    handle.status()  # raises JobNotFoundError now, not at the first read
    return handle


def check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 64 or not _ID_CHARS.issuperset(job_id):
        raise InvalidArgumentError(
            f"job_id must be a job's id as Job.id, `burla jobs list` or the detached call printed it, got {job_id!r}"
        )
    return job_id


class Job:
    """A job on a Burla cluster: its status, results, output, and cancel, from any process of its owner.

    ``Job.id`` is what `burla.job` and the ``burla jobs`` commands take.
    """

    def __init__(self, client: Client, job_id: str) -> None:
        self._client = client
        self._id = check_job_id(job_id)

    @property
    def id(self) -> str:
        return self._id

    def __repr__(self) -> str:
        return f"<burla.Job {self._id}>"

    # ---- plain requests ------------------------------------------------------------------

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        self._client.connect()
        r = self._client.request(method, path, what, check=False, **kwargs)
        if r.status_code == 404:
            raise JobNotFoundError(
                f"no job {self._id} on the cluster at {self._client.url}: it never existed there, is another "
                "user's, or finished longer than the daemon's job_retention ago and was deleted"
            )
        if r.status_code != 200:
            raise error_from_response(r.status_code, r.text, what)
        return r

    def status(self) -> m.JobStatus:
        """Where the job stands: ``state`` ("running", "done", "failed", "cancelled"), ``n_inputs``,
        ``n_done``, ``function_name``, ``created`` and ``finished`` (Unix times), ``detached``, ``owner``."""
        from burla.schemas import messages as m

        r = self._request("GET", f"/v1/jobs/{self._id}", "read the job's status", timeout=30)
        return m.JobStatus.from_wire(r.json())

    def cancel(self, reason: str = "cancelled with burla.Job.cancel") -> None:
        """Cancel the job on the cluster (a finished job stays as it is)."""
        r = self._client.request(
            "POST", f"/v1/jobs/{self._id}/cancel", "cancel the job", check=False, json={"reason": reason[:500]},
            timeout=30,
        )  # fmt: skip
        if r.status_code == 409:  # it has finished: nothing to cancel
            return
        if r.status_code == 404:
            self._request("GET", f"/v1/jobs/{self._id}", "cancel the job", timeout=30)  # raises JobNotFoundError
        if r.status_code != 200:
            raise error_from_response(r.status_code, r.text, "cancel the job")

    # ---- results -------------------------------------------------------------------------

    def results(self) -> list[Any]:
        """Every result, in input order, once the job is done (blocking until then).

        Each input's result exactly once, also across a restart of the daemon. A failed job raises
        its error as a plain call would (your exception as itself); a cancelled one JobCancelledError.
        With ``return_exceptions=True`` a failed input's slot holds its exception instead.
        Ctrl-C stops waiting and leaves the job running.
        """
        chunks: dict[int, tuple[Any, ...]] = {}
        total: int | None = None
        for item in self._events():
            if item[0] == "done":
                total = item[1]
            else:
                chunks[item[1]] = item
        results: list[Any] = []
        for lo in sorted(chunks):
            if lo != len(results):
                raise BurlaError(f"job {self._id}: results of inputs {len(results)} to {lo - 1} are missing or "
                                 "came twice (this is a bug in Burla; please report it)")  # fmt: skip
            results.extend(_values(chunks.pop(lo)))
        self._check_count(len(results), total)
        return results

    def as_completed(self) -> Iterator[Any]:
        """A generator of the results as they arrive (in completion order, not input order); it ends when the
        job is done. Closing it early only stops following."""
        received = 0
        for item in self._events():
            if item[0] == "done":
                self._check_count(received, item[1])
            else:
                values = _values(item)
                received += len(values)
                yield from values

    def _check_count(self, received: int, total: int | None) -> None:
        if total is not None and received != total:
            raise BurlaError(
                f"the cluster reported job {self._id} done with {received} results for {total} inputs: "
                "results were lost on the way (this is a bug in Burla; please report it)"
            )

    def _events(self) -> Iterator[tuple[Any, ...]]:
        """The job's result events from its first ("results" with a pickled list, or "call_failed" with the
        errors of return_exceptions=True), then ("done", n_inputs); raises how it failed otherwise."""
        client = self._client
        client.connect()
        reader = _Reader(client, self._id)
        stream = client._events
        if self._id in stream.jobs:
            raise InvalidArgumentError(f"job {self._id} is being read by another call in this process already")
        client._portal.run(stream.follow, reader)
        try:
            while True:
                try:
                    item = reader.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item[0] == "error":
                    raise item[1]
                yield item
                if item[0] == "done":
                    return
        finally:
            if not reader.ended:
                try:
                    client._portal.run(stream.unfollow, self._id)
                except Exception:  # noqa: BLE001 - the loop or the connection is gone: nothing is followed
                    pass

    # ---- output --------------------------------------------------------------------------

    def logs(self, follow: bool = False) -> Iterator[str]:
        """What the job's calls printed (stdout and stderr, in the order it reached the daemon), from the start.

        ``follow=True`` goes on yielding new output as it comes, until the job ends. A job that printed
        more than ``daemon.max_log_bytes_per_job`` kept only that much (a notice says so).
        """
        for _stream, text in self.log_entries(follow):
            yield text

    def log_entries(self, follow: bool = False) -> Iterator[tuple[int, str]]:
        """`logs` with each text's stream: (1, text) for stdout, (2, text) for stderr."""
        from burla.schemas import envelope
        from burla.schemas import messages as m

        after = 0
        lost_since: float | None = None
        while True:
            params = {"after": after, "wait": LOGS_WAIT if follow else 0}
            try:
                r = self._request("GET", f"/v1/jobs/{self._id}/logs", "read the job's output", params=params,
                                  timeout=LOGS_WAIT + 30)  # fmt: skip
            except (ClusterUnavailableError, ClusterError) as e:
                if not follow or isinstance(e, JobNotFoundError) or not _retryable(e):
                    raise
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_SECONDS:
                    raise
                time.sleep(0.5)  # the daemon restarting: follow on once it is back
                continue
            lost_since = None
            header, blobs = envelope.unpack(r.content)
            events = [m.Event.from_wire(e) for e in header.get("events", [])]
            scanned = header.get("after")
            if isinstance(scanned, int) and not isinstance(scanned, bool):
                after = max(after, scanned)  # past the results the daemon looked through for output
            for event in events:
                after = max(after, event.seq)
                if event.kind == m.LOGS and event.blob is not None:
                    for _index, stream, text in pickle.loads(blobs[event.blob]):
                        yield (2 if stream == m.STDERR else 1), text
                elif event.kind == m.NOTICE:
                    yield 2, f"burla: {event.data.get('message', '')}\n"
            if header.get("finished") or (not follow and not events):
                return


def _values(item: tuple[Any, ...]) -> list[Any]:
    """The slots of one result event: its return values, or the errors of inputs that failed."""
    return list(item[3]) if item[0] == "call_failed" else list(pickle.loads(item[3]))


def _retryable(error: BurlaError) -> bool:
    return isinstance(error, ClusterUnavailableError) or " answered 5" in str(error)


class _Reader:
    """Follows one job on the client's event stream (`_events.Follower`) and queues its result events."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._client = client
        self._job_id = job_id
        self.after = 0
        self.create: tuple[dict[str, Any], list[bytes]] | None = None
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.ended = False  # the final event (or an error) came: the stream forgot the job already

    @property
    def job_id(self) -> str:
        return self._job_id

    def fail(self, error: BurlaError) -> None:
        self.ended = True
        self._client._events.forget(self._job_id)
        self.queue.put(("error", error))

    async def take_message(self, header: dict[str, Any], blobs: list[memoryview]) -> None:
        import json

        from burla.schemas import messages as m

        from ._job import fetch_payload
        from ._remote_errors import rebuild

        if "error" in header:
            e = header["error"]
            if e.get("code") == "not_found":
                self.fail(JobNotFoundError(f"no job {self._job_id}: {str(e.get('message', ''))[:500]}"))
            else:
                status = e.get("status") if isinstance(e.get("status"), int) else 400
                self.fail(error_from_response(status, json.dumps({"error": e}), "follow the job"))
            return
        for wire in header.get("events", []):
            event = m.Event.from_wire(wire)
            if event.seq <= self.after:
                continue  # seen before a reconnect
            blob: bytes | bytearray | None = bytes(blobs[event.blob]) if event.blob is not None else None
            if blob is None and event.size:
                fetched = await fetch_payload(
                    self._client._http, self._job_id, event, self._client._local_payloads()
                )  # before later events: "done" must follow its results
                if isinstance(fetched, BurlaError):
                    self.fail(fetched)
                    return
                blob = fetched
            self.after = event.seq
            if event.kind == m.RESULTS:
                self.queue.put(("results", event.lo, event.hi, blob))
            elif event.kind == m.CALL_FAILED:  # return_exceptions=True: each input of [lo, hi) gets its error
                errors = [rebuild({**event.data, "index": i}, blob) for i in range(event.lo, event.hi)]
                self.queue.put(("call_failed", event.lo, event.hi, errors))
            elif event.kind == m.FAILED:
                self._end(("error", rebuild(event.data, blob)))
            elif event.kind == m.CANCELLED:
                why = event.data.get("reason", "cancelled")
                self._end(("error", JobCancelledError(f"job {self._job_id} was cancelled on the cluster: {why}")))
            elif event.kind == m.DONE:
                self._end(("done", event.data.get("n_inputs")))

    def _end(self, item: tuple[Any, ...]) -> None:
        self.ended = True
        self._client._events.forget(self._job_id)  # never acked: the daemon keeps a detached job for retention
        self.queue.put(item)

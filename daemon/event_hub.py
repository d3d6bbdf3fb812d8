"""The events websocket (``/v1/events``): one per client, carrying the events of every job it follows.

The client sends ``{"op": "subscribe", "job": ID, "after": SEQ}`` and, once it
has a job's final event, ``{"op": "ack", "job": ID}``; ``{"op": "unsubscribe",
"job": ID}`` stops a follow (a reattached reader that stopped reading). A binary frame is a
create: the envelope of ``POST /v1/jobs`` (spec, function, first inputs), up to
`CREATE_BYTES`, which creates the job and subscribes to it in one message; a
create sent again for a job of the caller's that exists (after a reconnect) only
subscribes; its header may carry ``"ack": [ID, ...]``, acks of finished jobs, taken once the job is made.
An error creating it is the job's ``{"job_id": ID, "error": {...,
"status": HTTP status}}``, the answer ``POST /v1/jobs`` would have given. A subscribe starts one
follow task per job (a second subscribe to the same job, a reconnect's
resubscribe with the last sequence it saw, replaces the first); each sends
envelopes ``{"job_id": ID, "events": [Event...], "status": JobStatus?}``, with
the events' payloads as blobs, or ``{"job_id": ID, "error": {...}}``. Frames go
out one at a time; the events come from `ControlPlane.next_events`.

A socket acts for one user: it follows only their jobs (another user's job is
answered as no job). When the user's key ends (users.py), the socket gets a
last frame ``{"error": {"code": "unauthorized", ...}}`` and is closed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import trio

from burla.common.trace import trace
from burla.schemas import envelope, wire
from burla.schemas import messages as m
from burla.schemas.wire import WireError

from .errors import ApiError, BadRequest
from .feeds import Follower
from .ids import valid_id
from .service import ControlPlane
from .users import Principal

STATUS_INTERVAL = 0.25  # seconds between status updates on a job's websocket
JOB_WAIT = 10.0  # how long a websocket waits for its job to be created
END_GRACE = 2.0  # how long a socket whose user was removed waits for its jobs' final events before closing
CREATE_BYTES = 8 * 1024**2  # of a create frame: a bigger job is created with POST /v1/jobs
_ACKS = 1000  # acks taken from one create frame
_FINAL = (m.DONE, m.FAILED, m.CANCELLED)

# Creates a job from the envelope of POST /v1/jobs for a user; returns its id (app.py's `create`).
Create = Callable[[dict[str, Any], list[memoryview], Principal], str]


class Socket(Protocol):
    """What the hub needs of a websocket (quart's, or a test's)."""

    async def accept(self) -> None: ...
    async def receive(self) -> Any: ...
    async def send(self, data: bytes) -> None: ...


class EventHub:
    """Serves one client's events websocket: its subscriptions, and the frames of every job it follows."""

    def __init__(self, plane: ControlPlane, socket: Socket, who: Principal, create: Create | None = None) -> None:
        self.plane = plane
        self.socket = socket
        self.who = who
        self.create = create
        self._send_lock = trio.Lock()
        self._follows: dict[str, trio.CancelScope] = {}
        self._following = 0  # follow tasks running
        self._ended: tuple[str, bool] | None = None  # (why, grace): the user's key ended
        self._end = trio.Event()

    def end(self, why: str, grace: bool) -> None:
        """The user's key ended: close the socket, after their jobs' final events when `grace`."""
        self._ended = (why, grace)
        self._end.set()

    async def serve(self) -> None:
        """Accept the socket and take the client's messages until it goes away (or its user's key ends)."""
        self.plane.sessions.opened(self.who.name, self)  # before accepting: a key that ends meanwhile ends it
        try:
            self.plane.users.current(self.who)
        except ApiError as e:
            self.end(e.message, grace=False)  # it ended since the socket's key was checked
        try:
            await self.socket.accept()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_when_ended, nursery.cancel_scope)
                await self._take_messages(nursery)
        finally:
            self.plane.sessions.closed(self.who.name, self)

    async def _close_when_ended(self, scope: trio.CancelScope) -> None:
        await self._end.wait()
        why, grace = self._ended or ("", False)
        if grace:
            with trio.move_on_after(END_GRACE):
                while self._following:
                    await trio.sleep(0.02)
        with trio.move_on_after(1):
            await self.send({"error": {"code": "unauthorized", "message": why}})
        scope.cancel()

    async def _take_messages(self, nursery: trio.Nursery) -> None:
        while True:
            raw = await self.socket.receive()
            if isinstance(raw, (bytes, bytearray)) and raw[: len(envelope.MAGIC)] == envelope.MAGIC:
                await self._create(raw, nursery)
                continue
            try:
                op, job_id, after = parse_op(raw)
            except (BadRequest, WireError) as e:
                await self.send({"error": {"code": "bad_request", "message": str(e)}})
                continue
            self._unfollow(job_id)
            trace("daemon", f"events {op} {job_id[:8]} after={after}")
            if op == "subscribe":
                self._follow(job_id, after, nursery)
            elif op == "ack":
                self.plane.ack_job(job_id, self.who)
            # "unsubscribe": unfollowed above, and nothing else

    def _unfollow(self, job_id: str) -> None:
        old = self._follows.pop(job_id, None)
        if old is not None:
            old.cancel()

    def _follow(self, job_id: str, after: int, nursery: trio.Nursery) -> None:
        """Follow `job_id` from `after`, in place of any follow of it before (a reconnect's resubscribe)."""
        self._unfollow(job_id)
        self._follows[job_id] = trio.CancelScope()
        nursery.start_soon(self.follow, job_id, after, self._follows[job_id])

    async def _create(self, raw: bytes | bytearray, nursery: trio.Nursery) -> None:
        """A create frame: make the job (unless it is the caller's already) and follow it from `after`."""
        job_id = ""
        try:
            if self.create is None:
                raise BadRequest("this socket takes no create frames: create the job with POST /v1/jobs")
            if len(raw) > CREATE_BYTES:
                raise BadRequest(f"a create frame is at most {CREATE_BYTES} bytes: send bigger jobs to POST /v1/jobs")
            header, blobs = envelope.unpack(bytes(raw))
            spec = header.get("spec")
            job_id = valid_id(spec.get("job_id") if isinstance(spec, dict) else None, "spec.job_id")
            after = header.get("after", 0)
            if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= wire.INT64[1]:
                raise BadRequest(f"after: expected a non-negative integer event sequence, got {str(after)[:40]}")
            trace("daemon", f"events create {job_id[:8]} after={after}")
            if not self.plane.has_job(job_id, self.who):  # else sent again after a reconnect: it exists
                self.create(header, blobs, self.plane.users.current(self.who))
        except (ApiError, WireError, envelope.EnvelopeError) as e:
            error = e if isinstance(e, ApiError) else BadRequest(str(e))
            body = {**error.body()["error"], "status": error.status}
            await self.send({"job_id": job_id, "error": body} if job_id else {"error": body})
            return
        self._follow(job_id, after, nursery)
        acks = header.get("ack", [])
        for acked in acks[:_ACKS] if isinstance(acks, list) else ():
            if isinstance(acked, str) and acked != job_id:
                try:
                    self.plane.ack_job(valid_id(acked, "ack"), self.who)
                except BadRequest:
                    pass  # not a job id: nothing to forget

    async def send(self, header: dict[str, Any], blobs: list[bytes] | None = None) -> None:
        data = envelope.pack(header, blobs or [])
        async with self._send_lock:  # one frame at a time on the socket
            await self.socket.send(data)

    async def follow(self, job_id: str, after: int, scope: trio.CancelScope) -> None:
        """Send a job's events after `after`, and its status as it changes, until its final event."""
        plane = self.plane
        with scope:
            try:
                await plane.wait_job(job_id, JOB_WAIT, self.who)
                plane.job_status(job_id, self.who)
            except ApiError as e:
                await self.send({"job_id": job_id, "error": e.body()["error"]})
                return
            plane.follow_started(job_id)  # only once it is the caller's: another's follow keeps no job alive
            self._following += 1
            try:
                with plane.follow(job_id, after) as follower:
                    await self._stream(job_id, follower)
            finally:
                self._following -= 1
                plane.follow_ended(job_id)

    async def _stream(self, job_id: str, follower: Follower) -> None:
        plane = self.plane
        last_status: dict[str, Any] | None = None
        while True:
            plane.note_activity()
            try:
                events = await plane.next_events(follower, STATUS_INTERVAL)
                status: dict[str, Any] | None = plane.job_status(job_id).to_wire()
            except ApiError:
                return  # acked and forgotten meanwhile
            header, blobs, finished = frame(job_id, events)
            if status != last_status:
                header["status"] = last_status = status
            if header["events"] or "status" in header:
                await self.send(header, blobs)
            if finished:
                return


def frame(job_id: str, events: list[tuple[m.Event, bytes | None]]) -> tuple[dict[str, Any], list[bytes], bool]:
    """One websocket frame of a job's events: its header, its blobs, and whether the job's final event is in it."""
    header: dict[str, Any] = {"job_id": job_id, "events": []}
    blobs: list[bytes] = []
    finished = False
    for event, payload in events:
        item = event.to_wire()
        if payload is not None:
            item["blob"] = len(blobs)
            blobs.append(payload)
        header["events"].append(item)
        finished = finished or event.kind in _FINAL
    return header, blobs, finished


def parse_op(raw: Any) -> tuple[str, str, int]:
    """A client's message on the events websocket: {"op": "subscribe"|"ack"|"unsubscribe", "job": ID, "after": SEQ}."""
    if not isinstance(raw, (str, bytes)) or len(raw) > 4096:
        raise BadRequest('expected a JSON text {"op": ..., "job": ...} of at most 4096 bytes')
    message = wire.loads(raw)
    if not isinstance(message, dict):
        raise BadRequest('expected {"op": ..., "job": ...}')
    op = message.get("op")
    if op not in ("subscribe", "ack", "unsubscribe"):
        raise BadRequest(f"op: expected 'subscribe', 'ack' or 'unsubscribe', got {str(op)[:40]!r}")
    job_id = valid_id(message.get("job"), "job")
    after = message.get("after", 0)
    if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= wire.INT64[1]:
        raise BadRequest(f"after: expected a non-negative integer event sequence, got {str(after)[:40]}")
    return op, job_id, after

"""The client's one websocket to the daemon, carrying the events of all its jobs.

A job subscribes with the sequence number of the last event it has seen, so
when the connection drops (the daemon restarted, the network blinked) the
stream reconnects and every job resumes where it was. Jobs ignore events they
have already seen, so a subscription sent twice does no harm. A small job is
created on the stream too: its create frame (the envelope of ``POST /v1/jobs``)
creates and subscribes in one message, and is sent again on a reconnect until
the daemon has answered for the job (a create of a job that exists subscribes).
A finished job's ack waits `ACK_DELAY` for the next create frame to ride on
(after it: the next job is created first), else goes on its own; a closing
client posts the acks still waiting over HTTP, where it learns they arrived.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

import httpx
import trio
from httpx_ws import WebSocketDisconnect, WebSocketNetworkError, WebSocketUpgradeError, aconnect_ws

from burla.common.retry import Backoff
from burla.common.trace import trace
from burla.schemas import envelope

from ._portal import guarded
from ._responses import error_from_response
from .errors import AuthenticationError, BurlaError, ClusterUnavailableError

MAX_MESSAGE_BYTES = 1024**3
ACK_DELAY = 0.2  # seconds an ack waits for a create frame to carry it
ACK_TIMEOUT = 2.0  # seconds a closing client waits for each ack over HTTP
_RETRYABLE = (
    httpx.TransportError,
    WebSocketNetworkError,
    WebSocketDisconnect,
    WebSocketUpgradeError,  # a 5xx or 404 while the daemon restarts
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for e in error.exceptions:
            yield from _leaves(e)
    else:
        yield error


class Follower(Protocol):
    after: int
    create: tuple[dict[str, Any], list[bytes]] | None  # the job's create frame, until the daemon answers for it

    @property
    def job_id(self) -> str: ...

    async def take_message(self, header: dict[str, Any], blobs: list[memoryview]) -> None: ...

    def fail(self, error: BurlaError) -> None: ...


class EventStream:
    def __init__(self, http: httpx.AsyncClient, nursery: trio.Nursery, reconnect_seconds: float) -> None:
        self.http = http
        self.nursery = nursery
        self.reconnect_seconds = reconnect_seconds
        self.jobs: dict[str, Follower] = {}
        self._ws: Any = None  # the open websocket, for _send
        self._running = False
        self._wake = trio.Event()
        self._send_lock = trio.Lock()
        self._scope = trio.CancelScope()
        self._acks: list[str] = []  # finished jobs to ack, with the next create frame or after ACK_DELAY
        self._acks_due = False  # a task sends them after ACK_DELAY

    async def follow(self, job: Follower) -> None:
        self.jobs[job.job_id] = job
        if not self._running:
            self._running = True
            self.nursery.start_soon(guarded, self._run)
        self._wake.set()
        if self._ws is not None:
            await self._subscribe(job)
        # otherwise _run subscribes every followed job as soon as it connects

    async def _subscribe(self, job: Follower) -> None:
        if job.create is not None:
            header, blobs = job.create
            acks, self._acks = self._acks, []
            if not await self._send(envelope.pack({**header, "ack": acks} if acks else header, blobs)):
                self._acks[:0] = acks  # the frame is sent again on the reconnect: the acks wait for a next one
        else:
            await self._send({"op": "subscribe", "job": job.job_id, "after": job.after})

    async def ack(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        self._acks.append(job_id)  # also while reconnecting: the next create frame, or the flush, takes it
        if not self._acks_due:
            self._acks_due = True
            self.nursery.start_soon(guarded, self._send_acks)

    async def _send_acks(self) -> None:
        """The acks no create frame took within ACK_DELAY, each in its own message."""
        try:
            await trio.sleep(ACK_DELAY)
        finally:
            self._acks_due = False
        acks, self._acks = self._acks, []
        unsent = [job_id for job_id in acks if not await self._send({"op": "ack", "job": job_id})]
        await self._post_acks(unsent)  # reconnecting, or the socket broke under them: over HTTP, not lost

    async def flush_acks(self) -> None:
        """Send the acks still waiting for a create frame now, and know they arrived: the client is closing.

        Over HTTP, not the websocket: a frame sent just before the socket closes may be dropped by the
        daemon's server when it sees the close first, and a socket that is reconnecting sends nothing."""
        acks, self._acks = self._acks, []
        await self._post_acks(acks)

    async def _post_acks(self, acks: list[str]) -> None:
        for job_id in acks:
            try:
                response = await self.http.post(f"/v1/jobs/{job_id}/ack", timeout=ACK_TIMEOUT)
            except httpx.HTTPError as e:  # the daemon is gone: it keeps the job until daemon.job_retention
                trace("client", f"ack of {job_id[:8]} not sent: {e!r}")
                continue
            if response.status_code != 200:
                trace("client", f"ack of {job_id[:8]}: {response.status_code} {response.text[:200]}")

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    async def unfollow(self, job_id: str) -> None:
        """Stop following a job that goes on running (a reattached reader stopped reading): the daemon stops
        sending its events."""
        if self.jobs.pop(job_id, None) is not None:
            await self._send({"op": "unsubscribe", "job": job_id})

    def close(self) -> None:
        self._scope.cancel()

    async def _send(self, message: dict[str, Any] | bytes) -> bool:
        """Whether the message went out on the socket (False: there is none now, or it broke)."""
        ws = self._ws
        if ws is None:
            return False
        try:
            async with self._send_lock:
                trace("client", f"events send {len(message)}")
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_text(json.dumps(message))
        except (WebSocketNetworkError, WebSocketDisconnect, trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # the reader notices and reconnects, then resubscribes
        return True

    async def _run(self) -> None:
        with self._scope:
            backoff = Backoff(first=0.02, cap=1.0)
            lost_since: float | None = None
            while True:
                if not self.jobs:  # nothing to follow: no need to hold a connection open
                    lost_since = None
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                ws: Any
                try:
                    async with aconnect_ws(
                        "/v1/events",
                        self.http,
                        max_message_size_bytes=MAX_MESSAGE_BYTES,
                        queue_size=64,
                        keepalive_ping_interval_seconds=20,
                        keepalive_ping_timeout_seconds=60,
                    ) as ws:
                        self._ws = ws
                        trace("client", f"events connected, following {len(self.jobs)}")
                        lost_since = None
                        backoff.reset()
                        for job in list(self.jobs.values()):
                            await self._subscribe(job)
                        while True:
                            header, blobs = envelope.unpack(await ws.receive_bytes())
                            if "job_id" not in header:
                                self._socket_error(header.get("error"))
                                continue
                            follower = self.jobs.get(header.get("job_id", ""))
                            if follower is not None:
                                await follower.take_message(header, blobs)
                except BaseException as e:  # noqa: BLE001 - httpx-ws raises inside exception groups
                    trace("client", f"events lost: {e!r}")
                    self._ws = None
                    self._handle(e)
                now = trio.current_time()
                lost_since = now if lost_since is None else lost_since
                if now - lost_since > self.reconnect_seconds:
                    self._fail_all(
                        ClusterUnavailableError(
                            f"lost the Burla cluster at {self.http.base_url} for {self.reconnect_seconds:.0f}s"
                        )
                    )
                    lost_since = None
                await backoff.wait()

    def _handle(self, error: BaseException) -> None:
        """Decide what a dropped connection means: retry, or fail the jobs."""
        leaves = list(_leaves(error))
        if any(isinstance(e, (trio.Cancelled, KeyboardInterrupt, SystemExit)) for e in leaves):
            raise error
        for e in leaves:
            if isinstance(e, WebSocketUpgradeError) and e.response.status_code == 401:
                self._fail_all(error_from_response(401, e.response.text, "follow jobs"))
                return
        if all(isinstance(e, _RETRYABLE) for e in leaves):
            return  # the daemon is restarting or the network blinked: reconnect
        self._fail_all(BurlaError(f"the connection to the cluster failed: {error!r}"))

    def _socket_error(self, error: Any) -> None:
        """An error frame for the whole socket: the key's user was removed, or the key revoked or rotated."""
        if isinstance(error, dict) and error.get("code") == "unauthorized":
            message = str(error.get("message", ""))[:2000]
            self._fail_all(
                AuthenticationError(
                    f"the cluster stopped accepting this API key ({message}): ask its admin for a new one, then "
                    "pass api_key=, set BURLA_API_KEY, or run `burla login URL`"
                )
            )
        else:
            trace("client", f"events: the daemon says {str(error)[:200]}")

    def _fail_all(self, error: BurlaError) -> None:
        for job in list(self.jobs.values()):
            job.fail(error)
        self.jobs.clear()

"""The control plane: the scheduler's decisions, persisted and delivered.

`ControlPlane` is what the HTTP routes call, the one facade over the parts:
the `Store` (durable state, store.py), the `Scheduler` (decisions,
scheduler.py), the `Couriers` that deliver leases, cancels and pool wants to
agents (delivery.py), the `Feeds` that push each job's events to its followers
(feeds.py), and the `BlobStore` of content-addressed files (blobs.py). What is
decided here: who may act on what, and what each decision writes.

Every method runs on the trio thread; SQLite calls are short and made inline.
Each public decision runs inside `_decision()`: one store transaction, so a
crash never leaves half of one, and the events it recorded are pushed to their
followers only once it has committed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import trio

from burla.common import local
from burla.common import version as _version
from burla.common.config import DaemonConfig
from burla.common.trace import trace
from burla.schemas import messages as m
from burla.schemas import wire
from burla.schemas.wire import WireError

from . import status_text
from .access import Access, check_blob_indices, within
from .blobs import BlobStore
from .delivery import AgentLink, Couriers
from .errors import BadRequest, Conflict, Forbidden, NotFound, TooLarge, Unsatisfiable, VersionMismatch
from .feeds import FRAME_BYTES, SPILL_BYTES, Events, Feeds, Follower
from .placement import TooLarge as CallTooLarge
from .retry_policy import retryable_error
from .scheduler import ActiveLease, Completion, JobState, Scheduler
from .state_dir import TOKENS_FILE, read_tokens
from .store import Store
from .users import BOOTSTRAP, Principal, Sessions, Users

if TYPE_CHECKING:  # only a daemon that starts its own nodes loads them (server.py), not every one at its start
    from .dist import Dist
    from .node_keeper import NodeKeeper

log = logging.getLogger("burla.daemon")

STATUS_ATTEMPTS = 20  # failed attempts of each job shown by `burla status` (GET /v1/jobs/ID: up to 1000)
_FINAL = (m.DONE, m.FAILED, m.CANCELLED)
_NO_SPEC = m.JobSpec("0" * 32, "", "0" * 64, "3.11")  # stands for a spec that cannot be read: no options


def _runs_alone(job: JobState) -> bool:
    """A detached job runs on without anyone following it, once every input is uploaded: until then its caller
    must be there (a caller gone mid-upload left a job that can never finish), so client_grace still holds."""
    return job.spec.detach and job.n_inputs is not None


P = ParamSpec("P")
R = TypeVar("R")


def _decides(method: Callable[Concatenate[ControlPlane, P], R]) -> Callable[Concatenate[ControlPlane, P], R]:
    """A public decision of the control plane: it runs in one store transaction (see `_decision`)."""

    def decide(self: ControlPlane, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._decision():
            return method(self, *args, **kwargs)

    functools.update_wrapper(decide, method)
    return decide


class ControlPlane:
    def __init__(self, store: Store, config: DaemonConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.boot_id = uuid.uuid4().hex[:12]
        self.version, self.protocol = _version.version(), _version.protocol()
        self.scheduler = Scheduler(
            config.target_lease_seconds, config.max_lease_inputs, store.max_lease_id() + 1, config.prefetch_per_slot,
            config.infra_retries,
        )  # fmt: skip
        self.counters: collections.Counter[str] = collections.Counter()
        self.couriers = Couriers(store, self.scheduler, self.boot_id, self.counters)
        self.links = self.couriers.links
        self.feeds = Feeds(store)
        self.blobs = BlobStore(store.payloads.root / ".blobs", config.max_blob_bytes)
        self.access = Access(self.scheduler, self.couriers, self.blobs, bytes.fromhex(store.secret("agent-key")))
        self._deciding = False
        self._recorded: list[tuple[str, m.Event, memoryview | bytes | None]] = []  # to publish on commit
        known = read_tokens(store.path.parent / TOKENS_FILE)  # the plaintext, kept for people in a 0600 file
        self.tokens = store.tokens(config.admin_token, config.node_token, known)
        self.token_hashes = store.token_hashes()
        self.users = Users(store, clock)
        self.sessions = Sessions()  # users' open event websockets: ended when their key ends
        self.last_activity = clock()
        self.started = clock()
        self._job_created = trio.Event()
        self._retry_delayed = trio.Event()  # a failed call waits for its backoff: `release_retries` wakes
        self.keeper: NodeKeeper | None = None  # the cluster's machines, when the daemon starts its own
        self.notes: dict[str, str] = {}  # job -> why it has fewer nodes than it wants (node_keeper)
        self.dist: Dist | None = None  # the wheels booting cluster nodes install
        self.scheduler.standby = [m.StandbyImage.from_wire(s) for s in store.standby()]
        with self._decision():
            self._restore()

    @property
    def standby_version(self) -> int:
        return self.couriers.standby_version

    # ---- one transaction per decision --------------------------------------------------

    @contextlib.contextmanager
    def _decision(self) -> Iterator[None]:
        """One public decision: its writes commit together or not at all; then its events are pushed.

        Nested decisions (a retried create_job adding its inputs) join the outer one.
        """
        if self._deciding:
            yield
            return
        self._deciding = True
        try:
            with self.store.tx():
                yield
        except BaseException:
            self._recorded.clear()  # never recorded: never pushed
            raise
        finally:
            self._deciding = False
        recorded, self._recorded = self._recorded, []
        for job_id, event, payload in recorded:
            self.feeds.publish(job_id, event, payload)

    def _record(
        self,
        job_id: str,
        kind: str,
        lo: int = 0,
        hi: int = 0,
        data: dict[str, Any] | None = None,
        payload: memoryview | bytes | None = None,
    ) -> None:
        """Append an event to the job's record; its followers get it from memory once the decision commits."""
        seq, ref = self.store.add_event(job_id, kind, lo, hi, data, payload)
        event = m.Event(seq, kind, lo, hi, data or {})
        if payload is not None and ref is not None and len(payload) > SPILL_BYTES:
            event, payload = dataclasses.replace(event, size=len(payload), ref=ref), None  # fetched, not pushed
        self._recorded.append((job_id, event, payload))

    # ---- restart ---------------------------------------------------------------

    def _restore(self) -> None:
        """Rebuild in-memory state from the store after a (re)start."""
        now = self.clock()
        for agent_id, info in self.store.agents():
            # a grace period: silent ones expire later; a cluster node's hold comes back with the node keeper
            self.scheduler.add_node(agent_id, info, now, single_tenant=bool(info.instance))
            self.couriers.add(agent_id)
        for job in self.store.running_jobs():
            if "error" not in job:
                try:
                    state = self.scheduler.restore_job(
                        job["spec"], job["created"], job["batches"], job["n_inputs"], job["done"], job["leases"],
                        job["owner"], job["attempts"], job["failed"],
                    )  # fmt: skip
                except (ValueError, TypeError, OverflowError, KeyError) as e:
                    self.scheduler.forget_job(job["spec"].job_id)
                    job = {"job_id": job["spec"].job_id, "error": f"{type(e).__name__}: {e}"}
            if "error" in job:  # a row this daemon cannot use: fail that job, saying why, and start anyway
                self._fail_unrestorable(job["job_id"], job["error"])
                continue
            # its client has client_grace to reconnect
            self.feeds.open(state.job_id, now, log_bytes=self.store.log_bytes(state.job_id))
            self.counters["jobs_restored"] += 1
            if state.complete():
                self._finish(state, m.JOB_DONE)
        self._dispatch()

    def _fail_unrestorable(self, job_id: str, why: str) -> None:
        log.error("job %s cannot be restored from %s (%s): it fails", job_id, self.store.path, why)
        message = (
            f"job {job_id} could not be restored after burlad restarted: its record in {self.store.path.name} "
            f"cannot be used ({why}). Run the job again."
        )
        self._record(job_id, m.FAILED, data={"kind": m.SYSTEM, "index": -1, "type_name": "", "message": message})
        self.store.set_job_state(job_id, m.JOB_FAILED, self.clock())  # its inputs and leases go too
        self.couriers.cancel_everywhere(job_id)
        self.counters["jobs_unrestorable"] += 1

    # ---- jobs (client side) --------------------------------------------------------

    @_decides
    def create_job(
        self,
        spec: m.JobSpec,
        function_blob: memoryview,
        batches: Sequence[tuple[m.BatchMeta, memoryview | None]],
        final_count: int | None,
        payload_proof: str = "",
        who: Principal | None = None,
    ) -> None:
        """A new job of `who` (None: the admin token's user)."""
        self.last_activity = self.clock()
        owner = who.name if who is not None else BOOTSTRAP
        existing = self.store.job_owner(spec.job_id)
        if existing is not None:
            if existing != owner:
                raise Conflict(f"job id {spec.job_id} is taken: make the job again with a new id")
            if spec.job_id in self.scheduler.jobs:  # a retried request: take the batches it carried
                self.add_inputs(spec.job_id, batches, final_count, payload_proof, who)
                return
            raise Conflict(f"job {spec.job_id} already exists and has finished")
        if len(function_blob) > self.config.max_function_bytes:
            raise TooLarge(
                f"the pickled function {spec.function_name!r} is {len(function_blob) / 1e6:.1f} MB, over this "
                f"cluster's limit of {self.config.max_function_bytes / 1e6:.0f} MB (daemon.max_function_bytes)"
            )
        if hashlib.sha256(function_blob).hexdigest() != spec.function_hash:
            # content addressing is only safe checked: another job's hash with other code would run in its place
            raise BadRequest("spec.function_hash: not the sha256 of the pickled function sent with the job")
        if spec.func_cpu <= 0 or spec.func_ram <= 0:
            raise BadRequest("func_cpu and func_ram must be positive")
        if spec.max_parallelism is not None and spec.max_parallelism < 1:
            raise BadRequest("max_parallelism must be at least 1")
        if any(not name or len(name) > m.TYPE_NAME for name in spec.retry_on):
            raise BadRequest(f"spec.retry_on: each a class's qualified name, of 1 to {m.TYPE_NAME} characters")
        for what, digest in (("build context", spec.build), ("environment", spec.env)):
            if digest and not self.blobs.has(digest):
                raise BadRequest(f"no {what} {digest}: upload it first (PUT /v1/blobs/DIGEST)")
        reason = self.scheduler.infeasible(spec)
        keeper = self.keeper
        if keeper is not None and not spec.image and not spec.build:
            why = keeper.cannot_run(spec)  # the cluster's groups, which it may start, before any node registered
            if why:
                raise Unsatisfiable(why)
            if isinstance(reason, CallTooLarge):
                reason = None  # a bigger node of another group can be started for it
        if reason is not None:
            raise Unsatisfiable(status_text.unfit(reason))
        self._check_batches(spec.job_id, batches, payload_proof)
        self.store.create_job(spec, bytes(function_blob), self.clock(), owner)
        self.scheduler.add_job(spec, self.clock(), owner)
        self.feeds.open(spec.job_id, self.clock())
        self.counters["jobs"] += 1
        self._job_created.set()
        self._job_created = trio.Event()
        self.add_inputs(spec.job_id, batches, final_count, payload_proof, who)
        log.info("job %s of user %s: %s", spec.job_id, owner, spec.function_name[:200])
        if self.keeper is not None:
            self.keeper.wake()

    def _check_batches(
        self, job_id: str, batches: Sequence[tuple[m.BatchMeta, memoryview | None]], payload_proof: str
    ) -> None:
        for meta, payload in batches:
            if meta.count < 0 or meta.start < 0:
                raise BadRequest(f"batch {meta.seq}: negative start or count")
            if meta.payload_ref:
                payloads = self.store.payloads
                if not payload_proof or not hmac.compare_digest(payload_proof, payloads.secret):
                    raise BadRequest(f"batch {meta.seq}: a payload_ref needs the payload directory's proof")
                if meta.payload_ref != local.batch_ref(job_id, meta.seq) or not payloads.exists(meta.payload_ref):
                    raise BadRequest(f"batch {meta.seq}: no payload file {meta.payload_ref!r} for this job")
                size = payloads.path(meta.payload_ref).stat().st_size
            else:
                size = len(payload) if payload is not None else 0
            if size > self.config.max_input_bytes * max(1, meta.count):
                raise TooLarge(f"batch {meta.seq} is over the input size limit")

    def note_activity(self) -> None:
        """A client is here (a daemon started on demand stays up while one is)."""
        self.last_activity = self.clock()

    def python_versions(self) -> list[str]:
        """The Python versions the cluster's nodes run."""
        return sorted({n.info.python_version for n in self.scheduler.nodes.values()})

    def node_count(self) -> int:
        return len(self.scheduler.nodes)

    def standby(self) -> list[m.StandbyImage]:
        """What container nodes keep warm (`set_standby`); `standby_version` counts its changes."""
        return list(self.scheduler.standby)

    def payload_info(self) -> dict[str, Any]:
        """Where large payloads live, for clients on this host (common.local)."""
        payloads = self.store.payloads
        return {"host": payloads.host, "dir": str(payloads.root), "inline_limit": payloads.inline_limit}

    def _job(self, job_id: str, who: Principal | None = None) -> JobState:
        """A running job that `who` may act on (None: the daemon itself, or any admin)."""
        self._visible(job_id, who)
        job = self.scheduler.jobs.get(job_id)
        if job is None:
            if self.store.job_exists(job_id):
                raise Conflict(f"job {job_id} has finished")
            raise NotFound(f"no job {job_id}")
        return job

    def _owner(self, job_id: str) -> str | None:
        """Who made the job, running or finished (None: no such job)."""
        job = self.scheduler.jobs.get(job_id)
        return job.owner if job is not None else self.store.job_owner(job_id)

    def _visible(self, job_id: str, who: Principal | None) -> None:
        """Another user's job is answered as no job at all: its id says nothing, and its existence is not told."""
        if who is None or who.admin:
            return
        owner = self._owner(job_id)
        if owner is not None and not who.may_act_on(owner):
            raise NotFound(f"no job {job_id}")

    @_decides
    def add_inputs(
        self,
        job_id: str,
        batches: Sequence[tuple[m.BatchMeta, memoryview | None]],
        final_count: int | None,
        payload_proof: str = "",
        who: Principal | None = None,
    ) -> None:
        self.last_activity = self.clock()
        trace("daemon", f"inputs {job_id[:8]} {[b.seq for b, _ in batches]} final={final_count}")
        job = self._job(job_id, who)
        if job.state != m.RUNNING:
            return  # a failed or cancelled job takes no more inputs; the client learns why from its events
        self._check_batches(job_id, batches, payload_proof)
        new = {b.seq for b in self.scheduler.add_batches(job_id, [b for b, _ in batches], final_count)}
        self.store.add_batches(job_id, [(b, p) for b, p in batches if b.seq in new], final_count)
        if job.complete():
            self._finish(job, m.JOB_DONE)
        self._dispatch()
        self.feeds.notify(job_id)

    @_decides
    def cancel_job(self, job_id: str, reason: str, who: Principal | None = None) -> None:
        job = self._job(job_id, who)
        if job.state == m.RUNNING:
            self._record(job_id, m.CANCELLED, data={"reason": reason})
            self._finish(job, m.JOB_CANCELLED)
            self.counters["jobs_cancelled"] += 1
            if who is not None and who.name != job.owner:
                log.info("job %s of user %s cancelled by %s: %s", job_id, job.owner, who.name, reason[:200])

    @_decides
    def cancel_jobs_of(self, user: str, reason: str) -> list[str]:
        """Cancel every running job of `user` (who is being removed); returns their ids."""
        jobs = [j.job_id for j in self.scheduler.jobs.values() if j.owner == user and j.state == m.RUNNING]
        for job_id in jobs:
            self.cancel_job(job_id, reason)
        return jobs

    def follow_started(self, job_id: str) -> None:
        self.feeds.follow_started(job_id)

    def follow_ended(self, job_id: str) -> None:
        self.feeds.follow_ended(job_id, self.clock())

    @_decides
    def cancel_abandoned_jobs(self) -> list[str]:
        """Cancel running jobs nobody has followed for `client_grace`: their caller left without cancelling."""
        now = self.clock()
        grace = self.config.client_grace
        abandoned = [
            job_id
            for job_id in self.feeds.unfollowed(now, grace)
            if (job := self.scheduler.jobs.get(job_id)) is not None and job.state == m.RUNNING and not _runs_alone(job)
        ]
        for job_id in abandoned:
            log.warning("job %s: no client has followed it for %.0f s: cancelled", job_id, grace)
            self.cancel_job(job_id, f"its client has been gone for over {grace:.0f} s (daemon.client_grace)")
            self.counters["jobs_abandoned"] += 1
        self.feeds.stop_watching(
            [
                j
                for j in self.feeds.unfollowed_since
                if (job := self.scheduler.jobs.get(j)) is None or _runs_alone(job) or j in abandoned
            ]
        )
        return abandoned

    @_decides
    def ack_job(self, job_id: str, who: Principal | None = None) -> None:
        """The client has every event of a finished job: forget it. A detached job is kept for job_retention
        whoever reads it, so that it can be reattached and its results fetched again until then."""
        try:
            self._visible(job_id, who)
        except NotFound:
            return  # not theirs to forget
        job = self.scheduler.jobs.get(job_id)
        if job is not None and (job.state == m.RUNNING or job.spec.detach):
            return
        if job is None and self._stored_spec(job_id, "ack").detach:
            return
        self.scheduler.forget_job(job_id)
        self.feeds.close(job_id)
        self.access.forget(job_id)
        self.store.delete_job(job_id)

    async def wait_job(self, job_id: str, timeout: float, who: Principal | None = None) -> None:
        """Wait until `job_id` exists (a client opens its events while creating it); another user's job
        is waited for as one that does not exist."""
        with trio.move_on_after(timeout):
            while not self.has_job(job_id, who):
                await self._job_created.wait()

    def has_job(self, job_id: str, who: Principal | None = None) -> bool:
        """Whether `job_id` exists (running or finished) and is `who`'s to see."""
        owner = self._owner(job_id)
        return owner is not None and (who is None or who.may_act_on(owner))

    def _stored_spec(self, job_id: str, why: str) -> m.JobSpec:
        """The spec of a job as SQLite keeps it; a row that cannot be read is a job with no options."""
        row = self.store.job_row(job_id)
        try:
            return m.JobSpec.from_wire(wire.loads(row["spec"])) if row else _NO_SPEC
        except (WireError, ValueError, TypeError):
            log.warning("job %s: its stored spec cannot be read (%s)", job_id, why)
            return _NO_SPEC

    def _stored_status(self, row: dict[str, Any]) -> m.JobStatus:
        """A job the scheduler does not hold (finished before a restart): its record in SQLite is all there is."""
        job_id = str(row["job_id"])
        spec = self._stored_spec(job_id, "status")
        n_inputs = row["n_inputs"]
        done, failed = self.store.inputs_done(job_id)
        return m.JobStatus(
            job_id,
            str(row["state"]),
            function_name=spec.function_name,
            n_inputs=n_inputs if isinstance(n_inputs, int) else None,
            n_uploaded=n_inputs if isinstance(n_inputs, int) else 0,
            n_done=done,
            failed=failed,
            created=float(row["created"] or 0.0),
            owner=str(row["owner"] or ""),
            detached=spec.detach,
            finished=float(row["finished"] or 0.0),
        )

    def list_jobs(self, who: Principal | None = None, limit: int = 1000) -> list[m.JobStatus]:
        """The newest jobs the daemon keeps, newest first: a user's own, every job for an admin (or None)."""
        owner = None if who is None or who.admin else who.name
        now = self.clock()
        out = []
        for row in self.store.job_rows(owner, limit):
            job = self.scheduler.jobs.get(str(row["job_id"]))
            if job is None:
                out.append(self._stored_status(row))
                continue
            status = status_text.job_status(self.scheduler.job_progress(job, now))
            if job.state != m.RUNNING:
                status = dataclasses.replace(status, phase="", finished=float(row["finished"] or 0.0))
            out.append(status)
        return out

    def job_status(self, job_id: str, who: Principal | None = None, attempts: int = 0) -> m.JobStatus:
        """Where a job stands; with its latest `attempts` failed attempts (its record: `burla status`, the
        job's route; the status pushed with every event carries none)."""
        self._visible(job_id, who)
        job = self.scheduler.jobs.get(job_id)
        if job is None:  # finished before a restart (or failed restoring it): its record in SQLite is all there is
            row = self.store.job_row(job_id)
            if row is None:
                raise NotFound(f"no job {job_id}")
            status = self._stored_status(row)
            if not attempts:
                return status
            kept = tuple(self.store.attempts(job_id, attempts))
            return dataclasses.replace(status, retried=sum(a.retried for a in kept), attempts=kept)
        status = status_text.job_status(self.scheduler.job_progress(job, self.clock()))
        if attempts:
            status = dataclasses.replace(status, attempts=tuple(job.history)[-attempts:])
        if job.state != m.RUNNING:  # finished, kept until acked or job_retention: when, and no phase any more
            row = self.store.job_row(job_id)
            return dataclasses.replace(status, phase="", finished=float(row["finished"] or 0.0) if row else 0.0)
        note = self.notes.get(job_id)
        return (
            dataclasses.replace(status, phase=f"{status.phase}; {note}" if status.phase else note) if note else status
        )

    def follow(self, job_id: str, after: int) -> contextlib.AbstractContextManager[Follower]:
        """Follow a job's events from sequence `after` (a websocket subscription): see `next_events`."""
        return self.feeds.follow(job_id, after)

    async def next_events(self, follower: Follower, timeout: float) -> Events:
        """A follower's next events; waits up to `timeout` for the first one.

        They come from memory as they are recorded; from SQLite when the follower catches up.
        Payloads over `SPILL_BYTES` are not pushed: their events say where to fetch them.
        """
        return await self.feeds.wait(follower, timeout)

    async def job_logs(
        self, job_id: str, after: int, timeout: float, who: Principal | None = None
    ) -> tuple[Events, int]:
        """What the job's calls printed after event `after`, with its notices and its final event (read from
        SQLite, at most a frame's worth at a time); waits up to `timeout` for some while it runs.

        Also returns the sequence to ask from next time: past the events of other kinds seen on the way, so
        neither a wake here nor the next request scans a job's results again."""
        self._visible(job_id, who)
        if not self.store.job_exists(job_id):
            raise NotFound(f"no job {job_id}")
        kinds = (m.LOGS, m.NOTICE, *_FINAL)

        def scan(since: int) -> tuple[Events, int]:
            top = self.store.last_seq(job_id)  # no await between: nothing is recorded in between
            found = self.store.events_after(job_id, since, FRAME_BYTES, kinds=kinds)
            return found, found[-1][0].seq if found else max(since, top)

        events, cursor = scan(after)
        job = self.scheduler.jobs.get(job_id)
        if events or timeout <= 0 or job is None or job.state != m.RUNNING:
            return events, cursor
        deadline = trio.current_time() + timeout
        with self.follow(job_id, cursor) as follower:  # behind: woken by each new event, and holds none of them
            while True:
                with trio.move_on_at(deadline):
                    await follower.wake.wait()
                follower.wake = trio.Event()
                events, cursor = scan(cursor)
                if events or trio.current_time() >= deadline or job.state != m.RUNNING:
                    return events, cursor

    async def wait_events(self, job_id: str, after: int, timeout: float) -> Events:
        """A job's events after `after`; waits up to `timeout` for the first one."""
        with self.follow(job_id, after) as follower:
            return await self.next_events(follower, timeout)

    def event_payload(self, job_id: str, seq: int, who: Principal | None = None) -> Path:
        """The file of a payload too large to push (see `wait_events`), of a running or a finished job."""
        self._visible(job_id, who)
        if self._owner(job_id) is None:
            raise NotFound(f"no job {job_id}")
        path = self.store.event_payload(job_id, seq)
        if path is None or not path.is_file():
            raise NotFound(f"no payload for event {seq} of job {job_id}")
        return path

    def _finish(self, job: JobState, state: str) -> None:
        """A job ended: record it, stop its leases, tell its agents and its client."""
        stopped = self.scheduler.finish_job(job.job_id, state)
        self._stop_on_agents(job.job_id, stopped)
        feed = self.feeds.jobs.get(job.job_id)
        if feed is not None and feed.dropped_lines:
            self._record(
                job.job_id,
                m.NOTICE,
                data={
                    "message": f"{feed.dropped_lines} lines ({feed.dropped_bytes / 1e6:.1f} MB) of output were "
                    f"dropped: the job printed more than daemon.max_log_bytes_per_job "
                    f"({self.config.max_log_bytes_per_job / 1e6:.0f} MB)"
                },
            )
        if state == m.JOB_DONE:
            self._record(job.job_id, m.DONE, data={"n_inputs": job.n_inputs})
        self.store.set_job_state(job.job_id, state, self.clock())
        self.feeds.notify(job.job_id)
        self._plan_pools()  # its nodes go back to standby
        self.notes.pop(job.job_id, None)
        if self.keeper is not None:
            self.keeper.wake()  # its cluster nodes are free again

    @_decides
    def fail_job(self, job_id: str, type_name: str, message: str) -> None:
        """End a running job with a failure of Burla's own (a SYSTEM error its caller raises)."""
        job = self.scheduler.jobs.get(job_id)
        if job is None or job.state != m.RUNNING:
            return
        self._record(job_id, m.FAILED, data={"kind": m.SYSTEM, "index": -1, "type_name": type_name, "message": message})
        self._finish(job, m.JOB_FAILED)

    @_decides
    def forget_agent(self, agent_id: str, why: str) -> None:
        """The agent's machine is gone: its leases run elsewhere now, not after agent_timeout."""
        if agent_id not in self.scheduler.nodes:
            return
        lease_ids = self.scheduler.remove_node(agent_id, f"its machine is gone ({why})")
        self.store.delete_leases(lease_ids)
        self.couriers.drop(agent_id)
        self.store.delete_agents([agent_id])
        log.warning("agent %s is gone (%s): %d leases requeued", agent_id, why, len(lease_ids))
        self._take_losses()
        self._dispatch()

    @_decides
    def hold(self, agent_id: str, job_id: str | None) -> None:
        """A cluster node runs `job_id` only from now on (None: no job)."""
        self.store.delete_leases(self.scheduler.hold(agent_id, job_id))
        self._dispatch()

    def _stop_on_agents(self, job_id: str, stopped: list[tuple[str, int]]) -> None:
        self.store.delete_leases([lid for _, lid in stopped])
        self.couriers.cancel(job_id, {a for a, _ in stopped})

    # ---- agents -----------------------------------------------------------------------

    @_decides
    def register(self, info: m.NodeInfo, instance: str = "") -> m.Registered:
        """A node agent joins. `instance`: the cluster node whose own token it registered with ("": the
        shared node token, an agent started by hand); such a node runs one job at a time."""
        if info.instance != instance:
            raise Forbidden(
                f"NodeInfo.instance: {info.instance!r} registered with the token of "
                + (f"instance {instance!r}" if instance else "no instance (the shared node token)")
            )
        if not m.compatible(self.version, self.protocol, info.agent_version, info.protocol):
            raise VersionMismatch(
                f"the node agent on {info.hostname} runs Burla {info.agent_version or '(unknown)'} "
                f"(protocol {info.protocol}), this daemon Burla {self.version} (protocol {self.protocol}): "
                f"they cannot work together. Install burla=={self.version} on {info.hostname} and restart the "
                "agent, or run a daemon of the agent's version."
            )
        agent_id = uuid.uuid4().hex[:16]
        now = self.clock()
        requeued = self.scheduler.add_node(agent_id, info, now, single_tenant=bool(instance))
        self.store.delete_leases(requeued)
        self._take_losses()
        self.store.delete_agents(self.couriers.drop_stale())
        self.store.put_agent(agent_id, info, now)
        self.couriers.add(agent_id)
        self.counters["agents_registered"] += 1
        log.info("agent %s registered: %s, %d CPUs, %d workers", agent_id, info.hostname, info.cpus, info.workers)
        if instance and self.keeper is not None:
            self.keeper.registered(instance, agent_id)
        self._dispatch()
        payloads = self.store.payloads
        return m.Registered(
            agent_id,
            self.boot_id,
            self.config.poll_timeout,
            self.config.agent_timeout,
            payload_host=payloads.host,
            payload_dir=str(payloads.root),
            agent_token=self.agent_token(agent_id),
            max_result_bytes=self.config.max_result_bytes,
        )

    # ---- who may act on what (daemon/access.py) ------------------------------------------

    def agent_token(self, agent_id: str) -> str:
        return self.access.agent_token(agent_id)

    def is_agent(self, agent_id: str, token: str) -> bool:
        return self.access.is_agent(agent_id, token)

    def _link(self, agent_id: str) -> AgentLink:
        return self.couriers.link(agent_id)

    @_decides
    def report(
        self, agent_id: str, report: m.AgentReport, blobs: Sequence[memoryview]
    ) -> tuple[m.Delivery, list[bytes]]:
        """Take an agent's results and logs; return whatever waits for it, without waiting."""
        link = self._link(agent_id)
        check_blob_indices(report, len(blobs))  # before anything is decided: a bad report changes nothing
        if report.payload_proof:
            link.reads_payloads = hmac.compare_digest(report.payload_proof, self.store.payloads.secret)
        holding = self.access.held(agent_id)
        jobs = self.access.jobs_of(agent_id, holding)  # an agent speaks only for the jobs it works for
        held = {a.lease.lease_id: a.lease for a in holding}
        self.scheduler.touch_node(
            agent_id, self.clock(), report.ready_workers, report.stats, report.pools, report.job_phases
        )
        for error in report.pool_errors:
            if error.job_id in jobs:
                self._pool_failed(error)
            else:
                self._refused(agent_id, f"a pool error for job {error.job_id}, which it does not work for")
        for chunk in report.logs:  # lines printed by a lease come before its result
            if chunk.job_id in jobs:
                self._append_logs(chunk, blobs)
            else:
                self._refused(agent_id, f"output of job {chunk.job_id}, which it does not work for")
        for result in report.results:
            lease = held.get(result.lease_id) or link.requeued.get(result.lease_id)
            if lease is not None and within(result, lease):
                link.requeued.pop(result.lease_id, None)
                self._accept(agent_id, result, blobs)
            elif lease is not None:  # its own lease, but a result for another job or range: forged or broken
                self._refused(agent_id, f"a result of lease {result.lease_id} outside its job or range")
            else:  # never issued to it, or no longer its own: its range runs (or ran) elsewhere
                self.counters["results_dropped"] += 1
                log.debug("agent %s: result of lease %d it does not hold: dropped", agent_id, result.lease_id)
        self._reconcile(agent_id, report)
        self._dispatch()
        return self.couriers.drain(link)

    async def poll(
        self, agent_id: str, report: m.AgentReport, blobs: Sequence[memoryview]
    ) -> tuple[m.Delivery, list[bytes]]:
        """Like `report`, but waits up to poll_timeout for something to deliver."""
        delivery = self.report(agent_id, report, blobs)
        if delivery[0].delivery:
            return delivery
        await self.couriers.wait(self._link(agent_id), self.config.poll_timeout)
        link = self._link(agent_id)
        self.scheduler.touch_node(agent_id, self.clock())
        return self.couriers.drain(link)

    def _reconcile(self, agent_id: str, report: m.AgentReport) -> None:
        """Requeue leases the agent was sent but no longer holds (a delivery was lost)."""
        node = self.scheduler.nodes[agent_id]
        held = set(report.running)
        gone: list[ActiveLease] = []
        for lease_id in node.leases:
            job = self.scheduler.jobs.get(self.scheduler.lease_owner.get(lease_id, ""))
            active = job.leases.get(lease_id) if job else None
            if active is None or active.delivered is None or lease_id in held:
                continue
            if active.delivered == 0 or (report.boot_id == self.boot_id and active.delivered <= report.ack_delivery):
                gone.append(active)
        if gone:
            lost = [a.lease.lease_id for a in gone]
            log.warning("agent %s does not hold leases %s: requeued", agent_id, lost)
            link = self.links.get(agent_id)
            if link is not None:
                link.remember_requeued(a.lease for a in gone)
            self.scheduler.requeue(lost)
            self.store.delete_leases(lost)
            self.counters["leases_lost"] += len(lost)

    def _accept(self, agent_id: str, result: m.LeaseResult, blobs: Sequence[memoryview]) -> None:
        now = self.clock()
        trace("daemon", f"result lease={result.lease_id} lo={result.lo} n={result.n_ok}")
        error = result.error
        job = self.scheduler.jobs.get(result.job_id)
        retryable = error is not None and job is not None and retryable_error(job.spec, error)
        c: Completion = self.scheduler.complete(
            result.job_id, result.lease_id, result.lo, result.n_ok, result.elapsed, error, now, retryable
        )
        if not c.accepted or c.job is None:
            self.store.delete_leases([result.lease_id])
            self.counters["results_dropped"] += 1
            log.debug("result of lease %d dropped: %s", result.lease_id, c.reason)
            return
        self.counters["results_accepted"] += 1
        self.store.delete_leases([result.lease_id, *c.superseded])
        if c.hi > c.lo:
            self._record(result.job_id, m.RESULTS, c.lo, c.hi, payload=blobs[result.results_blob])
        if c.attempt is not None:
            self.store.add_attempt(result.job_id, c.attempt)
        if c.error_dropped:
            error = None  # its input runs again elsewhere: that run's answer decides
        if error is not None and c.retry_in is not None and c.attempt is not None:
            self._record(result.job_id, m.RETRY, c.at, c.at + 1, data=c.attempt.to_wire())
            self.counters["calls_retried"] += 1
            self._retry_delayed.set()
        elif error is not None:
            exc = blobs[error.exc_blob] if error.exc_blob is not None else None
            data = dataclasses.replace(error, exc_blob=None, index=c.at).to_wire()
            data["has_exception"] = exc is not None
            kind = m.CALL_FAILED if c.call_failed else m.FAILED
            self._record(result.job_id, kind, c.at, c.at + 1, data=data, payload=exc)
            if c.call_failed:
                self.counters["calls_failed"] += 1
                if c.job_done:
                    self._finish(c.job, m.JOB_DONE)
            else:
                self.counters["jobs_failed"] += 1
                self._stop_on_agents(result.job_id, c.stopped)
                self._finish(c.job, m.JOB_FAILED)
        elif c.job_done:
            self._finish(c.job, m.JOB_DONE)

    def _take_losses(self) -> None:
        """Calls of lost nodes (`Scheduler.remove_node`): each loss kept in its job's record; a range lost
        past `infra_retries` fails with a NodeLostError naming the input and every loss."""
        losses, self.scheduler.losses = self.scheduler.losses, []
        for lost in losses:
            job = lost.job
            self.store.add_attempt(job.job_id, lost.attempt)
            if not lost.exhausted:
                self._record(job.job_id, m.RETRY, lost.lo, lost.hi, data=lost.attempt.to_wire())
                self.counters["calls_lost"] += 1
                continue
            history = [a for a in job.history if a.kind == m.LOST and a.lo < lost.hi and lost.lo < a.hi]
            each = "; ".join(f"{i}) node {a.node or '?'}: {a.message}" for i, a in enumerate(history[-10:], 1))
            span = f" (of inputs #{lost.lo} to #{lost.hi - 1}, run together)" if lost.hi - lost.lo > 1 else ""
            message = (
                f"input #{lost.lo}{span} was lost with its node {lost.attempt.attempt} times, more than "
                f"daemon.infra_retries ({self.config.infra_retries}): {each}"
            )
            error = m.CallError(lost.lo, m.LOST, m.ErrorType.NODE_LOST, message[: m.MAX_ERROR_MESSAGE],
                                node=lost.attempt.node)  # fmt: skip
            data = error.to_wire() | {"has_exception": False}
            if job.spec.return_exceptions:
                self._record(job.job_id, m.CALL_FAILED, lost.lo, lost.hi, data=data)
                self.counters["calls_failed"] += 1
                if job.state == m.RUNNING and job.complete():
                    job.state = m.JOB_DONE
                    self._finish(job, m.JOB_DONE)
            elif lost.stopped is not None and job.state == m.JOB_FAILED:
                self._record(job.job_id, m.FAILED, lost.lo, lost.lo + 1, data=data)
                self.counters["jobs_failed"] += 1
                self._stop_on_agents(job.job_id, lost.stopped)
                self._finish(job, m.JOB_FAILED)

    def _append_logs(self, chunk: m.LogChunk, blobs: Sequence[memoryview]) -> None:
        job = self.scheduler.jobs.get(chunk.job_id)
        feed = self.feeds.jobs.get(chunk.job_id)
        if job is None or feed is None or job.state != m.RUNNING:
            return
        if feed.log_bytes + chunk.nbytes > self.config.max_log_bytes_per_job:
            feed.dropped_bytes += chunk.nbytes
            feed.dropped_lines += chunk.lines
            self.store.add_log_bytes(chunk.job_id, 0, chunk.nbytes, chunk.lines)
            return
        feed.log_bytes += chunk.nbytes
        self._record(chunk.job_id, m.LOGS, data={"lines": chunk.lines}, payload=blobs[chunk.blob])
        self.store.add_log_bytes(chunk.job_id, chunk.nbytes)

    def _pool_failed(self, error: m.PoolError) -> None:
        """A node cannot make the pool a job needs: the job fails, saying why and where."""
        job = self.scheduler.jobs.get(error.job_id)
        if job is None or job.state != m.RUNNING:
            return
        if error.kind == "install":
            type_name, message = m.ErrorType.INSTALL, f"node {error.node}: {error.message}"
        else:
            type_name, message = m.ErrorType.IMAGE, f"image {error.image} on node {error.node}: {error.message}"
        data = m.CallError(index=-1, kind=m.SYSTEM, type_name=type_name, message=message, node=error.node).to_wire()
        self._record(job.job_id, m.FAILED, data=data)
        self.counters["jobs_failed"] += 1
        self._finish(job, m.JOB_FAILED)

    @_decides
    def set_standby(self, images: Sequence[m.StandbyImage]) -> None:
        """Change what container nodes keep warm; agents converge on their next delivery."""
        self.store.set_standby([i.to_wire() for i in images])
        self.scheduler.standby = list(images)
        self.couriers.standby_changed()
        self._dispatch()

    def _plan_pools(self) -> None:
        self.couriers.want(self.scheduler.plan_wants())

    def _dispatch(self) -> None:
        self._plan_pools()
        issued = self.scheduler.assign(self.clock())
        if not issued:
            return
        trace("daemon", f"dispatch {[(a.agent_id[:6], a.lease.lo, a.lease.hi) for a in issued]}")
        self.store.put_leases([(a.lease, a.agent_id) for a in issued])
        self.counters["leases_issued"] += len(issued)
        self.counters["leases_prefetched"] += sum(a.queued for a in issued)
        self.couriers.post(issued)

    def put_blob(self, digest: str, data: bytes) -> None:
        """Keep a content-addressed blob (a build context, an environment's manifest, code or package)."""
        self.blobs.put(digest, data)

    def has_blob(self, digest: str) -> bool:
        return self.blobs.has(digest)

    def blob(self, digest: str, agent_id: str | None = None) -> bytes:
        """A blob; for an agent, only one of a job it works for."""
        if agent_id is not None and not self.access.may_read_blob(agent_id, digest):
            raise Forbidden(f"agent {agent_id} works for no job that uses blob {digest[:12]}")
        return self.blobs.read(digest)

    def function_blob(self, function_hash: str, agent_id: str | None = None) -> bytes:
        """A job's function; for an agent, only while it holds a lease of a job that runs it."""
        if agent_id is not None and not any(a.lease.function_hash == function_hash for a in self.access.held(agent_id)):
            raise Forbidden(f"agent {agent_id} holds no lease that runs function {function_hash[:12]}")
        blob = self.store.function_blob(function_hash)
        if blob is None:
            raise NotFound(f"no function {function_hash}")
        return blob

    def _refused(self, agent_id: str, what: str) -> None:
        self.counters["reports_refused"] += 1
        log.warning("agent %s sent %s: ignored", agent_id, what)

    def batch_payload(self, job_id: str, seq: int, agent_id: str | None = None) -> bytes:
        if agent_id is not None and not any(
            a.lease.job_id == job_id and a.lease.batch_seq == seq for a in self.access.held(agent_id)
        ):
            raise Forbidden(f"agent {agent_id} holds no lease of batch {seq} of job {job_id}")
        payload = self.store.batch_payload(job_id, seq)
        if payload is None:
            raise NotFound(f"no batch {seq} of job {job_id}")
        return payload

    # ---- housekeeping -------------------------------------------------------------------

    @_decides
    def expire_agents(self) -> list[str]:
        """Agents silent past agent_timeout lose their leases, which run elsewhere."""
        now = self.clock()
        dead = self.scheduler.silent_nodes(now, self.config.agent_timeout)
        for agent_id in dead:
            silent = now - self.scheduler.nodes[agent_id].last_seen
            why = f"its agent stopped heartbeating ({silent:.0f} s silent, daemon.agent_timeout)"
            lease_ids = self.scheduler.remove_node(agent_id, why)
            self.store.delete_leases(lease_ids)
            self.couriers.drop(agent_id)
            log.warning(
                "agent %s silent for %.0fs: %d leases requeued", agent_id, self.config.agent_timeout, len(lease_ids)
            )
            self.counters["agents_expired"] += 1
            if self.keeper is not None:
                self.keeper.agent_lost(agent_id)
        if dead:
            self.store.delete_agents(dead)
            self._take_losses()
            self._dispatch()
        return dead

    @_decides
    def expire_jobs(self) -> None:
        """Fail jobs that waited too long for any node; drop finished jobs nobody collected."""
        now = self.clock()
        if not self.scheduler.nodes and not (self.keeper is not None and self.keeper.booting()):
            for job in list(self.scheduler.jobs.values()):
                if job.state == m.RUNNING and now - job.created > self.config.no_node_timeout:
                    self._record(
                        job.job_id,
                        m.FAILED,
                        data={
                            "kind": m.SYSTEM,
                            "index": -1,
                            "type_name": m.ErrorType.NO_NODES,
                            "message": f"no node joined the cluster within {self.config.no_node_timeout:.0f}s "
                            "(daemon.no_node_timeout); start node agents with `burlad agent URL --token-file FILE`",
                        },
                    )
                    self._finish(job, m.JOB_FAILED)
        for job_id in self.store.finished_jobs_before(now - self.config.job_retention):
            self.scheduler.forget_job(job_id)
            self.feeds.close(job_id)
            self.access.forget(job_id)
            self.store.delete_job(job_id)

    def busy(self) -> bool:
        return any(j.state == m.RUNNING for j in self.scheduler.jobs.values())

    async def housekeeping(self) -> None:
        interval = max(0.05, min(self.config.poll_timeout, self.config.agent_timeout) / 4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.release_retries)
            while True:
                await trio.sleep(interval)
                self.expire_agents()
                self.expire_jobs()
                self.cancel_abandoned_jobs()

    async def release_retries(self) -> None:
        """Hand out each failed call whose backoff is over (`retry_delay`): it waits in the scheduler, not on a
        worker, and the lease made for it then is like any other."""
        while True:
            due = self.scheduler.next_retry()
            if due is None:
                self._retry_delayed = trio.Event()
                await self._retry_delayed.wait()
                continue
            with trio.move_on_after(max(0.0, due - self.clock())):
                self._retry_delayed = trio.Event()
                await self._retry_delayed.wait()  # an earlier one may come meanwhile
            if self.clock() >= due:
                self.dispatch()

    @_decides
    def dispatch(self) -> None:
        """Hand out what is pending now (delayed retries whose time has come)."""
        self._dispatch()

    # ---- views ------------------------------------------------------------------------

    def cluster_status(self, who: Principal | None = None) -> m.ClusterStatus:
        """The nodes and the jobs: every job for an admin, a user's own for a user."""
        now = self.clock()
        nodes = tuple(
            m.NodeStatus(
                agent_id=n.agent_id,
                hostname=n.info.hostname,
                state="busy" if n.leases else "idle",
                cpus=n.info.cpus,
                ram_bytes=n.info.ram_bytes,
                python_version=n.info.python_version,
                workers=n.ready_workers,
                busy=n.running,
                runtime=n.info.runtime,
                last_seen_ago=round(now - n.last_seen, 3),
                stats=n.stats,
                pools=tuple(self._pool_seen_by(p, who) for p in n.pool_views()),
            )
            for n in self.scheduler.nodes.values()
        )
        jobs = tuple(
            dataclasses.replace(
                status_text.job_status(self.scheduler.job_progress(j, now)),
                attempts=tuple(j.history)[-STATUS_ATTEMPTS:],
            )
            for j in self.scheduler.jobs.values()
            if who is None or who.may_act_on(j.owner)
        )
        stats = self.statistics() if who is None or who.admin else {"boot_id": self.boot_id}
        return m.ClusterStatus(nodes, jobs, stats)

    def _pool_seen_by(self, pool: m.PoolState, who: Principal | None) -> m.PoolState:
        """A pool made for another user's job shows that it is busy, not whose job, image or phase it is."""
        if not pool.job_id or who is None or who.admin or self.has_job(pool.job_id, who):
            return pool
        return dataclasses.replace(pool, job_id="", image="", phase="another user's job", containers=())

    def statistics(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id,
            "uptime": round(self.clock() - self.started, 3),
            "database": str(self.store.path),
            **self.counters,
        }

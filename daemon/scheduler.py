"""Which inputs run where: the scheduler, as plain logic with no I/O.

The control plane feeds it events (an agent registered, inputs arrived, a
lease came back, an agent went silent) and it returns decisions (these leases
go to these agents, this result is accepted, these leases are cancelled) and
facts (why a job cannot run, what it waits on). The store persists what it
decides; nothing here touches a socket or a file.

Its parts: `pending` (the queue leases are carved from), `placement` (which
node and pool a call fits, CPU and RAM held), `pool_claims` (which pools
container nodes make), `ranges` (the done sets). `status_text` words its facts.

Invariants (see docs/ARCHITECTURE.md):

* Pending intervals are never merged, and leases are carved from the front of
  one interval, so any two lease ranges are nested or disjoint.
* A result is accepted iff its range is disjoint from the job's done set: each
  input's result reaches the user exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
from collections.abc import Iterable

from burla.schemas import messages as m

from . import pool_claims
from .pending import Pending
from .placement import NodeState, Unfit, ram_bytes, slots_for, unfit
from .ranges import RangeSet, subtract
from .retry_policy import fails_every_input

_ESTIMATE_MEMORY = 4096  # function hashes whose call time we remember
# A lease expected to last longer is not prefetched: its round trip costs it under 1% of its time, and a
# slot promised to it for long would keep another user's job waiting.
PREFETCH_MAX_LEASE_SECONDS = 1.0
PREFETCH_MIN_SPLIT_SECONDS = 0.05  # see Scheduler._prefetch_chunk
ATTEMPTS_KEPT = 1000  # failed attempts a job keeps in memory for its status (the store keeps them all)


@dataclasses.dataclass
class ActiveLease:
    lease: m.Lease
    agent_id: str
    delivered: int | None = None  # the delivery that carried it; 0 when restored from disk
    issued: float = 0.0
    queued: bool = False  # prefetched: it waits on its node for the lease before it in its slot


@dataclasses.dataclass
class JobState:
    spec: m.JobSpec
    created: float
    owner: str = ""  # the user who made it ("": one anonymous user)
    state: str = m.RUNNING
    pending: Pending = dataclasses.field(default_factory=Pending)
    leases: dict[int, ActiveLease] = dataclasses.field(default_factory=dict)
    queued: int = 0  # of its leases, those prefetched (waiting on their node for a worker)
    done: RangeSet = dataclasses.field(default_factory=RangeSet)
    n_inputs: int | None = None  # known once the client has sent the last batch
    n_uploaded: int = 0
    batches: dict[int, tuple[int, int]] = dataclasses.field(default_factory=dict)  # seq -> (start, count)
    seconds_per_call: float | None = None
    slots: int = 0  # worker slots the job can use right now, cluster-wide
    round_chunk: int = 1  # lease size for the current assign() round
    first_result_at: float | None = None
    last_result_at: float | None = None
    # failures (retries=, return_exceptions=, infra_retries)
    attempts: dict[int, int] = dataclasses.field(default_factory=dict)  # input -> its failed attempts, until done
    lost: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (lo, hi, times its node was lost)
    delayed: list[tuple[float, int, m.Lease]] = dataclasses.field(default_factory=list)  # heap: (due, n, [at, at+1))
    retried: int = 0  # attempts that failed and ran again
    failed: int = 0  # inputs done with their error (return_exceptions)
    history: collections.deque[m.Attempt] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=ATTEMPTS_KEPT)
    )

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def func_ram_bytes(self) -> int:
        return ram_bytes(self.spec)

    @property
    def n_pending(self) -> int:
        return self.pending.size

    @property
    def running(self) -> int:
        """Leases that hold a worker (the prefetched ones wait for one)."""
        return len(self.leases) - self.queued

    def finished_uploading(self) -> bool:
        return self.n_inputs is not None and self.n_uploaded >= self.n_inputs

    def complete(self) -> bool:
        return self.finished_uploading() and self.done.size >= (self.n_inputs or 0)


@dataclasses.dataclass(frozen=True)
class Phase:
    """What the cluster is doing for a job, as facts (`status_text.phase` puts them in words)."""

    nodes: int  # registered
    preparing: tuple[str, int] | None  # what most nodes preparing for it do (pulling, installing), on how many
    running: int  # leases out
    pending: int  # inputs waiting for a worker


@dataclasses.dataclass(frozen=True)
class Progress:
    """A job's status, its phase still as facts."""

    status: m.JobStatus  # with no phase
    phase: Phase


@dataclasses.dataclass
class Completion:
    """What accepting a lease's result decided."""

    accepted: bool
    job: JobState | None = None
    lo: int = 0
    hi: int = 0  # accepted results: [lo, hi)
    failed: bool = False  # this result's error failed the job
    job_done: bool = False
    superseded: list[int] = dataclasses.field(default_factory=list)
    stopped: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (agent, lease) of a failed job
    reason: str = ""
    at: int = -1  # with an error: the input that failed
    attempt: m.Attempt | None = None  # with an error: the attempt, kept in the job's record
    retry_in: float | None = None  # the failed input runs again after this many seconds (retries=)
    call_failed: bool = False  # the failed input is done with its error (return_exceptions=); the job goes on
    error_dropped: bool = False  # the late error of a lease given up for lost: its input runs again elsewhere


@dataclasses.dataclass
class Lost:
    """Inputs [lo, hi) of a lease whose node was lost: requeued, or, past `infra_retries`, failed."""

    job: JobState
    lo: int
    hi: int
    attempt: m.Attempt
    exhausted: bool = False  # lost more than infra_retries times
    stopped: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # the job failed: leases to stop


class Scheduler:
    def __init__(
        self,
        target_lease_seconds: float = 0.2,
        max_lease_inputs: int = 100_000,
        next_lease_id: int = 1,
        prefetch_per_slot: int = 1,
        infra_retries: int = 3,
    ) -> None:
        self.infra_retries = max(0, infra_retries)
        self._delayed_seq = itertools.count()
        self.target_lease_seconds = target_lease_seconds
        self.max_lease_inputs = max_lease_inputs
        self.prefetch_per_slot = max(0, min(prefetch_per_slot, 16))
        self.next_lease_id = next_lease_id
        self.nodes: dict[str, NodeState] = {}
        self.jobs: dict[str, JobState] = {}
        self.lease_owner: dict[int, str] = {}  # lease id -> job id
        self.losses: list[Lost] = []  # of nodes removed: the control plane takes them (`remove_node`)
        self.standby: list[m.StandbyImage] = []  # what container nodes keep warm between jobs
        self.claims: dict[str, str] = {}  # agent id -> the job whose pool that container node is making
        self._estimates: collections.OrderedDict[str, float] = collections.OrderedDict()

    # ---- nodes -------------------------------------------------------------

    def add_node(self, agent_id: str, info: m.NodeInfo, now: float, single_tenant: bool = False) -> list[int]:
        """Register an agent; returns the leases of earlier agents of the same node, requeued.

        `single_tenant`: a cluster node the daemon started, which runs only the job that holds it (`hold`).
        """
        requeued = []
        for other in [n for n in self.nodes.values() if n.info.node_id == info.node_id and n.agent_id != agent_id]:
            requeued += self.remove_node(other.agent_id)
        self.nodes[agent_id] = NodeState(agent_id, info, now, ready_workers=info.workers, single_tenant=single_tenant)
        return requeued

    def hold(self, agent_id: str, job_id: str | None) -> list[int]:
        """A single-tenant node now takes leases of `job_id` only; returns the leases requeued.

        The node changes hands between leases: the leases of the job before still run there and report
        as usual, and `job_id`'s first lease goes there once they are done (`NodeState.serves`), so a
        handover (fair share, `scaling.plan`) preempts no call. None: the node takes no job any more (its
        job ended); leases of a job before it, still running there after a handover, run to their end
        too. A node that fails or leaves is forgotten (`remove_node`), which requeues what it ran.
        """
        node = self.nodes.get(agent_id)
        if node is None or not node.single_tenant:
            return []
        node.tenant = job_id
        return []

    def touch_node(
        self,
        agent_id: str,
        now: float,
        ready_workers: int | None = None,
        stats: dict[str, object] | None = None,
        pools: Iterable[m.PoolState] | None = None,
        job_phases: dict[str, str] | None = None,
    ) -> None:
        node = self.nodes[agent_id]
        if job_phases is not None:
            node.job_phases = job_phases
        node.last_seen = now
        if ready_workers is not None:
            node.ready_workers = ready_workers
        if stats:
            node.stats = stats
        if pools is not None:
            node.pools = {p.key: p for p in pools}

    def silent_nodes(self, now: float, timeout: float) -> list[str]:
        return [a for a, n in self.nodes.items() if now - n.last_seen > timeout]

    def remove_node(self, agent_id: str, why: str = "") -> list[int]:
        """Forget an agent; its leases go back to pending. Returns their ids.

        `why` (the node was lost: its agent went silent, restarted, its machine is gone): the calls it was
        running count an attempt each (`lose`), and those lost past `infra_retries` fail (`self.losses`).
        """
        node = self.nodes.pop(agent_id, None)
        if node is None:
            return []
        lease_ids = sorted(node.leases)
        if why:
            self.losses += self.lose(lease_ids, why, node.info.hostname, node.last_seen)
        self.requeue(lease_ids)
        return lease_ids

    def lose(self, lease_ids: Iterable[int], why: str, node: str, now: float) -> list[Lost]:
        """Count a lost attempt for the running leases among `lease_ids` (prefetched ones never started).

        A range lost more than `infra_retries` times fails: as its inputs' errors with return_exceptions,
        else the job fails. The rest is left for `requeue`.
        """
        out: list[Lost] = []
        for lease_id in lease_ids:
            job = self.jobs.get(self.lease_owner.get(lease_id, ""))
            active = job.leases.get(lease_id) if job is not None else None
            if job is None or active is None or active.queued or job.state != m.RUNNING:
                continue
            lo, hi = active.lease.lo, active.lease.hi
            times = 1 + max((t for a, b, t in job.lost if a < hi and lo < b), default=0)
            job.lost.append((lo, hi, times))
            exhausted = times > self.infra_retries
            attempt = m.Attempt(lo, hi, times, m.LOST, m.ErrorType.NODE_LOST, why[:4096], node[:255], now,
                                retried=not exhausted)  # fmt: skip
            job.history.append(attempt)
            lost = Lost(job, lo, hi, attempt, exhausted)
            if exhausted:
                self._drop_lease(job, lease_id)
                if job.spec.return_exceptions:
                    for r_lo, r_hi in subtract(lo, hi, job.done):
                        job.done.add(r_lo, r_hi)
                        job.failed += r_hi - r_lo
                else:
                    lost.stopped = self.finish_job(job.job_id, m.JOB_FAILED)
            else:
                job.retried += 1
            out.append(lost)
        return out

    # ---- jobs --------------------------------------------------------------

    def infeasible(self, spec: m.JobSpec) -> Unfit | None:
        """Why no registered node could ever run `spec`, or None (`status_text.unfit` words it).

        With no node registered at all the job waits for one instead.
        """
        return unfit(self.nodes.values(), spec)

    def add_job(self, spec: m.JobSpec, now: float, owner: str = "") -> JobState:
        """A new running job of user `owner` ("": the one anonymous user)."""
        job = JobState(spec, created=now, owner=owner)
        job.seconds_per_call = self._estimates.get(spec.function_hash)
        self.jobs[spec.job_id] = job
        return job

    def add_batches(
        self, job_id: str, batches: Iterable[m.BatchMeta], final_count: int | None = None
    ) -> list[m.BatchMeta]:
        """Queue uploaded batches; returns the ones that were new (uploads are retried)."""
        job = self.jobs[job_id]
        new = []
        for b in batches:
            if b.seq in job.batches or job.state != m.RUNNING:
                continue
            job.batches[b.seq] = (b.start, b.count)
            job.n_uploaded += b.count
            job.pending.add(b.seq, b.start, b.start, b.start + b.count)
            new.append(b)
        if final_count is not None:
            job.n_inputs = final_count
        return new

    def finish_job(self, job_id: str, state: str) -> list[tuple[str, int]]:
        """End a job early (failed or cancelled): returns the (agent, lease) pairs to stop."""
        job = self.jobs.get(job_id)
        if job is None:
            return []
        if job.state == m.RUNNING:
            job.state = state
        stopped = []
        for lease_id, active in list(job.leases.items()):
            stopped.append((active.agent_id, lease_id))
            self._drop_lease(job, lease_id)
        job.pending.clear()
        job.delayed.clear()
        return stopped

    def forget_job(self, job_id: str) -> None:
        self.finish_job(job_id, m.JOB_CANCELLED)
        self.jobs.pop(job_id, None)

    # ---- leases ------------------------------------------------------------

    def assign(self, now: float) -> list[ActiveLease]:
        """Hand pending inputs to free worker slots, and prefetch the next lease of busy ones; returns the
        new leases.

        Fair share: each free slot goes to the user with the fewest calls running (over all their jobs),
        then to that user's job with the fewest, then to the oldest. So a user's job of ten million inputs
        and another user's job of ten split the slots as they free up, and a user with two jobs gets no
        more than one with one. Running calls are never preempted: slots change hands as leases end, and
        leases are sized to last about `target_lease_seconds`.

        Prefetch (`prefetch_per_slot`): a slot busy with a lease of a job whose calls are short gets the
        next lease of the same job ahead of time, queued on its node (`Lease.after`), so its worker goes on
        the moment the lease ends instead of after a report and a poll. Only where fair share would give
        the slot to that job again once the lease ends: when another user's job would get it, the slot
        frees and is handed out as above.
        """
        for job in self.jobs.values():
            while job.delayed and job.delayed[0][0] <= now:
                _, _, lease = heapq.heappop(job.delayed)
                if job.state == m.RUNNING:
                    self.requeue_rest(job, lease, lease.lo)
        runnable = [j for j in self.jobs.values() if j.state == m.RUNNING and j.pending.size > 0]
        if not runnable:
            return []
        for job in runnable:
            job.slots = self._slots_for(job)
            job.round_chunk = self.chunk_size(job)  # fixed for the round: 4 inputs on 2 slots is 2 + 2
        # calls running by user: counted once per call, then kept as leases are carved
        out: collections.Counter[str] = collections.Counter()
        for job in self.jobs.values():
            if job.leases:
                out[job.owner] += job.running
        issued: list[ActiveLease] = []
        nodes = sorted(self.nodes.values(), key=lambda n: n.running - n.ready_workers)
        for node in nodes:
            while node.running < node.ready_workers:
                candidates = [
                    j for j in runnable
                    if j.pending.size > 0 and node.fits(j.spec)
                    and (j.spec.max_parallelism is None or j.running < j.spec.max_parallelism)
                ]  # fmt: skip
                if not candidates:
                    break
                job = min(candidates, key=lambda j: (out[j.owner], j.running, j.created))
                issued.append(self._carve(job, node, now))
                out[job.owner] += 1
        for node in nodes:
            if self.prefetch_per_slot and node.info.runs_after and node.running <= node.ready_workers:
                issued += self._prefetch(node, runnable, out, now)
        return issued

    def _prefetch(
        self, node: NodeState, runnable: list[JobState], out: collections.Counter[str], now: float
    ) -> list[ActiveLease]:
        """The next leases of each busy slot of `node` whose job fair share would give it to again."""
        issued: list[ActiveLease] = []
        while more := self._prefetch_once(node, runnable, out, now):
            issued += more
        return issued

    def _prefetch_once(
        self, node: NodeState, runnable: list[JobState], out: collections.Counter[str], now: float
    ) -> list[ActiveLease]:
        issued: list[ActiveLease] = []
        tails = node.tails(self.prefetch_per_slot)
        if not tails:
            return issued
        servable = [j for j in runnable if j.pending.size > 0 and node.could_serve(j.spec)]
        # a job at its max_parallelism takes no freed slot; the slot's own job keeps its count as it goes on
        rivals = [j for j in servable if j.spec.max_parallelism is None or j.running < j.spec.max_parallelism]
        for tail in tails:
            job = self.jobs.get(self.lease_owner.get(tail, ""))
            if job is None or job.pending.size == 0 or job not in servable:
                continue
            pool = job.leases[tail].lease.pool
            if not self._short_calls(job) or not node.pool_ready(pool):
                continue
            # the slot's lease ends before this one starts: rank its job as if it had one call fewer running
            mine = (out[job.owner] - 1, job.running - 1, job.created)
            if any(
                (out[j.owner] - (j.owner == job.owner), j.running, j.created) < mine for j in rivals if j is not job
            ):
                continue  # another job gets the slot when it frees
            issued.append(self._carve(job, node, now, after=tail, pool=pool, chunk=self._prefetch_chunk(job)))
        return issued

    def _prefetch_chunk(self, job: JobState) -> int:
        """A prefetched lease's size: guided as if each slot's queue were a slot of its own, since it starts
        a lease later than one carved now for a free slot. So near the end it is smaller and the slots finish
        together; but never below `PREFETCH_MIN_SPLIT_SECONDS` of work, where a lease costs more than the
        balance gains (a million trivial calls keep their few large leases)."""
        spc = job.seconds_per_call or 0.0
        guided = math.ceil(job.pending.size / max(1, job.slots * (1 + self.prefetch_per_slot)))
        floor = math.ceil(PREFETCH_MIN_SPLIT_SECONDS / max(spc, 1e-9))
        return max(1, min(job.round_chunk, max(guided, floor)))

    def _short_calls(self, job: JobState) -> bool:
        """Whether `job`'s leases are short enough to prefetch (its call time known: no probe is)."""
        spc = job.seconds_per_call
        return spc is not None and job.round_chunk * spc <= PREFETCH_MAX_LEASE_SECONDS

    def _slots_for(self, job: JobState) -> int:
        return slots_for(self.nodes.values(), job.spec)

    def chunk_size(self, job: JobState) -> int:
        guided = math.ceil(job.pending.size / max(1, job.slots))
        if job.seconds_per_call is None:
            cap = 1  # a probe: learn the call time before handing out more
        else:
            cap = max(1, int(self.target_lease_seconds / max(job.seconds_per_call, 1e-9)))
        return max(1, min(guided, cap, self.max_lease_inputs))

    def _carve(
        self, job: JobState, node: NodeState, now: float, after: int = 0, pool: str = "", chunk: int = 0
    ) -> ActiveLease:
        seq, start, lo, hi = job.pending.take(chunk or job.round_chunk)
        lease = m.Lease(
            lease_id=self.next_lease_id,
            job_id=job.job_id,
            function_hash=job.spec.function_hash,
            batch_seq=seq,
            batch_start=start,
            lo=lo,
            hi=hi,
            func_cpu=job.spec.func_cpu,
            func_ram_bytes=job.func_ram_bytes,
            pool=pool if after else node.pick_pool(job.spec) or "",
            env=job.spec.env,
            after=after,
            timeout=job.spec.timeout or 0.0,
        )
        self.next_lease_id += 1
        active = ActiveLease(lease, node.agent_id, issued=now)
        self._attach(job, node, active)
        return active

    def _attach(self, job: JobState, node: NodeState | None, active: ActiveLease) -> None:
        job.leases[active.lease.lease_id] = active
        self.lease_owner[active.lease.lease_id] = job.job_id
        if node is not None:
            node.hold(active.lease.lease_id, active.lease.pool, job.spec, active.lease.after)
            active.queued = active.lease.lease_id in node.queued
        else:
            active.queued = False  # restored, its agent gone: requeued next
        job.queued += active.queued

    def _drop_lease(self, job: JobState, lease_id: int) -> ActiveLease | None:
        active = job.leases.pop(lease_id, None)
        self.lease_owner.pop(lease_id, None)
        if active is None:
            return None
        job.queued -= active.queued
        node = self.nodes.get(active.agent_id)
        if node is not None:
            follower = node.release(lease_id, active.lease.pool, job.spec)
            promoted = job.leases.get(follower) if follower is not None else None
            if promoted is not None and promoted.queued:  # it runs now, in this lease's slot
                promoted.queued = False
                job.queued -= 1
        return active

    def requeue(self, lease_ids: Iterable[int]) -> None:
        """Put leases' inputs back in front of the queue (their agent lost them)."""
        for lease_id in lease_ids:
            job = self.jobs.get(self.lease_owner.get(lease_id, ""))
            if job is None:
                continue
            active = self._drop_lease(job, lease_id)
            if active is None or job.state != m.RUNNING:
                continue
            job.pending.put_back(active.lease, active.lease.lo, job.done)

    def complete(
        self,
        job_id: str,
        lease_id: int,
        lo: int,
        n_ok: int,
        elapsed: float,
        error: m.CallError | bool | None,
        now: float,
        retryable: bool = False,
    ) -> Completion:
        """Decide whether a lease's result is accepted.

        `lo`/`n_ok`: the results cover [lo, lo + n_ok); with `error`, an input failed: lo + n_ok, or the
        input the error names when it lies further on in the lease (a worker that died mid-lease loses the
        results it had; they run again). A result for a lease the scheduler no longer holds (its agent was
        presumed dead) is still accepted if none of its range is done; leases carved from that range since
        are superseded.

        The failed input runs again after a backoff when `retryable` (the control plane matched the error
        against the job's `retry_on`) and it has failed at most `retries` times; else, with
        `return_exceptions`, it is done with its error; else the job fails. What the rest of the lease did
        not run goes back to pending at once, in front.
        """
        job = self.jobs.get(job_id)
        if job is None:
            return Completion(False, reason="unknown job")
        active = job.leases.get(lease_id)
        if active is not None and active.lease.lo != lo:
            return Completion(False, job, reason="lease range mismatch")
        if job.state != m.RUNNING:
            self._drop_lease(job, lease_id)
            return Completion(False, job, reason=f"job {job.state}")
        dropped = active is None and bool(error)
        if dropped:
            # The late answer of a lease given up for lost (its node went silent, or it was requeued): its
            # inputs run elsewhere already. What it ran stands; its failure does not decide: the failed input's
            # rerun does, under retries= and retry_on= as for any held lease (taken here, it would fail the job
            # with its retries unused).
            error = None
        hi = lo + n_ok
        at = hi
        if isinstance(error, m.CallError) and active is not None and hi <= error.index < active.lease.hi:
            at = error.index
        span_hi = at + 1 if error else hi
        if job.done.intersects(lo, span_hi):
            if active is not None:
                self._drop_lease(job, lease_id)
                self.requeue_rest(job, active.lease, lo)
            return Completion(False, job, reason="duplicate")
        if active is not None:
            self._drop_lease(job, lease_id)
            lease_hi = active.lease.hi
        else:
            lease_hi = span_hi
        # An active lease's range is in no other lease and not pending (leases are carved from pending and
        # leave it): only the result of a lease given up for lost can supersede others. Skipping the scan
        # keeps each accepted result O(1) in the job's leases out.
        superseded = self._claim(job, lo, span_hi) if active is None else []
        job.done.add(lo, hi)
        if n_ok:
            job.first_result_at = job.first_result_at or now
            job.last_result_at = now
        calls = n_ok + (1 if error else 0)
        if calls and elapsed >= 0 and not error:
            self._learn(job, elapsed / calls)
        completion = Completion(True, job, lo, hi, superseded=superseded, error_dropped=dropped)
        if error:
            return self._failed_call(job, active, completion, at, error, now, retryable)
        if active is not None and hi < lease_hi:  # a short result without an error: rerun the rest
            job.pending.put_back(active.lease, hi, job.done)
        self._settled(job, lo, hi)
        completion.job_done = job.complete()
        if completion.job_done:
            job.state = m.JOB_DONE
        return completion

    def _failed_call(
        self,
        job: JobState,
        active: ActiveLease | None,
        completion: Completion,
        at: int,
        error: m.CallError | bool,
        now: float,
        retryable: bool,
    ) -> Completion:
        """Input `at` of a lease failed (see `complete`): retry it, keep its error, or fail the job."""
        completion.at = at
        attempt = job.attempts.get(at, 0) + 1
        spec = job.spec
        retry = retryable and attempt <= spec.retries and active is not None
        if isinstance(error, m.CallError) and (retry or attempt > 1):
            completion.attempt = m.Attempt(
                at, at + 1, attempt, error.kind[:32], error.type_name[:1024], error.message[:4096],
                error.node[:255], now, retried=retry,
            )  # fmt: skip
            job.history.append(completion.attempt)
        if not retry and (not spec.return_exceptions or isinstance(error, m.CallError) and fails_every_input(error)):
            completion.failed = True
            completion.stopped = self.finish_job(job.job_id, m.JOB_FAILED)
            return completion
        if active is not None:  # what the lease did not run, or ran and lost with its worker: again, now
            job.pending.put_back(active.lease, completion.hi, [*job.done, (at, at + 1)])
        if retry and active is not None:
            job.attempts[at] = attempt
            job.retried += 1
            delay = min(m.MAX_RETRY_DELAY, spec.retry_delay * 2.0 ** (attempt - 1))
            one = dataclasses.replace(active.lease, lo=at, hi=at + 1)
            heapq.heappush(job.delayed, (now + delay, next(self._delayed_seq), one))
            completion.retry_in = delay
            return completion
        job.attempts.pop(at, None)
        job.done.add(at, at + 1)
        job.failed += 1
        completion.call_failed = True
        completion.job_done = job.complete()
        if completion.job_done:
            job.state = m.JOB_DONE
        return completion

    def _settled(self, job: JobState, lo: int, hi: int) -> None:
        """Inputs [lo, hi) have their results: forget their failed attempts."""
        if job.attempts:
            for index in [i for i in job.attempts if lo <= i < hi]:
                del job.attempts[index]

    def next_retry(self) -> float | None:
        """When the next delayed retry is due (None: none waits)."""
        return min((j.delayed[0][0] for j in self.jobs.values() if j.delayed and j.state == m.RUNNING), default=None)

    def requeue_rest(self, job: JobState, lease: m.Lease, lo: int) -> None:
        """Requeue what of `lease` from `lo` on is neither done nor pending nor leased again."""
        job.pending.put_back(lease, lo, job.done, keep=lambda r_lo, r_hi: not self._covered_elsewhere(job, r_lo, r_hi))

    def _covered_elsewhere(self, job: JobState, lo: int, hi: int) -> bool:
        return (
            job.pending.overlaps(lo, hi)
            or any(a.lease.lo < hi and lo < a.lease.hi for a in job.leases.values())
            or any(d.lo < hi and lo < d.hi for _, _, d in job.delayed)
        )

    def _claim(self, job: JobState, lo: int, hi: int) -> list[int]:
        """Take [lo, hi) out of pending and out of any lease carved inside it."""
        job.pending.remove(lo, hi)
        superseded = [lid for lid, a in job.leases.items() if a.lease.lo < hi and lo < a.lease.hi]
        for lid in superseded:
            active = self._drop_lease(job, lid)
            if active is not None:  # the part of it outside [lo, hi) still needs running
                job.pending.put_back(
                    active.lease,
                    active.lease.lo,
                    [(lo, hi)],
                    keep=lambda r_lo, r_hi: not job.done.intersects(r_lo, r_hi),
                )
        return superseded

    def _learn(self, job: JobState, seconds: float) -> None:
        prior = job.seconds_per_call
        job.seconds_per_call = seconds if prior is None else 0.5 * prior + 0.5 * seconds
        self._estimates[job.spec.function_hash] = job.seconds_per_call
        self._estimates.move_to_end(job.spec.function_hash)
        while len(self._estimates) > _ESTIMATE_MEMORY:
            self._estimates.popitem(last=False)

    # ---- pools on container nodes (see pool_claims) --------------------------

    def plan_wants(self) -> dict[str, tuple[m.PoolWant, ...]]:
        """The pools each container node should make now; nodes not named go back to standby.

        A job that no standby container fits (another image, a dockerfile=, more
        CPU or RAM per call) claims container nodes, oldest job first, until it
        has max_parallelism workers; a claim lasts until the job ends.
        """
        running = {job_id: j.spec for job_id, j in self.jobs.items() if j.state == m.RUNNING}
        return pool_claims.plan_wants(self.claims, self.nodes, running, self.standby)

    # ---- restore after a restart ------------------------------------------

    def restore_job(
        self,
        spec: m.JobSpec,
        created: float,
        batches: Iterable[m.BatchMeta],
        n_inputs: int | None,
        done: Iterable[tuple[int, int]],
        leases: Iterable[tuple[m.Lease, str]],
        owner: str = "",
        attempts: Iterable[m.Attempt] = (),
        failed: int = 0,
    ) -> JobState:
        """Rebuild a running job from the store: pending = batches - done - leased.

        `attempts`: its failed attempts, oldest first, so the counts of retries and of lost nodes go on
        where they were (a retry waiting for its backoff is pending again at once); `failed`: its inputs
        done with their error.
        """
        job = self.add_job(spec, created, owner)
        job.n_inputs = n_inputs
        job.failed = failed
        for a in attempts:
            job.history.append(a)
            job.retried += a.retried
            if a.kind == m.LOST:
                job.lost.append((a.lo, a.hi, a.attempt))
            elif a.retried:
                job.attempts[a.lo] = max(job.attempts.get(a.lo, 0), a.attempt)
        for lo, hi in sorted(done):
            job.done.add(lo, hi)
        for index in [i for i in job.attempts if job.done.intersects(i, i + 1)]:
            del job.attempts[index]  # it succeeded (or kept its error) before the restart: no count to go on
        held, orphans = [], []
        for lease, agent_id in leases:
            node = self.nodes.get(agent_id)
            lease = dataclasses.replace(lease, timeout=spec.timeout or 0.0)  # not a column: the job's
            self._attach(job, node, ActiveLease(lease, agent_id, delivered=0))
            held.append((lease.lo, lease.hi))
            if node is None:
                orphans.append(lease.lease_id)
            self.next_lease_id = max(self.next_lease_id, lease.lease_id + 1)
        for b in sorted(batches, key=lambda b: b.seq):
            job.batches[b.seq] = (b.start, b.count)
            job.n_uploaded += b.count
            job.pending.add(b.seq, b.start, b.start, b.start + b.count, [*job.done, *held])
        self.requeue(orphans)  # leases of agents that are gone: back to pending, after the batches
        return job

    # ---- views ---------------------------------------------------------------

    def job_progress(self, job: JobState, now: float) -> Progress:
        """Where `job` stands (`status_text.job_status` makes the wire message of it)."""
        rate = 0.0
        if job.first_result_at is not None and job.last_result_at and job.last_result_at > job.first_result_at:
            rate = job.done.size / max(1e-6, now - job.first_result_at)
        preparing = collections.Counter(
            p.phase for n in self.nodes.values() for p in n.pools.values()
            if p.job_id == job.job_id and p.state == "preparing" and p.phase
        )  # fmt: skip
        preparing.update(n.job_phases[job.job_id] for n in self.nodes.values() if n.job_phases.get(job.job_id))
        status = m.JobStatus(
            job_id=job.job_id,
            state=job.state,
            function_name=job.spec.function_name,
            n_inputs=job.n_inputs,
            n_uploaded=job.n_uploaded,
            n_done=job.done.size,
            running=job.running,
            workers=self._slots_for(job) if self.nodes else 0,
            created=job.created,
            calls_per_second=rate,
            owner=job.owner,
            retried=job.retried,
            failed=job.failed,
            detached=job.spec.detach,
        )
        phase = Phase(
            nodes=len(self.nodes),
            preparing=preparing.most_common(1)[0] if preparing else None,
            running=job.running,
            pending=job.pending.size,
        )
        return Progress(status, phase)

"""The agent's workers: which pools to keep, starting and replacing workers, feeding them leases.

`Supervisor` converges the node on its desired pools (`pools.plan`, then
`reconcile.converge`): it keeps the pools of recent jobs parked, warm for the
next job of their image, within the node's room (`agent.warm_containers_per_cpu`),
prepares each pool's image, keeps its count of warm
workers (`startup`), retires workers of pools no longer wanted (idle ones at
once, busy ones after their lease), starts each lease on a worker of its pool
(`WorkerPool` decides which), and turns every worker death into the right
error for the input it was running (`deaths`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import pickle
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from burla.common.config import AgentConfig
from burla.common.trace import trace
from burla.schemas import envelope, wire
from burla.schemas import messages as m
from burla.schemas import worker as proto

from . import memory, pools, reconcile
from .blobs import BlobCache
from .channel import FrameStream
from .deadlines import Deadlines, poll_interval
from .deaths import Death, kernel_oom_since, oom_kills
from .environments import EnvCache
from .outbox import Lines, Outbox, Outcome
from .pool import Slot, SlotState, WorkerPool
from .reconcile import PoolRun
from .runtime import Runtime, WorkerProcess, WorkerSetupError
from .startup import START_TRIES, Started, WorkerStarter, read_progress, restart_delay

log = logging.getLogger("burla.agent")

FUNCTIONS_KEPT = 16  # per worker; the shim keeps the same number
WORKER_BATCHES_KEPT = 4  # the shim's cache of unpickled batches

Fetch = Callable[[str], Awaitable[bytes]]


@dataclasses.dataclass
class WorkerConn:
    slot: int
    proc: WorkerProcess
    stream: FrameStream
    nonce: str
    progress: Path | None = None  # its progress file: the input it is calling (`Deadlines`)
    env: str = ""  # the environment on its worker's import path: given at its start, or adopted (`Run.paths`)
    functions: collections.OrderedDict[str, None] = dataclasses.field(default_factory=collections.OrderedDict)
    batches: collections.OrderedDict[tuple[str, int], None] = dataclasses.field(default_factory=collections.OrderedDict)


class Supervisor:
    def __init__(
        self, config: AgentConfig, runtime: Runtime, outbox: Outbox, blobs: BlobCache, fetch: Fetch, hostname: str
    ) -> None:
        self.max_result_bytes = 0  # the daemon's limit on one call's pickled result (0: none)
        self.config = config
        self.runtime = runtime
        self.outbox = outbox
        self.blobs = blobs
        self.fetch = fetch
        self.hostname = hostname
        self.pool = WorkerPool()
        self.starter = WorkerStarter(runtime, config.log_flush_interval)
        self.conns: dict[int, WorkerConn] = {}
        self.runs: dict[str, PoolRun] = {}  # pools prepared or being prepared
        self.desired: dict[str, pools.PoolSpec] = {}
        self.recent: list[pools.PoolSpec] = []  # parked pools of jobs that ran here, most recently used first
        self.standby: tuple[m.StandbyImage, ...] = ()
        self.wants: tuple[m.PoolWant, ...] = ()
        self.pool_errors: list[m.PoolError] = []
        self.envs: EnvCache | None = None
        self.env_paths: dict[str, list[str]] = {"": []}  # environment key -> the host paths its workers start with
        self.env_ready: dict[tuple[str, str], str] = {}  # (manifest digest, pool) -> environment key
        # new workers start in the environment their pool's last lease ran with, or a new pool's in the node's
        # last: most often the next lease's (a wrong guess costs what a worker started in none does, a switch)
        self.pool_envs: dict[str, str] = {}
        self.last_env = ""
        self.env_waiting: dict[tuple[str, str], list[m.Lease]] = {}  # leases whose environment is being prepared
        self.job_phases: dict[str, str] = {}  # job -> what this node is doing for it ("installing 3 packages")
        self.counters: collections.Counter[str] = collections.Counter()
        self.info: m.NodeInfo | None = None
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.deadlines = Deadlines()
        self._timed = trio.Event()  # set when a lease with a timeout starts: the watch wakes

    # ---- what the node should run -----------------------------------------------------

    def set_targets(self, standby: tuple[m.StandbyImage, ...] | None, wants: tuple[m.PoolWant, ...] | None) -> None:
        if standby is not None:
            self.standby = standby
        if wants is not None:
            self.wants = wants
        self._changed.set()

    def room(self) -> int:
        """How many containers this node keeps running, warm ones and busy ones together."""
        assert self.info is not None
        return int(self.config.warm_containers_per_cpu * self.info.cpus + 1e-9)

    def _reconcile(self) -> None:
        """Converge on the desired pools: retire what is not wanted, prepare and fill what is."""
        assert self.info is not None and self._nursery is not None
        wanted = {pools.job_pool_key(w) for w in self.wants}
        for key, spec in self.desired.items():  # pools of jobs that ended: parked, the most recent first
            run = self.runs.get(key)
            ended = spec.job_id and not spec.parked and key not in wanted
            if ended and run is not None and run.state != reconcile.FAILED:
                self.recent = [pools.parked(spec), *(r for r in self.recent if r.key != key)]
        planned = pools.plan(
            self.runtime.containers, self.info.cpus, self.info.ram_bytes, self.info.workers, self.standby,
            self.wants, self.recent, self.room(),
        )  # fmt: skip
        self.desired = {spec.key: spec for spec in planned}
        for spec in self.recent:
            if spec.key not in self.desired:
                log.info("parked pool %s (image %s, %d containers) stopped: the node's room of %d containers "
                         "is needed", spec.key, spec.image, spec.count, self.room())  # fmt: skip
                self.counters["pools_evicted"] += 1
        self.recent = [spec for spec in self.recent if spec.key in self.desired and self.desired[spec.key].parked]
        for key, spec in self.desired.items():
            run = self.runs.get(key)
            if run is None:
                continue
            if run.state == reconcile.FAILED and spec.job_id and spec.job_id != run.spec.job_id:
                del self.runs[key]  # failed for another job: this one tries again, and hears why itself
            else:
                if run.spec.parked and spec.job_id:  # a later job takes the pool of an earlier one
                    self.counters["parked_pools_reused"] += 1
                run.spec = spec  # parked, or taken by a job
        steps = reconcile.converge(self.desired, self.runs, self.pool.slots.values())
        for index in steps.retire:
            if self.pool.retire(index):
                self._kill(index)
        for key in steps.prepare:
            self.runs[key] = PoolRun.start(self.desired[key])
            self._nursery.start_soon(self._prepare, key)
        for key, count in steps.fill:
            for _ in range(count):
                slot = self.pool.add_slot(key, self.pool_envs.get(key, self.last_env))
                self._nursery.start_soon(self._keep_worker, slot.index)
        for key in steps.forget:
            del self.runs[key]
        self.outbox.mark_dirty()

    def ready_workers(self) -> int:
        """Workers that take leases now: none of parked pools."""
        return sum(self.pool.ready(key) for key, spec in self.desired.items() if not spec.parked)

    async def _prepare(self, key: str) -> None:
        run = self.runs[key]

        async def fetch_build(digest: str) -> bytes:
            try:
                return await self.fetch(f"blobs/{digest}")
            except LookupError:
                raise WorkerSetupError(f"the daemon has no build context {digest}") from None

        def phase(text: str) -> None:
            run.phase = text
            self.outbox.mark_dirty()  # the daemon shows it in the job's status

        try:
            run.python = await self.runtime.prepare_pool(run.spec, fetch_build, phase)
        except WorkerSetupError as e:
            self._pool_failed(run, str(e))
        else:
            run.state, run.phase = reconcile.READY, ""
            trace("agent", f"pool {key} ready")
            # Listed now, while its workers start: the first lease with an environment then waits for no listing.
            assert self._nursery is not None
            self._nursery.start_soon(self._list_distributions, run.spec)
        self._changed.set()

    async def _list_distributions(self, spec: pools.PoolSpec) -> None:
        try:
            await self.runtime.distributions(spec)  # kept by the runtime; asked again by `_prepare_env`
        except Exception as e:  # noqa: BLE001 - `_prepare_env` asks again, and reports what fails then
            log.debug("listing the distributions of pool %s failed: %s", spec.key, e)

    def _pool_failed(self, run: PoolRun, message: str) -> None:
        run.state, run.error, run.phase = reconcile.FAILED, message, ""
        log.error("pool %s (image %s) failed: %s", run.spec.key, run.spec.image, message)
        if run.spec.job_id:
            self.pool_errors.append(m.PoolError(run.spec.job_id, run.spec.image, message, self.hostname))
        self.counters["pool_failures"] += 1
        self.outbox.mark_dirty()

    async def reconcile_loop(self) -> None:
        while True:
            self._changed = trio.Event()
            self._reconcile()
            await self._changed.wait()

    def pool_states(self) -> tuple[m.PoolState, ...]:
        out = []
        for key, run in sorted(self.runs.items()):
            containers = [
                (_short_id(self.conns[s.index]) if s.index in self.conns else None, s.state.value)
                for s in self.pool.slots.values()
                if s.pool == key
            ]
            out.append(reconcile.pool_state(run, key in self.desired, self.pool.ready(key), containers))
        return tuple(out)

    # ---- leases ---------------------------------------------------------------------------

    def offer(self, leases: list[m.Lease]) -> None:
        """New leases: each runs once its environment is ready on this node."""
        assert self._nursery is not None
        ready = []
        for lease in leases:
            if not lease.env:
                ready.append(lease)
                continue
            key = (lease.env, lease.pool)
            if key in self.env_ready:
                ready.append(dataclasses.replace(lease, env=self.env_ready[key]))
            elif key in self.env_waiting:
                self.env_waiting[key].append(lease)
            else:
                self.env_waiting[key] = [lease]
                self._nursery.start_soon(self._prepare_env, key, lease.job_id)
        self._start(self.pool.offer(ready))

    async def _prepare_env(self, key: tuple[str, str], job_id: str) -> None:
        digest, pool_key = key
        assert self.envs is not None
        run = self.runs.get(pool_key)
        spec = run.spec if run is not None else pools.PoolSpec(pool_key)

        def phase(text: str) -> None:
            self.job_phases[job_id] = text
            self.outbox.mark_dirty()

        try:
            present = await self.runtime.distributions(spec)
            python = (run.python if run is not None and run.python else "") or self.runtime.python_version()
            paths = await self.envs.prepare(digest, present, python, phase)
        except Exception as e:  # a PackageInstallError says why; anything else must not take the agent down either
            message = str(e) if isinstance(e, WorkerSetupError) else f"{type(e).__name__}: {e}"
            log.error("environment %s for job %s: %s", digest[:12], job_id, message)
            self.pool_errors.append(m.PoolError(job_id, spec.image, message, self.hostname, kind="install"))
            self.env_waiting.pop(key, None)  # the daemon fails the job, and cancels these
            self.counters["environment_failures"] += 1
        else:
            env_key = hashlib.sha256(os.pathsep.join(paths).encode()).hexdigest()[:16] if paths else ""
            self.env_paths[env_key] = paths
            self.env_ready[key] = env_key
            waiting = self.env_waiting.pop(key, [])
            self._start(self.pool.offer([dataclasses.replace(lease, env=env_key) for lease in waiting]))
        finally:
            self.job_phases.pop(job_id, None)
            self.outbox.mark_dirty()

    def held(self) -> set[int]:
        """Leases this node holds: running, queued, or waiting for their environment."""
        waiting = {lease.lease_id for leases in self.env_waiting.values() for lease in leases}
        return self.pool.held() | waiting

    def cancel_job(self, job_id: str) -> None:
        for slot in self.pool.cancel_job(job_id):
            self._kill(slot.index)
        for key, waiting in list(self.env_waiting.items()):
            self.env_waiting[key] = [lease for lease in waiting if lease.job_id != job_id]
        self.counters["jobs_cancelled"] += 1

    def _kill(self, index: int) -> None:
        conn = self.conns.get(index)
        if conn is not None:
            conn.proc.kill()

    def kill_all(self) -> None:
        for conn in self.conns.values():
            conn.proc.kill()

    def _start(self, started: list[tuple[Slot, m.Lease]]) -> None:
        assert self._nursery is not None
        for slot, lease in started:
            if lease.timeout:
                self._timed.set()
            self.pool_envs[slot.pool] = self.last_env = lease.env
            if slot.state == SlotState.SWITCHING:
                self._kill(slot.index)  # its keeper starts a worker of the lease's environment, which runs it
                self.counters["environment_switches"] += 1
            else:
                self._nursery.start_soon(self._send_run, slot.index, lease)

    async def _send_run(self, index: int, lease: m.Lease) -> None:
        conn = self.conns.get(index)
        if conn is None:
            return
        blobs = envelope.Blobs()
        function_blob: int | None = None
        batch_blob: int | None = None
        batch_file: str | None = None
        key = (lease.job_id, lease.batch_seq)
        try:
            if lease.function_hash not in conn.functions:
                fn = self.blobs.functions.get(lease.function_hash)
                if fn is None:
                    fn = await self.fetch(f"functions/{lease.function_hash}")  # checked against its digest
                    self.blobs.add_function(lease.function_hash, fn)
                function_blob = blobs.add(fn)
            if key not in conn.batches:
                path = self.blobs.batch_files.get(key)
                inside = self.runtime.worker_path(path) if path is not None else None
                if inside is not None and path is not None and os.path.exists(path):
                    batch_file = inside  # the worker reads it itself
                else:
                    batch = self.blobs.batches.get(key)
                    if batch is None:
                        batch = await self.fetch(f"batches/{lease.job_id}/{lease.batch_seq}")
                        self.blobs.add_batch(key, batch)
                    batch_blob = blobs.add(batch)
        except LookupError as e:  # never dropped silently: the daemon fails the job, or drops this if it ended
            self._cannot_run(index, lease, str(e))
            return
        slot = self.pool.slots.get(index)
        if slot is None or slot.lease is not lease or self.conns.get(index) is not conn:
            return  # cancelled or the worker died while we fetched
        paths: tuple[str, ...] = ()
        if slot.env != conn.env:  # a fresh worker adopts the lease's environment (`WorkerPool`): no restart
            seen = [self.runtime.worker_path(p) for p in self.env_paths.get(slot.env, [])]
            paths = tuple(p for p in seen if p)
            self.counters["environments_adopted"] += 1
        run = proto.Run(
            lease_id=lease.lease_id,
            job_id=lease.job_id,
            function_hash=lease.function_hash,
            batch=key,
            batch_start=lease.batch_start,
            lo=lease.lo,
            hi=lease.hi,
            function_blob=function_blob,
            batch_blob=batch_blob,
            batch_file=batch_file,
            max_result_bytes=self.max_result_bytes,
            paths=paths,
        )
        trace("agent", f"run w{index} [{lease.lo},{lease.hi}) blobs={len(blobs)}")
        conn.proc.oom_kills_at_start = oom_kills()  # a SIGKILL during this lease is blamed on memory only if it rose
        conn.env = slot.env
        try:
            await conn.stream.send(run.to_wire(), blobs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the worker died: its death reports the lease
        if function_blob is not None:
            conn.functions[lease.function_hash] = None
            while len(conn.functions) > FUNCTIONS_KEPT:
                conn.functions.popitem(last=False)
        if batch_blob is not None or batch_file is not None:
            conn.batches[key] = None
            while len(conn.batches) > WORKER_BATCHES_KEPT:
                conn.batches.popitem(last=False)

    def _cannot_run(self, index: int, lease: m.Lease, reason: str) -> None:
        """A lease whose function or inputs cannot be had: report why (the job fails), free its slot."""
        slot = self.pool.slots.get(index)
        if slot is None or slot.lease is not lease:
            return  # cancelled meanwhile
        error = m.CallError(
            index=lease.lo,
            kind=m.SYSTEM,
            type_name=m.ErrorType.CALL,
            message=f"node {self.hostname} cannot run inputs #{lease.lo} to #{lease.hi - 1}: {reason}",
            node=self.hostname,
        )
        self.outbox.add_result(Outcome.failed(lease.lease_id, lease.job_id, lease.lo, error))
        self.counters["leases_unrunnable"] += 1
        self._after_lease(index)

    def _after_lease(self, index: int) -> None:
        self._start(self.pool.finished(index))
        slot = self.pool.slots.get(index)
        if slot is not None and slot.retired and slot.state == SlotState.STOPPING:
            self._kill(index)  # its pool is no longer wanted

    # ---- workers ---------------------------------------------------------------------------

    async def run(self, nursery: trio.Nursery, run_dir: Path, info: m.NodeInfo, state_dir: Path) -> None:
        """Listen for workers, keep the pools and watch memory (in `nursery`)."""
        self._nursery = nursery
        self.info = info
        self.runtime.env_root = state_dir / "envs"
        self.envs = EnvCache(
            self.runtime.env_root, self.fetch, self.hostname, self.config.installer,
            share=self.runtime.share, installer_options=self.runtime.installer_options,
        )  # fmt: skip
        await self.starter.listen(nursery, run_dir)
        nursery.start_soon(self.reconcile_loop)
        if not self.runtime.enforces_memory:
            nursery.start_soon(memory.watch, self.config.memory_check_interval, self._busy, self._memory_kill)
        nursery.start_soon(self._watch_timeouts)

    async def _watch_timeouts(self) -> None:
        """Kill each call that runs past its lease's timeout; its worker is replaced, its input fails with a
        timeout (`Death.timed_out`). Asleep while no lease with a timeout runs: a job without one costs nothing."""
        while True:
            limits = {s.index: s.lease.timeout for s in self.pool.busy() if s.lease is not None and s.lease.timeout}
            if not limits:
                self.deadlines.clocks.clear()
                self._timed = trio.Event()
                await self._timed.wait()
                continue
            now = trio.current_time()
            for index in limits:
                slot, conn = self.pool.slots[index], self.conns.get(index)
                if conn is not None and conn.progress is not None and slot.lease is not None:
                    lease = slot.lease
                    self.deadlines.observe(index, lease.lease_id, lease.lo, lease.hi, read_progress(conn.progress), now)
            for late in self.deadlines.overdue(limits, now):
                conn = self.conns.get(late.slot)
                if conn is None:
                    continue
                log.warning("worker %d: input #%d ran %.2f s, past its timeout of %g s: killed",
                            late.slot, late.index, late.ran, late.limit)  # fmt: skip
                self.pool.kill_for_timeout(late.slot, late.index, late.limit, late.ran)
                self.deadlines.forget(late.slot)
                conn.proc.kill()
                self.counters["timeout_kills"] += 1
            await trio.sleep(poll_interval(min(limits.values())))

    async def _keep_worker(self, index: int) -> None:
        """Keep a warm worker in slot `index` until its pool is no longer wanted.

        A worker that cannot start is tried again with backoff (`startup.restart_delay`). After
        `START_TRIES` failures in a row, a job's pool fails (the job fails, saying why) and the slot is
        given up; a standby pool (the node's own) is tried again every `RESTART_PAUSE` seconds, the error
        logged each time.
        """
        failures = 0
        while True:
            slot = self.pool.slots.get(index)
            if slot is None or slot.retired:
                break
            spec = self.desired.get(slot.pool) or (self.runs[slot.pool].spec if slot.pool in self.runs else None)
            if spec is None:
                break
            delay = restart_delay(failures, slot.deaths)
            if delay:
                await trio.sleep(delay)
            try:
                await self._run_worker(index, spec)
                failures = 0
            except WorkerSetupError as e:  # the runtime cannot start this pool's workers
                run = self.runs.get(slot.pool)
                if run is not None and run.state != reconcile.FAILED:
                    self._pool_failed(run, str(e))
                self.pool.died(index)
                break
            except Exception as e:  # a worker that cannot start must not take the agent down
                failures += 1
                log.error("cannot start worker %d (try %d of %d): %s: %s", index, failures, START_TRIES,
                          type(e).__name__, e)  # fmt: skip
                self.pool.died(index)
                run = self.runs.get(slot.pool)
                if failures >= START_TRIES and run is not None and run.spec.job_id:
                    why = f"a worker cannot start {START_TRIES} times in a row: {type(e).__name__}: {e}"
                    if run.state != reconcile.FAILED:
                        self._pool_failed(run, why)
                    log.error("worker slot %d given up: %s", index, why)
                    break
        self.pool.remove(index)
        self._changed.set()
        self.outbox.mark_dirty()

    async def _run_worker(self, index: int, spec: pools.PoolSpec) -> None:
        paths = self.env_paths.get(self.pool.slots[index].env, [])
        proc: WorkerProcess | None = None
        try:
            async with self.starter.running(index, spec, paths, self._forward_raw) as started:
                proc = started.proc
                if started.frames is None:
                    self.pool.died(index)
                    return
                conn = WorkerConn(
                    index, proc, started.frames, started.nonce, started.progress_path, self.pool.slots[index].env
                )
                self.conns[index] = conn
                self._start(self.pool.worker_ready(index))
                if self.pool.slots[index].retired:
                    proc.kill()
                self.outbox.mark_dirty()
                self.counters["workers_started"] += 1
                await self._serve_worker(conn)
        finally:
            if proc is not None and self.conns.get(index) is not None and self.conns[index].proc is proc:
                del self.conns[index]
        self._worker_died(index, started, spec)

    async def _serve_worker(self, conn: WorkerConn) -> None:
        while True:
            try:
                message = await conn.stream.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, envelope.EnvelopeError):
                return
            if message is None:
                return
            header, blobs = message
            kind = header.get("kind")
            if kind == proto.LOGS:
                try:
                    logs = proto.Logs.from_wire(header)
                except wire.WireError as e:
                    log.warning("worker %d sent printed lines that cannot be read: dropped: %s", conn.slot, e)
                    continue
                if blobs:
                    await self.outbox.add_logs(Lines(logs.job_id, logs.lines, logs.nbytes, blobs[0]))
            elif kind == proto.DONE:
                self._lease_done(conn, header, blobs)

    def _lease_done(self, conn: WorkerConn, header: dict[str, Any], blobs: list[memoryview]) -> None:
        slot = self.pool.slots[conn.slot]
        lease = slot.lease
        trace("agent", f"done w{conn.slot} lease={header.get('lease_id')}")
        if lease is None or lease.lease_id != header.get("lease_id") or slot.state != SlotState.BUSY:
            return  # a cancelled lease finishing: the daemon has dropped it
        try:
            done = proto.Done.from_wire(header)
            results = blobs[proto.Done.RESULTS_BLOB]
        except (wire.WireError, IndexError) as e:  # the lease fails saying so, rather than the whole report
            error = m.CallError(lease.lo, m.SYSTEM, m.ErrorType.CALL,
                                f"node {self.hostname}: the worker's answer cannot be read: {e}"[:4096],
                                node=self.hostname)  # fmt: skip
            self.outbox.add_result(Outcome.failed(lease.lease_id, lease.job_id, lease.lo, error))
        else:
            exc_blob = done.error.exc_blob if done.error is not None else None
            exception = blobs[exc_blob] if exc_blob is not None and exc_blob < len(blobs) else None
            self.outbox.add_result(
                Outcome(lease.lease_id, lease.job_id, done.lo, done.n_ok, done.elapsed, done.error, results, exception)
            )
        self.counters["leases_done"] += 1
        self._after_lease(conn.slot)

    def _worker_died(self, index: int, started: Started, spec: pools.PoolSpec) -> None:
        slot = self.pool.slots.get(index)
        timed_out = slot.timed_out if slot is not None else None
        lease, memory_kill = self.pool.died(index)
        self.outbox.mark_dirty()
        self._start(self.pool.start_queued())  # a lease that followed its lease may go to another worker
        if lease is None:
            return
        self.counters["worker_deaths"] += 1
        proc = started.proc
        death = Death(
            lo=lease.lo,
            hi=lease.hi,
            func_ram_bytes=lease.func_ram_bytes,
            node=self.hostname,
            image=spec.image,
            progress=read_progress(started.progress_path),
            code=started.code,
            memory_kill=memory_kill,
            container_oom=proc.oom_killed,
            kernel_oom=kernel_oom_since(proc.oom_kills_at_start),
            timed_out=timed_out,
        )
        self.outbox.add_result(Outcome.failed(lease.lease_id, lease.job_id, lease.lo, death.error()))

    async def _forward_raw(self, index: int, which: int, data: bytes) -> None:
        """What a worker printed before its shim captured its output: the lease's lines, or the agent's stderr."""
        text = data.decode("utf-8", "replace")
        slot = self.pool.slots.get(index)
        lease = slot.lease if slot is not None else None
        if lease is None:
            print(f"[worker {index}] {text}", end="", file=sys.stderr)
            return
        blob = pickle.dumps([(-1, which, text)])
        await self.outbox.add_logs(Lines(lease.job_id, text.count("\n"), len(text), blob))

    # ---- memory ------------------------------------------------------------------------------

    def _busy(self) -> list[memory.Busy]:
        busy = []
        for slot in self.pool.busy():
            conn = self.conns.get(slot.index)
            if conn is None or conn.proc.pid is None or slot.lease is None:
                continue
            busy.append(memory.Busy(slot.index, conn.proc.pid, slot.lease.func_ram_bytes))
        return busy

    def _memory_kill(self, worker: memory.Busy, rss: int) -> None:
        conn = self.conns.get(worker.slot)
        if conn is None:
            return
        log.warning("worker %d: %d bytes > func_ram %d: killed", worker.slot, rss, worker.limit)
        self.pool.kill_for_memory(worker.slot, rss, worker.limit)
        conn.proc.kill()
        self.counters["memory_kills"] += 1

    def statistics(self) -> dict[str, Any]:
        envs = self.envs.statistics() if self.envs is not None else {}
        followed = {"leases_followed": self.pool.followed}
        return {**self.pool.statistics(), **self.runtime.statistics(), **envs, **self.counters, **followed}


def _short_id(conn: WorkerConn) -> str:
    return str(getattr(conn.proc, "id", "") or conn.proc.pid or "")[:12]

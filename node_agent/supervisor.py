"""The agent's workers: which pools to keep, starting and replacing workers, feeding them leases.

`Supervisor` converges the node on its desired pools (`pools.plan`): it
prepares each pool's image, keeps its count of warm workers, retires workers
of pools no longer wanted (idle ones at once, busy ones after their lease),
starts each lease on a worker of its pool, and turns every worker death into
the right error for the input it was running.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
import pickle
import secrets
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from burla.common.config import AgentConfig
from burla.common.trace import trace
from burla.schemas import envelope
from burla.schemas import messages as m
from burla.schemas import worker as proto

from . import host, pools
from .blobs import BlobCache
from .channel import FrameStream
from .environments import EnvCache
from .outbox import Outbox
from .pool import Slot, SlotState, WorkerPool
from .runtime import PoolError, Runtime, WorkerProcess, describe_exit, oom_kills

log = logging.getLogger("burla.agent")

FUNCTIONS_KEPT = 16  # per worker; the shim keeps the same number
_START_TRIES = 5  # a job's worker that fails to start this many times in a row fails its pool
_RESTART_PAUSE = 30.0  # seconds between tries of a standby worker that keeps failing to start
WORKER_BATCHES_KEPT = 4  # the shim's cache of unpickled batches
HELLO_TIMEOUT = 120.0

Fetch = Callable[[str], Awaitable[bytes]]


@dataclasses.dataclass
class WorkerConn:
    slot: int
    proc: WorkerProcess
    stream: FrameStream
    nonce: str
    functions: collections.OrderedDict[str, None] = dataclasses.field(default_factory=collections.OrderedDict)
    batches: collections.OrderedDict[tuple[str, int], None] = dataclasses.field(default_factory=collections.OrderedDict)


@dataclasses.dataclass
class PoolRun:
    """A pool's progress on this node."""

    spec: pools.PoolSpec
    state: str = "preparing"  # preparing, ready, failed
    phase: str = ""
    python: str = ""
    error: str = ""


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
        self.conns: dict[int, WorkerConn] = {}
        self.runs: dict[str, PoolRun] = {}  # pools prepared or being prepared
        self.desired: dict[str, pools.PoolSpec] = {}
        self.standby: tuple[m.StandbyImage, ...] = ()
        self.wants: tuple[m.PoolWant, ...] = ()
        self.pool_errors: list[m.PoolError] = []
        self.envs: EnvCache | None = None
        self.env_paths: dict[str, list[str]] = {"": []}  # environment key -> the host paths its workers start with
        self.env_ready: dict[tuple[str, str], str] = {}  # (manifest digest, pool) -> environment key
        self.env_waiting: dict[tuple[str, str], list[m.Lease]] = {}  # leases whose environment is being prepared
        self.job_phases: dict[str, str] = {}  # job -> what this node is doing for it ("installing 3 packages")
        self.counters: collections.Counter[str] = collections.Counter()
        self.info: m.NodeInfo | None = None
        self.run_dir = Path()
        self.socket_path = ""
        self._hello: dict[str, trio.MemorySendChannel[FrameStream]] = {}
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None

    # ---- what the node should run -----------------------------------------------------

    def set_targets(self, standby: tuple[m.StandbyImage, ...] | None, wants: tuple[m.PoolWant, ...] | None) -> None:
        if standby is not None:
            self.standby = standby
        if wants is not None:
            self.wants = wants
        self._changed.set()

    def _reconcile(self) -> None:
        """Converge on the desired pools: retire what is not wanted, prepare and fill what is."""
        assert self.info is not None and self._nursery is not None
        self.desired = {
            spec.key: spec
            for spec in pools.plan(
                self.runtime.containers, self.info.cpus, self.info.ram_bytes, self.info.workers, self.standby,
                self.wants,
            )
        }  # fmt: skip
        for slot in list(self.pool.slots.values()):
            if slot.pool not in self.desired and not slot.retired and self.pool.retire(slot.index):
                self._kill(slot.index)
        for key, spec in self.desired.items():
            run = self.runs.get(key)
            if run is None:
                run = self.runs[key] = PoolRun(spec, phase=_phase(spec))
                self._nursery.start_soon(self._prepare, key)
            if run.state == "ready":
                for _ in range(spec.count - len(self.pool.in_pool(key))):
                    slot = self.pool.add_slot(key)
                    self._nursery.start_soon(self._keep_worker, slot.index)
        for key in [k for k in self.runs if k not in self.desired]:
            if not any(s.pool == key for s in self.pool.slots.values()):
                del self.runs[key]
        self.outbox.mark_dirty()

    async def _prepare(self, key: str) -> None:
        run = self.runs[key]

        async def fetch_build(digest: str) -> bytes:
            try:
                return await self.fetch(f"blobs/{digest}")
            except LookupError:
                raise PoolError(f"the daemon has no build context {digest}") from None

        def phase(text: str) -> None:
            run.phase = text
            self.outbox.mark_dirty()  # the daemon shows it in the job's status

        try:
            run.python = await self.runtime.prepare_pool(run.spec, fetch_build, phase)
        except PoolError as e:
            self._pool_failed(run, str(e))
        else:
            run.state, run.phase = "ready", ""
            trace("agent", f"pool {key} ready")
        self._changed.set()

    def _pool_failed(self, run: PoolRun, message: str) -> None:
        run.state, run.error, run.phase = "failed", message, ""
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
            spec = run.spec
            slots = [s for s in self.pool.slots.values() if s.pool == key]
            state = run.state if key in self.desired else "draining"
            out.append(
                m.PoolState(
                    key=key,
                    image=spec.image,
                    python_version=run.python or spec.python_version,
                    cpus=spec.cpus,
                    ram_bytes=spec.ram_bytes,
                    slots=spec.count,
                    ready=self.pool.ready(key) if state == "ready" else 0,
                    state={"failed": "failed"}.get(state, state),
                    phase=run.phase,
                    job_id=spec.job_id,
                    default=spec.default,
                    containers=tuple(
                        [
                            getattr(self.conns.get(s.index), "proc", None) and _short_id(self.conns[s.index]),
                            s.state.value,
                        ]
                        for s in slots
                    ),
                )
            )
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
        except Exception as e:  # an InstallError says why; anything else must not take the agent down either
            message = str(e) if isinstance(e, PoolError) else f"{type(e).__name__}: {e}"
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
            if slot.state == SlotState.SWITCHING:
                self._kill(slot.index)  # its keeper starts a worker of the lease's environment, which runs it
                self.counters["environment_switches"] += 1
            else:
                self._nursery.start_soon(self._send_run, slot.index, lease)

    async def _send_run(self, index: int, lease: m.Lease) -> None:
        conn = self.conns.get(index)
        if conn is None:
            return
        header: dict[str, Any] = {
            "kind": proto.RUN,
            "lease_id": lease.lease_id,
            "job_id": lease.job_id,
            "function_hash": lease.function_hash,
            "batch": [lease.job_id, lease.batch_seq],
            "batch_start": lease.batch_start,
            "lo": lease.lo,
            "hi": lease.hi,
            "function_blob": None,
            "batch_blob": None,
            "batch_file": None,
            "max_result_bytes": self.max_result_bytes,
        }
        blobs: list[Any] = []
        key = (lease.job_id, lease.batch_seq)
        try:
            if lease.function_hash not in conn.functions:
                fn = self.blobs.functions.get(lease.function_hash)
                if fn is None:
                    fn = await self.fetch(f"functions/{lease.function_hash}")  # checked against its digest
                    self.blobs.add_function(lease.function_hash, fn)
                header["function_blob"] = len(blobs)
                blobs.append(fn)
            if key not in conn.batches:
                path = self.blobs.batch_files.get(key)
                inside = self.runtime.worker_path(path) if path is not None else None
                if inside is not None and path is not None and os.path.exists(path):
                    header["batch_file"] = inside  # the worker reads it itself
                else:
                    batch = self.blobs.batches.get(key)
                    if batch is None:
                        batch = await self.fetch(f"batches/{lease.job_id}/{lease.batch_seq}")
                        self.blobs.add_batch(key, batch)
                    header["batch_blob"] = len(blobs)
                    blobs.append(batch)
        except LookupError as e:  # never dropped silently: the daemon fails the job, or drops this if it ended
            self._cannot_run(index, lease, str(e))
            return
        slot = self.pool.slots.get(index)
        if slot is None or slot.lease is not lease or self.conns.get(index) is not conn:
            return  # cancelled or the worker died while we fetched
        trace("agent", f"run w{index} [{lease.lo},{lease.hi}) blobs={len(blobs)}")
        conn.proc.oom_kills_at_start = oom_kills()  # a SIGKILL during this lease is blamed on memory only if it rose
        try:
            await conn.stream.send(header, blobs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the worker died: its death reports the lease
        if header["function_blob"] is not None:
            conn.functions[lease.function_hash] = None
            while len(conn.functions) > FUNCTIONS_KEPT:
                conn.functions.popitem(last=False)
        if header["batch_blob"] is not None or header["batch_file"] is not None:
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
        result = {"lease_id": lease.lease_id, "job_id": lease.job_id, "lo": lease.lo, "n_ok": 0, "elapsed": 0.0,
                  "error": error.to_wire()}  # fmt: skip
        self.outbox.add_result(result, [pickle.dumps([])])
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
        self.run_dir = run_dir
        self.runtime.env_root = state_dir / "envs"
        self.envs = EnvCache(self.runtime.env_root, self.fetch, self.hostname, self.config.installer)
        self.socket_path = str(run_dir / "agent.sock")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o777)  # rootless containers connect as another uid
        listener.listen(256)
        nursery.start_soon(self._accept_loop, trio.SocketListener(listener))
        nursery.start_soon(self.reconcile_loop)
        nursery.start_soon(self._memory_loop)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                assert self._nursery is not None
                self._nursery.start_soon(self._greet, stream)

    async def _greet(self, stream: trio.SocketStream) -> None:
        frames = FrameStream(stream)
        with trio.move_on_after(HELLO_TIMEOUT):
            try:
                hello = await frames.receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError, envelope.EnvelopeError):
                hello = None
            if hello is not None and hello[0].get("kind") == proto.HELLO:
                channel = self._hello.get(hello[0].get("nonce", ""))
                if channel is not None:
                    await channel.send(frames)
                    return
        await stream.aclose()  # a stale or stray connection

    async def _keep_worker(self, index: int) -> None:
        """Keep a warm worker in slot `index` until its pool is no longer wanted.

        A worker that cannot start is tried again with backoff. After `_START_TRIES` failures in a
        row, a job's pool fails (the job fails, saying why) and the slot is given up; a standby pool
        (the node's own) is tried again every `_RESTART_PAUSE` seconds, the error logged each time.
        """
        failures = 0
        while True:
            slot = self.pool.slots.get(index)
            if slot is None or slot.retired:
                break
            spec = self.desired.get(slot.pool) or (self.runs[slot.pool].spec if slot.pool in self.runs else None)
            if spec is None:
                break
            if failures >= _START_TRIES:
                await trio.sleep(_RESTART_PAUSE)
            elif slot.deaths:
                await trio.sleep(min(0.05 * 2 ** min(slot.deaths, 6), 5.0))
            try:
                await self._run_worker(index, spec)
                failures = 0
            except PoolError as e:  # the runtime cannot start this pool's workers
                run = self.runs.get(slot.pool)
                if run is not None and run.state != "failed":
                    self._pool_failed(run, str(e))
                self.pool.died(index)
                break
            except Exception as e:  # a worker that cannot start must not take the agent down
                failures += 1
                log.error("cannot start worker %d (try %d of %d): %s: %s", index, failures, _START_TRIES,
                          type(e).__name__, e)  # fmt: skip
                self.pool.died(index)
                run = self.runs.get(slot.pool)
                if failures >= _START_TRIES and run is not None and run.spec.job_id:
                    why = f"a worker cannot start {_START_TRIES} times in a row: {type(e).__name__}: {e}"
                    if run.state != "failed":
                        self._pool_failed(run, why)
                    log.error("worker slot %d given up: %s", index, why)
                    break
        self.pool.remove(index)
        self._changed.set()
        self.outbox.mark_dirty()

    async def _run_worker(self, index: int, spec: pools.PoolSpec) -> None:
        progress_path = self.run_dir / f"w{index}.progress"
        progress_path.write_bytes(proto.PROGRESS.pack(proto.IDLE))
        os.chmod(progress_path, 0o666)
        nonce = secrets.token_hex(8)
        send, receive = trio.open_memory_channel[FrameStream](1)
        self._hello[nonce] = send
        slot = self.pool.slots[index]
        paths = [self.runtime.worker_path(p) for p in self.env_paths.get(slot.env, [])]
        env = {
            proto.SOCKET_ENV: self.socket_path,
            proto.PROGRESS_ENV: str(progress_path),
            proto.LOG_FLUSH_ENV: str(self.config.log_flush_interval),
            proto.PATHS_ENV: os.pathsep.join(p for p in paths if p),
            "BURLA_WORKER_SLOT": str(index),
            "BURLA_WORKER_NONCE": nonce,
        }
        try:
            proc = await self.runtime.start_worker(index, env, spec)
        except BaseException:
            del self._hello[nonce]
            raise
        code: int | None = None
        frames: FrameStream | None = None
        try:
            async with trio.open_nursery() as nursery:
                for stream, which in ((proc.stdout, m.STDOUT), (proc.stderr, m.STDERR)):
                    if stream is not None:
                        nursery.start_soon(self._pump_output, index, stream, which)
                with trio.move_on_after(HELLO_TIMEOUT) as hello_scope:
                    async with trio.open_nursery() as race:

                        async def exited() -> None:
                            nonlocal code
                            code = await proc.wait()
                            race.cancel_scope.cancel()

                        async def greeted() -> None:
                            nonlocal frames
                            frames = await receive.receive()
                            race.cancel_scope.cancel()

                        race.start_soon(exited)
                        race.start_soon(greeted)
                if frames is None:
                    if hello_scope.cancelled_caught:
                        log.error("worker %d did not connect within %.0fs", index, HELLO_TIMEOUT)
                    proc.kill()
                    code = await proc.wait() if code is None else code
                    log.error(
                        "worker %d (%s) %s before it was ready", index, spec.image or "process", describe_exit(code)
                    )
                    nursery.cancel_scope.cancel()
                    self.pool.died(index)
                    return
                trace("agent", f"worker {index} ready")
                conn = WorkerConn(index, proc, frames, nonce)
                self.conns[index] = conn
                self._start(self.pool.worker_ready(index))
                if self.pool.slots[index].retired:
                    proc.kill()
                self.outbox.mark_dirty()
                self.counters["workers_started"] += 1
                await self._serve_worker(conn)
                with trio.move_on_after(5):
                    code = await proc.wait()
                if code is None:
                    proc.kill()
                    code = await proc.wait()
                # let the output pumps drain, unless a child of the worker holds its stdout open
                nursery.cancel_scope.deadline = trio.current_time() + 0.5
        finally:
            del self._hello[nonce]
            proc.kill()
            if self.conns.get(index) is not None and self.conns[index].proc is proc:
                del self.conns[index]
            with trio.CancelScope(shield=True):
                if frames is not None:
                    await frames.aclose()
                with trio.move_on_after(5):
                    await proc.wait()  # reap it, even when the agent itself is stopping
        self._worker_died(index, code, progress_path, proc, spec)

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
                chunk = {"job_id": header["job_id"], "lines": header["lines"], "nbytes": header["nbytes"]}
                await self.outbox.add_logs(chunk, blobs[0])
            elif kind == proto.DONE:
                trace("agent", f"done w{conn.slot} lease={header['lease_id']}")
                slot = self.pool.slots[conn.slot]
                lease = slot.lease
                if lease is None or lease.lease_id != header["lease_id"] or slot.state != SlotState.BUSY:
                    continue  # a cancelled lease finishing: the daemon has dropped it
                result = {
                    "lease_id": lease.lease_id,
                    "job_id": lease.job_id,
                    "lo": header["lo"],
                    "n_ok": header["n_ok"],
                    "elapsed": header["elapsed"],
                    "error": header.get("error"),
                }
                self.outbox.add_result(result, list(blobs))
                self.counters["leases_done"] += 1
                self._after_lease(conn.slot)

    def _worker_died(
        self, index: int, code: int | None, progress_path: Path, proc: WorkerProcess, spec: pools.PoolSpec
    ) -> None:
        lease, memory = self.pool.died(index)
        self.outbox.mark_dirty()
        if lease is None:
            return
        self.counters["worker_deaths"] += 1
        try:
            (at,) = proto.PROGRESS.unpack(progress_path.read_bytes()[: proto.PROGRESS.size])
        except (OSError, ValueError):
            at = proto.IDLE
        if not lease.lo <= at < lease.hi:
            at = lease.lo
        where = f"on node {self.hostname}" + (f", in a container of image {spec.image}" if spec.image else "")
        oom = getattr(proc, "oom_killed", False)
        if memory is not None or oom:
            rss, limit = memory if memory is not None else (0, lease.func_ram_bytes)
            used = f"used {rss / 1e9:.2f} GB of memory, over" if rss else "went over"
            error = m.CallError(
                index=at,
                kind=m.MEMORY,
                type_name=m.ErrorType.MEMORY_LIMIT,
                message=(
                    f"input #{at} {used} its func_ram of {limit / 1e9:g} GB {where}, and was killed. "
                    "Pass a larger func_ram= (up to a node's RAM), or use less memory per call."
                ),
                node=self.hostname,
            )
        else:
            how = proc.describe_exit(code) if code is not None else "stopped answering"
            error = m.CallError(
                index=at,
                kind=m.WORKER_DIED,
                type_name=m.ErrorType.WORKER_DIED,
                message=f"the worker running input #{at} {how} {where}.",
                node=self.hostname,
            )
        result = {
            "lease_id": lease.lease_id,
            "job_id": lease.job_id,
            "lo": lease.lo,
            "n_ok": 0,
            "elapsed": 0.0,
            "error": error.to_wire(),
        }
        self.outbox.add_result(result, [pickle.dumps([])])

    async def _pump_output(self, index: int, stream: trio.abc.ReceiveStream, which: int) -> None:
        """Forward what a worker writes to its raw stdout/stderr before its shim captures them."""
        partial = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    if partial:
                        await self._forward_raw(index, which, partial)
                    return
                data = partial + data
                cut = data.rfind(b"\n") + 1
                partial = data[cut:]
                if cut:
                    await self._forward_raw(index, which, data[:cut])

    async def _forward_raw(self, index: int, which: int, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        slot = self.pool.slots.get(index)
        lease = slot.lease if slot is not None else None
        if lease is None:
            print(f"[worker {index}] {text}", end="", file=sys.stderr)
            return
        blob = pickle.dumps([(-1, which, text)])
        await self.outbox.add_logs({"job_id": lease.job_id, "lines": text.count("\n"), "nbytes": len(text)}, blob)

    async def _memory_loop(self) -> None:
        """Kill calls that go over their func_ram, where the kernel does not do it for us."""
        if self.runtime.enforces_memory:
            return
        while True:
            await trio.sleep(self.config.memory_check_interval)
            for slot in self.pool.busy():
                conn = self.conns.get(slot.index)
                if conn is None or conn.proc.pid is None or slot.lease is None:
                    continue
                rss = host.rss_bytes(conn.proc.pid)
                if rss > slot.lease.func_ram_bytes:
                    log.warning("worker %d: %d bytes > func_ram %d: killed", slot.index, rss, slot.lease.func_ram_bytes)
                    self.pool.kill_for_memory(slot.index, rss, slot.lease.func_ram_bytes)
                    conn.proc.kill()
                    self.counters["memory_kills"] += 1

    def statistics(self) -> dict[str, Any]:
        envs = self.envs.statistics() if self.envs is not None else {}
        return {**self.pool.statistics(), **self.runtime.statistics(), **envs, **self.counters}


def _phase(spec: pools.PoolSpec) -> str:
    return f"preparing image {spec.image}" if spec.image else ""


def _short_id(conn: WorkerConn) -> str:
    return str(getattr(conn.proc, "id", "") or conn.proc.pid or "")[:12]

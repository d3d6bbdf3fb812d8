"""The node agent: keeps warm workers and feeds them the daemon's leases.

One agent runs per node (``burlad agent URL --token T``). It

* registers its host with the daemon, then long-polls it for deliveries
  (leases, the functions and input batches they need, job cancellations);
* keeps one warm worker per slot, replacing any that dies, and starts each
  lease on a free worker (`WorkerPool` decides which);
* sends results and printed lines back in one request whenever none is in
  flight, so batches grow with load; nothing is dropped while the daemon is
  unreachable, it is re-sent when the daemon is back;
* kills a call that goes over its func_ram, and reports which input a dead
  worker was running.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

import burla
from burla._trace import trace
from burla.daemon.config import AgentConfig
from burla.schemas import envelope, local
from burla.schemas import messages as m
from burla.schemas import worker as proto

from . import host
from .channel import FrameStream
from .pool import Slot, SlotState, WorkerPool
from .runtime import Runtime, WorkerProcess, describe_exit

log = logging.getLogger("burla.agent")

_FUNCTIONS_KEPT = 16  # per worker; the shim keeps the same number
_WORKER_BATCHES_KEPT = 4  # the shim's cache of unpickled batches
_AGENT_BATCH_BYTES = 512 * 1024**2  # input batches the agent keeps to hand to workers
_OUTBOX_BYTES = 64 * 1024**2  # printed output waiting to be sent; past it, workers wait
_HELLO_TIMEOUT = 120.0
_REPORTS_IN_FLIGHT = 2
_REPOLL_DELAY = 0.05  # with leases running, how long a report may take the place of a poll


class AgentError(RuntimeError):
    """The agent cannot go on (its token was refused, its state dir is taken)."""


class DaemonUnavailable(Exception):
    pass


@dataclasses.dataclass
class WorkerConn:
    slot: int
    proc: WorkerProcess
    stream: FrameStream
    nonce: str
    functions: collections.OrderedDict[str, None] = dataclasses.field(default_factory=collections.OrderedDict)
    batches: collections.OrderedDict[tuple[str, int], None] = dataclasses.field(default_factory=collections.OrderedDict)


class Outbox:
    """Results and log lines waiting to go to the daemon."""

    def __init__(self, max_log_bytes: int = _OUTBOX_BYTES) -> None:
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


class Agent:
    def __init__(self, config: AgentConfig, runtime: Runtime | None = None) -> None:
        if not config.url:
            raise AgentError("the agent needs the daemon's URL (burlad agent URL --token TOKEN)")
        self.config = config
        if runtime is None:
            from .process_runtime import ProcessRuntime

            runtime = ProcessRuntime(config.python)
        self.runtime = runtime
        self.hostname = host.hostname()
        self.agent_id = ""
        self.boot_id = ""
        self.ack = 0
        self.poll_timeout = 2.0
        self.outbox = Outbox()
        self.conns: dict[int, WorkerConn] = {}
        self.functions: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.batches: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()
        self.batch_bytes = 0
        self.unacked: set[int] = set()  # leases whose results are sent but not yet acknowledged
        self.payload_dir = ""
        self.payload_proof = ""
        self._waiting = 0  # requests held at the daemon waiting for work (polls)
        self._waiting_changed = trio.Event()
        self._line_reports = 0  # reports in flight that carry printed lines
        self._line_reports_done = trio.Event()
        self._report_backoff = 0.05
        self.batch_files: dict[tuple[str, int], str] = {}  # batches readable as files on this host
        self.counters: collections.Counter[str] = collections.Counter()
        self._hello: dict[str, trio.MemorySendChannel[FrameStream]] = {}
        self._registered = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.pool = WorkerPool(0)
        self.run_dir = Path()

    # ---- lifecycle ---------------------------------------------------------------

    def _n_workers(self, cpus: int) -> int:
        if self.config.workers > 0:
            return self.config.workers
        return max(1, int(cpus * self.config.workers_per_cpu))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        lock = host.StateDirLock(self.config.resolved_state_dir())
        # unix socket paths must stay under ~100 bytes: keep them in a short temp dir
        self.run_dir = Path(tempfile.mkdtemp(prefix="burla-agent-"))
        os.chmod(self.run_dir, 0o755)
        try:
            await self.runtime.prepare(self.run_dir)
            cpus = self.config.cpus or host.cpu_count()
            self.info = m.NodeInfo(
                node_id=lock.node_id,
                hostname=self.hostname,
                cpus=cpus,
                ram_bytes=self.config.ram or host.ram_bytes(),
                python_version=self.runtime.python_version(),
                workers=self._n_workers(cpus),
                runtime=self.runtime.name,
                gpus=host.gpus(),
                agent_version=burla.__version__,
            )
            self.pool = WorkerPool(self.info.workers)
            self.socket_path = str(self.run_dir / "agent.sock")
            listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o777)  # rootless containers connect as another uid
            listener.listen(256)
            headers = {"authorization": f"Bearer {self.config.token}", "user-agent": f"burla-agent/{burla.__version__}"}
            timeout = httpx.Timeout(60.0, connect=10.0)
            async with httpx.AsyncClient(base_url=self.config.url, headers=headers, timeout=timeout) as self.http:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._accept_loop, trio.SocketListener(listener))
                    for slot in range(self.info.workers):
                        nursery.start_soon(self._keep_worker, slot)
                    await self._register()
                    nursery.start_soon(self._poll_loop)
                    nursery.start_soon(self._report_loop)
                    nursery.start_soon(self._memory_loop)
                    task_status.started(self)
        finally:
            for conn in self.conns.values():
                conn.proc.kill()
            with trio.CancelScope(shield=True):
                await self.runtime.aclose()
            lock.release()
            _remove_tree(self.run_dir)

    async def _register(self) -> None:
        backoff = 0.05
        while True:
            try:
                r = await self.http.post("/v1/agents/register", json=self.info.to_wire())
            except httpx.TransportError as e:
                log.info("daemon %s unreachable (%s); retrying", self.config.url, e)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
                continue
            if r.status_code == 401:
                raise AgentError(f"the daemon at {self.config.url} refused this agent's token: {r.text}")
            if r.status_code != 200:
                log.warning("register failed (%s): %s", r.status_code, r.text)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
                continue
            reg = m.Registered.from_wire(r.json())
            self.agent_id, self.boot_id, self.ack = reg.agent_id, reg.boot_id, 0
            self.poll_timeout = reg.poll_timeout
            # on the daemon's host, large batches are read from its payload files instead of HTTP
            self.payload_dir = reg.payload_dir
            self.payload_proof = local.read_probe(reg.payload_dir, reg.payload_host) or ""
            self.counters["registrations"] += 1
            log.info("registered with %s as agent %s (%d workers)", self.config.url, self.agent_id, self.info.workers)
            trace("agent", "registered")
            self._registered.set()
            return

    # ---- talking to the daemon -------------------------------------------------------

    def _report(self, results: Sequence[dict[str, Any]] = (), logs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id,
            "ack_delivery": self.ack,
            "ready_workers": self.pool.ready(),
            "running": sorted(self.pool.held() | self.unacked | self.outbox.lease_ids()),
            "results": list(results),
            "logs": list(logs),
            "stats": self.statistics(),
            "payload_proof": self.payload_proof,
        }

    async def _post(self, route: str, header: dict[str, Any], blobs: Sequence[Any]) -> None:
        """POST a report to the daemon and take in what it delivers back."""
        agent_id = self.agent_id
        trace("agent", f"{route} send results={[r['lease_id'] for r in header['results']]}")
        try:
            r = await self.http.post(
                f"/v1/agents/{agent_id}/{route}",
                content=envelope.pack(header, blobs),
                headers={"content-type": envelope.CONTENT_TYPE},
                timeout=httpx.Timeout(self.poll_timeout + 30.0, connect=5.0),
            )
        except httpx.TransportError as e:
            raise DaemonUnavailable(str(e)) from None
        if r.status_code == 404 and agent_id == self.agent_id:
            log.warning("the daemon no longer knows agent %s: registering again", agent_id)
            await self._register()
            raise DaemonUnavailable("re-registered")
        if r.status_code == 401:
            raise AgentError(f"the daemon at {self.config.url} refused this agent's token: {r.text}")
        if r.status_code != 200:
            raise DaemonUnavailable(f"HTTP {r.status_code}: {r.text[:200]}")
        head, out = envelope.unpack(r.content)
        trace("agent", f"{route} answered leases={[(x['lo'], x['hi']) for x in head.get('leases', [])]}")
        self._take_delivery(m.Delivery.from_wire(head), out)

    async def _poll_loop(self) -> None:
        """Keep one request waiting at the daemon for work and cancellations.

        After a delivery the agent does not poll again at once: the report of
        the leases just delivered, sent when they finish, waits for the next
        work itself (see `_report_loop`). Only if they are still running after
        `_REPOLL_DELAY` does a plain poll go out, so a cancellation still
        reaches the agent well within a second.
        """
        backoff = 0.05
        while True:
            while self._waiting:
                await self._waiting_changed.wait()
            if self.pool.busy():
                with trio.move_on_after(_REPOLL_DELAY):
                    while not self._waiting:
                        await self._waiting_changed.wait()
                if self._waiting:
                    continue
            self._set_waiting(+1)
            try:
                await self._post("poll", self._report(), [])
                backoff = 0.05
            except DaemonUnavailable as e:
                log.debug("poll failed: %s", e)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff)
            finally:
                self._set_waiting(-1)

    def _set_waiting(self, delta: int) -> None:
        self._waiting += delta
        self._waiting_changed.set()
        self._waiting_changed = trio.Event()

    async def _report_loop(self) -> None:
        """Send results and lines as they come; up to two reports at once.

        Printed lines must reach the daemon in order, and before the result of
        their lease: while a report carrying lines is in flight, the next report
        with lines or results waits for it. A report without lines, sent while
        no request waits at the daemon, is itself that waiting request (the
        daemon's poll takes results too): one request per job instead of two.
        """
        slots = trio.Semaphore(_REPORTS_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            while True:
                await self.outbox.wait()
                while self._line_reports and (self.outbox.logs or self.outbox.results):
                    await self._line_reports_done.wait()
                if not self._waiting and not self.outbox.logs:
                    results, logs, blobs, taken = self.outbox.take()
                    self._set_waiting(+1)
                    nursery.start_soon(self._send_report, results, logs, blobs, taken, None)
                    continue
                await slots.acquire()
                results, logs, blobs, taken = self.outbox.take()
                nursery.start_soon(self._send_report, results, logs, blobs, taken, slots)

    async def _send_report(
        self, results: list[dict[str, Any]], logs: list[dict[str, Any]], blobs: list[Any], taken: Any,
        slots: trio.Semaphore | None,
    ) -> None:  # fmt: skip
        """Send one report; without a slot it is the request that waits for work (a poll)."""
        lease_ids = {r["lease_id"] for r in results}
        self.unacked |= lease_ids
        if logs:
            self._line_reports += 1
        try:
            await self._post("report" if slots else "poll", self._report(results, logs), blobs)
            self.counters["results_sent"] += len(results)
            self.counters["log_chunks_sent"] += len(logs)
            self._report_backoff = 0.05
        except DaemonUnavailable as e:
            log.debug("report failed: %s", e)
            self.outbox.put_back(taken)
            await trio.sleep(self._report_backoff)
            self._report_backoff = min(self._report_backoff * 2, self.config.max_backoff)
        finally:
            self.unacked -= lease_ids
            if logs:
                self._line_reports -= 1
                self._line_reports_done.set()
                self._line_reports_done = trio.Event()
            if slots is None:
                self._set_waiting(-1)
            else:
                slots.release()

    def _take_delivery(self, delivery: m.Delivery, blobs: list[memoryview]) -> None:
        if delivery.boot_id != self.boot_id:
            self.boot_id, self.ack = delivery.boot_id, 0
        if not delivery.delivery:
            return
        self.ack = max(self.ack, delivery.delivery)
        for function_hash, i in delivery.functions.items():
            self.functions[function_hash] = blobs[i]
            while len(self.functions) > 4 * _FUNCTIONS_KEPT:
                self.functions.popitem(last=False)
        for job_id, seq, i in delivery.batches:
            self._keep_batch((job_id, seq), blobs[i])
        for job_id, seq, ref in delivery.batch_refs:
            self.batch_files[(job_id, seq)] = str(Path(self.payload_dir) / ref)
        for job_id in delivery.cancel_jobs:
            self._cancel_job(job_id)
        self.counters["leases_received"] += len(delivery.leases)
        self._start(self.pool.offer(list(delivery.leases)))

    def _keep_batch(self, key: tuple[str, int], blob: Any) -> None:
        if key in self.batches:
            return
        self.batches[key] = blob
        self.batch_bytes += len(blob)
        while self.batch_bytes > _AGENT_BATCH_BYTES and len(self.batches) > 1:
            _, old = self.batches.popitem(last=False)
            self.batch_bytes -= len(old)

    def _cancel_job(self, job_id: str) -> None:
        for slot in self.pool.cancel_job(job_id):
            conn = self.conns.get(slot.index)
            if conn is not None:
                conn.proc.kill()
        for key in [k for k in self.batches if k[0] == job_id]:
            self.batch_bytes -= len(self.batches.pop(key))
        for key in [k for k in self.batch_files if k[0] == job_id]:
            del self.batch_files[key]
        self.counters["jobs_cancelled"] += 1

    async def _fetch(self, path: str) -> bytes:
        backoff = 0.05
        while True:
            try:
                r = await self.http.get(f"/v1/agents/{self.agent_id}/{path}")
                if r.status_code == 200:
                    return r.content
                if r.status_code in (404, 409):
                    raise LookupError(f"{path}: {r.text}")
            except httpx.TransportError:
                pass
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.max_backoff)

    # ---- leases on workers ---------------------------------------------------------------

    def _start(self, started: list[tuple[Slot, m.Lease]]) -> None:
        assert self._nursery is not None
        for slot, lease in started:
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
        }
        blobs: list[Any] = []
        key = (lease.job_id, lease.batch_seq)
        try:
            if lease.function_hash not in conn.functions:
                fn = self.functions.get(lease.function_hash)
                if fn is None:
                    fn = await self._fetch(f"functions/{lease.function_hash}")
                    self.functions[lease.function_hash] = fn
                header["function_blob"] = len(blobs)
                blobs.append(fn)
            if key not in conn.batches:
                path = self.batch_files.get(key)
                if path is not None and self.runtime.worker_path(path) is not None and os.path.exists(path):
                    header["batch_file"] = self.runtime.worker_path(path)  # the worker reads it itself
                else:
                    batch = self.batches.get(key)
                    if batch is None:
                        batch = await self._fetch(f"batches/{lease.job_id}/{lease.batch_seq}")
                        self._keep_batch(key, batch)
                    header["batch_blob"] = len(blobs)
                    blobs.append(batch)
        except LookupError:  # the job ended meanwhile: nothing to run
            self._settle(index, lease)
            return
        if self.pool.slots[index].lease is not lease or self.conns.get(index) is not conn:
            return  # cancelled or the worker died while we fetched
        trace("agent", f"run w{index} [{lease.lo},{lease.hi}) blobs={len(blobs)}")
        try:
            await conn.stream.send(header, blobs)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the worker died: its death reports the lease
        if header["function_blob"] is not None:
            conn.functions[lease.function_hash] = None
            while len(conn.functions) > _FUNCTIONS_KEPT:
                conn.functions.popitem(last=False)
        if header["batch_blob"] is not None or header["batch_file"] is not None:
            conn.batches[key] = None
            while len(conn.batches) > _WORKER_BATCHES_KEPT:
                conn.batches.popitem(last=False)

    def _settle(self, index: int, lease: m.Lease) -> None:
        """A lease that cannot run: give its slot the next one (the daemon already dropped it)."""
        if self.pool.slots[index].lease is lease:
            self._start(self.pool.finished(index))

    # ---- workers -----------------------------------------------------------------------

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                assert self._nursery is not None
                self._nursery.start_soon(self._greet, stream)

    async def _greet(self, stream: trio.SocketStream) -> None:
        frames = FrameStream(stream)
        with trio.move_on_after(_HELLO_TIMEOUT):
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
        """Keep a warm worker in slot `index`, forever."""
        while True:
            deaths = self.pool.slots[index].deaths
            if deaths:
                await trio.sleep(min(0.05 * 2 ** min(deaths, 6), 5.0))
            try:
                await self._run_worker(index)
            except Exception as e:  # a worker that cannot start must not take the agent down
                log.error("cannot start worker %d: %s: %s", index, type(e).__name__, e)
                self.pool.died(index)

    async def _run_worker(self, index: int) -> None:
        progress_path = self.run_dir / f"w{index}.progress"
        progress_path.write_bytes(proto.PROGRESS.pack(proto.IDLE))
        os.chmod(progress_path, 0o666)
        nonce = secrets.token_hex(8)
        send, receive = trio.open_memory_channel[FrameStream](1)
        self._hello[nonce] = send
        env = {
            proto.SOCKET_ENV: self.socket_path,
            proto.PROGRESS_ENV: str(progress_path),
            proto.LOG_FLUSH_ENV: str(self.config.log_flush_interval),
            "BURLA_WORKER_SLOT": str(index),
            "BURLA_WORKER_NONCE": nonce,
        }
        proc = await self.runtime.start_worker(index, env)
        code: int | None = None
        frames: FrameStream | None = None
        try:
            async with trio.open_nursery() as nursery:
                for stream, which in ((proc.stdout, m.STDOUT), (proc.stderr, m.STDERR)):
                    if stream is not None:
                        nursery.start_soon(self._pump_output, index, stream, which)
                with trio.move_on_after(_HELLO_TIMEOUT) as hello_scope:
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
                        log.error("worker %d did not connect within %.0fs", index, _HELLO_TIMEOUT)
                    proc.kill()
                    code = await proc.wait()
                    log.error("worker %d %s before it was ready", index, describe_exit(code))
                    nursery.cancel_scope.cancel()
                    self.pool.died(index)
                    return
                trace("agent", f"worker {index} ready")
                conn = WorkerConn(index, proc, frames, nonce)
                self.conns[index] = conn
                self._start(self.pool.worker_ready(index))
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
        self._worker_died(index, code, progress_path)

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
                self._start(self.pool.finished(conn.slot))

    def _worker_died(self, index: int, code: int | None, progress_path: Path) -> None:
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
        if memory is not None:
            rss, limit = memory
            error = m.CallError(
                index=at,
                kind=m.MEMORY,
                type_name="burla.errors.MemoryLimitError",
                message=(
                    f"input #{at} used {rss / 1e9:.2f} GB of memory, over its func_ram of {limit / 1e9:g} GB, "
                    f"on node {self.hostname}, and was killed. Pass a larger func_ram= "
                    "(up to a node's RAM), or use less memory per call."
                ),
                node=self.hostname,
            )
        else:
            how = describe_exit(code) if code is not None else "stopped answering"
            error = m.CallError(
                index=at,
                kind=m.WORKER_DIED,
                type_name="burla.errors.WorkerDiedError",
                message=f"the worker running input #{at} {how} on node {self.hostname}.",
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
        """Forward what a worker writes to its raw stdout/stderr (C code, subprocesses)."""
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
        lease = self.pool.slots[index].lease
        if lease is None:
            print(f"[worker {index}] {text}", end="", file=sys.stderr)
            return
        blob = pickle.dumps([(-1, which, text)])
        await self.outbox.add_logs({"job_id": lease.job_id, "lines": text.count("\n"), "nbytes": len(text)}, blob)

    async def _memory_loop(self) -> None:
        """Kill calls that go over their func_ram (the process runtime's enforcement)."""
        if getattr(self.runtime, "enforces_memory", False):
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
        return {
            **self.pool.statistics(),
            **self.runtime.statistics(),
            "cached_functions": len(self.functions),
            "cached_batches": len(self.batches),
            **self.counters,
        }


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

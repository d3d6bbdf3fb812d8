"""The node agent: keeps warm workers and feeds them the daemon's leases.

One agent runs per node (``burlad agent URL``, the node token in $BURLA_AGENT_TOKEN or a file). It

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
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from burla.common import local, tls
from burla.common import version as _version
from burla.common.config import AgentConfig
from burla.common.http import Chunks, async_client
from burla.common.retry import Backoff
from burla.common.trace import trace
from burla.errors import ConfigError
from burla.schemas import envelope
from burla.schemas import messages as m

from . import host
from .blobs import BlobCache
from .outbox import Outbox, Outcome, Taken
from .runtime import Runtime, WorkerSetupError
from .supervisor import Supervisor

log = logging.getLogger("burla.agent")

_REPORTS_IN_FLIGHT = 2
_REPOLL_DELAY = 0.05  # with leases running, how long a report may take the place of a poll
_REFUSED = m.ErrorType.CALL  # type of the error that stands for a result the daemon refused
_FETCH_PATIENCE = 60.0  # seconds a fetch retries an unreachable daemon before its lease fails


class AgentError(RuntimeError):
    """The agent cannot go on (its token was refused, its state dir is taken)."""


class DaemonUnavailable(Exception):
    pass


class ReportRefused(Exception):
    """The daemon answered a report 400: sending it again cannot help."""


class Agent:
    def __init__(self, config: AgentConfig, runtime: Runtime | None = None) -> None:
        if not config.url:
            raise AgentError("the agent needs the daemon's URL (burlad agent URL)")
        self.config = config
        if runtime is None:
            from .process_runtime import ProcessRuntime

            runtime = ProcessRuntime(config.python, config.worker_user)
        elif config.worker_user and runtime.containers:
            raise ConfigError(
                f"agent.worker_user is for the process runtime; the {runtime.name} runtime's workers are rootless "
                "containers, which see none of the agent's files: leave agent.worker_user empty"
            )
        elif config.worker_user and getattr(runtime, "user", None) is None:
            raise ConfigError(f"agent.worker_user is set, but the {runtime.name} runtime given was made without it")
        runtime.secrets = (config.token,)  # no variable that holds it reaches a worker
        self.runtime = runtime
        self.hostname = host.hostname()
        self.agent_id = ""
        self.agent_auth: dict[str, str] = {}
        self.boot_id = ""
        self.ack = 0
        self.poll_timeout = 2.0
        self.outbox = Outbox()
        self.blobs = BlobCache()
        self.workers = Supervisor(config, runtime, self.outbox, self.blobs, self._fetch, self.hostname)
        self.unacked: set[int] = set()  # leases whose results are sent but not yet acknowledged
        self.payload_dir = ""
        self.payload_proof = ""
        self._waiting = 0  # requests held at the daemon waiting for work (polls)
        self._waiting_changed = trio.Event()
        self._line_reports = 0  # reports in flight that carry printed lines
        self._line_reports_done = trio.Event()
        self._report_backoff = Backoff(0.05, config.max_backoff)  # shared: reports fail together
        self._pools_acked: tuple[m.PoolState, ...] | None = None  # what the daemon last heard of our pools
        self.counters: collections.Counter[str] = collections.Counter()
        self._registered = trio.Event()
        self.run_dir = Path()

    # ---- lifecycle ---------------------------------------------------------------

    def _n_workers(self, cpus: int) -> int:
        if self.config.workers > 0:
            return self.config.workers
        return max(1, int(cpus * self.config.workers_per_cpu))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            verify = tls.client_context(self.config.ca_file, "agent.ca_file")
        except ConfigError as e:
            raise AgentError(str(e)) from None
        lock = host.StateDirLock(self.config.resolved_state_dir())
        # unix socket paths must stay under ~100 bytes: keep them in a short temp dir
        self.run_dir = Path(tempfile.mkdtemp(prefix="burla-agent-"))
        os.chmod(self.run_dir, 0o755)
        self.runtime.label = lock.node_id[:12]  # one agent per state dir: its containers are its own
        self.runtime.env_root = lock.state_dir / "envs"
        try:
            try:
                await self.runtime.prepare(self.run_dir)
            except WorkerSetupError as e:
                raise AgentError(f"the {self.runtime.name} runtime cannot start: {e}") from None
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
                agent_version=_version.version(),
                protocol=_version.protocol(),
                instance=self.config.instance,
                runs_after=True,  # a prefetched lease waits for the one it follows (WorkerPool.offer)
            )
            headers = {
                "authorization": f"Bearer {self.config.token}",
                "user-agent": f"burla-agent/{_version.version()}",
            }
            timeout = httpx.Timeout(60.0, connect=10.0)
            async with async_client(self.config.url, headers, timeout, verify=verify) as self.http:
                async with trio.open_nursery() as nursery:
                    await self.workers.run(nursery, self.run_dir, self.info, lock.state_dir)
                    await self._register()
                    nursery.start_soon(self._poll_loop)
                    nursery.start_soon(self._report_loop)
                    task_status.started(self)
        finally:
            self.workers.kill_all()
            with trio.CancelScope(shield=True):
                await self.runtime.aclose()
            lock.release()
            _remove_tree(self.run_dir)

    async def _register(self) -> None:
        backoff = Backoff(0.05, self.config.max_backoff)
        while True:
            try:
                r = await self.http.post("/v1/agents/register", json=self.info.to_wire())
            except httpx.TransportError as e:
                if why := tls.untrusted(e):  # retrying cannot help
                    raise AgentError(
                        f"the daemon at {self.config.url} presented a TLS certificate this agent does not trust "
                        f"({why}): if your own CA signed it, pass --ca-file CA.pem (or set [agent] ca_file, "
                        "$BURLA_AGENT_CA_FILE)"
                    ) from None
                log.info("daemon %s unreachable (%s); retrying", self.config.url, e)
                await backoff.wait()
                continue
            if r.status_code == 401:
                raise AgentError(f"the daemon at {self.config.url} refused this agent's token: {r.text}")
            if r.status_code == 409 and _error_code(r) == "version_mismatch":  # retrying cannot help
                raise AgentError(f"the daemon at {self.config.url} refused this agent: {_error_message(r)}")
            if r.status_code != 200:
                log.warning("register failed (%s): %s", r.status_code, r.text)
                await backoff.wait()
                continue
            reg = m.Registered.from_wire(r.json())
            self.agent_id, self.boot_id, self.ack = reg.agent_id, reg.boot_id, 0
            # from now on this agent speaks with its own token: the shared node token only registers
            self.agent_auth = {"authorization": f"Bearer {reg.agent_token or self.config.token}"}
            self.poll_timeout = reg.poll_timeout
            self.workers.max_result_bytes = reg.max_result_bytes
            # on the daemon's host, large batches are read from its payload files instead of HTTP
            self.payload_dir = reg.payload_dir
            self.payload_proof = local.read_probe(reg.payload_dir, reg.payload_host) or ""
            self.counters["registrations"] += 1
            log.info("registered with %s as agent %s (%d workers)", self.config.url, self.agent_id, self.info.workers)
            trace("agent", "registered")
            self._registered.set()
            return

    # ---- talking to the daemon -------------------------------------------------------

    def _report(self, taken: Taken | None = None) -> m.AgentReport:
        pools = self.workers.pool_states()
        return m.AgentReport(
            boot_id=self.boot_id,
            ack_delivery=self.ack,
            ready_workers=self.workers.ready_workers(),
            running=tuple(sorted(self.workers.held() | self.unacked | self.outbox.lease_ids())),
            results=taken.results if taken is not None else (),
            logs=taken.logs if taken is not None else (),
            stats=self.statistics(),
            payload_proof=self.payload_proof,
            job_phases=dict(self.workers.job_phases),
            pools=None if pools == self._pools_acked else pools,
            pool_errors=tuple(self.workers.pool_errors),
        )

    async def _post(self, route: str, report: m.AgentReport, blobs: Sequence[envelope.Blob]) -> None:
        """POST a report to the daemon and take in what it delivers back."""
        agent_id = self.agent_id
        trace("agent", f"{route} send results={[r.lease_id for r in report.results]}")
        content, length = _body(envelope.parts(report.to_wire(), blobs))
        try:
            r = await self.http.post(
                f"/v1/agents/{agent_id}/{route}",
                content=content,
                headers={"content-type": envelope.CONTENT_TYPE, "content-length": str(length), **self.agent_auth},
                timeout=httpx.Timeout(self.poll_timeout + 30.0, connect=5.0),
            )
        except httpx.TransportError as e:
            raise DaemonUnavailable(str(e)) from None
        if r.status_code == 404 and agent_id == self.agent_id:
            log.warning("the daemon no longer knows agent %s: registering again", agent_id)
            self._pools_acked = None
            await self._register()
            raise DaemonUnavailable("re-registered")
        if r.status_code == 401:
            raise AgentError(f"the daemon at {self.config.url} refused this agent's token: {r.text}")
        if r.status_code == 400:
            raise ReportRefused(_error_message(r))
        if r.status_code != 200:
            raise DaemonUnavailable(f"HTTP {r.status_code}: {r.text[:200]}")
        head, out = envelope.unpack(r.content)
        trace("agent", f"{route} answered leases={[(x['lo'], x['hi']) for x in head.get('leases', [])]}")
        if report.pools is not None:
            self._pools_acked = report.pools
        if report.pool_errors:
            sent = report.pool_errors
            self.workers.pool_errors = [e for e in self.workers.pool_errors if e not in sent]
        self._take_delivery(m.Delivery.from_wire(head), out)

    async def _poll_loop(self) -> None:
        """Keep one request waiting at the daemon for work and cancellations.

        After a delivery the agent does not poll again at once: the report of
        the leases just delivered, sent when they finish, waits for the next
        work itself (see `_report_loop`). Only if they are still running after
        `_REPOLL_DELAY` does a plain poll go out, so a cancellation still
        reaches the agent well within a second.
        """
        backoff = Backoff(0.05, self.config.max_backoff)
        while True:
            while self._waiting:
                await self._waiting_changed.wait()
            if self.workers.pool.busy():
                with trio.move_on_after(_REPOLL_DELAY):
                    while not self._waiting:
                        await self._waiting_changed.wait()
                if self._waiting:
                    continue
            self._set_waiting(+1)
            try:
                await self._post("poll", self._report(), [])
                backoff.reset()
            except DaemonUnavailable as e:
                log.debug("poll failed: %s", e)
                await backoff.wait()
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
                    taken = self._take()
                    self._set_waiting(+1)
                    nursery.start_soon(self._send_report, taken, None)
                    continue
                await slots.acquire()
                nursery.start_soon(self._send_report, self._take(), slots)

    def _take(self) -> Taken:
        """The outbox's contents, their leases counted as unacknowledged at once: a poll sent before the
        report starts must still name them as held, or the daemon requeues them and they run twice."""
        taken = self.outbox.take()
        self.unacked |= {r.lease_id for r in taken.results}
        return taken

    async def _send_report(self, taken: Taken, slots: trio.Semaphore | None) -> None:
        """Send one report; without a slot it is the request that waits for work (a poll)."""
        results, logs = taken.results, taken.logs
        lease_ids = {r.lease_id for r in results}
        self.unacked |= lease_ids
        if logs:
            self._line_reports += 1
        try:
            await self._post("report" if slots else "poll", self._report(taken), taken.blobs)
            self.counters["results_sent"] += len(results)
            self.counters["log_chunks_sent"] += len(logs)
            self._report_backoff.reset()
        except DaemonUnavailable as e:
            log.debug("report failed: %s", e)
            self.outbox.put_back(taken)
            await self._report_backoff.wait()
        except ReportRefused as e:  # a bug of ours or of a worker: say so for each result, never resend it as is
            log.error("the daemon refused a report of %d results: %s", len(results), e)
            self.counters["reports_refused"] += 1
            for result in results:
                if result.error is not None and result.error.type_name == _REFUSED:
                    continue  # refused once already: dropped, the daemon requeues its lease
                error = m.CallError(result.lo, m.SYSTEM, _REFUSED,
                                    f"node {self.hostname}: the daemon refused this result: {e}"[:4096],
                                    node=self.hostname)  # fmt: skip
                self.outbox.add_result(Outcome.failed(result.lease_id, result.job_id, result.lo, error))
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
            self._pools_acked = None  # a restarted daemon knows nothing of our pools: the next report says them
        if not delivery.delivery:
            return
        self.ack = max(self.ack, delivery.delivery)
        for function_hash, i in delivery.functions.items():
            # checked here as on the daemon: a worker runs only the code its lease names
            if 0 <= i < len(blobs) and hashlib.sha256(blobs[i]).hexdigest() == function_hash:
                self.blobs.add_function(function_hash, blobs[i])
            else:
                log.warning("delivery: function %s does not match its digest: not kept", function_hash[:12])
        for job_id, seq, i in delivery.batches:
            if isinstance(i, int) and 0 <= i < len(blobs):
                self.blobs.add_batch((job_id, seq), blobs[i])
        for job_id, seq, ref in delivery.batch_refs:
            self.blobs.add_batch_file((job_id, seq), str(Path(self.payload_dir) / ref))
        for job_id in delivery.cancel_jobs:
            self.workers.cancel_job(job_id)
            self.blobs.forget_job(job_id)
        if delivery.wants is not None or delivery.standby is not None:
            self.workers.set_targets(delivery.standby, delivery.wants)
        self.counters["leases_received"] += len(delivery.leases)
        self.workers.offer(list(delivery.leases))

    async def _fetch(self, path: str) -> bytes:
        """A function, batch or build context from the daemon; LookupError, saying why, if it cannot be had.

        A refusal (4xx) is final; an unreachable daemon or a 5xx is retried for `_FETCH_PATIENCE` seconds
        (a daemon restart takes about one), then given up, so no lease waits on it forever.
        """
        backoff = Backoff(0.05, self.config.max_backoff, patience=_FETCH_PATIENCE)
        backoff.gives_up()  # starts its deadline: the patience counts from the first try, not the first failure
        while True:
            try:
                r = await self.http.get(
                    f"/v1/agents/{self.agent_id}/{path}",
                    headers=self.agent_auth,
                    timeout=httpx.Timeout(600.0, connect=10),
                )
            except httpx.TransportError as e:
                why = f"the daemon is unreachable ({type(e).__name__}: {e})"
            else:
                if r.status_code == 200:
                    kind, _, digest = path.partition("/")
                    if kind in ("functions", "blobs") and hashlib.sha256(r.content).hexdigest() != digest:
                        # content-addressed: checked here as on the daemon, so a node runs only what was named
                        raise LookupError(f"the daemon sent {path} with bytes that are not its sha256")
                    return r.content
                if 400 <= r.status_code < 500:
                    raise LookupError(f"the daemon refused {path} (HTTP {r.status_code}): {r.text[:300]}")
                why = f"the daemon answered HTTP {r.status_code}"
            if backoff.gives_up():
                raise LookupError(f"gave up on {path} after {_FETCH_PATIENCE:.0f} s: {why}")
            await backoff.wait()

    def statistics(self) -> dict[str, Any]:
        return {**self.workers.statistics(), **self.blobs.statistics(), **self.counters}


def _error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _error_message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


_STREAM_BYTES = 8 * 1024**2  # a report larger than this goes out in chunks, never joined into one copy
_CHUNK_BYTES = 1024**2


def _body(parts: Sequence[bytes | bytearray | memoryview]) -> tuple[Any, int]:
    """A request body of envelope parts, and its length: small ones joined, big ones streamed in chunks."""
    length = sum(len(p) for p in parts)
    if length <= _STREAM_BYTES:
        return b"".join(parts), length
    return Chunks(parts, _CHUNK_BYTES), length


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

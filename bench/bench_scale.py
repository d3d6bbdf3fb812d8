"""The scale of one daemon: many simulated agents, one print-only job over all their slots.

    python bench/bench_scale.py [--agents 1000] [--slots 8] [--inputs 8000] [--runs 3] [--procs 1]
                                [--json OUT] [--trace FILE] [--profile OUT] [--no-local] [--local-only]

A real `burlad serve` (its own temp state dir) and, in --procs harness processes, N simulated agents
that speak the real agent protocol over HTTP: each registers with a node id of its own (NodeInfo with
S workers), long-polls, runs the calls of the leases it gets in-process (the function unpickled with
cloudpickle, the batch with pickle, as the worker shim does), and reports each lease's results as one
pickled list and each call's printed lines as a LogChunk, acking deliveries, with the real agent's
poll/report rules (node_agent/agent.py) and its Outbox (node_agent/outbox.py). At most S leases run at
once per agent. Then this process, as a user, runs `remote_parallel_map(print_only, range(K),
generator=True)`: once cold (function and estimates unknown to the daemon) and --runs times warm.

Figures: seconds to the first result and to all results; daemon CPU seconds per lease (utime+stime
from /proc before and after, leases counted by the harness); leases and deliveries per run; harness
and client CPU (to tell whether the harness kept up); the SQLite file size after the runs.

Then a small second figure with the local provider: from `remote_parallel_map(f, range(8),
grow=True)` on an empty cluster (no standby node) to the first result and to all results.

--trace FILE sets BURLA_TRACE for the daemon and the client (common/trace.py) and prints, per kind of
trace line, how many there were and when the first and last came, relative to each run's call.
--profile OUT runs the daemon under cProfile and writes its stats there (printed: the top entries).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def print_only(x: Any) -> None:
    print(x)


# ---- processes and /proc ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all processes, ours and others'), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # all but idle and iowait


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"burlad exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError("burlad did not serve in time")


class Daemon:
    """`burlad serve` as a subprocess with a state dir of its own."""

    def __init__(self, root: Path, env: dict[str, str], profile: str | None = None) -> None:
        self.root = root
        self.state = root / "daemon"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["serve", "--port", str(self.port), "--state-dir", str(self.state), "--log-level", "WARNING"]
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        self.log = open(root / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, *prefix, "-m", "burla.daemon", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
        wait_healthy(self.url, self.proc)
        tokens = json.loads((self.state / "tokens.json").read_text())
        self.admin_token, self.node_token = tokens["admin"], tokens["node"]

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def db_bytes(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.state.glob("burla.db*")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # a clean exit: cProfile writes its stats
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def log_tail(self, n: int = 2000) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")[-n:]


# ---- the simulated agents (run in harness processes) ----------------------------------------


class Unavailable(Exception):
    pass


class SimAgent:
    """One node agent over HTTP, its workers replaced by calls in this process."""

    def __init__(self, harness: Harness, i: int) -> None:
        import trio

        from burla.common import version
        from burla.node_agent.outbox import Outbox
        from burla.schemas import messages as m

        self.h = harness
        self.info = m.NodeInfo(
            node_id=f"sim{os.getpid()}x{i}",
            hostname=f"sim-{i}",
            cpus=harness.slots,
            ram_bytes=harness.slots * 8 * 10**9,  # 8 GB per slot: every call's default func_ram fits
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            workers=harness.slots,
            runtime="process",
            agent_version=version.version(),
            protocol=version.protocol(),
        )
        self.agent_id = ""
        self.auth: dict[str, str] = {}
        self.boot_id = ""
        self.ack = 0
        self.outbox = Outbox()
        self.free = trio.Semaphore(harness.slots)  # its worker slots
        self.held: set[int] = set()
        self.unacked: set[int] = set()
        self.functions: dict[str, Any] = {}
        self.batches: dict[tuple[str, int], list[Any]] = {}
        self.waiting = 0
        self.waiting_changed = trio.Event()
        self.line_reports = 0
        self.line_reports_done = trio.Event()
        self.nursery: Any = None

    async def run(self, limiter: Any) -> None:
        import trio

        timeout = httpx.Timeout(self.h.poll_timeout + 120.0, connect=60.0)
        # one TLS context for all (a real agent makes its own, once, on its own machine): making 1,000 of
        # them cost this process more CPU than the registrations themselves
        transport = httpx.AsyncHTTPTransport(verify=self.h.ssl_context)
        async with httpx.AsyncClient(base_url=self.h.url, timeout=timeout, transport=transport) as self.http:
            async with limiter:
                await self.register()
            self.h.registered_one()
            async with trio.open_nursery() as self.nursery:
                self.nursery.start_soon(self.poll_loop)
                self.nursery.start_soon(self.report_loop)

    async def register(self) -> None:
        import trio

        from burla.schemas import messages as m

        while True:
            try:
                r = await self.h.timed(
                    "register",
                    self.http.post(
                        "/v1/agents/register",
                        json=self.info.to_wire(),
                        headers={"authorization": f"Bearer {self.h.node_token}"},
                    ),
                )
            except httpx.TransportError:
                self.h.count["transport_errors"] += 1
                await trio.sleep(0.5)
                continue
            if r.status_code != 200:
                self.h.count[f"register_{r.status_code}"] += 1
                await trio.sleep(0.5)
                continue
            reg = m.Registered.from_wire(r.json())
            self.agent_id, self.boot_id, self.ack = reg.agent_id, reg.boot_id, 0
            self.auth = {"authorization": f"Bearer {reg.agent_token}"}
            self.h.count["registrations"] += 1
            return

    def report(self, taken: Any = None) -> Any:
        from burla.schemas import messages as m

        return m.AgentReport(
            boot_id=self.boot_id,
            ack_delivery=self.ack,
            ready_workers=self.h.slots,
            running=tuple(sorted(self.held | self.unacked | self.outbox.lease_ids())),
            results=taken.results if taken is not None else (),
            logs=taken.logs if taken is not None else (),
        )

    async def post(self, route: str, report: Any, blobs: Any) -> None:
        from burla.schemas import envelope
        from burla.schemas import messages as m

        body = b"".join(envelope.parts(report.to_wire(), blobs))
        headers = {"content-type": envelope.CONTENT_TYPE, **self.auth}
        try:
            r = await self.h.timed(
                route, self.http.post(f"/v1/agents/{self.agent_id}/{route}", content=body, headers=headers)
            )
        except httpx.TransportError as e:
            self.h.count["transport_errors"] += 1
            raise Unavailable(str(e)) from None
        if r.status_code == 404:  # expired by the daemon: as the real agent, register again
            self.h.count["expired"] += 1
            await self.register()
            raise Unavailable("re-registered")
        if r.status_code != 200:
            self.h.count[f"{route}_{r.status_code}"] += 1
            raise Unavailable(f"HTTP {r.status_code}: {r.text[:200]}")
        head, out = envelope.unpack(r.content)
        self.take_delivery(m.Delivery.from_wire(head), out)

    def set_waiting(self, delta: int) -> None:
        import trio

        self.waiting += delta
        self.waiting_changed.set()
        self.waiting_changed = trio.Event()

    async def poll_loop(self) -> None:
        import trio

        while True:
            while self.waiting:
                await self.waiting_changed.wait()
            if self.held:  # as the agent's _REPOLL_DELAY: a report of running leases may take the poll's place
                with trio.move_on_after(0.05):
                    while not self.waiting:
                        await self.waiting_changed.wait()
                if self.waiting:
                    continue
            self.set_waiting(+1)
            try:
                await self.post("poll", self.report(), [])
            except Unavailable:
                await trio.sleep(0.2)
            finally:
                self.set_waiting(-1)

    async def report_loop(self) -> None:
        import trio

        slots = trio.Semaphore(2)
        async with trio.open_nursery() as nursery:
            while True:
                await self.outbox.wait()
                while self.line_reports and (self.outbox.logs or self.outbox.results):
                    await self.line_reports_done.wait()
                if not self.waiting and not self.outbox.logs:
                    self.set_waiting(+1)
                    nursery.start_soon(self.send_report, self.take(), None)
                    continue
                await slots.acquire()
                nursery.start_soon(self.send_report, self.take(), slots)

    def take(self) -> Any:
        """What the outbox holds, its leases counted as unacked at once.

        The real agent (node_agent/agent.py, 5064258) adds them to `unacked` only when `_send_report`
        starts, one scheduler tick after `take()`: a poll built in that tick names none of them, and the
        daemon requeues them as lost ("does not hold leases ...: requeued") and runs them again. Here
        that happened to whole deliveries in most runs of 100 agents, so the harness closes the gap.
        """
        taken = self.outbox.take()
        self.unacked |= {r.lease_id for r in taken.results}
        return taken

    async def send_report(self, taken: Any, slots: Any) -> None:
        import trio

        ids = {r.lease_id for r in taken.results}
        if taken.logs:
            self.line_reports += 1
        try:
            await self.post("report" if slots else "poll", self.report(taken), taken.blobs)
            self.h.count["results_sent"] += len(taken.results)
        except Unavailable:
            self.outbox.put_back(taken)
            await trio.sleep(0.2)
        finally:
            self.unacked -= ids
            if taken.logs:
                self.line_reports -= 1
                self.line_reports_done.set()
                self.line_reports_done = trio.Event()
            if slots is None:
                self.set_waiting(-1)
            else:
                slots.release()

    def take_delivery(self, delivery: Any, blobs: list[memoryview]) -> None:
        import cloudpickle

        if delivery.boot_id != self.boot_id:
            self.boot_id, self.ack = delivery.boot_id, 0
        if not delivery.delivery:
            return
        self.ack = max(self.ack, delivery.delivery)
        for function_hash, i in delivery.functions.items():
            if hashlib.sha256(blobs[i]).hexdigest() != function_hash:
                raise RuntimeError(f"function {function_hash[:12]} does not match its digest")
            self.functions[function_hash] = cloudpickle.loads(blobs[i])
        for job_id, seq, i in delivery.batches:
            self.batches[(job_id, seq)] = pickle.loads(blobs[i])
        if delivery.batch_refs:
            raise RuntimeError("the daemon sent batch files: this harness never proves it reads them")
        for job_id in delivery.cancel_jobs:
            self.batches = {k: v for k, v in self.batches.items() if k[0] != job_id}
        self.h.delivered(len(delivery.leases))
        for lease in delivery.leases:
            self.held.add(lease.lease_id)
            self.nursery.start_soon(self.run_lease, lease)

    async def fetch(self, path: str) -> bytes:
        r = await self.h.timed("fetch", self.http.get(f"/v1/agents/{self.agent_id}/{path}", headers=self.auth))
        r.raise_for_status()
        return r.content

    async def run_lease(self, lease: Any) -> None:
        import time as clock

        import cloudpickle

        from burla.node_agent.outbox import Lines, Outcome
        from burla.schemas import messages as m

        async with self.free:
            fn = self.functions.get(lease.function_hash)
            if fn is None:  # as the agent's BlobCache: fetched on a miss
                fn = self.functions[lease.function_hash] = cloudpickle.loads(
                    await self.fetch(f"functions/{lease.function_hash}")
                )
            key = (lease.job_id, lease.batch_seq)
            batch = self.batches.get(key)
            if batch is None:
                batch = self.batches[key] = pickle.loads(await self.fetch(f"batches/{lease.job_id}/{lease.batch_seq}"))
            started = clock.perf_counter()
            results: list[Any] = []
            entries: list[tuple[int, int, str]] = []
            error = None
            for index in range(lease.lo, lease.hi):
                out = io.StringIO()
                try:
                    with contextlib.redirect_stdout(out):
                        value = fn(batch[index - lease.batch_start])
                except Exception as e:  # noqa: BLE001 - reported as the worker shim would
                    error = m.CallError(index, m.EXCEPTION, f"{type(e).__module__}.{type(e).__qualname__}", str(e))
                    break
                finally:
                    text = out.getvalue()
                    if text:
                        entries.append((index, m.STDOUT, text))
                results.append(value)
            elapsed = clock.perf_counter() - started
            if entries:  # the shim's lines of a lease go out before its result
                lines = sum(text.count("\n") or 1 for _, _, text in entries)
                nbytes = sum(len(text) for _, _, text in entries)
                blob = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
                await self.outbox.add_logs(Lines(lease.job_id, lines, nbytes, blob))
            payload = cloudpickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
            self.outbox.add_result(
                Outcome(lease.lease_id, lease.job_id, lease.lo, len(results), elapsed, error, payload)
            )
            self.held.discard(lease.lease_id)
            self.h.count["leases_done"] += 1


class Harness:
    """The simulated agents of one harness process, and what they saw."""

    def __init__(self, url: str, node_token: str, indices: range, slots: int, poll_timeout: float) -> None:
        self.url, self.node_token, self.indices, self.slots = url, node_token, indices, slots
        self.poll_timeout = poll_timeout
        self.count: collections.Counter[str] = collections.Counter()
        self.deliveries: list[tuple[float, int]] = []  # (unix time, leases) of each delivery with leases
        self.requests: collections.defaultdict[str, list[float]] = collections.defaultdict(list)  # seconds each
        self.n_registered = 0
        self.all_registered: Any = None
        self.ssl_context = httpx.create_ssl_context()

    def registered_one(self) -> None:
        self.n_registered += 1
        if self.n_registered == len(self.indices):
            self.all_registered.set()

    def delivered(self, leases: int) -> None:
        self.count["deliveries"] += 1
        if leases:
            self.count["leases"] += leases
            self.count["deliveries_with_leases"] += 1
            self.deliveries.append((time.time(), leases))

    async def timed(self, route: str, request: Any) -> Any:
        started = time.perf_counter()
        try:
            return await request
        finally:
            if route != "poll":  # a poll's time is mostly its long wait
                self.requests[route].append(time.perf_counter() - started)
            self.count[f"requests_{route}"] += 1

    def snapshot(self) -> dict[str, Any]:
        out = {"count": dict(self.count), "deliveries": self.deliveries, "requests": dict(self.requests)}
        self.count, self.deliveries, self.requests = collections.Counter(), [], collections.defaultdict(list)
        return out

    async def main(self, conn: Any) -> None:
        import trio

        self.all_registered = trio.Event()
        limiter = trio.CapacityLimiter(64)
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            for i in self.indices:
                nursery.start_soon(SimAgent(self, i).run, limiter)
            await self.all_registered.wait()
            conn.send(("registered", time.perf_counter() - started))
            while True:
                command = await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
                if command == "stop":
                    nursery.cancel_scope.cancel()
                    return
                conn.send(self.snapshot())


def harness_process(conn: Any, url: str, node_token: str, indices: range, slots: int, poll_timeout: float) -> None:
    import trio

    try:
        trio.run(Harness(url, node_token, indices, slots, poll_timeout).main, conn)
    except BaseException as e:  # noqa: BLE001 - the parent reads why
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise


class Harnesses:
    """--procs harness processes, N agents split among them."""

    def __init__(self, daemon: Daemon, agents: int, slots: int, procs: int, poll_timeout: float) -> None:
        ctx = multiprocessing.get_context("fork")  # before this process starts any trio or client thread
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        share = -(-agents // procs)
        for p in range(procs):
            indices = range(p * share, min(agents, (p + 1) * share))
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=harness_process, args=(child, daemon.url, daemon.node_token, indices, slots, poll_timeout)
            )
            proc.start()
            self.procs.append(proc)
            self.conns.append(parent)

    def wait_registered(self, timeout: float) -> list[float]:
        out = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise TimeoutError(f"agents did not register within {timeout:.0f} s")
            kind, value = conn.recv()
            if kind != "registered":
                raise RuntimeError(f"a harness process failed: {value}")
            out.append(value)
        return out

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def snapshot(self) -> dict[str, Any]:
        count: collections.Counter[str] = collections.Counter()
        deliveries: list[tuple[float, int]] = []
        requests: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        for conn in self.conns:
            conn.send("snapshot")
            snap = conn.recv()
            if isinstance(snap, tuple):
                raise RuntimeError(f"a harness process failed: {snap[1]}")
            count.update(snap["count"])
            deliveries.extend(snap["deliveries"])
            for route, times in snap["requests"].items():
                requests[route].extend(times)
        return {"count": count, "deliveries": sorted(deliveries), "requests": requests}

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


# ---- the client ------------------------------------------------------------------------------


class LineCount(io.TextIOBase):
    """A stdout that counts the lines written to it (what the calls printed)."""

    def __init__(self) -> None:
        self.lines = 0

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        return len(text)


def one_run(inputs: int) -> dict[str, Any]:
    from burla import remote_parallel_map

    sink = LineCount()
    with contextlib.redirect_stdout(sink):
        started = time.perf_counter()
        t_call = time.time()
        results = remote_parallel_map(print_only, range(inputs), spinner=False, generator=True)
        first = next(iter(results))
        t_first = time.perf_counter() - started
        n = 1 + sum(1 for _ in results)
        t_all = time.perf_counter() - started
    assert first is None and n == inputs, (first, n)
    return {"first": t_first, "all": t_all, "results": n, "lines": sink.lines, "t_call": t_call}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def phases(run: dict[str, Any], snap: dict[str, Any]) -> dict[str, Any]:
    """When the leases reached the agents, relative to the call, and how long reports took."""
    t0 = run["t_call"]
    times = [t - t0 for t, _ in snap["deliveries"]]
    out: dict[str, Any] = {
        "first_lease_delivered": round(times[0], 3) if times else None,
        "last_lease_delivered": round(times[-1], 3) if times else None,
        "deliveries_with_leases": len(times),
    }
    for route, seconds in snap["requests"].items():
        if route in ("report", "fetch"):
            out[f"{route}_requests"] = len(seconds)
            out[f"{route}_p50_ms"] = round(1000 * pct(seconds, 0.5), 1)
            out[f"{route}_p99_ms"] = round(1000 * pct(seconds, 0.99), 1)
    # the leases delivered in each tenth of the run, to see the dispatch rounds
    if times:
        span = max(run["all"], 1e-9)
        tenths = [0] * 10
        for (_, n), t in zip(snap["deliveries"], times, strict=True):
            tenths[min(9, max(0, int(10 * t / span)))] += n
        out["leases_by_tenth_of_run"] = tenths
    return out


def trace_summary(path: Path, t_call: float, t_end: float) -> list[str]:
    """Per kind of trace line: count, first and last seconds after the call."""
    kinds: dict[str, list[float]] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        t = float(parts[0])
        if not t_call <= t <= t_end + 0.5:
            continue
        word = parts[3].split(" ", 1)[0].split("=", 1)[0]
        kinds.setdefault(f"{parts[2]} {word}", []).append(t - t_call)
    rows = sorted(kinds.items(), key=lambda kv: kv[1][0])
    return [f"  {k:<32} {len(v):>6}  first {v[0]:7.3f} s  last {v[-1]:7.3f} s" for k, v in rows]


def scale(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="burla-bench-scale-"))
    env = {
        "BURLA_DAEMON_POLL_TIMEOUT": str(args.poll_timeout),
        "BURLA_DAEMON_AGENT_TIMEOUT": str(args.agent_timeout),
    }
    if args.trace:
        Path(args.trace).unlink(missing_ok=True)
        env["BURLA_TRACE"] = args.trace
    daemon = Daemon(root, env, args.profile)
    harnesses = None
    out: dict[str, Any] = {"agents": args.agents, "slots": args.slots, "inputs": args.inputs, "procs": args.procs}
    try:
        cpu0, t0 = daemon.cpu(), time.perf_counter()
        harnesses = Harnesses(daemon, args.agents, args.slots, args.procs, args.poll_timeout)
        reg = harnesses.wait_registered(timeout=600)
        out["register_seconds"] = round(time.perf_counter() - t0, 3)
        out["register_daemon_cpu"] = round(daemon.cpu() - cpu0, 3)
        print(f"{args.agents} agents registered in {out['register_seconds']:.2f} s "
              f"(harness processes: {', '.join(f'{s:.2f}' for s in reg)} s), daemon CPU "
              f"{out['register_daemon_cpu']:.2f} s", file=sys.stderr)  # fmt: skip
        headers = {"authorization": f"Bearer {daemon.admin_token}"}
        status = httpx.get(f"{daemon.url}/v1/cluster", headers=headers, timeout=60).json()
        out["nodes"] = len(status["nodes"])
        out["slots_total"] = sum(n["workers"] for n in status["nodes"])
        idle0, h0 = daemon.cpu(), harnesses.cpu()
        time.sleep(3)
        out["idle_daemon_cpu_percent"] = round(100 * (daemon.cpu() - idle0) / 3, 1)
        out["idle_harness_cpu_percent"] = round(100 * (harnesses.cpu() - h0) / 3, 1)
        harnesses.snapshot()
        os.environ["BURLA_CLUSTER_URL"], os.environ["BURLA_API_KEY"] = daemon.url, daemon.admin_token
        if args.trace:
            os.environ["BURLA_TRACE"] = args.trace
        runs = []
        for i in range(1 + args.runs):
            d0, h0, c0, b0 = daemon.cpu(), harnesses.cpu(), sum(os.times()[:2]), machine_busy()
            run = one_run(args.inputs)
            time.sleep(0.3)  # the last reports' answers
            snap = harnesses.snapshot()
            leases = snap["count"]["leases"]
            run.update(
                kind="cold" if i == 0 else "warm",
                leases=leases,
                daemon_cpu=round(daemon.cpu() - d0, 3),
                daemon_cpu_per_lease_ms=round(1000 * (daemon.cpu() - d0) / max(1, leases), 3),
                harness_cpu=round(harnesses.cpu() - h0, 3),
                client_cpu=round(sum(os.times()[:2]) - c0, 3),
                machine_busy_cpu=round(machine_busy() - b0, 3),  # of 2 x wall on 2 cores: the rest is idle
                requests={k[9:]: v for k, v in snap["count"].items() if k.startswith("requests_")},
                expired=snap["count"]["expired"],
                other_counts={k: v for k, v in snap["count"].items() if not k.startswith("requests_")},
                **phases(run, snap),
            )
            if args.trace:
                run["trace"] = trace_summary(Path(args.trace), run["t_call"], run["t_call"] + run["all"])
            runs.append(run)
            print(f"  {run['kind']}: first result {run['first']:.3f} s, all {run['all']:.3f} s, "
                  f"{leases} leases, daemon CPU {run['daemon_cpu']:.2f} s "
                  f"({run['daemon_cpu_per_lease_ms']:.2f} ms/lease), harness CPU {run['harness_cpu']:.2f} s, "
                  f"client CPU {run['client_cpu']:.2f} s, machine busy {run['machine_busy_cpu']:.1f} CPU-s, "
                f"{run['lines']} lines printed", file=sys.stderr)  # fmt: skip
        out["runs"] = runs
        out["db_bytes"] = daemon.db_bytes()
    finally:
        for key in ("BURLA_CLUSTER_URL", "BURLA_API_KEY"):
            os.environ.pop(key, None)
        if harnesses is not None:
            harnesses.stop()
        daemon.stop()
        warnings = [line for line in daemon.log_tail(10**7).splitlines() if " WARNING " in line or "ERROR" in line]
        out["daemon_warnings"] = len(warnings)
        out["daemon_warning_sample"] = warnings[:5]
        if daemon.proc.returncode not in (0, None):
            print(f"burlad exited {daemon.proc.returncode}:\n{daemon.log_tail()}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    return out


# ---- the local provider: grow=True on an empty cluster ---------------------------------------

GROW_CLIENT = """
import json, sys, time
from burla import remote_parallel_map
def square(x):
    return x * x
started = time.perf_counter()
results = remote_parallel_map(square, range(8), grow=True, spinner=False, generator=True)
first = next(iter(results))
t_first = time.perf_counter() - started
rest = list(results)
t_all = time.perf_counter() - started
assert sorted([first, *rest]) == [x * x for x in range(8)]
print("RESULT " + json.dumps({"first": t_first, "all": t_all}))
"""


def grow(timeout: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="burla-bench-grow-"))
    config = root / "burla.toml"
    config.write_text(textwrap.dedent("""\
        [cluster]
        provider = "local"
        name = "bench"
        idle_timeout = "5s"
        [[cluster.groups]]
        machine_type = "e2-standard-2"
        cpus = 1
        standby = 0
        """))  # fmt: skip
    daemon = Daemon(root, {"BURLA_CONFIG": str(config)})
    try:
        env = {**os.environ, "BURLA_CLUSTER_URL": daemon.url, "BURLA_API_KEY": daemon.admin_token}
        proc = subprocess.run([PYTHON, "-c", GROW_CLIENT], env=env, capture_output=True, text=True, timeout=timeout)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                out = dict(json.loads(line[7:]))
                break
        else:
            out = {"error": (proc.stderr or proc.stdout).strip()[-1500:]}
        headers = {"authorization": f"Bearer {daemon.admin_token}"}
        out["nodes_started"] = len(httpx.get(f"{daemon.url}/v1/cluster/nodes", headers=headers).json()["nodes"])
        return out
    finally:
        daemon.stop()
        for pid_file in (daemon.state / "nodes").glob("*/pid"):  # local nodes outlive their daemon
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


# ---- main ----------------------------------------------------------------------------------------


def compile_burla() -> None:
    """Compile Burla's bytecode first, as scripts/bench does (PYTHONDONTWRITEBYTECODE may be set)."""
    dirs = [str(ROOT / d) for d in ("burla", "common", "daemon", "node_agent", "schemas") if (ROOT / d).is_dir()]
    subprocess.run([PYTHON, "-m", "compileall", "-q", *dirs], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents")
    parser.add_argument("--slots", type=int, default=8, help="worker slots per agent")
    parser.add_argument("--inputs", type=int, default=8000, help="inputs of the print-only job")
    parser.add_argument("--runs", type=int, default=3, help="warm runs after the cold one")
    parser.add_argument("--procs", type=int, default=1, help="harness processes the agents are split among")
    parser.add_argument("--poll-timeout", type=float, default=30.0, help="the daemon's long-poll (seconds)")
    parser.add_argument("--agent-timeout", type=float, default=600.0, help="silence before an agent expires")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--trace", help="BURLA_TRACE file for daemon and client; summarized per run")
    parser.add_argument("--profile", help="run the daemon under cProfile, stats to this file")
    parser.add_argument("--no-local", action="store_true", help="skip the local-provider grow figure")
    parser.add_argument("--local-only", action="store_true", help="only the local-provider grow figure")
    args = parser.parse_args()
    compile_burla()
    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    if not args.local_only:
        figures["scale"] = scale(args)
    if not args.no_local:
        print("local provider: grow=True on an empty cluster...", file=sys.stderr)
        figures["grow"] = grow(timeout=300)
    print(json.dumps(figures, indent=2, default=str))
    if args.profile and not args.local_only:
        import pstats

        pstats.Stats(args.profile).sort_stats("cumulative").print_stats(40)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

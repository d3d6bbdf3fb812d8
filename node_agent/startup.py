"""Starting a worker: its socket and progress file, its hello, its reaping; and how soon to try again.

`WorkerStarter` listens on the agent's unix socket. `running` starts a worker
through the runtime, forwards what it prints before its shim captures its
output, and waits until it connects back and says `Hello` (or exits, or
`HELLO_TIMEOUT` passes); on the way out it kills and reaps it. What a started
worker does meanwhile is the supervisor's business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

from burla.common.trace import trace
from burla.schemas import envelope, wire
from burla.schemas import messages as m
from burla.schemas import worker as proto

from .channel import FrameStream
from .deaths import describe_exit
from .pools import PoolSpec
from .runtime import Runtime, WorkerProcess

log = logging.getLogger("burla.agent")

HELLO_TIMEOUT = 120.0
START_TRIES = 5  # a job's worker that fails to start this many times in a row fails its pool
RESTART_PAUSE = 30.0  # seconds between tries of a standby worker that keeps failing to start

Forward = Callable[[int, int, bytes], Awaitable[None]]  # (slot, stream, whole lines) of raw output


def restart_delay(failures: int, deaths: int) -> float:
    """Seconds a slot waits before it starts a worker again, after `failures` failed starts in a row
    and `deaths` deaths of its workers before they became ready (0: start at once)."""
    if failures >= START_TRIES:
        return RESTART_PAUSE
    if deaths:
        return min(0.05 * 2.0 ** min(deaths, 6), 5.0)
    return 0.0


def read_progress(path: Path) -> int:
    """The input a worker is calling (or was, when it died), from its progress file; `proto.IDLE` if unknown.

    The file is the worker's, so its call may have written anything there or cut it short: that reads as
    unknown, never as an error of the agent."""
    try:
        data = path.read_bytes()[: proto.PROGRESS.size]
    except (OSError, ValueError):
        return proto.IDLE
    if len(data) < proto.PROGRESS.size:
        return proto.IDLE
    (at,) = proto.PROGRESS.unpack(data)
    return int(at)


@dataclasses.dataclass
class Started:
    """A worker `WorkerStarter.running` started: connected (`frames`) or not, and, once it ended, its exit code."""

    proc: WorkerProcess
    nonce: str
    progress_path: Path
    frames: FrameStream | None = None  # None: it exited or never said hello
    code: int | None = None  # None while it runs, or if it stopped answering


class WorkerStarter:
    def __init__(self, runtime: Runtime, log_flush_interval: float) -> None:
        self.runtime = runtime
        self.log_flush_interval = log_flush_interval
        self.run_dir = Path()
        self.socket_path = ""
        self._hello: dict[str, trio.MemorySendChannel[FrameStream]] = {}

    async def listen(self, nursery: trio.Nursery, run_dir: Path) -> None:
        """Open the socket workers connect to, in `run_dir`, and greet them (in `nursery`)."""
        self.run_dir = run_dir
        self.socket_path = str(run_dir / "agent.sock")
        listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await listener.bind(self.socket_path)
        os.chmod(self.socket_path, 0o777)  # rootless containers connect as another uid
        listener.listen(256)
        nursery.start_soon(self._accept_loop, nursery, trio.SocketListener(listener))

    async def _accept_loop(self, nursery: trio.Nursery, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._greet, stream)

    async def _greet(self, stream: trio.SocketStream) -> None:
        """Hand a connection that says hello with a waiting nonce to its `running`; close any other.

        The connection is closed on every other way out, a cancel included (the agent stopping)."""
        frames = FrameStream(stream)
        handed = False
        try:
            with trio.move_on_after(HELLO_TIMEOUT):
                try:
                    message = await frames.receive()
                    hello = proto.Hello.from_wire(message[0]) if message is not None else None
                except (trio.BrokenResourceError, trio.ClosedResourceError, envelope.EnvelopeError, wire.WireError):
                    hello = None
                if hello is not None and hello.kind == proto.HELLO:
                    channel = self._hello.get(hello.nonce)
                    if channel is not None:
                        try:
                            channel.send_nowait(frames)  # no checkpoint since the lookup: `running` still waits
                            handed = True
                        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                            pass  # a second hello with that nonce, or its worker gave up waiting
        finally:
            if not handed:  # a stale or stray connection, or the agent is stopping
                await trio.aclose_forcefully(stream)

    @contextlib.asynccontextmanager
    async def running(self, index: int, spec: PoolSpec, paths: list[str], forward: Forward) -> AsyncIterator[Started]:
        """Start a worker of pool `spec` in slot `index`, with the host `paths` first on its import path.

        Yields once it said hello (`Started.frames`) or failed to (None: it exited or timed out, and was
        killed); on the way out it is killed and reaped, its exit code in `Started.code`.
        """
        progress_path = self.run_dir / f"w{index}.progress"
        progress_path.write_bytes(proto.PROGRESS.pack(proto.IDLE))
        os.chmod(progress_path, 0o666)
        nonce = secrets.token_hex(8)
        send, receive = trio.open_memory_channel[FrameStream](1)
        self._hello[nonce] = send
        inside = [self.runtime.worker_path(p) for p in paths]
        env = {
            proto.SOCKET_ENV: self.socket_path,
            proto.PROGRESS_ENV: str(progress_path),
            proto.LOG_FLUSH_ENV: str(self.log_flush_interval),
            proto.PATHS_ENV: os.pathsep.join(p for p in inside if p),
            proto.SLOT_ENV: str(index),
            proto.NONCE_ENV: nonce,
        }
        try:
            proc = await self.runtime.start_worker(index, env, spec)
        except BaseException:
            del self._hello[nonce]
            raise
        started = Started(proc, nonce, progress_path)
        try:
            async with trio.open_nursery() as nursery:
                for stream, which in ((proc.stdout, m.STDOUT), (proc.stderr, m.STDERR)):
                    if stream is not None:
                        nursery.start_soon(pump_lines, stream, index, which, forward)
                await self._wait_hello(index, started, receive)
                if started.frames is None:
                    proc.kill()
                    started.code = await proc.wait() if started.code is None else started.code
                    log.error(
                        "worker %d (%s) %s before it was ready",
                        index, spec.image or "process", describe_exit(started.code),
                    )  # fmt: skip
                    nursery.cancel_scope.cancel()
                else:
                    trace("agent", f"worker {index} ready")
                    yield started
                    with trio.move_on_after(5):
                        started.code = await proc.wait()
                    if started.code is None:
                        proc.kill()
                        started.code = await proc.wait()
                    # let the output pumps drain, unless a child of the worker holds its stdout open
                    nursery.cancel_scope.deadline = trio.current_time() + 0.5
            if started.frames is None:
                yield started  # outside the nursery, whose pumps are cancelled
        finally:
            del self._hello[nonce]
            proc.kill()
            with trio.CancelScope(shield=True):
                if started.frames is not None:
                    await started.frames.aclose()
                while True:  # a hello that came after `_wait_hello` gave up waiting: no one else will close it
                    try:
                        await receive.receive_nowait().aclose()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                receive.close()
                with trio.move_on_after(5):
                    await proc.wait()  # reap it, even when the agent itself is stopping

    async def _wait_hello(self, index: int, started: Started, receive: trio.MemoryReceiveChannel[FrameStream]) -> None:
        """Until the worker connects (`started.frames`), exits (`started.code`) or `HELLO_TIMEOUT` passes."""
        with trio.move_on_after(HELLO_TIMEOUT) as hello_scope:
            async with trio.open_nursery() as race:

                async def exited() -> None:
                    started.code = await started.proc.wait()
                    race.cancel_scope.cancel()

                async def greeted() -> None:
                    started.frames = await receive.receive()
                    race.cancel_scope.cancel()

                race.start_soon(exited)
                race.start_soon(greeted)
        if started.frames is None and hello_scope.cancelled_caught:
            log.error("worker %d did not connect within %.0fs", index, HELLO_TIMEOUT)


async def pump_lines(stream: trio.abc.ReceiveStream, index: int, which: int, forward: Forward) -> None:
    """Forward what a worker writes to its raw stdout/stderr before its shim captures them, in whole lines."""
    partial = b""
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                if partial:
                    await forward(index, which, partial)
                return
            data = partial + data
            cut = data.rfind(b"\n") + 1
            partial = data[cut:]
            if cut:
                await forward(index, which, data[:cut])

"""Why a worker died, in words: the facts of a death in, the error its input reports out. No I/O but `oom_kills`.

The supervisor gathers the facts when a worker running a lease exits (its exit code, the input
its progress file names, whether the agent killed it for memory, whether its container was
OOM-killed, whether the kernel's count of out-of-memory kills rose during the lease) and
`Death.error` turns them into the `CallError` the job fails with.
"""

from __future__ import annotations

import dataclasses
import signal

from burla.schemas import messages as m


@dataclasses.dataclass(frozen=True)
class Death:
    """What is known of a worker that died running inputs [lo, hi) of a lease."""

    lo: int
    hi: int
    func_ram_bytes: int  # the lease's memory limit per call
    node: str  # the node's hostname
    image: str = ""  # the container's image; "" for a process worker
    progress: int = -1  # the input its progress file names (anything outside [lo, hi): unknown)
    code: int | None = None  # exit code, negative for a signal; None: it stopped answering
    memory_kill: tuple[int, int] | None = None  # (rss, limit) when the agent killed it for memory
    container_oom: bool = False  # the runtime says the kernel killed it for its memory limit
    kernel_oom: bool = False  # the kernel counted an out-of-memory kill while it ran the lease
    timed_out: tuple[int, float, float] | None = None  # (input, limit, seconds seen running) when killed for timeout

    @property
    def index(self) -> int:
        """The input that was running: the one its progress file names, else the lease's first."""
        return self.progress if self.lo <= self.progress < self.hi else self.lo

    def error(self) -> m.CallError:
        at = self.index
        where = f"on node {self.node}" + (f", in a container of image {self.image}" if self.image else "")
        if self.timed_out is not None:
            at, limit, ran = self.timed_out
            return m.CallError(
                index=at,
                kind=m.TIMEOUT,
                type_name=m.ErrorType.CALL_TIMEOUT,
                message=(
                    f"input #{at} ran past its timeout of {limit:g} s {where} and was killed (after {ran:.2f} s); "
                    "its worker was replaced. Pass a larger timeout=, or make the call faster."
                ),
                node=self.node,
            )
        if self.memory_kill is not None or self.container_oom:
            rss, limit = self.memory_kill if self.memory_kill is not None else (0, self.func_ram_bytes)
            used = f"used {rss / 1e9:.2f} GB of memory, over" if rss else "went over"
            return m.CallError(
                index=at,
                kind=m.MEMORY,
                type_name=m.ErrorType.MEMORY_LIMIT,
                message=(
                    f"input #{at} {used} its func_ram of {limit / 1e9:g} GB {where}, and was killed. "
                    "Pass a larger func_ram= (up to a node's RAM), or use less memory per call."
                ),
                node=self.node,
            )
        how = describe_exit(self.code, self.kernel_oom) if self.code is not None else "stopped answering"
        return m.CallError(
            index=at,
            kind=m.WORKER_DIED,
            type_name=m.ErrorType.WORKER_DIED,
            message=f"the worker running input #{at} {how} {where}.",
            node=self.node,
        )


def describe_exit(code: int, kernel_oom: bool = False) -> str:
    """How a worker ended, in words; a SIGKILL is blamed on memory only when the kernel counted an OOM kill."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        meaning = {
            "SIGSEGV": " (segmentation fault)",
            "SIGKILL": (
                " (the kernel's out-of-memory killer killed a process meanwhile: most likely this one)"
                if kernel_oom
                else " (by another process: not Burla's memory limit, and the kernel counted no out-of-memory kill)"
            ),
            "SIGABRT": " (aborted)",
            "SIGBUS": " (bus error)",
            "SIGFPE": " (floating point exception)",
        }.get(name, "")
        return f"was killed by {name}{meaning}"
    return f"exited with code {code}"


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot (None if unknown)."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def kernel_oom_since(count_at_start: int | None) -> bool:
    """Whether the kernel's count of out-of-memory kills rose since it was `count_at_start` (None: unknown)."""
    return count_at_start is not None and (oom_kills() or 0) > count_at_start

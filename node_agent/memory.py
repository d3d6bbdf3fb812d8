"""Watching memory: a call that goes over its func_ram is killed, where the runtime does not do it for us.

Container runtimes leave it to the kernel (each container's cgroup has its limit); process workers share
the node, so the agent samples each busy worker's RSS every `memory_check_interval` seconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import trio

from . import host


@dataclasses.dataclass(frozen=True)
class Busy:
    """A worker running a lease: its slot, its pid, and the lease's func_ram in bytes."""

    slot: int
    pid: int
    limit: int


def over_limit(busy: Iterable[Busy], rss: Callable[[int], int]) -> list[tuple[Busy, int]]:
    """The workers over their limit, each with the RSS it was found using (`rss` of a pid)."""
    found = []
    for worker in busy:
        used = rss(worker.pid)
        if used > worker.limit:
            found.append((worker, used))
    return found


async def watch(interval: float, busy: Callable[[], list[Busy]], kill: Callable[[Busy, int], None]) -> None:
    """Every `interval` seconds, `kill` each worker of `busy()` over its limit (with its RSS)."""
    while True:
        await trio.sleep(interval)
        for worker, rss in over_limit(busy(), host.rss_bytes):
            kill(worker, rss)

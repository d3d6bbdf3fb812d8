"""A job's pending inputs: the queue that leases are carved from.

Pending inputs are intervals of one batch each, never merged, and a lease is
carved from the front of the first one, so any two lease ranges are nested or
disjoint. What comes back unrun (a lost lease, a short result) goes back in
front, to run next.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator

from burla.schemas import messages as m

from .ranges import subtract


@dataclasses.dataclass
class Interval:
    """Pending inputs [lo, hi) of batch `seq`, whose first input is `start`."""

    seq: int
    start: int
    lo: int
    hi: int


class Pending:
    """Pending intervals in the order they are leased, and how many inputs they hold."""

    __slots__ = ("intervals", "size")

    def __init__(self) -> None:
        self.intervals: collections.deque[Interval] = collections.deque()
        self.size = 0

    def __iter__(self) -> Iterator[Interval]:
        return iter(self.intervals)

    def __len__(self) -> int:
        return len(self.intervals)

    def __repr__(self) -> str:
        return f"Pending({[(iv.lo, iv.hi) for iv in self.intervals]})"

    def add(self, seq: int, start: int, lo: int, hi: int, holes: Iterable[tuple[int, int]] = ()) -> None:
        """Queue [lo, hi) of batch `seq`, less `holes`, at the back (new inputs)."""
        for p_lo, p_hi in subtract(lo, hi, holes):
            self.intervals.append(Interval(seq, start, p_lo, p_hi))
            self.size += p_hi - p_lo

    def put_back(
        self,
        lease: m.Lease,
        lo: int,
        holes: Iterable[tuple[int, int]],
        keep: Callable[[int, int], bool] | None = None,
    ) -> None:
        """Requeue [lo, lease.hi), less `holes`, in front of everything: it runs next.

        The parts that `keep` accepts (all by default) are pushed in turn,
        lowest first, so they end up in front highest first.
        """
        for p_lo, p_hi in subtract(lo, lease.hi, holes):
            if keep is None or keep(p_lo, p_hi):
                self.intervals.appendleft(Interval(lease.batch_seq, lease.batch_start, p_lo, p_hi))
                self.size += p_hi - p_lo

    def take(self, limit: int) -> tuple[int, int, int, int]:
        """Carve up to `limit` inputs off the front: (seq, start, lo, hi) of what was taken."""
        iv = self.intervals[0]
        lo = iv.lo
        hi = min(iv.hi, lo + limit)
        if hi == iv.hi:
            self.intervals.popleft()
        else:
            iv.lo = hi
        self.size -= hi - lo
        return iv.seq, iv.start, lo, hi

    def remove(self, lo: int, hi: int) -> None:
        """Take [lo, hi) out, wherever it is pending (its results came in)."""
        if not self.intervals:
            return
        kept: collections.deque[Interval] = collections.deque()
        for iv in self.intervals:
            if iv.hi <= lo or iv.lo >= hi:
                kept.append(iv)
                continue
            self.size -= iv.hi - iv.lo
            for r_lo, r_hi in subtract(iv.lo, iv.hi, [(lo, hi)]):
                kept.append(Interval(iv.seq, iv.start, r_lo, r_hi))
                self.size += r_hi - r_lo
        self.intervals = kept

    def overlaps(self, lo: int, hi: int) -> bool:
        return any(iv.lo < hi and lo < iv.hi for iv in self.intervals)

    def clear(self) -> None:
        self.intervals.clear()
        self.size = 0

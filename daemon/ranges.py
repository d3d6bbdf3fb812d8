"""Sets of integer ranges, for the inputs of a job that are done."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class RangeSet:
    """Disjoint half-open ranges [lo, hi), merged when they touch."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._los: list[int] = []
        self._his: list[int] = []
        self.size = 0
        for lo, hi in ranges:
            self.add(lo, hi)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._los, self._his, strict=True))

    def __len__(self) -> int:
        return len(self._los)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)})"

    def intersects(self, lo: int, hi: int) -> bool:
        if lo >= hi:
            return False
        i = bisect.bisect_right(self._los, lo) - 1
        if i >= 0 and self._his[i] > lo:
            return True
        j = i + 1
        return j < len(self._los) and self._los[j] < hi

    def covers(self, lo: int, hi: int) -> bool:
        if lo >= hi:
            return True
        i = bisect.bisect_right(self._los, lo) - 1
        return i >= 0 and self._his[i] >= hi

    def add(self, lo: int, hi: int) -> None:
        """Add [lo, hi); the caller guarantees it is disjoint from the set."""
        if lo >= hi:
            return
        if self.intersects(lo, hi):
            raise ValueError(f"[{lo}, {hi}) overlaps {self!r}")
        i = bisect.bisect_left(self._los, lo)
        self.size += hi - lo
        merge_left = i > 0 and self._his[i - 1] == lo
        merge_right = i < len(self._los) and self._los[i] == hi
        if merge_left and merge_right:
            self._his[i - 1] = self._his[i]
            del self._los[i], self._his[i]
        elif merge_left:
            self._his[i - 1] = hi
        elif merge_right:
            self._los[i] = lo
        else:
            self._los.insert(i, lo)
            self._his.insert(i, hi)


def subtract(lo: int, hi: int, holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) minus `holes`, as sorted disjoint ranges."""
    out = []
    cursor = lo
    for h_lo, h_hi in sorted(holes):
        if h_hi <= cursor or h_lo >= hi:
            continue
        if h_lo > cursor:
            out.append((cursor, h_lo))
        cursor = max(cursor, h_hi)
        if cursor >= hi:
            break
    if cursor < hi:
        out.append((cursor, hi))
    return out

"""burla.daemon.pending.Pending: carving leases from the front, putting the unrun back."""

from __future__ import annotations

from burla.daemon.pending import Pending
from burla.schemas import messages as m

FHASH = "0" * 64


def lease(lo: int, hi: int, seq: int = 0, start: int = 0) -> m.Lease:
    return m.Lease(1, "j1", FHASH, batch_seq=seq, batch_start=start, lo=lo, hi=hi)


def intervals(p: Pending) -> list[tuple[int, int, int, int]]:
    """In queue order: (seq, start, lo, hi)."""
    return [(iv.seq, iv.start, iv.lo, iv.hi) for iv in p]


def test_add_queues_batches_at_the_back_and_counts() -> None:
    p = Pending()
    p.add(0, 0, 0, 10)
    p.add(1, 10, 10, 15)
    p.add(2, 15, 15, 15)  # an empty batch queues nothing
    assert intervals(p) == [(0, 0, 0, 10), (1, 10, 10, 15)]
    assert p.size == 15 and len(p) == 2


def test_add_leaves_out_holes() -> None:
    p = Pending()
    p.add(3, 100, 100, 120, [(104, 106), (110, 112), (118, 130)])
    assert intervals(p) == [(3, 100, 100, 104), (3, 100, 106, 110), (3, 100, 112, 118)]
    assert p.size == 14


def test_take_carves_the_front_and_pops_what_it_empties() -> None:
    p = Pending()
    p.add(0, 0, 0, 5)
    p.add(1, 5, 5, 8)
    assert p.take(2) == (0, 0, 0, 2)
    assert intervals(p) == [(0, 0, 2, 5), (1, 5, 5, 8)]
    assert p.take(10) == (0, 0, 2, 5)  # never past its interval: a lease stays inside one batch
    assert p.take(10) == (1, 5, 5, 8)
    assert p.size == 0 and len(p) == 0


def test_put_back_goes_in_front_less_holes_highest_first() -> None:
    p = Pending()
    p.add(1, 10, 10, 20)
    p.put_back(lease(0, 10), 2, [(4, 6)])
    assert intervals(p) == [(0, 0, 6, 10), (0, 0, 2, 4), (1, 10, 10, 20)]
    assert p.size == 16
    assert p.take(100) == (0, 0, 6, 10)  # what came back runs next


def test_put_back_keeps_only_what_keep_accepts() -> None:
    p = Pending()
    asked: list[tuple[int, int]] = []

    def keep(lo: int, hi: int) -> bool:
        asked.append((lo, hi))
        return lo != 0

    p.put_back(lease(0, 10, seq=2, start=0), 0, [(3, 5)], keep=keep)
    assert asked == [(0, 3), (5, 10)]  # lowest first
    assert intervals(p) == [(2, 0, 5, 10)]
    assert p.size == 5


def test_put_back_of_a_done_lease_adds_nothing() -> None:
    p = Pending()
    p.put_back(lease(0, 4), 0, [(0, 4)])
    p.put_back(lease(0, 4), 4, [])  # from its end: nothing left
    assert intervals(p) == [] and p.size == 0


def test_remove_cuts_a_range_out_of_every_interval() -> None:
    p = Pending()
    p.add(0, 0, 0, 10)
    p.add(1, 10, 10, 20)
    p.add(2, 20, 20, 30)
    p.remove(8, 12)
    assert intervals(p) == [(0, 0, 0, 8), (1, 10, 12, 20), (2, 20, 20, 30)]
    assert p.size == 26
    p.remove(22, 25)
    assert intervals(p) == [(0, 0, 0, 8), (1, 10, 12, 20), (2, 20, 20, 22), (2, 20, 25, 30)]
    p.remove(0, 30)
    assert intervals(p) == [] and p.size == 0
    p.remove(0, 1)  # on an empty queue
    assert p.size == 0


def test_overlaps_and_clear() -> None:
    p = Pending()
    p.add(0, 0, 5, 10)
    assert p.overlaps(9, 12) and p.overlaps(0, 6)
    assert not p.overlaps(10, 12) and not p.overlaps(0, 5)
    p.clear()
    assert not p.overlaps(0, 100) and p.size == 0 and len(p) == 0

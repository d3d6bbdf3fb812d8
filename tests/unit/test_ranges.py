"""burla.daemon.ranges: RangeSet and subtract()."""

from __future__ import annotations

import random

import pytest

from burla.daemon.ranges import RangeSet, subtract

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is an optional test dependency
    hypothesis = None  # type: ignore[assignment]


def runs(indexes: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ints, as sorted half-open ranges."""
    out: list[tuple[int, int]] = []
    for i in sorted(indexes):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def test_empty() -> None:
    rs = RangeSet()
    assert list(rs) == []
    assert len(rs) == 0
    assert rs.size == 0
    assert not rs.intersects(0, 10)
    assert rs.covers(3, 3)  # an empty range is covered by anything
    assert not rs.covers(3, 4)


def test_add_keeps_ranges_sorted() -> None:
    rs = RangeSet()
    rs.add(20, 30)
    rs.add(0, 5)
    rs.add(10, 12)
    assert list(rs) == [(0, 5), (10, 12), (20, 30)]
    assert rs.size == 17
    assert len(rs) == 3


def test_touching_ranges_merge() -> None:
    rs = RangeSet([(0, 5), (10, 15)])
    rs.add(5, 7)  # touches the left one
    assert list(rs) == [(0, 7), (10, 15)]
    rs.add(8, 10)  # touches the right one
    assert list(rs) == [(0, 7), (8, 15)]
    rs.add(7, 8)  # fills the gap: one range
    assert list(rs) == [(0, 15)]
    assert len(rs) == 1
    assert rs.size == 15


def test_add_empty_or_inverted_range_is_a_no_op() -> None:
    rs = RangeSet([(0, 5)])
    rs.add(3, 3)
    rs.add(9, 2)
    assert list(rs) == [(0, 5)]
    assert rs.size == 5


@pytest.mark.parametrize("lo,hi", [(0, 1), (4, 6), (2, 3), (-5, 20), (9, 11), (14, 16), (10, 15)])
def test_add_overlapping_raises(lo: int, hi: int) -> None:
    rs = RangeSet([(0, 5), (10, 15)])
    with pytest.raises(ValueError, match="overlaps"):
        rs.add(lo, hi)
    assert list(rs) == [(0, 5), (10, 15)]  # unchanged
    assert rs.size == 10


def test_intersects() -> None:
    rs = RangeSet([(10, 20), (30, 40)])
    assert rs.intersects(15, 16)
    assert rs.intersects(5, 11)
    assert rs.intersects(19, 31)
    assert rs.intersects(0, 100)
    assert rs.intersects(39, 45)
    assert not rs.intersects(0, 10)  # half-open: 10 is the first member
    assert not rs.intersects(20, 30)
    assert not rs.intersects(40, 50)
    assert not rs.intersects(15, 15)  # empty query


def test_covers() -> None:
    rs = RangeSet([(10, 20), (20, 25), (30, 40)])  # the first two merge
    assert rs.covers(10, 25)
    assert rs.covers(12, 13)
    assert rs.covers(30, 40)
    assert not rs.covers(9, 12)
    assert not rs.covers(24, 26)
    assert not rs.covers(10, 40)  # a gap in the middle
    assert not rs.covers(25, 30)


def test_repr_and_constructor() -> None:
    rs = RangeSet([(3, 4), (1, 2)])
    assert repr(rs) == "RangeSet([(1, 2), (3, 4)])"


def test_subtract_basic() -> None:
    assert subtract(0, 10, []) == [(0, 10)]
    assert subtract(0, 10, [(3, 5)]) == [(0, 3), (5, 10)]
    assert subtract(0, 10, [(0, 10)]) == []
    assert subtract(0, 10, [(-5, 50)]) == []
    assert subtract(0, 10, [(7, 9), (1, 2)]) == [(0, 1), (2, 7), (9, 10)]  # holes in any order
    assert subtract(0, 10, [(0, 3), (3, 6)]) == [(6, 10)]
    assert subtract(5, 10, [(0, 5), (10, 20)]) == [(5, 10)]  # holes touching only the edges
    assert subtract(0, 10, [(2, 6), (4, 8)]) == [(0, 2), (8, 10)]  # overlapping holes
    assert subtract(0, 10, RangeSet([(2, 4)])) == [(0, 2), (4, 10)]


def test_subtract_empty_range() -> None:
    assert subtract(5, 5, [(0, 3)]) == []


def test_subtract_empty_hole_removes_nothing() -> None:
    got = subtract(0, 10, [(4, 4)])
    assert members(got) == set(range(10))


def members(ranges: list[tuple[int, int]]) -> set[int]:
    """The ints in sorted, disjoint, non-empty ranges (asserting they are)."""
    out: set[int] = set()
    prev_hi = None
    for lo, hi in ranges:
        assert lo < hi, ranges
        assert prev_hi is None or prev_hi <= lo, ranges
        prev_hi = hi
        out |= set(range(lo, hi))
    return out


# ---- against a plain set of ints ------------------------------------------------------


def check_against_model(ops: list[tuple[int, int]], queries: list[tuple[int, int]]) -> None:
    rs = RangeSet()
    model: set[int] = set()
    for lo, length in ops:
        hi = lo + length
        new = set(range(lo, hi))
        if new & model:
            with pytest.raises(ValueError):
                rs.add(lo, hi)
        else:
            rs.add(lo, hi)
            model |= new
        assert rs.size == len(model)
        assert list(rs) == runs(model)
        assert len(rs) == len(runs(model))
        for q_lo, q_len in queries:
            q = set(range(q_lo, q_lo + q_len))
            assert rs.intersects(q_lo, q_lo + q_len) == bool(q & model), (q_lo, q_len, rs)
            assert rs.covers(q_lo, q_lo + q_len) == (q <= model), (q_lo, q_len, rs)
            assert subtract(q_lo, q_lo + q_len, rs) == runs(q - model)


@pytest.mark.parametrize("seed", range(40))
def test_random_against_set_model(seed: int) -> None:
    rng = random.Random(seed)
    ops = [(rng.randrange(0, 80), rng.randrange(0, 8)) for _ in range(60)]
    queries = [(rng.randrange(-3, 85), rng.randrange(0, 12)) for _ in range(15)]
    check_against_model(ops, queries)


def check_subtract(lo: int, length: int, holes: list[tuple[int, int]]) -> None:
    hi = lo + length
    expected = set(range(lo, hi))
    for h_lo, h_len in holes:
        expected -= set(range(h_lo, h_lo + h_len))
    got = subtract(lo, hi, [(h_lo, h_lo + h_len) for h_lo, h_len in holes])
    assert members(got) == expected
    if all(h_len > 0 for _, h_len in holes):  # with no empty hole, the pieces are maximal runs
        assert got == runs(expected)


@pytest.mark.parametrize("seed", range(40))
def test_random_subtract_against_set_model(seed: int) -> None:
    rng = random.Random(seed)
    holes = [(rng.randrange(-5, 40), rng.randrange(0, 10)) for _ in range(rng.randrange(0, 8))]
    check_subtract(rng.randrange(0, 20), rng.randrange(0, 25), holes)


if hypothesis is not None:
    _pairs = st.lists(st.tuples(st.integers(-20, 100), st.integers(0, 15)), max_size=40)

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(ops=_pairs, queries=_pairs)
    def test_hypothesis_rangeset_matches_set_of_ints(
        ops: list[tuple[int, int]], queries: list[tuple[int, int]]
    ) -> None:
        check_against_model(ops, queries[:10])

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(lo=st.integers(-20, 60), length=st.integers(0, 40), holes=_pairs)
    def test_hypothesis_subtract_matches_set_of_ints(lo: int, length: int, holes: list[tuple[int, int]]) -> None:
        check_subtract(lo, length, holes)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed (the seeded random tests above still run)")
    def test_hypothesis_rangeset_matches_set_of_ints() -> None:
        pass

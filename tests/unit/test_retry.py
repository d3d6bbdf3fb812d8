"""The one backoff every retry loop uses (burla.common.retry)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from burla.common.retry import Backoff


async def test_delays_double_up_to_the_cap_and_reset_starts_over(autojump_clock: trio.testing.MockClock) -> None:
    backoff = Backoff(first=0.05, cap=0.3)
    slept = []
    for _ in range(5):
        start = trio.current_time()
        await backoff.wait()
        slept.append(round(trio.current_time() - start, 6))
    assert slept == [0.05, 0.1, 0.2, 0.3, 0.3]
    backoff.reset()
    assert backoff.delay == 0.05


async def test_patience_gives_up_before_a_wait_that_would_end_past_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backoff = Backoff(first=1.0, cap=4.0, patience=10.0)
    waited = 0
    while not backoff.gives_up():
        await backoff.wait()
        waited += 1
    assert waited == 3  # 1 + 2 + 4 = 7 s; a fourth wait (4 s) would end at 11 s
    backoff.reset()
    assert not backoff.gives_up()  # a success starts a new deadline


def test_without_patience_it_never_gives_up() -> None:
    assert not Backoff().gives_up()


@pytest.mark.parametrize(("first", "cap"), [(0, 1), (2, 1), (-1, 1)])
def test_bad_bounds_are_refused(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="first"):
        Backoff(first=first, cap=cap)

"""Exponential backoff for the loops that retry an unreachable peer.

    backoff = Backoff(first=0.05, cap=config.max_backoff)
    while True:
        try:
            return await call()
        except httpx.TransportError:
            await backoff.wait()  # 0.05, 0.1, 0.2, ... cap, cap, ...

`reset()` after a success starts the next failure at `first` again. With `patience`, the
backoff also keeps a deadline from its first failure: `gives_up()` says whether the next wait
would end past it, so a caller can fail with its own message instead of waiting forever.
"""

from __future__ import annotations

import trio


class Backoff:
    """Delays that double from `first` up to `cap`, and an optional deadline (`patience` seconds)."""

    def __init__(self, first: float = 0.05, cap: float = 1.0, patience: float | None = None) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"need 0 < first <= cap, got first={first}, cap={cap}")
        self.first, self.cap, self.patience = first, cap, patience
        self.delay = first
        self._deadline: float | None = None

    def reset(self) -> None:
        """A success: the next failure waits `first` again, and the deadline starts afresh."""
        self.delay = self.first
        self._deadline = None

    def gives_up(self) -> bool:
        """Whether waiting once more would end past the deadline (never without `patience`)."""
        if self.patience is None:
            return False
        now = trio.current_time()
        if self._deadline is None:
            self._deadline = now + self.patience
        return now + self.delay > self._deadline

    async def wait(self) -> None:
        """Sleep the current delay, then double it (up to `cap`)."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.cap)
        await trio.sleep(delay)

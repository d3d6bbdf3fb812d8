"""A trio event loop in a background thread, for synchronous callers.

`remote_parallel_map` is a plain function, and with ``generator=True`` it
hands results out while the job runs, so its network I/O cannot run in the
caller's thread. It runs here instead: the caller's thread only unpickles
results, raises errors and handles Ctrl-C.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class Portal:
    def __init__(self, name: str = "burla-io") -> None:
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as e:  # pragma: no cover - only if trio itself fails to start
            self._error = e
            self._ready.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    def alive(self) -> bool:
        return self._thread.is_alive()

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `afn(*args)` in the loop and wait for its result."""
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def start_soon(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start `afn(*args)` in the loop without waiting for it."""
        assert self._nursery is not None
        trio.from_thread.run_sync(self._nursery.start_soon, guarded, afn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
            self._thread.join(5)


async def guarded(afn: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Run a background task; a bug in one must not stop the loop every job shares."""
    try:
        await afn(*args)
    except Exception:
        import traceback

        traceback.print_exc()

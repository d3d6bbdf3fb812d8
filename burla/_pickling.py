"""Turning the user's function and inputs into bytes, with errors that say which.

The function goes by value with cloudpickle. Inputs are pulled from the
user's iterable in batches and each batch is pickled as one list: a million
small inputs are a few dozen pickle calls, not a million. Batch sizes follow
the inputs' size (about `TARGET_BATCH_BYTES` each), so memory stays bounded
whatever the iterable's length.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import operator
import pickle
import sys
from collections.abc import Callable, Iterable, Iterator
from types import CodeType
from typing import Any

import cloudpickle

from burla.schemas import messages as m

from ._local_code import is_local_module
from .errors import NotCallableError, NotIterableError, TooLargeError, UnpicklableError

FIRST_BATCH_INPUTS = 1024
PROBE_INPUTS = 1  # pickle one input first: its size decides how many more to take
MAX_BATCH_INPUTS = 100_000
TARGET_BATCH_BYTES = 2 * 1024 * 1024
FILE_BATCH_BYTES = 16 * 1024 * 1024  # the target once batches go as files on the daemon's host (no HTTP body)
PROTOCOL = pickle.HIGHEST_PROTOCOL


_DYNAMIC_CODE = "<dynamic-code>"


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, keeping the file name of each code object it pickles by value.

    cloudpickle 3.1 writes ``<dynamic-code>`` as the file name of every code object it pickles by
    value (so that its output does not depend on where the code was defined). Remote tracebacks
    need the real one: the user must see ``File "their_script.py", line 6`` and its source line.
    Each code object travels as cloudpickle sends it, then gets its file name back on the worker
    with ``code.replace(co_filename=...)``: nothing but the standard library is needed there, and
    the output stays deterministic with every cloudpickle version.
    """

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is CodeType and obj.co_filename != _DYNAMIC_CODE:
            return operator.methodcaller("replace", co_filename=obj.co_filename), (
                obj.replace(co_filename=_DYNAMIC_CODE),
            )
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """`cloudpickle.dumps`, with code objects keeping their file names (see `_Pickler`)."""
    with io.BytesIO() as buffer:
        _Pickler(buffer, protocol=PROTOCOL).dump(obj)
        return buffer.getvalue()


def function_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def pickle_function(fn: Callable[..., Any], max_bytes: int | None = None) -> bytes:
    """The function, pickled by value; its own module goes by value too when it is local code."""
    if not callable(fn):
        raise NotCallableError(
            f"function_ must be callable, but got {type(fn).__name__} {_short_repr(fn)}. "
            "Pass the function itself: remote_parallel_map(my_function, inputs)."
        )
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    by_value = is_local_module(module)
    if by_value:
        cloudpickle.register_pickle_by_value(module)
    try:
        blob: bytes = dumps(fn)
    except Exception as e:
        raise UnpicklableError(
            f"function {function_name(fn)!r} cannot be pickled to send it to the cluster: {type(e).__name__}: {e}. "
            "Functions travel by value with cloudpickle, with every global they use: create open files, locks, "
            "sockets and database connections inside the function instead."
        ) from e
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(module)
    if max_bytes is not None and len(blob) > max_bytes:
        raise TooLargeError(
            f"function {function_name(fn)!r} pickles to {len(blob) / 1e6:.1f} MB, over the cluster's limit of "
            f"{max_bytes / 1e6:.0f} MB (daemon.max_function_bytes). It likely captures a large global: load the data "
            "inside the function, or pass it as an input."
        )
    return blob


def function_hash(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class InputBatcher:
    """Pulls inputs from an iterable and pickles them in batches."""

    def __init__(self, inputs: Iterable[Any], max_input_bytes: int | None = None) -> None:
        if isinstance(inputs, (str, bytes)):
            raise NotIterableError(
                f"inputs must be an iterable of inputs, not a {type(inputs).__name__}: "
                "wrap a single input in a list, e.g. [my_input]."
            )
        try:
            self._it: Iterator[Any] = iter(inputs)
        except TypeError:
            raise NotIterableError(
                f"inputs must be an iterable (a list, range, generator...), not {type(inputs).__name__}"
            ) from None
        self.max_input_bytes = max_input_bytes
        self.target_bytes = TARGET_BATCH_BYTES  # pickled bytes per batch; larger when batches go as files
        self.count = 0  # inputs taken so far
        self.seq = 0
        self.exhausted = False  # no batch is left: the last one has been returned
        self.drained = False  # the iterable has no more items (some may still be carried over)
        self._per_item: float | None = None  # pickled bytes per input, once measured
        self._carry: list[Any] = []

    def __iter__(self) -> Iterator[tuple[m.BatchMeta, bytes]]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> tuple[m.BatchMeta, bytes] | None:
        """The next batch, or None once the iterable is exhausted."""
        if self.exhausted:
            return None
        items, self._carry = self._carry, []
        if self._per_item is None:
            # Sizes unknown: pickle a few inputs first, so 4 MiB inputs are not pickled a thousand at a time.
            items += self._take(PROBE_INPUTS - len(items))
            if not items:
                self.exhausted = True
                return None
            probe = self._pickle(items, self.count)
            self._per_item = len(probe) / len(items)
            want = min(FIRST_BATCH_INPUTS, self._count_for(self._per_item))
            if want <= len(items) or self.drained:
                return self._emit(items, probe)
            items += self._take(want - len(items))
        else:
            items += self._take(self._count_for(self._per_item) - len(items))  # follows a changed target_bytes
        if not items:
            self.exhausted = True
            return None
        return self._emit(items, self._pickle(items, self.count))

    def _take(self, n: int) -> list[Any]:
        taken = list(itertools.islice(self._it, max(0, n)))
        self.drained = self.drained or len(taken) < n
        return taken

    def _count_for(self, per_item: float) -> int:
        return max(1, min(MAX_BATCH_INPUTS, int(self.target_bytes / max(per_item, 1.0))))

    def _emit(self, items: list[Any], payload: bytes) -> tuple[m.BatchMeta, bytes]:
        if len(items) > 1 and len(payload) > 2 * self.target_bytes:
            # a few large inputs: send fewer per batch; the rest waits for the next one
            keep = max(1, int(len(items) * self.target_bytes / len(payload)))
            self._carry = items[keep:]
            items = items[:keep]
            payload = self._pickle(items, self.count)
        if not self._carry and not self.drained:
            self._carry = self._take(1)  # peek: the last batch should know it is the last
        meta = m.BatchMeta(self.seq, self.count, len(items))
        self.seq += 1
        self.count += len(items)
        self.exhausted = self.drained and not self._carry
        self._per_item = len(payload) / len(items)
        return meta, payload

    def check_sizes(self, batch: tuple[m.BatchMeta, bytes]) -> None:
        """Raise TooLargeError if an input of an already pickled batch is over the limit."""
        self._pickle(pickle.loads(batch[1]), batch[0].start)

    def _pickle(self, items: list[Any], first_index: int) -> bytes:
        try:
            payload: bytes = cloudpickle.dumps(items, protocol=PROTOCOL)  # not `dumps`: inputs are the hot path
        except Exception:
            for offset, item in enumerate(items):
                try:
                    cloudpickle.dumps(item, protocol=PROTOCOL)
                except Exception as e:
                    raise UnpicklableError(
                        f"input #{first_index + offset} ({type(item).__name__} {_short_repr(item)}) cannot be "
                        f"pickled to send it to the cluster: {type(e).__name__}: {e}",
                        input_index=first_index + offset,
                    ) from e
            raise
        if self.max_input_bytes is not None and len(payload) > self.max_input_bytes:
            for offset, item in enumerate(items):
                size = len(cloudpickle.dumps(item, protocol=PROTOCOL)) if len(items) > 1 else len(payload)
                if size > self.max_input_bytes:
                    raise TooLargeError(
                        f"input #{first_index + offset} ({type(item).__name__}) pickles to {size / 1e6:.1f} MB, over "
                        f"the cluster's limit of {self.max_input_bytes / 1e6:.0f} MB per input "
                        "(daemon.max_input_bytes). Split it, or put it on the shared disk and pass its path.",
                        input_index=first_index + offset,
                    )
        return payload


def _short_repr(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."

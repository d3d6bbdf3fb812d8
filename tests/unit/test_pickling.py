"""burla._pickling: the function and the inputs as bytes, with errors that say which."""

from __future__ import annotations

import pickle
import sys
import threading
from collections.abc import Iterator

import cloudpickle
import pytest

from burla import _pickling
from burla._pickling import (
    FILE_BATCH_BYTES,
    FIRST_BATCH_INPUTS,
    MAX_BATCH_INPUTS,
    TARGET_BATCH_BYTES,
    InputBatcher,
    function_hash,
    pickle_function,
)
from burla.errors import InvalidArgumentError, NotCallableError, NotIterableError, TooLargeError, UnpicklableError
from burla.schemas.messages import BatchMeta

GLOBAL_LOCK = threading.Lock()


def uses_global_lock(x: int) -> int:
    with GLOBAL_LOCK:
        return x


def square(x: int) -> int:
    return x * x


# ---- the function ---------------------------------------------------------------------------


def test_pickle_function_round_trip() -> None:
    blob = pickle_function(square)
    fn = cloudpickle.loads(blob)
    assert fn(7) == 49


def test_closure_round_trip() -> None:
    offset = 10

    def add(x: int) -> int:
        return x + offset

    assert cloudpickle.loads(pickle_function(add))(5) == 15


def test_function_hash_is_stable_sha256() -> None:
    blob = pickle_function(square)
    assert function_hash(blob) == function_hash(bytes(blob))
    assert len(function_hash(blob)) == 64
    assert function_hash(b"a") != function_hash(b"b")


@pytest.mark.parametrize(
    ("value", "type_name"), [(42, "int"), ("square", "str"), ([square], "list"), (None, "NoneType")]
)
def test_not_callable(value: object, type_name: str) -> None:
    with pytest.raises(NotCallableError) as info:
        pickle_function(value)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, InvalidArgumentError)
    assert f"got {type_name}" in str(info.value)


def test_unpicklable_closure_names_the_function() -> None:
    lock = threading.Lock()

    def holds_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(UnpicklableError) as info:
        pickle_function(holds_lock)
    assert "holds_lock" in str(info.value)
    assert "lock" in str(info.value)
    assert isinstance(info.value, TypeError)
    assert info.value.input_index is None
    assert info.value.__cause__ is not None


def test_unpicklable_global_of_a_local_module_names_the_function() -> None:
    # this test module is local code: it goes by value, with the globals the function uses
    if not _pickling.is_local_module(sys.modules[__name__]):  # pragma: no cover - tests run from an install
        pytest.skip("this test module is not local code here: functions pickle by reference")
    with pytest.raises(UnpicklableError, match="uses_global_lock"):
        pickle_function(uses_global_lock)
    # the module is registered for by-value pickling only while pickling, even when that fails
    assert sys.modules[__name__] not in cloudpickle.list_registry_pickle_by_value()


def test_installed_modules_are_not_local() -> None:
    assert not _pickling.is_local_module(pytest)
    assert not _pickling.is_local_module(pickle)
    assert not _pickling.is_local_module(_pickling)  # burla itself
    assert not _pickling.is_local_module(None)


def test_function_over_max_bytes() -> None:
    data = bytes(range(256)) * 8000  # ~2 MB

    def big() -> int:
        return len(data)

    with pytest.raises(TooLargeError) as info:
        pickle_function(big, max_bytes=1_000_000)
    assert "big" in str(info.value)
    assert "MB" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert info.value.input_index is None
    assert len(pickle_function(big, max_bytes=10_000_000)) > 2_000_000  # under the limit: fine


# ---- inputs ----------------------------------------------------------------------------------


def drain(batcher: InputBatcher) -> list[tuple[BatchMeta, list[object]]]:
    out = []
    while (batch := batcher.next_batch()) is not None:
        meta, payload = batch
        out.append((meta, pickle.loads(payload)))
    return out


def test_batches_cover_consecutive_indexes() -> None:
    inputs = list(range(50_000))
    batches = drain(InputBatcher(inputs))
    assert len(batches) >= 2
    expected_start = 0
    for seq, (meta, items) in enumerate(batches):
        assert meta.seq == seq
        assert meta.start == expected_start
        assert meta.count == len(items)
        assert items == inputs[meta.start : meta.start + meta.count]
        expected_start += meta.count
    assert expected_start == len(inputs)


def test_first_batch_is_small_then_grows_for_tiny_items() -> None:
    batcher = InputBatcher(range(500_000))
    first, _ = batcher.next_batch()  # type: ignore[misc]
    assert first.count == FIRST_BATCH_INPUTS
    second, _ = batcher.next_batch()  # type: ignore[misc]
    assert second.count > FIRST_BATCH_INPUTS
    assert second.count <= MAX_BATCH_INPUTS
    counts = [meta.count for meta, _ in drain(batcher)]
    assert max(counts) <= MAX_BATCH_INPUTS
    assert batcher.count == 500_000


def test_big_items_go_one_per_batch() -> None:
    inputs = [bytes([i]) * 3_000_000 for i in range(4)]  # distinct objects: no pickle memo sharing
    batcher = InputBatcher(inputs)
    seen = []
    for i in range(4):
        meta, payload = batcher.next_batch()  # type: ignore[misc]
        assert (meta.seq, meta.start, meta.count) == (i, i, 1)
        assert pickle.loads(payload) == [inputs[i]]
        seen.append(batcher.exhausted)
    assert seen == [False, False, False, True]
    assert batcher.next_batch() is None


def test_a_larger_target_puts_several_big_items_in_a_batch() -> None:
    # as when batches go as files on the daemon's host (JobRun sets FILE_BATCH_BYTES after the first batch)
    inputs = [bytes([i]) * 3_000_000 for i in range(12)]
    batcher = InputBatcher(inputs)
    first, _ = batcher.next_batch()  # type: ignore[misc]
    assert first.count == 1
    batcher.target_bytes = FILE_BATCH_BYTES
    batches = drain(batcher)
    assert [x for _, items in batches for x in items] == inputs[1:]
    assert all(1 < meta.count <= FILE_BATCH_BYTES // 3_000_000 for meta, _ in batches[:-1])
    assert [meta.start for meta, _ in batches] == [
        1 + sum(m.count for m, _ in batches[:i]) for i in range(len(batches))
    ]


def test_batch_count_shrinks_for_medium_items() -> None:
    inputs = [bytes([i % 256]) * 100_000 for i in range(200)]  # 100 kB each
    batches = drain(InputBatcher(inputs))
    assert sum(meta.count for meta, _ in batches) == 200
    assert [x for _, items in batches for x in items] == inputs
    assert all(meta.count < 100 for meta, _ in batches)
    for _, items in batches:
        assert len(pickle.dumps(items)) <= 2 * TARGET_BATCH_BYTES


def test_exhausted_right_after_a_short_final_batch() -> None:
    batcher = InputBatcher(list(range(10)))
    assert not batcher.exhausted
    meta, _ = batcher.next_batch()  # type: ignore[misc]
    assert meta.count == 10
    assert batcher.exhausted
    assert batcher.count == 10
    assert batcher.next_batch() is None


def test_exhausted_when_length_is_an_exact_multiple_of_the_batch() -> None:
    # The batcher peeks one input ahead, so even a final batch that filled its size knows it is
    # the last one: the client sends the final count with it, not in an extra upload.
    batcher = InputBatcher(list(range(FIRST_BATCH_INPUTS)))
    meta, _ = batcher.next_batch()  # type: ignore[misc]
    assert meta.count == FIRST_BATCH_INPUTS
    assert batcher.exhausted
    assert batcher.next_batch() is None
    assert batcher.exhausted
    assert batcher.count == FIRST_BATCH_INPUTS
    assert batcher.next_batch() is None


def test_empty_inputs() -> None:
    batcher = InputBatcher([])
    assert batcher.next_batch() is None
    assert batcher.exhausted
    assert batcher.count == 0


def test_iterating_the_batcher() -> None:
    metas = [meta for meta, _ in InputBatcher(iter(range(3000)))]
    assert metas[0].count == FIRST_BATCH_INPUTS
    assert [m.start for m in metas] == [sum(x.count for x in metas[:i]) for i in range(len(metas))]
    assert [m.seq for m in metas] == list(range(len(metas)))
    assert sum(m.count for m in metas) == 3000


def test_generator_is_consumed_lazily() -> None:
    pulled = 0

    def gen() -> Iterator[int]:
        nonlocal pulled
        for i in range(300_000):
            pulled += 1
            yield i

    batcher = InputBatcher(gen())
    assert pulled == 0
    meta, _ = batcher.next_batch()  # type: ignore[misc]
    assert meta.count == FIRST_BATCH_INPUTS
    assert pulled == FIRST_BATCH_INPUTS + 1  # the batch, plus one input peeked to know if it was the last
    assert not batcher.exhausted
    total = meta.count + sum(meta.count for meta, _ in drain(batcher))
    assert total == 300_000
    assert pulled == 300_000


def test_unpicklable_input_names_its_global_index() -> None:
    inputs: list[object] = list(range(2000))
    inputs[1500] = threading.Lock()
    batcher = InputBatcher(inputs)
    meta, _ = batcher.next_batch()  # type: ignore[misc]
    assert meta.count == FIRST_BATCH_INPUTS  # the lock is not in the first batch
    with pytest.raises(UnpicklableError) as info:
        batcher.next_batch()
    assert info.value.input_index == 1500
    assert "input #1500" in str(info.value)
    assert "lock" in str(info.value)
    assert isinstance(info.value, TypeError)


def test_unpicklable_input_in_first_batch() -> None:
    with pytest.raises(UnpicklableError) as info:
        InputBatcher([1, 2, lambda: threading.Lock(), threading.Lock()]).next_batch()
    assert info.value.input_index == 3


def test_too_large_input_names_its_index() -> None:
    big = b"x" * 1_500_000
    with pytest.raises(TooLargeError) as info:
        InputBatcher([1, 2, big, 3], max_input_bytes=1_000_000).next_batch()
    assert info.value.input_index == 2
    assert "input #2" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_too_large_input_in_a_later_batch() -> None:
    inputs: list[object] = list(range(1100))
    inputs.append(b"y" * 1_500_000)
    batcher = InputBatcher(inputs, max_input_bytes=1_000_000)
    batcher.next_batch()
    with pytest.raises(TooLargeError) as info:
        batcher.next_batch()
    assert info.value.input_index == 1100


def test_single_too_large_input() -> None:
    with pytest.raises(TooLargeError) as info:
        InputBatcher([b"z" * 1_500_000], max_input_bytes=1_000_000).next_batch()
    assert info.value.input_index == 0


def test_batch_under_the_limit_is_fine() -> None:
    batcher = InputBatcher([b"a" * 600_000, b"b" * 600_000], max_input_bytes=1_000_000)
    meta, payload = batcher.next_batch()  # type: ignore[misc]
    assert meta.count == 2  # the batch is over the limit, no single input is


def test_check_sizes_of_a_batch_pickled_before_the_limit_was_known() -> None:
    batcher = InputBatcher([1, b"q" * 1_500_000])
    first = batcher.next_batch()
    assert first is not None
    batcher.max_input_bytes = 1_000_000
    with pytest.raises(TooLargeError) as info:
        batcher.check_sizes(first)
    assert info.value.input_index == 1


@pytest.mark.parametrize(("inputs", "type_name"), [("abc", "str"), (b"abc", "bytes"), (42, "int"), (None, "NoneType")])
def test_not_iterable(inputs: object, type_name: str) -> None:
    with pytest.raises(NotIterableError) as info:
        InputBatcher(inputs)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert type_name in str(info.value)

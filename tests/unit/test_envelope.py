"""burla.schemas.envelope: the binary envelope every message travels in."""

from __future__ import annotations

import json
import struct

import pytest

from burla.schemas import envelope
from burla.schemas.envelope import MAGIC, EnvelopeError, frame, frame_length, pack, unpack

HEADER = {"job_id": "j1", "batches": [{"seq": 0, "start": 0, "count": 3}], "text": "ünïcode", "none": None}


def _raw(header_bytes: bytes, lengths: list[int], body: bytes = b"", count: int | None = None) -> bytes:
    """An envelope built by hand, to make malformed ones."""
    n = len(lengths) if count is None else count
    data: bytes = (
        MAGIC
        + struct.pack("<I", len(header_bytes))
        + header_bytes
        + struct.pack("<I", n)
        + struct.pack(f"<{len(lengths)}Q", *lengths)
        + body
    )
    return data


def test_round_trip_header_and_blobs() -> None:
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB
    blobs = [b"function", b"", big, b"\x00\xff" * 3]
    data = pack(HEADER, blobs)
    header, views = unpack(data)
    assert header == HEADER
    assert [bytes(v) for v in views] == blobs
    assert len(views[2]) == 5 * 1024 * 1024
    assert len(views[1]) == 0


def test_no_blobs() -> None:
    header, views = unpack(pack({"a": 1}))
    assert header == {"a": 1}
    assert views == []


def test_layout_matches_the_documented_format() -> None:
    data = pack({"k": "v"}, [b"ab", b"cde"])
    head = b'{"k":"v"}'
    assert data == MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I2Q", 2, 2, 3) + b"abcde"


def test_blobs_are_zero_copy_views() -> None:
    data = bytearray(pack({"x": 1}, [b"hello", b"world"]))
    _, views = unpack(data)
    assert all(isinstance(v, memoryview) for v in views)
    assert bytes(views[1]) == b"world"
    # The views share memory with the input: changing the buffer changes them.
    offset = len(data) - len(b"world")
    data[offset] = ord("W")
    assert bytes(views[1]) == b"World"
    assert views[1].obj is data


def test_pack_accepts_memoryview_and_bytearray_blobs() -> None:
    source = b"0123456789"
    blobs = [memoryview(source)[2:5], bytearray(b"xy")]
    _, views = unpack(pack({}, blobs))
    assert [bytes(v) for v in views] == [b"234", b"xy"]


def test_unpack_accepts_memoryview_input() -> None:
    data = pack({"a": [1, 2]}, [b"blob"])
    header, views = unpack(memoryview(data))
    assert header == {"a": [1, 2]}
    assert bytes(views[0]) == b"blob"


def test_frame_prefix_announces_body_length() -> None:
    framed = frame({"op": "run"}, [b"payload"])
    prefix, body = framed[: envelope.FRAME_PREFIX], framed[envelope.FRAME_PREFIX :]
    assert envelope.FRAME_PREFIX == 8
    assert frame_length(prefix) == len(body)
    assert body == pack({"op": "run"}, [b"payload"])
    header, views = unpack(body)
    assert header == {"op": "run"}
    assert bytes(views[0]) == b"payload"


def test_frame_length_of_large_value() -> None:
    assert frame_length(struct.pack("<Q", 2**40 + 5)) == 2**40 + 5
    assert frame_length(memoryview(struct.pack("<Q", 7))) == 7


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"BRL1",
        b"XXXX" + pack({"a": 1})[4:],  # bad magic
        b"BRL2" + pack({"a": 1})[4:],
        b"not an envelope at all",
    ],
)
def test_bad_magic_or_too_short(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        unpack(data)


def test_every_truncation_raises() -> None:
    data = pack(HEADER, [b"xyz", b"", b"0123456789"])
    for cut in range(len(data)):
        with pytest.raises(EnvelopeError):
            unpack(data[:cut])


def test_trailing_bytes() -> None:
    with pytest.raises(EnvelopeError, match="trailing"):
        unpack(pack({"a": 1}, [b"abc"]) + b"!")


def test_blob_length_past_end() -> None:
    data = _raw(b"{}", [3, 100], b"abc" + b"d" * 10)
    with pytest.raises(EnvelopeError, match="past the end"):
        unpack(data)


def test_blob_count_past_end() -> None:
    data = _raw(b"{}", [1], b"a", count=1000)
    with pytest.raises(EnvelopeError):
        unpack(data)


def test_header_length_past_end() -> None:
    data = MAGIC + struct.pack("<I", 10_000) + b'{"a":1}' + struct.pack("<I", 0)
    with pytest.raises(EnvelopeError):
        unpack(data)


@pytest.mark.parametrize("header", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_header_not_an_object(header: bytes) -> None:
    with pytest.raises(EnvelopeError, match="not an object"):
        unpack(_raw(header, []))


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe{}", b""])
def test_header_not_json(header: bytes) -> None:
    with pytest.raises(EnvelopeError):
        unpack(_raw(header, []))


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


def test_single_byte_corruptions_raise_only_envelope_error() -> None:
    data = pack({"a": [1, 2, 3], "b": "text"}, [b"one", b"", b"three"])
    for i in range(len(data)):
        for value in (0x00, 0xFF, 0x7B, data[i] ^ 0x01):
            corrupt = bytearray(data)
            corrupt[i] = value
            try:
                header, blobs = unpack(bytes(corrupt))
            except EnvelopeError:
                continue
            assert isinstance(header, dict)
            assert sum(len(b) for b in blobs) <= len(corrupt)


def test_deeply_nested_header_raises_envelope_error() -> None:
    head = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(EnvelopeError):
        unpack(_raw(head, []))


def test_header_is_compact_json() -> None:
    data = pack({"a": 1, "b": [1, 2]})
    (head_len,) = struct.unpack_from("<I", data, 4)
    assert data[8 : 8 + head_len] == b'{"a":1,"b":[1,2]}'
    assert json.loads(data[8 : 8 + head_len]) == {"a": 1, "b": [1, 2]}


def test_content_type() -> None:
    assert envelope.CONTENT_TYPE == "application/x-burla-envelope"

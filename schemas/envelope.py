"""The binary envelope every Burla message travels in.

An envelope is a small JSON header plus any number of binary blobs (pickled
functions, input batches, result lists), laid out so the blobs can be sliced
out without copying::

    b"BRL1" | u32 header length | header JSON | u32 blob count
            | u64 length per blob ... | blob bytes ...

The same layout is used for HTTP bodies, websocket messages and, behind a u64
length prefix, for frames on the agent <-> worker socket.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from .wire import WireError, loads

MAGIC = b"BRL1"
CONTENT_TYPE = "application/x-burla-envelope"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class EnvelopeError(ValueError):
    """Raised when bytes are not a well-formed envelope."""


Blob = bytes | bytearray | memoryview


class Blobs(list[Blob]):
    """The blobs of one envelope, in order. `add` returns each one's index, for the header field that names it:
    the one place indices are assigned, so none is ever computed by hand."""

    def add(self, blob: Blob) -> int:
        self.append(blob)
        return len(self) - 1


def pack(header: dict[str, Any], blobs: Sequence[bytes | bytearray | memoryview] = ()) -> bytes:
    """Return `header` and `blobs` as one envelope."""
    return b"".join(parts(header, blobs))


def parts(
    header: dict[str, Any], blobs: Sequence[bytes | bytearray | memoryview] = (), framed: bool = False
) -> list[bytes | bytearray | memoryview]:
    """The pieces of an envelope (behind its frame length if `framed`), to write without joining them."""
    head = json.dumps(header, separators=(",", ":")).encode()
    lengths = struct.pack(f"<{len(blobs)}Q", *(len(b) for b in blobs))
    out: list[bytes | bytearray | memoryview] = [MAGIC + _U32.pack(len(head)) + head + _U32.pack(len(blobs)) + lengths]
    out.extend(blobs)
    if framed:
        out.insert(0, _U64.pack(sum(len(p) for p in out)))
    return out


def unpack(data: bytes | bytearray | memoryview) -> tuple[dict[str, Any], list[memoryview]]:
    """Split an envelope into its header and zero-copy views of its blobs."""
    view = memoryview(data)
    if len(view) < 12 or view[:4] != MAGIC:
        raise EnvelopeError("not a Burla envelope (bad magic)")
    try:
        (head_len,) = _U32.unpack_from(view, 4)
        pos = 8 + head_len
        if pos > len(view):
            raise EnvelopeError("malformed envelope: header runs past the end")
        header = loads(view[8:pos])  # no NaN or Infinity, bounded nesting
        (count,) = _U32.unpack_from(view, pos)
        pos += 4
        lengths = struct.unpack_from(f"<{count}Q", view, pos)
        pos += 8 * count
    except WireError as e:
        raise EnvelopeError(f"malformed envelope header: {e}") from None
    except (struct.error, ValueError) as e:
        raise EnvelopeError(f"malformed envelope: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise EnvelopeError("malformed envelope: header is not an object")
    blobs = []
    for length in lengths:
        end = pos + length
        if end > len(view):
            raise EnvelopeError("malformed envelope: blob runs past the end")
        blobs.append(view[pos:end])
        pos = end
    if pos != len(view):
        raise EnvelopeError("malformed envelope: trailing bytes")
    return header, blobs


def frame(header: dict[str, Any], blobs: Sequence[bytes | bytearray | memoryview] = ()) -> bytes:
    """An envelope behind a u64 length prefix, for stream sockets."""
    return b"".join(parts(header, blobs, framed=True))


FRAME_PREFIX = _U64.size


def frame_length(prefix: bytes | bytearray | memoryview) -> int:
    """The body length announced by a frame's 8-byte prefix."""
    return int(_U64.unpack(prefix)[0])

"""Framed envelopes over a trio stream: the agent's end of a worker's socket."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from burla.schemas import envelope

_READ_BYTES = 1024 * 1024
_JOIN_BYTES = 64 * 1024  # a frame up to this size is joined and written at once


class FrameStream:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, header: dict[str, Any], blobs: Sequence[envelope.Blob] = ()) -> None:
        pieces = envelope.parts(header, blobs, framed=True)
        if sum(len(p) for p in pieces) <= _JOIN_BYTES:
            pieces = [b"".join(pieces)]  # one write: the worker is not kept waiting on the rest of its frame
        # Taken without a checkpoint when free: a lease's Run goes out before any other task (a report
        # being encoded, say) takes a turn, so its worker starts at once.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:  # a frame's pieces go out back to back, the large ones uncopied
            for piece in pieces:
                await self.stream.send_all(piece)
        finally:
            self._send_lock.release()

    async def _fill(self, n: int) -> bool:
        while len(self._buffer) < n:
            chunk = await self.stream.receive_some(max(_READ_BYTES, n - len(self._buffer)))
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def receive(self) -> tuple[dict[str, Any], list[memoryview]] | None:
        """The next frame, or None when the worker closed its end.

        The body is read into one buffer of its own size: a 300 MB result costs 300 MB here, not the
        two or three copies that growing and slicing a shared buffer would make.
        """
        if not await self._fill(envelope.FRAME_PREFIX):
            return None
        length = envelope.frame_length(self._buffer[: envelope.FRAME_PREFIX])
        del self._buffer[: envelope.FRAME_PREFIX]
        body = bytearray(length)
        got = min(length, len(self._buffer))
        body[:got] = self._buffer[:got]
        del self._buffer[:got]
        while got < length:
            chunk = await self.stream.receive_some(max(_READ_BYTES, min(length - got, 16 * _READ_BYTES)))
            if not chunk:
                return None
            take = min(len(chunk), length - got)
            body[got : got + take] = chunk[:take] if take < len(chunk) else chunk
            if take < len(chunk):
                self._buffer += chunk[take:]  # the start of the next frame
            got += take
        return envelope.unpack(body)

    async def aclose(self) -> None:
        await self.stream.aclose()

"""Framed envelopes over a trio stream: the agent's end of a worker's socket."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from burla.schemas import envelope

_READ_BYTES = 1024 * 1024


class FrameStream:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, header: dict[str, Any], blobs: Sequence[bytes | memoryview] = ()) -> None:
        pieces = envelope.parts(header, blobs, framed=True)
        async with self._send_lock:  # a frame's pieces go out back to back, uncopied
            for piece in pieces:
                await self.stream.send_all(piece)

    async def _fill(self, n: int) -> bool:
        while len(self._buffer) < n:
            chunk = await self.stream.receive_some(max(_READ_BYTES, n - len(self._buffer)))
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def receive(self) -> tuple[dict[str, Any], list[memoryview]] | None:
        """The next frame, or None when the worker closed its end."""
        if not await self._fill(envelope.FRAME_PREFIX):
            return None
        length = envelope.frame_length(self._buffer[: envelope.FRAME_PREFIX])
        total = envelope.FRAME_PREFIX + length
        if not await self._fill(total):
            return None
        body = bytes(self._buffer[envelope.FRAME_PREFIX : total])
        del self._buffer[:total]
        return envelope.unpack(body)

    async def aclose(self) -> None:
        await self.stream.aclose()

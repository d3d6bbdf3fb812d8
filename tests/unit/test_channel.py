"""The agent's end of a worker's socket: framed envelopes, however the bytes arrive."""

from __future__ import annotations

import trio
import trio.testing

from burla.node_agent.channel import FrameStream
from burla.schemas import envelope


async def test_frames_come_back_whole_and_in_order_whatever_the_chunks() -> None:
    left, right = trio.testing.memory_stream_pair()
    frames = [({"n": i}, [bytes([i]) * size]) for i, size in enumerate([0, 1, 7, 100_000, 3 * 1024**2, 5])]
    wire = b"".join(envelope.frame(h, b) for h, b in frames)

    async def send_in_odd_chunks() -> None:
        for i in range(0, len(wire), 65_537):  # frames split across chunks, several frames in one chunk
            await left.send_all(wire[i : i + 65_537])
        await left.aclose()

    stream = FrameStream(right)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_in_odd_chunks)
        got = []
        while (frame := await stream.receive()) is not None:
            got.append((frame[0], [bytes(b) for b in frame[1]]))
    assert got == frames

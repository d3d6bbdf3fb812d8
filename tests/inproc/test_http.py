"""The HTTP client of Burla's processes, on a real socket: cancelling a request mid-body leaves nothing behind."""

from __future__ import annotations

import functools
import gc
import warnings

import httpx
import pytest
import trio

from burla.common.http import async_client

BODY = b"x" * 64 * 1024**2  # more than the socket buffers hold: its write blocks on a peer that does not read


async def test_a_request_cancelled_while_its_body_is_sent_leaves_no_generator_to_finalize(
    nursery: trio.Nursery,
) -> None:
    async def never_reads(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, never_reads, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with async_client(f"http://127.0.0.1:{port}", {}, httpx.Timeout(30.0)) as http:
            with trio.move_on_after(1) as scope:
                await http.post("/", content=BODY)
            assert scope.cancelled_caught
        gc.collect()
        await trio.sleep(0.1)
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_bodies_arrive_whole_with_their_length(nursery: trio.Nursery) -> None:
    received: list[bytes] = []

    async def answer(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 5:
            data += await stream.receive_some()
        received.append(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    async with async_client(f"http://127.0.0.1:{port}", {"x-test": "1"}, httpx.Timeout(10.0)) as http:
        r = await http.post("/path", content=b"hello")
    assert r.status_code == 200 and r.text == "ok"
    head, body = received[0].split(b"\r\n\r\n", 1)
    assert body == b"hello" and b"content-length: 5" in head.lower() and b"x-test: 1" in head.lower()


@pytest.fixture(autouse=True)
def _no_stale_garbage() -> None:
    gc.collect()  # what earlier tests left must not be counted here


async def test_chunks_send_every_byte_of_every_part_in_order() -> None:
    from burla.common.http import Chunks

    parts = [b"ab", bytearray(b""), memoryview(b"cdefg"), b"h" * 10]
    got = [chunk async for chunk in Chunks(parts, 3)]
    assert b"".join(got) == b"abcdefg" + b"h" * 10 and max(map(len, got)) <= 3

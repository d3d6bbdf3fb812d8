"""Every header and body has a bound, slow peers are cut off, and no answer carries a stack trace.

A real burlad on 127.0.0.1 with small timeouts; raw sockets where a test must misbehave below HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from burla.common.config import DaemonConfig
from burla.daemon import bounds
from burla.daemon.server import Running, serve
from burla.node_agent.agent import Agent

from .test_hostile import run_job

SAFETY = 30  # a bound on each wait, so a test that should fail cannot hang: never what it asserts


@pytest.fixture
async def daemon(tmp_path: Path, nursery: trio.Nursery) -> Running:
    """Timeouts of a second or two, so slow peers are cut off within the test; long polls longer than them."""
    config = DaemonConfig(
        port=0, state_dir=str(tmp_path / "daemon"), poll_timeout=2, agent_timeout=5,
        header_timeout=1, read_timeout=1, body_timeout=3,
    )  # fmt: skip
    running: Running = await nursery.start(serve, config)
    return running


@contextlib.asynccontextmanager
async def connect(daemon: Running) -> AsyncIterator[trio.SocketStream]:
    host, port = daemon.url.removeprefix("http://").split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        yield stream


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    data = b""
    with trio.fail_after(SAFETY):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


async def test_an_oversized_header_gets_431(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/v1/health", headers={"x-big": "a" * (bounds.MAX_HEADER_BYTES + 1)})
    assert r.status_code == 431
    assert str(bounds.MAX_HEADER_BYTES) in r.json()["error"]["message"]


@pytest.mark.parametrize("size", [64 * 1024, 4 * 1024**2])
async def test_a_huge_header_gets_431_or_a_closed_connection(daemon: Running, size: int) -> None:
    async with connect(daemon) as stream:
        try:
            await stream.send_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        except trio.BrokenResourceError:
            pass  # cut off while still sending: the connection is closed
        answer = await read_until_closed(stream)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer[:200]


async def test_headers_sent_slowly_are_cut_off(daemon: Running) -> None:
    async with connect(daemon) as stream:
        await stream.send_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        sent = 0

        async def trickle() -> None:  # a header byte at a time, never the blank line that ends them
            nonlocal sent
            try:
                while True:
                    await stream.send_all(b"X-Slow: " if sent == 0 else b"a")
                    sent += 1
                    await trio.sleep(0.1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            answer = await read_until_closed(stream)
            nursery.cancel_scope.cancel()
        assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]  # cut off unanswered, though bytes kept coming
        assert sent > 1


async def test_a_body_that_stops_midway_is_cut_off_and_stores_nothing(daemon: Running) -> None:
    data = b"x" * 1_000_000
    digest = hashlib.sha256(data).hexdigest()
    async with connect(daemon) as stream:
        head = (f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {daemon.admin_token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
        await stream.send_all(head.encode() + data[:1000])  # and then nothing more
        answer = await read_until_closed(stream)
        assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]
        assert not daemon.plane.has_blob(digest)
        async with httpx.AsyncClient(base_url=daemon.url) as c:  # the daemon serves on
            assert (await c.get("/v1/health")).status_code == 200


async def test_a_body_trickled_past_body_timeout_is_answered_408(daemon: Running) -> None:
    data = b"y" * 100_000
    digest = hashlib.sha256(data).hexdigest()
    async with connect(daemon) as stream:
        head = (f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {daemon.admin_token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
        await stream.send_all(head.encode())

        async def trickle() -> None:  # a byte more often than read_timeout, never the whole body
            try:
                for i in range(len(data)):
                    await stream.send_all(data[i : i + 1])
                    await trio.sleep(0.2)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        answer = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            with trio.fail_after(SAFETY):
                while b"}}" not in answer:  # the whole JSON error
                    chunk = await stream.receive_some(65536)
                    assert chunk, f"closed without an answer: {answer[:200]!r}"
                    answer += chunk
            nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"daemon.body_timeout" in answer and b"connection: close" in answer.lower()
    assert not daemon.plane.has_blob(digest)


@pytest.fixture
async def admin(daemon: Running) -> Any:
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {daemon.admin_token}"}) as c:
        yield c


async def test_an_oversized_json_body_gets_413_naming_the_limit(admin: httpx.AsyncClient) -> None:
    body = json.dumps({"reason": "x" * (bounds.JSON_BODY_BYTES + 10)}).encode()
    r = await admin.post("/v1/jobs/" + "a" * 32 + "/cancel", content=body)
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["code"] == "too_large" and str(bounds.JSON_BODY_BYTES) in error["message"]
    assert "/cancel" in error["message"]


async def test_an_oversized_body_without_a_length_gets_413_too(admin: httpx.AsyncClient) -> None:
    async def chunks() -> Any:  # chunked: the size is known only as the bytes pass the limit
        for _ in range(4):
            yield b" " * (bounds.JSON_BODY_BYTES // 2)

    r = await admin.post("/v1/agents/register", content=chunks())
    assert r.status_code == 413, r.text
    assert str(bounds.JSON_BODY_BYTES) in r.json()["error"]["message"]


async def test_routes_that_carry_data_take_more_than_the_json_limit(admin: httpx.AsyncClient, daemon: Running) -> None:
    data = b"z" * (3 * bounds.JSON_BODY_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    r = await admin.put(f"/v1/blobs/{digest}", content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert daemon.plane.has_blob(digest)


async def test_a_route_that_raises_answers_500_with_an_id_and_no_traceback(
    admin: httpx.AsyncClient, daemon: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Any:
        raise RuntimeError("secret internals at /srv/burla")

    monkeypatch.setattr(daemon.plane, "cluster_status", broken)
    with caplog.at_level(logging.ERROR, logger="burla.daemon"):
        r = await admin.get("/v1/cluster")
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "internal" and "see the daemon's log (id " in error["message"]
    for leak in ("Traceback", "RuntimeError", "secret", "/srv/burla", 'File "'):
        assert leak not in r.text
    error_id = error["message"].rsplit("id ", 1)[1].rstrip(")")
    logged = [rec for rec in caplog.records if error_id in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log, under that id


async def test_unknown_routes_and_methods_answer_json(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/v1/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await admin.delete("/v1/health")
    assert r.status_code == 405 and "error" in r.json()


async def test_long_polls_longer_than_read_timeout_are_not_cut(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    await trio.sleep(2.5 * daemon.plane.config.poll_timeout)  # several idle long polls, each longer than read_timeout
    assert await run_job(daemon, admin, "b" * 32, abs, [-1, -2, -3]) == [1, 2, 3]
    assert agent.counters["registrations"] == 1  # never lost the daemon

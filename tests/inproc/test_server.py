"""A real burlad bound to 127.0.0.1 port 0 inside the test's nursery, with an in-process agent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from httpx_ws import aconnect_ws

from burla.common.config import DaemonConfig
from burla.daemon.server import Running
from burla.node_agent.agent import Agent
from burla.schemas import envelope
from burla.schemas import messages as m


async def test_health_needs_no_token_but_everything_else_does(daemon: Running) -> None:
    async with httpx.AsyncClient(base_url=daemon.url) as client:
        health = await client.get("/v1/health")
        assert health.status_code == 200 and health.json()["boot_id"] == daemon.plane.boot_id
        assert (await client.get("/v1/info")).status_code == 401
        r = await client.get("/v1/info", headers={"authorization": f"Bearer {daemon.admin_token}"})
        assert r.status_code == 200 and r.json()["max_input_bytes"] == DaemonConfig().max_input_bytes


async def test_remote_parallel_map_against_the_in_process_daemon(
    daemon: Running, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from burla import remote_parallel_map

    monkeypatch.setenv("BURLA_CLUSTER_URL", daemon.url)
    monkeypatch.setenv("BURLA_API_KEY", daemon.admin_token)
    results = await trio.to_thread.run_sync(lambda: remote_parallel_map(str, range(100), spinner=False))
    assert results == [str(x) for x in range(100)]
    assert daemon.plane.counters["results_accepted"] >= 2
    stats = agent.statistics()
    assert stats["leases_done"] >= 2 and stats["workers"] == 2


async def submit(admin: httpx.AsyncClient, job_id: str, values: list[Any]) -> None:
    import pickle
    import sys

    import cloudpickle

    fn = cloudpickle.dumps(abs)
    spec = m.JobSpec(job_id, "abs", hashlib.sha256(fn).hexdigest(), f"{sys.version_info[0]}.{sys.version_info[1]}")
    header = {"spec": spec.to_wire(), "batches": [m.BatchMeta(0, 0, len(values)).to_wire()], "final_count": len(values)}
    r = await admin.post(
        "/v1/jobs",
        content=envelope.pack(header, [fn, pickle.dumps(values)]),
        headers={"content-type": envelope.CONTENT_TYPE},
    )
    assert r.status_code == 200, r.text


async def test_the_events_socket_replays_after_a_sequence_and_acks(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    await submit(admin, "replay", [-1, -2, -3])
    seen: list[dict[str, Any]] = []
    async with aconnect_ws("/v1/events", admin) as ws:
        await ws.send_text(json.dumps({"op": "subscribe", "job": "replay", "after": 0}))
        with trio.fail_after(20):
            while not seen or seen[-1]["kind"] != m.DONE:
                header, _ = envelope.unpack(await ws.receive_bytes())
                seen += header.get("events", [])
        middle = seen[0]["seq"]
        await ws.send_text(json.dumps({"op": "subscribe", "job": "replay", "after": middle}))
        replay: list[dict[str, Any]] = []
        with trio.fail_after(20):
            while not replay or replay[-1]["kind"] != m.DONE:
                header, _ = envelope.unpack(await ws.receive_bytes())
                replay += header.get("events", [])
        assert [e["seq"] for e in replay] == [e["seq"] for e in seen if e["seq"] > middle]
        await ws.send_text(json.dumps({"op": "ack", "job": "replay"}))
        with trio.fail_after(5):
            while daemon.plane.store.job_exists("replay"):
                await trio.sleep(0.02)
    assert (await admin.get("/v1/jobs/replay")).status_code == 404


async def test_a_closing_client_acks_over_http_also_while_its_websocket_is_down(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    """The ack of a finished job is not lost when the events socket is reconnecting at that moment, nor when
    the process exits right after it (found in CI: the job was then kept until daemon.job_retention)."""
    from burla._events import EventStream

    await submit(admin, "closing", [-1, -2])
    with trio.fail_after(20):
        while daemon.plane.job_status("closing").state == m.RUNNING:
            await trio.sleep(0.02)
    async with trio.open_nursery() as nursery:
        stream = EventStream(admin, nursery, reconnect_seconds=5)  # never connected: no websocket at all
        await stream.ack("closing")
        await stream.flush_acks()
        nursery.cancel_scope.cancel()
    assert not daemon.plane.store.job_exists("closing")
    assert (await admin.get("/v1/jobs/closing")).status_code == 404


async def test_an_ack_with_no_socket_to_ride_goes_over_http_after_its_delay(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    from burla._events import ACK_DELAY, EventStream

    await submit(admin, "delayed", [-1, -2])
    with trio.fail_after(20):
        while daemon.plane.job_status("delayed").state == m.RUNNING:
            await trio.sleep(0.02)
    async with trio.open_nursery() as nursery:
        stream = EventStream(admin, nursery, reconnect_seconds=5)  # no websocket: the ack cannot go on one
        await stream.ack("delayed")
        with trio.fail_after(ACK_DELAY + 10):
            while daemon.plane.store.job_exists("delayed"):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_cancel_stops_the_job_on_the_agent(daemon: Running, agent: Agent, admin: httpx.AsyncClient) -> None:
    import pickle
    import sys
    import time

    import cloudpickle

    fn = cloudpickle.dumps(time.sleep)
    spec = m.JobSpec("slow", "sleep", hashlib.sha256(fn).hexdigest(), f"{sys.version_info[0]}.{sys.version_info[1]}")
    header = {"spec": spec.to_wire(), "batches": [m.BatchMeta(0, 0, 2).to_wire()], "final_count": 2}
    body = envelope.pack(header, [fn, pickle.dumps([60, 60])])
    r = await admin.post("/v1/jobs", content=body, headers={"content-type": envelope.CONTENT_TYPE})
    assert r.status_code == 200
    with trio.fail_after(10):
        while len(agent.workers.pool.busy()) < 2:
            await trio.sleep(0.02)
    assert (await admin.post("/v1/jobs/slow/cancel", json={"reason": "test"})).status_code == 200
    with trio.fail_after(5):  # the calls sleep 60 s: only the cancel frees the workers this soon (how soon is
        while agent.workers.pool.busy():  # a benchmark figure, not a pass/fail one: CI's machines are noisy)
            await trio.sleep(0.01)
    assert (await admin.get("/v1/jobs/slow")).json()["state"] == m.JOB_CANCELLED


async def test_leases_waiting_for_their_environment_are_not_run_twice(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    """While a node prepares a job's environment, its report still holds the job's leases."""
    import pickle
    import sys

    import cloudpickle

    from burla.schemas.environment import Environment

    manifest = Environment(f"{sys.version_info[0]}.{sys.version_info[1]}", "linux-x86_64")
    import hashlib

    body = manifest.canonical()
    assert (await admin.put(f"/v1/blobs/{hashlib.sha256(body).hexdigest()}", content=body)).status_code == 200
    fn = cloudpickle.dumps(abs)
    spec = m.JobSpec("withenv", "abs", hashlib.sha256(fn).hexdigest(), manifest.python_version, env=manifest.digest())
    header = {"spec": spec.to_wire(), "batches": [m.BatchMeta(0, 0, 6).to_wire()], "final_count": 6}
    body = envelope.pack(header, [fn, pickle.dumps([-1, -2, -3, -4, -5, -6])])
    r = await admin.post("/v1/jobs", content=body, headers={"content-type": envelope.CONTENT_TYPE})
    assert r.status_code == 200, r.text
    with trio.fail_after(30):
        while daemon.plane.store.job_exists("withenv") and daemon.plane.job_status("withenv").state == m.RUNNING:
            await trio.sleep(0.05)
    assert daemon.plane.job_status("withenv").state == m.JOB_DONE
    assert daemon.plane.counters["leases_lost"] == 0 and daemon.plane.counters["results_dropped"] == 0


def create_frame(job_id: str, values: list[Any], ack: list[str] | None = None, fn_hash: str = "") -> bytes:
    """The create frame of the events socket: the envelope of POST /v1/jobs."""
    import pickle
    import sys

    import cloudpickle

    fn = cloudpickle.dumps(abs)
    spec = m.JobSpec(
        job_id, "abs", fn_hash or hashlib.sha256(fn).hexdigest(), f"{sys.version_info[0]}.{sys.version_info[1]}"
    )
    header: dict[str, Any] = {"spec": spec.to_wire(), "batches": [m.BatchMeta(0, 0, len(values)).to_wire()],
                              "final_count": len(values), "after": 0}  # fmt: skip
    if ack is not None:
        header["ack"] = ack
    return envelope.pack(header, [fn, pickle.dumps(values)])


async def events_until_done(ws: Any, job_id: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with trio.fail_after(20):
        while not seen or seen[-1]["kind"] != m.DONE:
            header, _ = envelope.unpack(await ws.receive_bytes())
            assert header["job_id"] == job_id and "error" not in header, header
            seen += header.get("events", [])
    return seen


async def test_a_create_frame_on_the_events_socket_makes_the_job_and_follows_it(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    async with aconnect_ws("/v1/events", admin) as ws:
        await ws.send_bytes(create_frame("onsocket1", [-1, -2, -3]))
        first = await events_until_done(ws, "onsocket1")
        assert sum(e["kind"] == m.RESULTS for e in first) >= 1
        # sent again (a reconnect before any answer): the job is followed, not made twice nor refused
        await ws.send_bytes(create_frame("onsocket1", [-1, -2, -3]))
        again = await events_until_done(ws, "onsocket1")
        assert [e["seq"] for e in again] == [e["seq"] for e in first]
        assert daemon.plane.counters["jobs"] == 1
        # the next job's frame carries the ack of the first: it is forgotten once the second is made
        await ws.send_bytes(create_frame("onsocket2", [-4], ack=["onsocket1", "not an id"]))
        await events_until_done(ws, "onsocket2")
        assert not daemon.plane.store.job_exists("onsocket1") and daemon.plane.store.job_exists("onsocket2")
    assert (await admin.get("/v1/jobs/onsocket1")).status_code == 404


async def test_a_refused_create_frame_answers_as_post_would(daemon: Running, admin: httpx.AsyncClient) -> None:
    async with aconnect_ws("/v1/events", admin) as ws:
        await ws.send_bytes(create_frame("badhash", [1], fn_hash="0" * 64))
        with trio.fail_after(10):
            header, _ = envelope.unpack(await ws.receive_bytes())
        assert header["job_id"] == "badhash"
        assert header["error"]["status"] == 400 and "function_hash" in header["error"]["message"]
        await ws.send_bytes(envelope.MAGIC + b"\xff\xff\xff\xff")  # not an envelope: the socket's error
        with trio.fail_after(10):
            header, _ = envelope.unpack(await ws.receive_bytes())
        assert "job_id" not in header and header["error"]["code"] == "bad_request"
    assert not daemon.plane.store.job_exists("badhash")

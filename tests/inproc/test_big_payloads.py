"""Results larger than the websocket push: their events say where they are, and the client fetches them."""

from __future__ import annotations

import hashlib
import pickle
import sys
from typing import Any

import cloudpickle
import httpx
import pytest
import trio

from burla.daemon.server import Running
from burla.daemon.service import SPILL_BYTES
from burla.node_agent.agent import Agent
from burla.schemas import envelope
from burla.schemas import messages as m

SIZE = SPILL_BYTES + 1024**2


async def test_a_big_result_is_fetched_not_pushed(daemon: Running, agent: Agent, admin: httpx.AsyncClient) -> None:
    fn = cloudpickle.dumps(lambda x: bytes([x]) * SIZE)  # by value: the workers need not import this module
    spec = m.JobSpec("big", "big", hashlib.sha256(fn).hexdigest(), f"{sys.version_info[0]}.{sys.version_info[1]}")
    header = {"spec": spec.to_wire(), "batches": [m.BatchMeta(0, 0, 2).to_wire()], "final_count": 2}
    r = await admin.post("/v1/jobs", content=envelope.pack(header, [fn, pickle.dumps([1, 2])]),
                         headers={"content-type": envelope.CONTENT_TYPE})  # fmt: skip
    assert r.status_code == 200, r.text
    with trio.fail_after(30):
        while daemon.plane.job_status("big").state == m.RUNNING:
            await trio.sleep(0.05)
    events = await daemon.plane.wait_events("big", 0, 0)
    spilled = [e for e, payload in events if e.kind == m.RESULTS]
    assert spilled and all(payload is None for e, payload in events if e.kind == m.RESULTS)
    assert all(e.size > SPILL_BYTES and e.ref for e in spilled)
    values = []
    for event in spilled:  # what a client on another host does: stream it over HTTP, whole, with its length
        r = await admin.get(f"/v1/jobs/big/events/{event.seq}/payload")
        assert r.status_code == 200 and int(r.headers["content-length"]) == event.size == len(r.content)
        values += pickle.loads(r.content)
    assert sorted(values) == [bytes([1]) * SIZE, bytes([2]) * SIZE]
    assert (await admin.get("/v1/jobs/big/events/999/payload")).status_code == 404


def big(x: int) -> bytes:
    return bytes([x]) * SIZE


async def test_remote_parallel_map_returns_big_results(
    daemon: Running, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from burla import remote_parallel_map

    monkeypatch.setenv("BURLA_CLUSTER_URL", daemon.url)
    monkeypatch.setenv("BURLA_API_KEY", daemon.admin_token)
    results = await trio.to_thread.run_sync(lambda: remote_parallel_map(big, [1, 2, 3], spinner=False))
    assert results == [big(1), big(2), big(3)]


async def test_a_failed_fetch_is_retried_and_a_refused_one_fails_only_its_job(
    daemon: Running, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from burla import Client
    from burla.daemon.errors import NotFound
    from burla.errors import ClusterError

    real = daemon.plane.event_payload
    calls: list[str] = []

    def flaky(job_id: str, seq: int, who: Any = None) -> Any:
        calls.append(job_id)
        if len(calls) == 1:
            raise RuntimeError("the daemon broke for a moment")  # a 500: the client reconnects and fetches again
        if job_id == refused_job[0]:
            raise NotFound("this payload is gone")
        return real(job_id, seq, who)

    refused_job: list[str] = [""]
    monkeypatch.setattr(daemon.plane, "event_payload", flaky)
    monkeypatch.setattr("burla.common.local.read_probe", lambda *a: None)  # as from another host: over HTTP

    def refuse_all(job_id: str, seq: int, who: Any = None) -> Any:
        refused_job[0] = job_id
        return flaky(job_id, seq, who)

    def as_a_user() -> None:
        with Client(daemon.url, daemon.admin_token) as client:
            assert client.map(big, [1], spinner=False) == [big(1)]
            assert len(calls) == 2  # a 500, then the same payload again
            monkeypatch.setattr(daemon.plane, "event_payload", refuse_all)
            with pytest.raises(ClusterError, match="this payload is gone"):
                client.map(big, [2], spinner=False)
            monkeypatch.setattr(daemon.plane, "event_payload", real)
            assert client.map(abs, [-3], spinner=False) == [3]  # the client's event stream lives on

    await trio.to_thread.run_sync(as_a_user)

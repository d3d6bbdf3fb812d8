"""Results larger than the websocket push: their events say where they are, and the client fetches them."""

from __future__ import annotations

import hashlib
import pickle
import sys

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

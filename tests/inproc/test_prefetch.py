"""Prefetched leases on a real burlad and an in-process agent: each waits on the node behind the lease
before it in its slot and goes on the moment that one ends; a cancel drops the queued ones at once."""

from __future__ import annotations

import hashlib
import pickle
import sys
import time

import cloudpickle
import httpx
import trio

from burla.daemon.server import Running
from burla.node_agent.agent import Agent
from burla.schemas import envelope
from burla.schemas import messages as m

SLEEP = cloudpickle.dumps(time.sleep)


async def submit_sleeps(admin: httpx.AsyncClient, job_id: str, seconds: float, n: int) -> None:
    spec = m.JobSpec(job_id, "sleep", hashlib.sha256(SLEEP).hexdigest(), f"{sys.version_info[0]}.{sys.version_info[1]}")
    header = {"spec": spec.to_wire(), "batches": [m.BatchMeta(0, 0, n).to_wire()], "final_count": n}
    body = envelope.pack(header, [SLEEP, pickle.dumps([seconds] * n)])
    r = await admin.post("/v1/jobs", content=body, headers={"content-type": envelope.CONTENT_TYPE})
    assert r.status_code == 200, r.text


def result_ranges(daemon: Running, job_id: str) -> list[tuple[int, int]]:
    rows = daemon.plane.store.conn.execute(
        "SELECT lo, hi FROM events WHERE job_id = ? AND kind = ? AND hi > lo ORDER BY lo", (job_id, m.RESULTS)
    )
    return [(int(lo), int(hi)) for lo, hi in rows.fetchall()]


def disjoint(ranges: list[tuple[int, int]]) -> bool:
    return all(a_hi <= b_lo for (_, a_hi), (b_lo, _) in zip(ranges, ranges[1:], strict=False))


async def wait_state(daemon: Running, job_id: str, timeout: float) -> str:
    with trio.fail_after(timeout):
        while (state := daemon.plane.job_status(job_id).state) == m.RUNNING:
            await trio.sleep(0.05)
    return state


async def test_a_prefetched_lease_starts_when_the_one_before_it_ends(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    await submit_sleeps(admin, "short", 0.01, 200)  # 2 probes, then leases of 20 calls, each with its next
    assert await wait_state(daemon, "short", 60) == m.JOB_DONE
    ranges = result_ranges(daemon, "short")
    assert disjoint(ranges) and sum(hi - lo for lo, hi in ranges) == 200  # each input's result once
    assert daemon.plane.counters["leases_prefetched"] > 0
    assert agent.statistics()["leases_followed"] > 0  # they waited on the node, not for a report and a poll
    assert daemon.plane.counters["leases_lost"] == 0 and daemon.plane.counters["results_dropped"] == 0
    assert agent.workers.pool.following == {} and not agent.workers.pool.queue


async def test_a_cancel_drops_the_prefetched_leases_at_once(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    await submit_sleeps(admin, "long", 0.3, 60)  # one call per lease: each slot gets its next one ahead
    with trio.fail_after(20):
        while not agent.workers.pool.following:
            await trio.sleep(0.02)
    assert daemon.plane.scheduler.jobs["long"].queued > 0
    before = result_ranges(daemon, "long")
    assert (await admin.post("/v1/jobs/long/cancel", json={"reason": "test"})).status_code == 200
    with trio.fail_after(5):
        while agent.workers.pool.following or agent.workers.pool.busy() or agent.workers.pool.queue:
            await trio.sleep(0.01)
    assert daemon.plane.job_status("long").state == m.JOB_CANCELLED
    assert daemon.plane.scheduler.jobs["long"].leases == {} and daemon.plane.scheduler.jobs["long"].queued == 0
    node = daemon.plane.scheduler.nodes[agent.agent_id]
    assert node.leases == set() and node.queued == {} and node.running == 0
    await trio.sleep(0.5)  # a cancelled lease's late result is dropped, never recorded
    after = result_ranges(daemon, "long")
    assert set(before) <= set(after) and disjoint(after)
    # the node takes the next job as before
    await submit_sleeps(admin, "next", 0.01, 40)
    assert await wait_state(daemon, "next", 30) == m.JOB_DONE
    assert sum(hi - lo for lo, hi in result_ranges(daemon, "next")) == 40


async def test_a_restarted_daemon_counts_prefetched_leases_as_waiting_not_running(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    """The store keeps whom a prefetched lease follows: restored, it takes no worker of its own, so the node's
    busy count stays its running calls (found by CI: a restarted daemon showed twice the node's workers busy)."""
    from burla.common.config import DaemonConfig
    from burla.daemon.service import ControlPlane
    from burla.daemon.store import Store

    await submit_sleeps(admin, "long", 0.2, 60)
    plane = daemon.plane
    with trio.fail_after(30):
        while not (queued := dict(plane.scheduler.nodes[agent.agent_id].queued)):
            await trio.sleep(0.01)
    store = plane.store
    again = ControlPlane(Store(store.path), DaemonConfig(state_dir=str(store.path.parent)))
    node = again.scheduler.nodes[agent.agent_id]
    restored = {lid: after for lid, after in queued.items() if lid in node.leases and after in node.leases}
    assert restored and all(node.queued.get(lid) == after for lid, after in restored.items())
    assert node.running <= node.ready_workers
    await admin.post("/v1/jobs/long/cancel", json={"reason": "the test is over"})

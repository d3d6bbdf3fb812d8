"""Events reach their followers from memory as they are recorded; SQLite is the record they catch up from.

Also: each public decision of the control plane is one transaction, and the events websocket's hub
(`EventHub`) driven over an in-memory socket.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
import trio

from burla.daemon.event_hub import EventHub
from burla.daemon.feeds import FRAME_BYTES, SPILL_BYTES
from burla.daemon.service import ControlPlane
from burla.daemon.store import StoreError
from burla.daemon.users import SYSTEM
from burla.schemas import envelope
from burla.schemas import messages as m

from .test_control_plane import Clock, batch, node, plane, report, result_for, spec


def each_blob(results: list[tuple[m.LeaseResult, bytes]]) -> list[tuple[m.LeaseResult, bytes]]:
    """Results of one report, each naming its own blob."""
    return [(dataclasses.replace(r, results_blob=i), blob) for i, (r, blob) in enumerate(results)]


def no_reads(p: ControlPlane) -> list[int]:
    """Make SQLite's event reads countable: the live push must not need them."""
    reads: list[int] = []
    real = p.store.events_after

    def counted(job_id: str, after: int, *args: Any, **kwargs: Any) -> Any:
        reads.append(after)
        return real(job_id, after, *args, **kwargs)

    p.store.events_after = counted  # type: ignore[method-assign]
    return reads


async def test_results_are_pushed_from_memory_and_a_late_follower_catches_up_from_sqlite(tmp_path: Path) -> None:
    p = plane(tmp_path, Clock())
    agent = p.register(node("a")).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    reads = no_reads(p)
    with p.follow("job1", 0) as follower:
        assert await p.next_events(follower, 0) == []  # subscribing: one read of the record, empty
        assert reads == [0]
        delivery, _ = report(p, agent)
        results = each_blob([result_for(lease) for lease in delivery.leases])
        report(p, agent, [r for r, _ in results], [b for _, b in results])
        pushed = await p.next_events(follower, 0)
        assert reads == [0]  # nothing read back from SQLite
        assert [(e.kind, e.lo, e.hi, payload) for e, payload in pushed] == [
            (m.RESULTS, r.lo, r.lo + r.n_ok, blob) for r, blob in results
        ]
    late = await p.wait_events("job1", 0, 0)  # a reconnect from the start: the record has the same events
    assert [(e, payload) for e, payload in late] == pushed
    assert reads == [0, 0]


async def test_a_payload_over_the_spill_size_is_pushed_by_reference(tmp_path: Path) -> None:
    p = plane(tmp_path, Clock(), max_result_bytes=2 * SPILL_BYTES)
    agent = p.register(node("a", workers=1)).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 1)], final_count=1)
    with p.follow("job1", 0) as follower:
        await p.next_events(follower, 0)
        (lease,) = report(p, agent, ready=1)[0].leases
        big = b"x" * (SPILL_BYTES + 1)
        report(p, agent, [m.LeaseResult(lease.lease_id, "job1", 0, 1, 0.1, 0)], [big], ready=1)
        pushed = await p.next_events(follower, 0)
    (result, payload), (done, _) = pushed
    assert payload is None and result.size == len(big) and result.ref and done.kind == m.DONE
    assert p.store.payloads.get(result.ref) == big
    assert await p.wait_events("job1", 0, 0) == pushed  # what a reconnect reads is the same


async def test_a_follower_that_falls_a_frame_behind_reads_the_record(tmp_path: Path) -> None:
    p = plane(tmp_path, Clock(), max_result_bytes=FRAME_BYTES)
    agent = p.register(node("a", workers=1)).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 3)], final_count=3)
    reads = no_reads(p)
    with p.follow("job1", 0) as follower:
        await p.next_events(follower, 0)
        leases = list(report(p, agent, ready=1)[0].leases)
        for i in range(3):  # three results of half a frame each, none read meanwhile
            (lease,) = leases
            r = m.LeaseResult(lease.lease_id, "job1", lease.lo, 1, 0.1, 0)
            leases = list(report(p, agent, [r], [bytes([i]) * (FRAME_BYTES // 2)], ready=1)[0].leases)
        assert follower.behind and not follower.pending  # memory let them go: SQLite has them
        first = await p.next_events(follower, 0)
        rest = await p.next_events(follower, 0)
    got = first + rest
    assert len(reads) == 3  # the subscribe, then the catch-up in two frames' worth
    assert [payload[:1] for e, payload in got if e.kind == m.RESULTS and payload] == [b"\0", b"\1", b"\2"]
    assert got[-1][0].kind == m.DONE


async def test_a_create_job_that_fails_midway_leaves_no_job(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    p.register(node("a"))

    def broken(*args: Any) -> None:
        raise StoreError("the disk is full")

    p.store.add_batches = broken  # type: ignore[method-assign]  # after the job's row, before its inputs
    with pytest.raises(StoreError):
        p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    for table in ("jobs", "functions", "batches", "leases", "events"):
        assert p.store.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    p.store.close()
    restarted = plane(tmp_path, clock)  # as after a crash at that point
    assert "job1" not in restarted.scheduler.jobs and not restarted.store.job_exists("job1")


async def test_a_cancel_that_fails_midway_leaves_the_job_running_with_its_inputs(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    agent = p.register(node("a")).agent_id
    big = m.BatchMeta(1, 4, 1), memoryview(pickle.dumps([b"x" * 300_000]))  # kept in a file
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 4), big], final_count=5)
    report(p, agent)  # leases out
    real = p.store.set_job_state

    def broken(*args: Any) -> None:
        real(*args)  # the rows go, then the commit never comes
        raise StoreError("the disk is full")

    p.store.set_job_state = broken  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        p.cancel_job("job1", "test")
    rows = p.store.conn.execute("SELECT state FROM jobs").fetchall()
    assert rows == [(m.RUNNING,)]
    assert [e.kind for e, _ in p.store.events_after("job1", 0)] == []  # no CANCELLED without the rest
    assert p.store.conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 2
    assert p.store.batch_payload("job1", 1) == bytes(big[1])  # its file is still there
    p.store.close()
    restarted = plane(tmp_path, clock)
    assert restarted.job_status("job1").state == m.RUNNING


class MemorySocket:
    """A websocket made of two memory channels: the test is the client."""

    def __init__(self) -> None:
        self.to_hub, self._inbox = trio.open_memory_channel[Any](16)
        self._outbox, self.from_hub = trio.open_memory_channel[bytes](16)

    async def accept(self) -> None:
        pass

    async def receive(self) -> Any:
        return await self._inbox.receive()

    async def send(self, data: bytes) -> None:
        await self._outbox.send(data)


async def frames_until(socket: MemorySocket, kind: str) -> list[tuple[dict[str, Any], list[memoryview]]]:
    out = []
    with trio.fail_after(10):
        while True:
            header, blobs = envelope.unpack(await socket.from_hub.receive())
            out.append((header, blobs))
            if any(e["kind"] == kind for e in header.get("events", [])):
                return out


async def test_the_event_hub_follows_a_job_from_before_it_exists_to_its_end(tmp_path: Path) -> None:
    p = plane(tmp_path, Clock())
    agent = p.register(node("a")).agent_id
    socket = MemorySocket()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(EventHub(p, socket, SYSTEM).serve)
        await socket.to_hub.send('{"op": "subscribe", "job": "job1", "after": 0}')
        await socket.to_hub.send('{"op": "nonsense"}')
        header, _ = envelope.unpack(await socket.from_hub.receive())
        assert header["error"]["code"] == "bad_request"
        await trio.sleep(0.01)
        assert not p.feeds.followers["job1"]  # subscribed before the job exists: it waits for the job
        p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 2)], final_count=2)
        await trio.sleep(0.01)
        assert p.feeds.followers["job1"] == 1  # then follows it (another user's job is never followed)
        delivery, _ = report(p, agent)
        results = each_blob([result_for(lease) for lease in delivery.leases])
        report(p, agent, [r for r, _ in results], [b for _, b in results])
        frames = await frames_until(socket, m.DONE)
        events = [
            (e, blobs[e["blob"]] if e.get("blob") is not None else None)
            for h, blobs in frames
            for e in h.get("events", [])
        ]
        assert [(e["kind"], e["lo"]) for e, _ in events] == [(m.RESULTS, 0), (m.RESULTS, 1), (m.DONE, 0)]
        assert [bytes(b) for _, b in events[:2]] == [b for _, b in results]
        assert frames[-1][0]["status"]["state"] == m.JOB_DONE
        await trio.sleep(0.01)
        assert not p.feeds.followers["job1"]  # the follow ended with the job's final event
        await socket.to_hub.send('{"op": "ack", "job": "job1"}')
        with trio.fail_after(5):
            while p.store.job_exists("job1"):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()

"""The control plane on a real SQLite file, driven directly, with a clock we move by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import sqlite3
from pathlib import Path

import pytest

import burla
from burla.common.config import DaemonConfig
from burla.daemon.errors import Conflict, NotFound, Unsatisfiable, VersionMismatch
from burla.daemon.service import ControlPlane
from burla.daemon.store import MIGRATIONS, SCHEMA_VERSION, Store
from burla.schemas import messages as m


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(node_id: str, workers: int = 2, python: str = "3.11") -> m.NodeInfo:
    return m.NodeInfo(
        node_id, f"host-{node_id}", cpus=workers, ram_bytes=64 * 10**9, python_version=python, workers=workers,
        agent_version=burla.__version__, protocol=m.PROTOCOL_VERSION,
    )  # fmt: skip


FN_HASH = hashlib.sha256(b"fn").hexdigest()  # of the function most tests send: b"fn"


def spec(job_id: str = "job1", function_hash: str = FN_HASH, **kw: object) -> m.JobSpec:
    return m.JobSpec(job_id, "f", function_hash, "3.11", func_ram=1.0, **kw)  # type: ignore[arg-type]


def batch(seq: int, start: int, count: int) -> tuple[m.BatchMeta, memoryview]:
    return m.BatchMeta(seq, start, count), memoryview(pickle.dumps(list(range(start, start + count))))


def plane(path: Path, clock: Clock, **config: object) -> ControlPlane:
    cfg = DaemonConfig(agent_timeout=10, poll_timeout=1, **config)  # type: ignore[arg-type]
    return ControlPlane(Store(path / "burla.db"), cfg, clock=clock)


def report(p: ControlPlane, agent: str, results: list[m.LeaseResult] = (), blobs: list[bytes] = (), running=(), **kw):  # type: ignore[no-untyped-def,assignment]
    rep = m.AgentReport(boot_id=p.boot_id, ready_workers=kw.pop("ready", 2), running=tuple(running),
                        results=tuple(results), **kw)  # fmt: skip
    return p.report(agent, rep, [memoryview(b) for b in blobs])


def result_for(lease: m.Lease, value: list[int] | None = None) -> tuple[m.LeaseResult, bytes]:
    values = value if value is not None else [x * 10 for x in range(lease.lo, lease.hi)]
    return m.LeaseResult(lease.lease_id, lease.job_id, lease.lo, len(values), 0.001, 0), pickle.dumps(values)


def finished(p: ControlPlane, job_id: str) -> bool:
    events = p.store.events_after(job_id, 0)
    return bool(events) and events[-1][0].kind in (m.DONE, m.FAILED, m.CANCELLED)


def drive(
    p: ControlPlane, agent: str, job_id: str = "job1", ready: int = 2, first: m.Delivery | None = None
) -> list[m.Lease]:
    """Play a well-behaved agent until the job ends: run every lease delivered, report its result."""
    delivered: list[m.Lease] = list(first.leases) if first else []
    todo = list(delivered)
    for _ in range(100):
        results = [result_for(lease) for lease in todo]
        d, _ = report(p, agent, [r for r, _ in results], [b for _, b in results], ready=ready)
        delivered += d.leases
        todo = list(d.leases)
        if finished(p, job_id):
            return delivered
    raise AssertionError("the job did not finish")


def results_events(p: ControlPlane, job_id: str) -> list[tuple[int, int]]:
    return [(e.lo, e.hi) for e, _ in p.store.events_after(job_id, 0) if e.kind == m.RESULTS]


async def test_a_job_runs_to_done_and_each_result_is_accepted_once(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    agent = p.register(node("a")).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    delivery, blobs = report(p, agent)
    assert [(x.lo, x.hi) for x in delivery.leases] == [(0, 1), (1, 2)]  # probes: the call time is unknown
    assert len(blobs) == 2  # the function and the batch, each sent once
    results = [result_for(lease) for lease in delivery.leases]
    second, blobs = report(p, agent, [r for r, _ in results], [b for _, b in results])
    assert [(x.lo, x.hi) for x in second.leases] == [(2, 3), (3, 4)] and blobs == []  # the agent has them
    report(p, agent, [r for r, _ in results], [b for _, b in results])  # a retried report: dropped
    assert p.counters["results_dropped"] == 2
    drive(p, agent, first=second)
    assert sorted(results_events(p, "job1")) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert p.store.events_after("job1", 0)[-1][0].kind == m.DONE
    p.create_job(spec("job2"), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    quick, _ = report(p, agent)
    assert [(x.lo, x.hi) for x in quick.leases] == [(0, 2), (2, 4)]  # same function: its call time is known


async def test_leases_of_a_silent_agent_run_elsewhere(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    a = p.register(node("a")).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    first, _ = report(p, a)
    assert first.leases
    clock.now += 11
    assert p.expire_agents() == [a]  # silent past agent_timeout: its leases go back to the queue
    b = p.register(node("b")).agent_id
    second, _ = report(p, b)
    assert {(x.lo, x.hi) for x in second.leases} == {(x.lo, x.hi) for x in first.leases}
    drive(p, b, first=second)
    late = [result_for(lease) for lease in first.leases]  # a comes back from the dead
    with pytest.raises(NotFound, match="register again"):
        report(p, a, [r for r, _ in late], [blob for _, blob in late])
    a2 = p.register(node("a")).agent_id
    dropped = p.counters["results_dropped"]
    report(p, a2, [r for r, _ in late], [blob for _, blob in late])
    assert p.counters["results_dropped"] == dropped + len(late)
    assert sorted(x for lo, hi in results_events(p, "job1") for x in range(lo, hi)) == [0, 1, 2, 3]


async def test_a_restart_restores_running_jobs_and_requeues_what_agents_lost(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    a = p.register(node("a", workers=1)).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 3), batch(1, 3, 3)], final_count=6)
    delivery, _ = report(p, a, ready=1)
    (held,) = delivery.leases
    p.store.close()

    q = plane(tmp_path, clock)  # burlad restarted on the same file
    job = q.scheduler.jobs["job1"]
    assert job.n_inputs == 6 and job.n_pending == 6 - (held.hi - held.lo)
    assert set(job.leases) == {held.lease_id}
    again, _ = report(q, a, ready=1, running=[])  # the agent does not hold it any more
    assert [(x.lo, x.hi) for x in again.leases] == [(held.lo, held.hi)]  # requeued, and delivered again
    drive(q, a, ready=1, first=again)
    assert sorted(x for lo, hi in results_events(q, "job1") for x in range(lo, hi)) == list(range(6))
    assert q.counters["jobs_restored"] == 1 and q.counters["leases_lost"] == 1


def container_node(node_id: str, cpus: int = 4) -> m.NodeInfo:
    return m.NodeInfo(node_id, f"host-{node_id}", cpus, 64 * 10**9, "3.11", workers=cpus, runtime="podman",
                      agent_version=burla.__version__, protocol=m.PROTOCOL_VERSION)  # fmt: skip


def standby_pools(per_pool: int = 2) -> tuple[m.PoolState, ...]:
    """A container node warm with two standby images; jobs naming no image run on the first."""
    return tuple(
        m.PoolState(key, image, "3.11", cpus=1.0, ram_bytes=16 * 10**9, slots=per_pool, ready=per_pool,
                    default=default)
        for key, image, default in (("standby-base", "base:1", True), ("standby-alt", "alt:1", False))
    )  # fmt: skip


def with_environment(p: ControlPlane) -> str:
    import hashlib

    manifest = b'{"python_version": "3.11"}'
    digest = hashlib.sha256(manifest).hexdigest()
    p.put_blob(digest, manifest)
    return digest


async def test_a_restart_counts_restored_leases_against_their_pool_and_keeps_their_environment(
    tmp_path: Path,
) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    p.set_standby([m.StandbyImage("base:1", "3.11"), m.StandbyImage("alt:1", "3.11")])
    a = p.register(container_node("a")).agent_id
    env = with_environment(p)
    p.create_job(spec(env=env), memoryview(b"fn"), [batch(0, 0, 10)], final_count=10)
    first, _ = report(p, a, ready=4, pools=standby_pools())
    assert [(x.pool, x.env) for x in first.leases] == [("standby-base", env)] * 2  # the base image's 2 workers
    running = [x.lease_id for x in first.leases]
    p.store.close()

    q = plane(tmp_path, clock)  # burlad restarted on the same file
    job = q.scheduler.jobs["job1"]
    assert {i: (a.lease.pool, a.lease.env) for i, a in job.leases.items()} == dict.fromkeys(
        running, ("standby-base", env)
    )
    node = q.scheduler.nodes[a]
    assert node.pool_leases["standby-base"] == 2 and node.pool_leases["process"] == 0
    # the agent reports the same pools and leases: both base workers are busy, nothing more goes to them
    again, _ = report(q, a, ready=4, pools=standby_pools(), running=running)
    assert again.leases == ()
    done = [result_for(x) for x in first.leases]
    third, _ = report(q, a, [r for r, _ in done], [b for _, b in done], ready=4, running=[])
    assert [(x.pool, x.env) for x in third.leases] == [("standby-base", env)] * 2


async def test_an_error_fails_the_job_and_tells_other_agents_to_stop(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock)
    a = p.register(node("a", workers=1)).agent_id
    b = p.register(node("b", workers=1)).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 8)], final_count=8)
    da, _ = report(p, a, ready=1)
    db, _ = report(p, b, ready=1)
    (lease,) = da.leases
    error = m.CallError(lease.lo, m.EXCEPTION, "builtins.ValueError", "boom", exc_blob=1)
    failed = m.LeaseResult(lease.lease_id, "job1", lease.lo, 0, 0.1, 0, error)
    report(p, a, [failed], [pickle.dumps([]), pickle.dumps(ValueError("boom"))], ready=1)
    kinds = [e.kind for e, _ in p.store.events_after("job1", 0)]
    assert kinds[-1] == m.FAILED
    stop, _ = report(p, b, ready=1)
    assert stop.cancel_jobs == ("job1",) and db.leases


async def test_create_job_checks(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock, max_function_bytes=10)
    p.register(node("a"))
    with pytest.raises(Unsatisfiable, match="no node runs Python 3.12"):
        p.create_job(m.JobSpec("j2", "f", FN_HASH, "3.12"), memoryview(b"fn"), [batch(0, 0, 1)], 1)
    from burla.daemon.errors import TooLarge

    with pytest.raises(TooLarge, match="over this cluster's limit"):
        p.create_job(spec("j3"), memoryview(b"f" * 11), [batch(0, 0, 1)], 1)
    p.create_job(spec("j4"), memoryview(b"fn"), [batch(0, 0, 1)], None)
    p.create_job(spec("j4"), memoryview(b"fn"), [batch(0, 0, 1)], None)  # a retried create is harmless
    p.cancel_job("j4", "test")
    p.ack_job("j4")
    with pytest.raises(NotFound):
        p.job_status("j4")
    p.create_job(spec("j5"), memoryview(b"fn"), [batch(0, 0, 1)], None)
    p.cancel_job("j5", "test")
    p.create_job(spec("j5"), memoryview(b"fn"), [batch(1, 1, 1)], None)  # a late retry does not revive it
    assert p.job_status("j5").state == m.JOB_CANCELLED and p.job_status("j5").n_uploaded == 1
    p.store.set_job_state("j5", m.JOB_CANCELLED, clock.now)
    p.scheduler.forget_job("j5")  # finished, and gone from memory: the id is taken
    with pytest.raises(Conflict, match="already exists"):
        p.create_job(spec("j5"), memoryview(b"fn"), [batch(0, 0, 1)], None)


async def test_output_past_the_limit_is_dropped_and_counted(tmp_path: Path) -> None:
    clock = Clock()
    p = plane(tmp_path, clock, max_log_bytes_per_job=100)
    a = p.register(node("a", workers=1)).agent_id
    p.create_job(spec(), memoryview(b"fn"), [batch(0, 0, 1)], final_count=1)
    d, _ = report(p, a, ready=1)
    chunks = tuple(m.LogChunk("job1", lines=2, nbytes=60, blob=i) for i in range(3))
    r, payload = result_for(d.leases[0])
    logs = [pickle.dumps([(0, m.STDOUT, "x" * 29 + "\n") * 2]) for _ in range(3)]
    report(p, a, [m.LeaseResult(r.lease_id, r.job_id, r.lo, r.n_ok, r.elapsed, 3)], [*logs, payload], ready=1,
           logs=chunks)  # fmt: skip
    events = p.store.events_after("job1", 0)
    assert [e.kind for e, _ in events].count(m.LOGS) == 1
    notice = next(e for e, _ in events if e.kind == m.NOTICE)
    assert "4 lines" in notice.data["message"] and "max_log_bytes_per_job" in notice.data["message"]


def test_an_older_database_file_is_migrated(tmp_path: Path) -> None:
    import sqlite_utils

    path = tmp_path / "burla.db"
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    MIGRATIONS[0](db)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO tokens (role, token) VALUES ('admin', 'kept-admin-token')")
    conn.close()
    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION
    tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"standby", "batches", "events"} <= tables
    assert "payload_ref" in {r[1] for r in store.conn.execute("PRAGMA table_info(batches)")}
    assert store.tokens()["admin"] == "kept-admin-token"


def test_leases_of_a_version_3_file_get_their_jobs_environment_and_the_process_pool(tmp_path: Path) -> None:
    import json

    import sqlite_utils

    path = tmp_path / "burla.db"
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    for migration in MIGRATIONS[:3]:
        migration(db)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '3')")
    for agent, info in (("proc", node("p")), ("pod", container_node("c"))):
        conn.execute(
            "INSERT INTO agents (agent_id, node_id, info, registered, last_seen) VALUES (?, ?, ?, 1, 1)",
            (agent, info.node_id, json.dumps(info.to_wire())),
        )
    conn.execute(
        "INSERT INTO jobs (job_id, spec, state, n_inputs, created) VALUES ('job1', ?, ?, 4, 1)",
        (json.dumps(spec(env="e" * 64).to_wire()), m.RUNNING),
    )
    conn.execute("INSERT INTO batches (job_id, seq, start, count, payload) VALUES ('job1', 0, 0, 4, x'00')")
    for lease_id, agent in ((1, "proc"), (2, "pod")):
        conn.execute(
            "INSERT INTO leases (lease_id, job_id, agent_id, function_hash, batch_seq, batch_start, lo, hi,"
            " func_cpu, func_ram_bytes) VALUES (?, 'job1', ?, ?, 0, 0, ?, ?, 1.0, 1000000000)",
            (lease_id, agent, FN_HASH, lease_id - 1, lease_id),
        )
    conn.close()

    store = Store(path)
    assert store.schema_version() == SCHEMA_VERSION == 7
    (job,) = store.running_jobs()
    assert [(x.lease_id, x.pool, x.env, agent) for x, agent in job["leases"]] == [
        (1, "process", "e" * 64, "proc"),
        (2, "", "e" * 64, "pod"),  # which of a container node's pools it ran on was never written down
    ]
    store.close()
    restored = plane(tmp_path, Clock()).scheduler.jobs["job1"].leases
    assert {i: restored[i].lease.pool for i in (1, 2)} == {1: "process", 2: ""}


def test_a_newer_database_file_is_refused(tmp_path: Path) -> None:
    from burla.daemon.store import StoreError

    store = Store(tmp_path / "burla.db")
    store.conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    store.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this burlad"):
        Store(tmp_path / "burla.db")


def test_an_agent_of_another_version_and_protocol_is_refused_at_registration(tmp_path: Path) -> None:
    p = plane(tmp_path, Clock())
    with pytest.raises(VersionMismatch) as refused:
        p.register(dataclasses.replace(node("a"), agent_version="0.0.1", protocol=0))  # older than protocol numbers
    message = str(refused.value)
    assert "host-a runs Burla 0.0.1 (protocol 0)" in message
    assert f"this daemon Burla {burla.__version__} (protocol {m.PROTOCOL_VERSION})" in message
    assert f"Install burla=={burla.__version__} on host-a" in message
    assert not p.scheduler.nodes
    # another version stating the same protocol number is welcome
    p.register(dataclasses.replace(node("b"), agent_version="0.0.2"))
    assert len(p.scheduler.nodes) == 1


@pytest.mark.parametrize(
    "poison",
    [
        "UPDATE batches SET count = 1000000000000000000000000000000 WHERE job_id = 'bad'",
        "UPDATE batches SET count = 'Infinity' WHERE job_id = 'bad'",
        'UPDATE jobs SET spec = \'{"job_id": "bad", "function_hash": null}\' WHERE job_id = \'bad\'',
        "UPDATE jobs SET spec = 'not json' WHERE job_id = 'bad'",
        "UPDATE jobs SET n_inputs = -5 WHERE job_id = 'bad'",
        "UPDATE leases SET lo = 'x' WHERE job_id = 'bad'",
        'UPDATE agents SET info = \'{"cpus": "a"}\'',
    ],
)
async def test_a_restart_survives_a_row_it_cannot_use(tmp_path: Path, poison: str) -> None:
    """The bad job fails with the reason; the daemon starts, and the good job goes on."""
    clock = Clock()
    p = plane(tmp_path, clock)
    agent = p.register(node("a")).agent_id
    p.create_job(spec("bad"), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    p.create_job(spec("good"), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    report(p, agent)  # leases out, kept in SQLite
    p.store.conn.execute(poison)
    p.store.close()
    restarted = plane(tmp_path, clock)  # before: OverflowError or WireError, at every start
    if "agents" not in poison:
        assert restarted.store.conn.execute("SELECT state FROM jobs WHERE job_id = 'bad'").fetchone()[0] == m.JOB_FAILED
        failed = [e for e, _ in restarted.store.events_after("bad", 0) if e.kind == m.FAILED]
        assert "could not be restored" in failed[0].data["message"]
        assert restarted.counters["jobs_unrestorable"] == 1
        assert restarted.job_status("bad").state == m.JOB_FAILED  # what a client following it is told
        assert all("bad" in link.cancel_jobs for link in restarted.links.values())  # its leases stop
    assert restarted.job_status("good").state == m.RUNNING
    clock.now += 11  # the old agent never comes back: its leases run elsewhere
    restarted.expire_agents()
    agent = restarted.register(node("a2")).agent_id
    drive(restarted, agent, job_id="good")
    assert restarted.job_status("good").state == m.JOB_DONE


async def test_a_followed_job_is_never_abandoned_and_an_unfollowed_one_is(tmp_path: Path) -> None:
    """The client subscribes before its job exists; only a job nobody follows for client_grace is cancelled."""
    clock = Clock()
    p = plane(tmp_path, clock, client_grace=5)
    p.register(node("a"))
    p.follow_started("job1")  # the websocket's subscribe arrives first
    p.create_job(spec("job1"), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    clock.now += 60
    assert p.cancel_abandoned_jobs() == [] and p.job_status("job1").state == m.RUNNING
    p.follow_ended("job1")  # the client went away
    clock.now += 4
    assert p.cancel_abandoned_jobs() == []
    p.follow_started("job1")  # and came back (a reconnect) in time
    p.follow_ended("job1")
    clock.now += 6
    assert p.cancel_abandoned_jobs() == ["job1"]
    assert p.job_status("job1").state == m.JOB_CANCELLED
    p.create_job(spec("job2"), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)  # never followed at all
    clock.now += 6
    assert p.cancel_abandoned_jobs() == ["job2"]


async def test_a_detached_job_whose_caller_left_mid_upload_is_cancelled_as_any_abandoned_one(
    tmp_path: Path,
) -> None:
    """Until its last input is uploaded a detached job needs its caller: one gone mid-upload left a job that
    could never finish, and it ran forever (found in review)."""
    clock = Clock()
    p = plane(tmp_path, clock, client_grace=5, job_retention=100)
    p.create_job(spec("half", detach=True), memoryview(b"fn"), [batch(0, 0, 4)], final_count=None)
    clock.now += 6
    assert p.cancel_abandoned_jobs() == ["half"]
    assert p.job_status("half").state == m.JOB_CANCELLED


async def test_a_detached_job_runs_unfollowed_and_is_kept_until_job_retention_however_often_it_is_read(
    tmp_path: Path,
) -> None:
    """No client follows a detached job: it is never cancelled for that. Its ack (any reader's) forgets
    nothing; it goes, with its results, job_retention after it ended, and a restart keeps that so."""
    clock = Clock()
    p = plane(tmp_path, clock, client_grace=5, job_retention=100)
    agent = p.register(node("a")).agent_id
    p.create_job(spec("det", detach=True), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    p.create_job(spec("plain"), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    clock.now += 60
    assert p.cancel_abandoned_jobs() == ["plain"]
    assert p.job_status("det").state == m.RUNNING and p.job_status("det").detached
    assert "det" not in p.feeds.unfollowed_since  # not watched any more: nothing to decide about it
    drive(p, agent, "det")
    p.ack_job("det")
    p.ack_job("plain")
    assert p.job_status("det").state == m.JOB_DONE and p.job_status("det").finished == clock.now
    with pytest.raises(NotFound):
        p.job_status("plain")  # a plain job is forgotten once its client has it all
    assert sorted(results_events(p, "det")) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    p.store.close()
    clock.now += 50
    p = plane(tmp_path, clock, client_grace=5, job_retention=100)  # a restart: the job is SQLite's alone
    p.ack_job("det")
    status = p.job_status("det")
    assert (status.state, status.n_done, status.n_inputs, status.detached, status.function_name) == (
        m.JOB_DONE, 4, 4, True, "f",
    )  # fmt: skip
    assert [s.job_id for s in p.list_jobs()] == ["det"]
    p.expire_jobs()
    assert p.job_status("det").state == m.JOB_DONE  # 50 s after it ended: kept
    clock.now += 51
    p.expire_jobs()
    with pytest.raises(NotFound):
        p.job_status("det")
    assert p.store.events_after("det", 0) == []


async def test_jobs_are_listed_for_their_owner_and_every_job_for_an_admin(tmp_path: Path) -> None:
    from burla.daemon.users import Principal

    clock = Clock()
    p = plane(tmp_path, clock)
    p.register(node("a"))
    alice, bob = Principal("alice", "user"), Principal("bob", "user")
    admin = Principal("root", "admin")
    p.create_job(spec("ja", detach=True), memoryview(b"fn"), [batch(0, 0, 2)], final_count=2, who=alice)
    clock.now += 1
    p.create_job(spec("jb"), memoryview(b"fn"), [batch(0, 0, 2)], final_count=2, who=bob)
    assert [s.job_id for s in p.list_jobs(alice)] == ["ja"]
    assert [(s.job_id, s.owner) for s in p.list_jobs(admin)] == [("jb", "bob"), ("ja", "alice")]  # newest first
    assert [s.detached for s in p.list_jobs(admin)] == [False, True]
    with pytest.raises(NotFound):
        await p.job_logs("ja", 0, 0, bob)


async def test_a_jobs_output_is_read_from_the_start_and_waited_for_while_it_runs(tmp_path: Path) -> None:
    import trio

    clock = Clock()
    p = plane(tmp_path, clock)
    agent = p.register(node("a")).agent_id
    p.create_job(spec("job1", detach=True), memoryview(b"fn"), [batch(0, 0, 4)], final_count=4)
    line = pickle.dumps([(0, m.STDOUT, "hello\n")])
    first, _ = report(p, agent, blobs=[line], logs=(m.LogChunk("job1", 1, 6, 0),))
    events, cursor = await p.job_logs("job1", 0, 0)
    assert [(e.kind, pickle.loads(b)) for e, b in events] == [(m.LOGS, [(0, m.STDOUT, "hello\n")])]
    after = events[-1][0].seq
    assert cursor == after and await p.job_logs("job1", after, 0) == ([], after)
    got: list[list[str]] = []
    scans: list[int] = []
    events_after = p.store.events_after

    def counted(job_id: str, since: int, *args: object, **kwargs: object) -> object:
        if kwargs.get("kinds"):  # the output's scans, not the feeds' reads
            scans.append(since)
        return events_after(job_id, since, *args, **kwargs)  # type: ignore[arg-type]

    p.store.events_after = counted  # type: ignore[method-assign]

    async def wait() -> None:
        got.append([e.kind for e, _ in (await p.job_logs("job1", after, 30))[0]])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(0.05)
        drive(p, agent, first=first)  # results are not output: the wait goes on until the final event
    assert got == [[m.DONE]]
    assert scans == sorted(scans)  # each wake scans on from where the one before had looked


async def test_reading_a_jobs_output_moves_past_its_results_once_seen(tmp_path: Path) -> None:
    """A job that prints nothing while its results pile up: each read (and each wake of a waiting one) goes on
    from the newest event seen, not from the last output again (found in review: every wake rescanned them)."""
    clock = Clock()
    p = plane(tmp_path, clock)
    agent = p.register(node("a")).agent_id
    p.create_job(spec("quiet", detach=True), memoryview(b"fn"), [batch(0, 0, 8)], final_count=8)
    delivery, _ = report(p, agent)
    results = [result_for(lease) for lease in delivery.leases]
    report(p, agent, [r for r, _ in results], [b for _, b in results])
    top = p.store.last_seq("quiet")
    assert top > 0
    assert await p.job_logs("quiet", 0, 0) == ([], top)  # nothing printed, and the next read starts past them

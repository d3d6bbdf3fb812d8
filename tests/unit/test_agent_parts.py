"""The agent's pure parts: pool reconciliation, memory watching, restart delays, the outbox's blob indices."""

from __future__ import annotations

import dataclasses
import pickle

from burla.node_agent import memory, pools, reconcile
from burla.node_agent.outbox import Lines, Outbox, Outcome
from burla.node_agent.pool import Slot
from burla.node_agent.pools import PoolSpec
from burla.node_agent.reconcile import PoolRun
from burla.node_agent.startup import RESTART_PAUSE, START_TRIES, restart_delay
from burla.schemas import envelope
from burla.schemas import messages as m


def test_blobs_gives_each_blob_its_index() -> None:
    blobs = envelope.Blobs()
    assert [blobs.add(b"a"), blobs.add(b"b"), blobs.add(b"c")] == [0, 1, 2]
    assert list(blobs) == [b"a", b"b", b"c"]


# ---- reconciliation ------------------------------------------------------------------------


def spec(key: str, count: int = 2) -> PoolSpec:
    return PoolSpec(key, image=f"img-{key}", count=count)


def test_a_new_pool_is_prepared_and_not_filled_before_it_is_ready() -> None:
    steps = reconcile.converge({"a": spec("a")}, {}, [])
    assert steps == reconcile.Steps(retire=[], prepare=["a"], fill=[], forget=[])


def test_a_ready_pool_is_filled_up_to_its_count() -> None:
    run = PoolRun(spec("a", 3), state=reconcile.READY)
    steps = reconcile.converge({"a": run.spec}, {"a": run}, [Slot(0, "a"), Slot(1, "a", retired=True)])
    assert steps.fill == [("a", 2)] and steps.prepare == [] and steps.retire == []


def test_a_pool_no_longer_wanted_retires_its_slots_and_is_forgotten_once_they_are_gone() -> None:
    old = PoolRun(spec("old"), state=reconcile.READY)
    new = spec("new")
    steps = reconcile.converge({"new": new}, {"old": old}, [Slot(0, "old"), Slot(1, "old", retired=True)])
    assert steps.retire == [0] and steps.prepare == ["new"] and steps.forget == []
    assert reconcile.converge({"new": new}, {"old": old}, []).forget == ["old"]


def test_a_failed_or_preparing_pool_gets_no_workers() -> None:
    for state in (reconcile.PREPARING, reconcile.FAILED):
        run = PoolRun(spec("a"), state=state)
        assert reconcile.converge({"a": run.spec}, {"a": run}, []).fill == []


def test_a_pool_is_reported_draining_when_no_longer_wanted_and_ready_only_when_ready() -> None:
    run = PoolRun(spec("a"), state=reconcile.READY, python="3.12")
    state = reconcile.pool_state(run, wanted=True, ready=2, containers=[("abc", "idle"), (None, "starting")])
    assert state.state == "ready" and state.ready == 2 and state.python_version == "3.12"
    assert state.containers == (["abc", "idle"], [None, "starting"])
    assert reconcile.pool_state(run, wanted=False, ready=2).state == "draining"
    assert reconcile.pool_state(run, wanted=False, ready=2).ready == 0
    assert PoolRun.start(spec("a")).phase == "preparing image img-a" and PoolRun.start(PoolSpec("p")).phase == ""


# ---- memory ------------------------------------------------------------------------------------


def test_only_workers_over_their_limit_are_killed() -> None:
    busy = [memory.Busy(0, 100, 1000), memory.Busy(1, 101, 1000), memory.Busy(2, 102, 5000)]
    rss = {100: 999, 101: 1001, 102: 6000}
    assert memory.over_limit(busy, rss.__getitem__) == [(busy[1], 1001), (busy[2], 6000)]


# ---- start-up ------------------------------------------------------------------------------------


def test_restart_delays_grow_with_deaths_and_pause_after_repeated_failed_starts() -> None:
    assert restart_delay(0, 0) == 0.0
    assert [restart_delay(0, d) for d in (1, 2, 6, 7, 50)] == [0.1, 0.2, 3.2, 3.2, 3.2]
    assert restart_delay(START_TRIES, 0) == RESTART_PAUSE


# ---- the outbox ----------------------------------------------------------------------------------


def test_taken_results_and_lines_name_their_blobs_whatever_came_before() -> None:
    outbox = Outbox()
    error = m.CallError(5, m.EXCEPTION, "builtins.ValueError", "boom", exc_blob=7)  # the worker's frame index
    outbox.add_result(Outcome(1, "job", 0, 5, 0.1, error, b"r1", b"tree1"))
    outbox.add_result(Outcome.failed(2, "job", 10, m.CallError(10, m.WORKER_DIED, "x", "died")))
    outbox.add_result(Outcome(3, "job", 20, 2, 0.1, None, b"r3"))
    outbox.add_result(Outcome(4, "job", 30, 0, 0.1, m.CallError(30, m.SYSTEM, "x", "y", exc_blob=1), b"r4"))
    taken = outbox.take()
    blobs = taken.blobs
    assert [blobs[r.results_blob] for r in taken.results] == [b"r1", pickle.dumps([]), b"r3", b"r4"]
    first, _, _, last = taken.results
    assert first.error is not None and first.error.exc_blob is not None and blobs[first.error.exc_blob] == b"tree1"
    assert last.error is not None and last.error.exc_blob is None  # a tree it does not carry is named by none


async def test_put_back_restores_what_take_took() -> None:
    outbox = Outbox()
    outbox.add_result(Outcome(1, "job", 0, 1, 0.1, None, b"r"))
    await outbox.add_logs(Lines("job", 1, 6, b"lines!"))
    taken = outbox.take()
    assert outbox.results == [] and outbox.log_bytes == 0
    assert [taken.blobs[c.blob] for c in taken.logs] == [b"lines!"]
    outbox.put_back(taken)
    again = outbox.take()
    assert again.results == taken.results and again.logs == taken.logs and list(again.blobs) == list(taken.blobs)
    assert outbox.lease_ids() == set()


def test_results_taken_for_a_report_are_still_named_as_held_by_a_poll_sent_before_it() -> None:
    """Between `take()` and the report's start, a poll must still name the leases as held: otherwise the
    daemon requeues them as lost and they run twice (seen with 1,000 simulated agents)."""
    from burla.common.config import AgentConfig
    from burla.node_agent.agent import Agent
    from burla.node_agent.outbox import Outcome

    agent = Agent(AgentConfig(url="http://127.0.0.1:9", token="t"))
    agent.outbox.add_result(Outcome(7, "job", 0, 1, 0.1, None, b"results"))
    taken = agent._take()
    assert [r.lease_id for r in taken.results] == [7]
    assert 7 in agent._report().running


# ---- parked pools ------------------------------------------------------------------------------


STANDBY = (m.StandbyImage("base:1"),)


def want(job: str, image: str = "alt:1", count: int = 2) -> m.PoolWant:
    return m.PoolWant(job, image, cpus=1, ram_bytes=10**9, count=count, python_version="3.11")


def plan(
    wants: tuple[m.PoolWant, ...] = (), recent: tuple[PoolSpec, ...] = (), room: int | None = None
) -> list[PoolSpec]:
    return pools.plan(True, 2, 16 * 10**9, 2, STANDBY, wants, recent, room)


def test_a_jobs_pool_is_keyed_by_what_its_containers_are_so_the_next_job_of_the_image_takes_it() -> None:
    (first,) = plan((want("j1"),), room=8)[:1]
    (second,) = plan((want("j2"),), recent=(pools.parked(first),), room=8)[:1]
    assert first.key == second.key and second.job_id == "j2" and not second.parked
    assert pools.job_pool_key(want("j1")) != pools.job_pool_key(want("j1", image="other:1"))
    assert pools.job_pool_key(want("j1")) != pools.job_pool_key(dataclasses.replace(want("j1"), build="a" * 64))
    small = plan((want("j3", count=1),), recent=(pools.parked(first),), room=8)[0]
    assert small.key == first.key and small.count == 2  # a parked pool is taken whole


def test_standby_is_parked_while_a_job_runs_and_recent_pools_after_their_job_within_the_room() -> None:
    job, standby = plan((want("j1"),), room=8)
    assert job.job_id == "j1" and not job.parked and standby.key.startswith("standby-") and standby.parked
    after = plan(recent=(pools.parked(job),), room=8)
    assert [(p.key, p.parked, p.job_id) for p in after] == [(standby.key, False, ""), (job.key, True, "")]


def test_when_room_is_short_the_least_recently_used_parked_pool_is_stopped_then_standby() -> None:
    a = pools.parked(plan((want("j1", image="a:1"),))[0])
    b = pools.parked(plan((want("j2", image="b:1"),))[0])
    c = plan((want("j3", image="c:1"),), recent=(b, a), room=6)  # c runs, standby and b (more recent) fit
    assert [p.image for p in c] == ["c:1", "base:1", "b:1"]
    assert [p.image for p in plan((want("j3", image="c:1"),), recent=(b, a), room=2)] == ["c:1"]  # standby too
    assert [p.image for p in plan(recent=(b, a), room=2)] == ["base:1"]  # standby takes leases: always kept
    assert [p.image for p in plan(recent=(b, a))] == ["base:1", "b:1", "a:1"]  # no limit


def test_a_parked_pool_is_never_prepared_nor_filled_and_reported_as_parked() -> None:
    spec = pools.parked(PoolSpec("a", image="img-a", count=2))
    assert reconcile.converge({"a": spec}, {}, []).prepare == []
    run = PoolRun(spec, state=reconcile.READY)
    steps = reconcile.converge({"a": spec}, {"a": run}, [Slot(0, "a")])
    assert steps.fill == [] and steps.retire == []
    state = reconcile.pool_state(run, wanted=True, ready=1)
    assert state.state == "parked" and state.ready == 0 and state.job_id == ""

"""burla.node_agent.pool.WorkerPool: which worker runs which lease."""

from __future__ import annotations

from burla.node_agent.pool import SlotState, WorkerPool
from burla.schemas import messages as m


def lease(lease_id: int, job_id: str = "j1") -> m.Lease:
    return m.Lease(lease_id, job_id, "hash", 0, 0, lease_id * 10, lease_id * 10 + 10)


def started(pairs: list) -> list[tuple[int, int]]:  # type: ignore[type-arg]
    """(slot index, lease id) of what the pool says to start."""
    return [(slot.index, ls.lease_id) for slot, ls in pairs]


def ready_pool(n: int) -> WorkerPool:
    pool = WorkerPool(n)
    for i in range(n):
        assert pool.worker_ready(i) == []
    return pool


def test_new_pool_has_no_ready_workers() -> None:
    pool = WorkerPool(3)
    assert pool.ready() == 0
    assert pool.held() == set()
    assert all(s.state == SlotState.STARTING for s in pool.slots.values())
    assert pool.statistics() == {"workers": 3, "queued_leases": 0, "starting": 3}


def test_offer_before_any_worker_is_ready_queues() -> None:
    pool = WorkerPool(2)
    assert pool.offer([lease(1), lease(2)]) == []
    assert [ls.lease_id for ls in pool.queue] == [1, 2]
    assert pool.held() == {1, 2}
    assert started(pool.worker_ready(1)) == [(1, 1)]  # the queued lease goes to the first ready worker
    assert pool.slots[1].state == SlotState.BUSY
    assert pool.ready() == 1
    assert started(pool.worker_ready(0)) == [(0, 2)]
    assert not pool.queue


def test_offer_fills_idle_workers_and_queues_the_rest() -> None:
    pool = ready_pool(2)
    assert pool.ready() == 2
    assert started(pool.offer([lease(1), lease(2), lease(3)])) == [(0, 1), (1, 2)]
    assert [ls.lease_id for ls in pool.queue] == [3]
    assert pool.held() == {1, 2, 3}
    assert [s.index for s in pool.busy()] == [0, 1]
    assert pool.statistics() == {"workers": 2, "queued_leases": 1, "busy": 2}


def test_finished_starts_the_next_queued_lease() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1), lease(2), lease(3), lease(4)])
    assert started(pool.finished(1)) == [(1, 3)]
    assert pool.held() == {1, 3, 4}
    assert started(pool.finished(0)) == [(0, 4)]
    assert pool.held() == {3, 4}
    assert pool.finished(0) == []
    assert pool.slots[0].state == SlotState.IDLE
    assert pool.slots[0].lease is None
    assert pool.held() == {3}
    assert pool.ready() == 2


def test_died_returns_the_unsettled_lease() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1), lease(2)])
    ls, memory = pool.died(0)
    assert ls is not None and ls.lease_id == 1
    assert memory is None
    assert pool.slots[0].state == SlotState.STARTING
    assert pool.slots[0].deaths == 1
    assert pool.ready() == 1
    assert pool.held() == {2}


def test_died_while_idle_returns_nothing() -> None:
    pool = ready_pool(1)
    assert pool.died(0) == (None, None)
    assert pool.slots[0].deaths == 1
    assert pool.died(0) == (None, None)
    assert pool.slots[0].deaths == 2
    pool.worker_ready(0)
    assert pool.slots[0].deaths == 0


def test_queued_lease_waits_for_the_replacement_worker() -> None:
    pool = ready_pool(1)
    pool.offer([lease(1), lease(2)])
    ls, _ = pool.died(0)
    assert ls is not None and ls.lease_id == 1
    assert [q.lease_id for q in pool.queue] == [2]  # not started on a dead worker
    assert started(pool.worker_ready(0)) == [(0, 2)]


def test_kill_for_memory_is_reported_by_died() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1)])
    pool.kill_for_memory(0, rss=5_000, limit=4_000)
    assert pool.slots[0].memory_kill == (5_000, 4_000)
    ls, memory = pool.died(0)
    assert ls is not None and ls.lease_id == 1
    assert memory == (5_000, 4_000)
    assert pool.slots[0].memory_kill is None
    assert pool.died(0) == (None, None)  # the memory kill is reported once


def test_kill_for_memory_of_an_idle_worker_is_ignored() -> None:
    pool = ready_pool(2)
    pool.kill_for_memory(1, rss=1, limit=0)
    assert pool.slots[1].memory_kill is None
    assert pool.died(1) == (None, None)


def test_cancel_job_returns_its_busy_workers_and_drops_its_queued_leases() -> None:
    pool = ready_pool(3)
    pool.offer([lease(1, "a"), lease(2, "b"), lease(3, "a"), lease(4, "a"), lease(5, "b")])
    victims = pool.cancel_job("a")
    assert sorted(s.index for s in victims) == [0, 2]
    assert all(s.state == SlotState.STOPPING for s in victims)
    assert [ls.lease_id for ls in pool.queue] == [5]
    assert pool.slots[1].state == SlotState.BUSY  # job b keeps running
    assert pool.ready() == 1  # stopping workers take no lease
    # a stopped worker's death does not hand its lease back: it is already settled
    assert pool.died(0) == (None, None)
    assert pool.slots[0].state == SlotState.STARTING
    assert started(pool.worker_ready(0)) == [(0, 5)]


def test_cancel_unknown_job_changes_nothing() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1), lease(2), lease(3)])
    assert pool.cancel_job("other") == []
    assert pool.held() == {1, 2, 3}
    assert pool.ready() == 2


def test_finished_on_a_stopping_worker_keeps_it_stopping() -> None:
    pool = ready_pool(1)
    pool.offer([lease(1), lease(2, "j2")])
    pool.cancel_job("j1")
    assert pool.finished(0) == []  # the lease of the cancelled job must not be followed on this worker
    assert pool.slots[0].state == SlotState.STOPPING
    assert [ls.lease_id for ls in pool.queue] == [2]


def test_ready_counts_idle_and_busy() -> None:
    pool = WorkerPool(4)
    pool.worker_ready(0)
    pool.worker_ready(1)
    pool.offer([lease(1)])
    assert pool.ready() == 2
    pool.worker_ready(2)
    assert pool.ready() == 3
    pool.died(1)
    assert pool.ready() == 2


def pooled_lease(lease_id: int, pool: str, job: str = "j") -> m.Lease:
    return m.Lease(lease_id, job, "fh", 0, 0, lease_id, lease_id + 1, pool=pool)


def test_a_lease_runs_only_on_a_worker_of_its_pool() -> None:
    pool = WorkerPool()
    a = pool.add_slot("image-a")
    b = pool.add_slot("image-b")
    pool.worker_ready(a.index)
    pool.worker_ready(b.index)
    started = pool.offer([pooled_lease(1, "image-b"), pooled_lease(2, "image-b")])
    assert [(s.index, x.lease_id) for s, x in started] == [(b.index, 1)]
    assert [x.lease_id for x in pool.queue] == [2]  # waits for image-b, though image-a is idle
    assert pool.ready("image-a") == 1 and pool.ready("image-b") == 1 and pool.ready() == 2
    assert [(s.index, x.lease_id) for s, x in pool.finished(b.index)] == [(b.index, 2)]


def test_retiring_an_idle_worker_stops_it_at_once_and_a_busy_one_after_its_lease() -> None:
    pool = WorkerPool()
    idle = pool.add_slot("old")
    busy = pool.add_slot("old")
    pool.worker_ready(idle.index)
    pool.worker_ready(busy.index)
    pool.offer([pooled_lease(1, "old")])
    running = next(s for s in pool.slots.values() if s.state == SlotState.BUSY)
    waiting = next(s for s in pool.slots.values() if s.state == SlotState.IDLE)
    assert pool.retire(waiting.index) is True and waiting.state == SlotState.STOPPING
    assert pool.retire(running.index) is False and running.state == SlotState.BUSY
    assert pool.ready("old") == 0  # retired workers take no new work
    pool.offer([pooled_lease(2, "old")])
    assert pool.finished(running.index) == [] and running.state == SlotState.STOPPING
    assert [x.lease_id for x in pool.queue] == [2]
    pool.remove(waiting.index)
    assert waiting.index not in pool.slots


def env_lease(lease_id: int, env: str, job: str = "j") -> m.Lease:
    return m.Lease(lease_id, job, "fh", 0, 0, lease_id, lease_id + 1, env=env)


def test_a_lease_prefers_a_worker_of_its_environment_and_else_switches_one() -> None:
    pool = WorkerPool(2)
    for index in pool.slots:
        pool.worker_ready(index)
    plain = pool.offer([env_lease(1, ""), env_lease(9, "")])
    assert [s.state for s, _ in plain] == [SlotState.BUSY] * 2  # env "" matches fresh workers
    for index in pool.slots:
        pool.finished(index)  # each has run a lease: no longer fresh
    ((slot, lease),) = pool.offer([env_lease(2, "E")])
    assert slot.state == SlotState.SWITCHING and slot.env == "E" and slot.lease is lease
    assert pool.died(slot.index) == (None, None)  # stopped on purpose: not a failure
    assert slot.lease is lease and slot.state == SlotState.STARTING
    assert pool.worker_ready(slot.index)[0] == (slot, lease) and slot.state == SlotState.BUSY
    assert pool.finished(slot.index) == [] and slot.state == SlotState.IDLE
    ((again, _),) = pool.offer([env_lease(3, "E")])
    assert again is slot and again.state == SlotState.BUSY  # the warm worker of E, no switch


def test_cancelling_a_job_mid_switch_leaves_an_idle_worker() -> None:
    pool = WorkerPool(1)
    pool.worker_ready(0)
    pool.offer([env_lease(1, "")])
    pool.finished(0)
    ((slot, _),) = pool.offer([env_lease(2, "E", job="gone")])
    assert slot.state == SlotState.SWITCHING
    pool.cancel_job("gone")
    pool.died(slot.index)
    assert pool.worker_ready(slot.index) == [] and slot.state == SlotState.IDLE and slot.env == "E"
    ((again, _),) = pool.offer([env_lease(3, "F")])
    assert again is slot and again.state == SlotState.SWITCHING  # fresh, but started with E: never E and F


def test_a_fresh_worker_of_no_environment_adopts_a_leases_without_a_restart() -> None:
    pool = WorkerPool(2)
    pool.worker_ready(0)
    pool.worker_ready(1)
    pairs = pool.offer([env_lease(1, "E"), env_lease(2, "E")])
    assert [(s.state, s.env) for s, _ in pairs] == [(SlotState.BUSY, "E")] * 2  # both run at once
    pool.finished(0)
    ((slot, _),) = pool.offer([env_lease(3, "F")])
    assert slot.index == 0 and slot.state == SlotState.SWITCHING  # it has run E's code: restarted for F
    pool.died(0)
    assert [(s.index, s.state) for s, _ in pool.worker_ready(0)] == [(0, SlotState.BUSY)]
    pool.finished(0)
    ((slot, _),) = pool.offer([env_lease(4, "G")])
    assert slot.state == SlotState.SWITCHING  # restarted for F's lease, which it ran: not fresh either


def test_a_worker_that_ran_a_plain_lease_is_switched_for_an_environment() -> None:
    pool = WorkerPool(1)
    pool.worker_ready(0)
    pool.offer([env_lease(1, "")])
    pool.finished(0)
    ((slot, _),) = pool.offer([env_lease(2, "E")])
    assert slot.state == SlotState.SWITCHING  # the job before may have imported anything


def after(lease_id: int, before: int, job_id: str = "j1") -> m.Lease:
    return m.Lease(lease_id, job_id, "hash", 0, 0, lease_id * 10, lease_id * 10 + 10, after=before)


def test_a_prefetched_lease_waits_for_the_one_it_follows_even_beside_an_idle_worker() -> None:
    pool = ready_pool(2)
    assert started(pool.offer([lease(1), after(2, 1)])) == [(0, 1)]  # worker 1 stays idle: 2 is 1's next
    assert pool.held() == {1, 2} and not pool.queue
    assert pool.statistics() == {"workers": 2, "queued_leases": 1, "busy": 1, "idle": 1}
    assert started(pool.finished(0)) == [(0, 2)]  # the worker goes straight on to it
    assert pool.held() == {2} and pool.following == {}


def test_a_prefetched_lease_goes_before_other_queued_leases_when_its_lease_ends() -> None:
    pool = ready_pool(1)
    pool.offer([lease(1), lease(3)])
    pool.offer([after(2, 1)])
    assert started(pool.finished(0)) == [(0, 2)]
    assert [ls.lease_id for ls in pool.queue] == [3]


def test_a_prefetched_lease_whose_lease_already_ended_runs_at_once() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1)])
    pool.finished(0)  # its result is on its way while the daemon sends the next one
    assert started(pool.offer([after(2, 1)])) == [(0, 2)]


def test_chains_of_prefetched_leases_run_in_order() -> None:
    pool = ready_pool(1)
    pool.offer([lease(1), after(2, 1), after(3, 2)])
    assert pool.held() == {1, 2, 3}
    assert started(pool.finished(0)) == [(0, 2)]
    assert started(pool.finished(0)) == [(0, 3)]


def test_a_death_frees_what_followed_its_lease_for_another_worker() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1), after(2, 1)])
    dead, _ = pool.died(0)
    assert dead is not None and dead.lease_id == 1  # reported as failed: the daemon fails the job
    assert started(pool.start_queued()) == [(1, 2)]


def test_cancel_drops_prefetched_leases_of_the_job_at_once() -> None:
    pool = ready_pool(2)
    pool.offer([lease(1), after(2, 1), lease(3, "j2"), after(4, 3, "j2")])
    assert [s.index for s in pool.cancel_job("j1")] == [0]
    assert pool.held() == {3, 4} and pool.following == {3: [after(4, 3, "j2")]}  # j2's leases untouched
    pool.died(0)
    assert pool.held() == {3, 4} and not pool.queue
    assert started(pool.finished(1)) == [(1, 4)]


def test_a_worker_killed_for_its_timeout_as_it_answers_takes_no_next_lease() -> None:
    """The kill lands after the answer: the answer stands, and the lease that followed runs elsewhere, never
    on the doomed worker, whose death would be blamed on it (found in review)."""
    pool = ready_pool(2)
    pool.offer([lease(1), after(2, 1)])
    pool.kill_for_timeout(0, 4, 1.0, 1.05)
    assert started(pool.finished(0)) == [(1, 2)]  # the other worker, not the one being killed
    assert pool.slots[0].state == SlotState.STOPPING and pool.slots[0].timed_out is None
    assert pool.died(0) == (None, None)  # nothing to report: its lease was answered
    assert pool.slots[0].state == SlotState.STARTING  # a fresh worker takes the slot


def test_a_worker_killed_for_memory_as_it_answers_takes_no_next_lease() -> None:
    pool = ready_pool(1)
    pool.offer([lease(1), after(2, 1)])
    pool.kill_for_memory(0, 2 * 10**9, 10**9)
    assert started(pool.finished(0)) == []  # lease 2 waits for the replacement worker
    assert pool.died(0) == (None, None)
    assert started(pool.worker_ready(0)) == [(0, 2)]

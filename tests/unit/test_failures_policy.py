"""Failures as plain logic: the scheduler's retries, kept errors and lost nodes; the retry policy; the agent's
clock of calls (`deadlines`)."""

from __future__ import annotations

import dataclasses

from burla.daemon.retry_policy import bases, retryable_error
from burla.daemon.scheduler import ActiveLease, JobState, Scheduler
from burla.node_agent.deadlines import Deadlines, poll_interval
from burla.node_agent.deaths import Death
from burla.schemas import messages as m
from burla.schemas import worker as proto

PY = "3.11"
GB = 10**9


def spec(**failures: object) -> m.JobSpec:
    return m.JobSpec("j1", "f", "h" * 64, PY, 1.0, 1.0, **failures)  # type: ignore[arg-type]


def scheduled(n: int = 10, workers: int = 2, nodes: int = 1, **failures: object) -> tuple[Scheduler, JobState]:
    s = Scheduler(infra_retries=2)
    for i in range(nodes):
        s.add_node(f"a{i}", m.NodeInfo(f"n{i}", f"host-{i}", 4, 64 * GB, PY, workers), 0.0)
    job = s.add_job(spec(**failures), 0.0)
    s.add_batches("j1", [m.BatchMeta(0, 0, n)], final_count=n)
    job.seconds_per_call = 0.001  # no probe: leases as large as guided scheduling makes them
    return s, job


def error(index: int, kind: str = m.EXCEPTION, names: tuple[str, ...] = ()) -> m.CallError:
    return m.CallError(index, kind, "builtins.ValueError", "boom", node="host-0", bases=names)


def fail_at(s: Scheduler, a: ActiveLease, index: int, now: float, retryable: bool = True) -> object:
    lease = a.lease
    return s.complete("j1", lease.lease_id, lease.lo, index - lease.lo, 0.01, error(index), now, retryable)


def ok(s: Scheduler, a: ActiveLease, now: float = 1.0) -> object:
    lease = a.lease
    return s.complete("j1", lease.lease_id, lease.lo, lease.hi - lease.lo, 0.01, None, now)


def test_a_retried_input_waits_its_backoff_off_the_workers_and_the_rest_of_its_lease_runs_at_once() -> None:
    s, job = scheduled(10, workers=1, retries=2, retry_delay=0.5)
    (a,) = s.assign(1.0)
    assert (a.lease.lo, a.lease.hi) == (0, 10)
    c = fail_at(s, a, 3, now=1.0)
    assert c.accepted and not c.failed and c.retry_in == 0.5 and c.at == 3  # type: ignore[attr-defined]
    assert job.done.size == 3 and job.retried == 1 and job.attempts == {3: 1}
    assert sorted((iv.lo, iv.hi) for iv in job.pending) == [(4, 10)]  # 3 waits, not on the queue
    assert s.next_retry() == 1.5
    (b,) = s.assign(1.1)  # the free slot runs what was not run
    assert (b.lease.lo, b.lease.hi) == (4, 10)
    ok(s, b, 1.2)
    assert s.assign(1.4) == [] and job.state == m.RUNNING
    (r,) = s.assign(1.5)  # its backoff is over: a lease of its own
    assert (r.lease.lo, r.lease.hi) == (3, 4)
    c = fail_at(s, r, 3, now=1.6)
    assert c.retry_in == 1.0 and job.attempts == {3: 2}  # type: ignore[attr-defined]  # doubled
    (r,) = s.assign(2.6)
    c = ok(s, r, 2.7)
    assert c.job_done and job.state == m.JOB_DONE and job.attempts == {}  # type: ignore[attr-defined]
    assert [a.attempt for a in job.history] == [1, 2]


def test_the_backoff_is_capped() -> None:
    s, job = scheduled(1, retries=20, retry_delay=40)
    (a,) = s.assign(0.0)
    c = fail_at(s, a, 0, now=0.0)
    assert c.retry_in == 40  # type: ignore[attr-defined]
    (a,) = s.assign(40.0)
    c = fail_at(s, a, 0, now=40.0)
    assert c.retry_in == m.MAX_RETRY_DELAY  # type: ignore[attr-defined]


def test_out_of_retries_the_job_fails_and_its_last_attempt_is_kept() -> None:
    s, job = scheduled(1, retries=1, retry_delay=0)
    (a,) = s.assign(0.0)
    fail_at(s, a, 0, now=0.0)
    (a,) = s.assign(0.0)
    c = fail_at(s, a, 0, now=0.0)
    assert c.failed and job.state == m.JOB_FAILED  # type: ignore[attr-defined]
    assert [(h.attempt, h.retried) for h in job.history] == [(1, True), (2, False)]


def test_a_failure_retry_on_does_not_name_fails_at_once() -> None:
    s, job = scheduled(1, retries=3)
    (a,) = s.assign(0.0)
    assert fail_at(s, a, 0, now=0.0, retryable=False).failed  # type: ignore[attr-defined]
    assert job.retried == 0


def test_return_exceptions_keeps_each_error_in_its_slot_and_the_job_goes_on() -> None:
    s, job = scheduled(20, workers=2, return_exceptions=True)
    for _ in range(40):
        issued = s.assign(1.0)
        if not issued:
            break
        for a in issued:
            tens = [i for i in range(a.lease.lo, a.lease.hi) if i % 10 == 0]
            if tens:
                c = fail_at(s, a, tens[0], now=1.0, retryable=False)
                assert c.call_failed and not c.failed  # type: ignore[attr-defined]
            else:
                ok(s, a)
    assert job.state == m.JOB_DONE and job.failed == 2 and job.done.size == 20


def test_a_worker_that_died_mid_lease_fails_the_input_it_named_and_reruns_the_others() -> None:
    s, job = scheduled(6, workers=1, retries=1, retry_delay=0)
    (a,) = s.assign(0.0)
    death = m.CallError(4, m.WORKER_DIED, m.ErrorType.WORKER_DIED, "died", node="host-0")
    c = s.complete("j1", a.lease.lease_id, 0, 0, 0.1, death, 0.0, True)  # it loses the results of 0-3 with it
    assert c.at == 4 and c.retry_in == 0  # type: ignore[attr-defined]
    assert sorted((iv.lo, iv.hi) for iv in job.pending) == [(0, 4), (5, 6)]


def test_a_lost_node_counts_an_attempt_of_its_running_calls_until_infra_retries_then_fails_the_job() -> None:
    s, job = scheduled(2, workers=1, nodes=1)
    for attempt in (1, 2, 3):
        (a,) = s.assign(float(attempt))
        s.remove_node("a0", "its agent stopped heartbeating")
        (lost,) = s.losses
        s.losses.clear()
        assert (lost.lo, lost.hi, lost.attempt.attempt) == (a.lease.lo, a.lease.hi, attempt)
        if attempt <= 2:
            assert not lost.exhausted and job.state == m.RUNNING and job.pending.size == 2
            s.add_node("a0", m.NodeInfo("n0", "host-0", 4, 64 * GB, PY, 1), float(attempt))
        else:
            assert lost.exhausted and job.state == m.JOB_FAILED and lost.stopped == []
    assert job.retried == 2


def test_lost_past_infra_retries_with_return_exceptions_the_inputs_hold_the_error() -> None:
    s, job = scheduled(2, workers=1, nodes=1, return_exceptions=True)
    for attempt in (1, 2, 3):
        s.assign(float(attempt))
        s.remove_node("a0", "gone")
        s.add_node("a0", m.NodeInfo("n0", "host-0", 4, 64 * GB, PY, 1), float(attempt))
    assert s.losses[-1].exhausted and job.state == m.RUNNING and job.failed == 2 and job.done.size == 2


def test_a_prefetched_lease_lost_with_its_node_never_ran_and_counts_no_attempt() -> None:
    s, job = scheduled(1000, workers=1, nodes=1)
    s.nodes["a0"].info = dataclasses.replace(s.nodes["a0"].info, runs_after=True)
    issued = s.assign(0.0)
    assert len(issued) == 2 and issued[1].queued
    s.remove_node("a0", "gone")
    assert [(x.lo, x.hi) for x in s.losses] == [(issued[0].lease.lo, issued[0].lease.hi)]
    assert job.pending.size == 1000


def test_attempts_come_back_after_a_restart() -> None:
    s, job = scheduled(3, retries=2)
    history = [
        m.Attempt(1, 2, 1, m.EXCEPTION, "builtins.ValueError", "boom", "host-0", 1.0),
        m.Attempt(0, 3, 1, m.LOST, m.ErrorType.NODE_LOST, "gone", "host-1", 2.0),
    ]
    restored = Scheduler().restore_job(spec(retries=2, timeout=5.0), 0.0, [m.BatchMeta(0, 0, 3)], 3, [], [],
                                       attempts=history)  # fmt: skip
    assert restored.attempts == {1: 1} and restored.lost == [(0, 3, 1)] and restored.retried == 2
    assert list(restored.history) == history
    settled = Scheduler().restore_job(spec(retries=2), 0.0, [m.BatchMeta(0, 0, 3)], 3, [(1, 2)], [],
                                      attempts=iter(history))  # fmt: skip
    assert settled.attempts == {} and settled.retried == 2  # input 1 succeeded before the restart
    del job


def test_leases_carry_the_timeout() -> None:
    s, _ = scheduled(2, timeout=2.5)
    assert {a.lease.timeout for a in s.assign(0.0)} == {2.5}


# ---- the retry policy ---------------------------------------------------------------


def test_retry_on_matches_the_classes_of_the_failure_by_name() -> None:
    value_error = error(0, names=("builtins.ValueError", "builtins.Exception", "builtins.BaseException"))
    assert retryable_error(spec(retries=1), value_error)  # default: every Exception
    assert not retryable_error(spec(retries=0), value_error)
    assert retryable_error(spec(retries=1, retry_on=("builtins.ValueError",)), value_error)
    assert not retryable_error(spec(retries=1, retry_on=("builtins.KeyError",)), value_error)
    interrupt = error(0, names=("builtins.KeyboardInterrupt", "builtins.BaseException"))
    assert not retryable_error(spec(retries=1), interrupt)  # not an Exception


def test_burlas_own_call_failures_match_by_their_error_classes() -> None:
    timeout = m.CallError(0, m.TIMEOUT, m.ErrorType.CALL_TIMEOUT, "late")
    assert "burla.errors.CallError" in bases(timeout) and "builtins.Exception" in bases(timeout)
    assert retryable_error(spec(retries=1, retry_on=("burla.errors.CallTimeoutError",)), timeout)
    memory = m.CallError(0, m.MEMORY, m.ErrorType.MEMORY_LIMIT, "big")
    assert retryable_error(spec(retries=1, retry_on=("burla.errors.WorkerDiedError",)), memory)
    unpicklable = m.CallError(0, m.SYSTEM, m.ErrorType.UNPICKLABLE_RESULT, "no")
    assert not retryable_error(spec(retries=5), unpicklable)  # fails the same way every time


# ---- the agent's clock of calls --------------------------------------------------------


def test_a_call_is_overdue_only_past_its_limit_from_when_it_was_first_seen() -> None:
    d = Deadlines()
    d.observe(0, lease_id=7, lo=10, hi=20, index=proto.IDLE, now=0.0)  # loading: no call runs
    assert d.overdue({0: 1.0}, now=5.0) == []
    d.observe(0, 7, 10, 20, 10, now=5.0)
    d.observe(0, 7, 10, 20, 10, now=5.9)
    assert d.overdue({0: 1.0}, now=5.9) == []
    (late,) = d.overdue({0: 1.0}, now=6.05)
    assert (late.slot, late.index, late.limit) == (0, 10, 1.0) and abs(late.ran - 1.05) < 1e-9
    d.observe(0, 7, 10, 20, 11, now=6.1)  # the next call: a clock of its own
    assert d.overdue({0: 1.0}, now=6.2) == []
    assert d.overdue({}, now=9.0) == [] and d.clocks == {}  # its lease ended


def test_the_poll_interval_follows_the_limit_within_bounds() -> None:
    assert poll_interval(100.0) == 0.1 and poll_interval(0.2) == 0.02 and poll_interval(0.001) == 0.005


def test_a_timed_out_worker_death_names_the_input_the_limit_and_the_node() -> None:
    e = Death(lo=0, hi=4, func_ram_bytes=GB, node="host-0", code=-9, timed_out=(2, 1.5, 1.61)).error()
    assert e.kind == m.TIMEOUT and e.type_name == m.ErrorType.CALL_TIMEOUT and e.index == 2
    assert "input #2 ran past its timeout of 1.5 s on node host-0" in e.message


def test_the_late_failure_of_a_lease_given_up_for_lost_does_not_fail_the_job_with_its_retries_unused() -> None:
    """An agent back after agent_timeout reports a user's exception of a lease already requeued: what it ran
    stands, and the failed input runs again where retries= decides (found in review)."""
    s, job = scheduled(10, workers=1, nodes=2, retries=3)
    leases = {a.lease.lo: a for a in s.assign(1.0)}
    first = leases[min(leases)]
    lost_on = first.agent_id
    s.remove_node(lost_on, "its agent stopped heartbeating")
    c = fail_at(s, first, first.lease.lo + 2, now=2.0)
    assert c.accepted and not c.failed and c.error_dropped and job.state == m.RUNNING  # type: ignore[attr-defined]
    assert (first.lease.lo, first.lease.hi) == (0, 5)
    assert job.done.size == 2 and job.retried == 1  # the loss's attempt only: the late failure counts none
    assert sorted((iv.lo, iv.hi) for iv in job.pending) == [(2, 5)]  # the failed input runs again


def test_with_return_exceptions_inputs_that_cannot_load_fail_the_job_at_once() -> None:
    """Not one input per lease round trip: the next lease would fail the same way (found in review)."""
    s, job = scheduled(1000, workers=1, return_exceptions=True)
    (a,) = s.assign(1.0)
    unloadable = m.CallError(a.lease.lo, m.SYSTEM, m.ErrorType.UNPICKLING, "the worker could not load the function")
    c = s.complete("j1", a.lease.lease_id, a.lease.lo, 0, 0.01, unloadable, 1.0, False)
    assert c.accepted and c.failed and job.state == m.JOB_FAILED  # type: ignore[attr-defined]
    s2, job2 = scheduled(10, workers=1, return_exceptions=True)
    (b,) = s2.assign(1.0)
    own = m.CallError(b.lease.lo, m.SYSTEM, m.ErrorType.UNPICKLABLE_RESULT, "its return value could not be pickled")
    c2 = s2.complete("j1", b.lease.lease_id, b.lease.lo, 0, 0.01, own, 1.0, False)
    assert c2.call_failed and job2.state == m.RUNNING  # type: ignore[attr-defined]  # an input's own: kept

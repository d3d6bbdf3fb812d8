"""burla.daemon.scheduler.Scheduler: lease sizing, resource fit, exactly-once results."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest

from burla.daemon import status_text
from burla.daemon.scheduler import ActiveLease, Completion, JobState, Scheduler
from burla.schemas import messages as m

try:
    import hypothesis
    from hypothesis import stateful
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is an optional test dependency
    hypothesis = None  # type: ignore[assignment]

PY = "3.11"
GB = 10**9


def node(
    node_id: str = "n1", cpus: int = 4, ram_gb: float = 64, workers: int = 4, py: str = PY, runs_after: bool = False
) -> m.NodeInfo:
    return m.NodeInfo(node_id, f"host-{node_id}", cpus, int(ram_gb * GB), py, workers, runs_after=runs_after)


def spec(
    job_id: str = "j1",
    fhash: str = "hash-1",
    py: str = PY,
    func_cpu: float = 1.0,
    func_ram: float = 1.0,
    max_parallelism: int | None = None,
) -> m.JobSpec:
    return m.JobSpec(job_id, "square", fhash, py, func_cpu, func_ram, max_parallelism)


def batches(*counts: int) -> list[m.BatchMeta]:
    out, start = [], 0
    for seq, count in enumerate(counts):
        out.append(m.BatchMeta(seq, start, count))
        start += count
    return out


def ranges(issued: list[ActiveLease]) -> list[tuple[int, int]]:
    return [(a.lease.lo, a.lease.hi) for a in issued]


def pending(job: JobState) -> list[tuple[int, int]]:
    return sorted((iv.lo, iv.hi) for iv in job.pending)


def pending_set(job: JobState) -> set[int]:
    return {i for iv in job.pending for i in range(iv.lo, iv.hi)}


def finish(s: Scheduler, a: ActiveLease, now: float = 1.0, elapsed: float = 0.001) -> Completion:
    """Complete a lease fully, without error."""
    lease = a.lease
    return s.complete(lease.job_id, lease.lease_id, lease.lo, lease.hi - lease.lo, elapsed, False, now)


def why_not(s: Scheduler, job_spec: m.JobSpec) -> str | None:
    """Why `s` could never run `job_spec`, in the words a client gets."""
    reason = s.infeasible(job_spec)
    return None if reason is None else status_text.unfit(reason)


def job_status(s: Scheduler, job: JobState, now: float) -> m.JobStatus:
    return status_text.job_status(s.job_progress(job, now))


def scheduled(
    *counts: int,
    final: bool = True,
    workers: int = 4,
    cpus: int | None = None,
    seconds_per_call: float | None = 0.001,
    **spec_kw: object,
) -> tuple[Scheduler, JobState]:
    s = Scheduler()
    s.add_node("a1", node(workers=workers, cpus=cpus if cpus is not None else workers), 0.0)
    job = s.add_job(spec(**spec_kw), 0.0)  # type: ignore[arg-type]
    job.seconds_per_call = seconds_per_call
    s.add_batches("j1", batches(*counts), final_count=sum(counts) if final else None)
    return s, job


# ---- guided lease sizing -------------------------------------------------------------------


def test_known_call_time_splits_4_inputs_into_2_plus_2_in_one_round() -> None:
    s, job = scheduled(4, workers=2)
    issued = s.assign(1.0)
    assert ranges(issued) == [(0, 2), (2, 4)]
    assert {a.agent_id for a in issued} == {"a1"}
    assert job.n_pending == 0
    assert s.assign(1.0) == []  # both workers are busy


def test_lease_fields() -> None:
    s, job = scheduled(4, workers=2, func_cpu=0.5, func_ram=2.0)
    lease = s.assign(3.0)[0]
    assert lease.issued == 3.0
    assert lease.lease.job_id == "j1"
    assert lease.lease.function_hash == "hash-1"
    assert lease.lease.batch_seq == 0
    assert lease.lease.batch_start == 0
    assert lease.lease.func_cpu == 0.5
    assert lease.lease.func_ram_bytes == 2 * GB
    ids = [lease.lease.lease_id] + [a.lease.lease_id for a in s.assign(3.0)]
    assert len(set(ids)) == len(ids)


def test_unknown_function_gets_one_input_probes() -> None:
    s, job = scheduled(10, workers=3, seconds_per_call=None)
    assert job.seconds_per_call is None
    issued = s.assign(1.0)
    assert ranges(issued) == [(0, 1), (1, 2), (2, 3)]
    assert job.n_pending == 7


def test_completion_teaches_the_call_time_and_later_leases_grow() -> None:
    s, job = scheduled(400, workers=2, seconds_per_call=None)
    first = s.assign(1.0)
    assert [a.lease.hi - a.lease.lo for a in first] == [1, 1]
    c = finish(s, first[0], elapsed=0.01)  # 0.01 s per call -> 20 calls per 0.2 s lease
    assert c.accepted
    assert job.seconds_per_call == pytest.approx(0.01)
    issued = s.assign(2.0)
    assert [a.lease.hi - a.lease.lo for a in issued] == [20]


def test_call_time_is_remembered_per_function_hash() -> None:
    s, job = scheduled(4, workers=2, seconds_per_call=None)
    c = finish(s, s.assign(1.0)[0], elapsed=0.05)
    assert c.accepted
    later = s.add_job(spec("j2", fhash="hash-1"), 5.0)
    other = s.add_job(spec("j3", fhash="hash-2"), 5.0)
    assert later.seconds_per_call == pytest.approx(0.05)
    assert other.seconds_per_call is None


def test_chunk_capped_by_target_lease_seconds() -> None:
    s, job = scheduled(1000, workers=1, seconds_per_call=0.05)  # 0.2 s / 0.05 s = 4 inputs
    assert ranges(s.assign(1.0)) == [(0, 4)]
    s2, job2 = scheduled(1000, workers=1, seconds_per_call=0.05)
    s2.target_lease_seconds = 1.0
    assert ranges(s2.assign(1.0)) == [(0, 20)]


def test_slow_function_still_gets_one_input() -> None:
    s, job = scheduled(10, workers=1, seconds_per_call=30.0)
    assert ranges(s.assign(1.0)) == [(0, 1)]


def test_chunk_capped_by_max_lease_inputs() -> None:
    s = Scheduler(max_lease_inputs=3)
    s.add_node("a1", node(workers=1), 0.0)
    job = s.add_job(spec(), 0.0)
    job.seconds_per_call = 1e-6
    s.add_batches("j1", batches(100), final_count=100)
    assert ranges(s.assign(1.0)) == [(0, 3)]


def test_guided_size_follows_pending_over_slots() -> None:
    s, job = scheduled(100, workers=4, seconds_per_call=1e-6)
    # ceil(100 / 4) = 25 for every lease of the round
    assert ranges(s.assign(1.0)) == [(0, 25), (25, 50), (50, 75), (75, 100)]


def test_leases_never_cross_batch_boundaries() -> None:
    s, job = scheduled(3, 7, 5, workers=2, seconds_per_call=1e-6)
    counts = {0: (0, 3), 1: (3, 7), 2: (10, 5)}
    seen: set[int] = set()
    for _ in range(20):
        issued = s.assign(1.0)
        for a in issued:
            start, count = counts[a.lease.batch_seq]
            assert a.lease.batch_start == start
            assert start <= a.lease.lo < a.lease.hi <= start + count, a.lease
            seen |= set(range(a.lease.lo, a.lease.hi))
            assert finish(s, a).accepted
        if job.state == m.JOB_DONE:
            break
    assert seen == set(range(15))
    assert job.state == m.JOB_DONE


def test_first_lease_stops_at_the_batch_end() -> None:
    s, job = scheduled(3, 100, workers=1, seconds_per_call=1e-6)
    assert ranges(s.assign(1.0)) == [(0, 3)]


# ---- resource fit ------------------------------------------------------------------------


def test_func_cpu_limits_calls_per_node() -> None:
    s, job = scheduled(100, workers=4, cpus=4, func_cpu=2.0, seconds_per_call=0.05)  # 4-input leases
    issued = s.assign(1.0)
    assert len(issued) == 2
    assert s.assign(1.0) == []
    assert s.nodes["a1"].cpu_used == pytest.approx(4.0)
    assert finish(s, issued[0]).accepted
    assert len(s.assign(2.0)) == 1  # the freed CPUs take one more
    assert s.nodes["a1"].cpu_used == pytest.approx(4.0)


def test_func_ram_limits_calls_per_node() -> None:
    s = Scheduler()
    s.add_node("a1", node(cpus=8, workers=8, ram_gb=16), 0.0)
    job = s.add_job(spec(func_ram=6.0), 0.0)
    job.seconds_per_call = 0.001
    s.add_batches("j1", batches(100), final_count=100)
    assert len(s.assign(1.0)) == 2  # 2 x 6 GB fit in 16 GB, 3 do not
    assert s.nodes["a1"].ram_used == 12 * GB


def test_fractional_func_cpu() -> None:
    s, job = scheduled(100, workers=8, cpus=2, func_cpu=0.25)
    assert len(s.assign(1.0)) == 8  # 8 x 0.25 CPU on 2 CPUs; the 8 workers are the limit


def test_python_version_mismatch_gets_no_lease() -> None:
    s = Scheduler()
    s.add_node("a1", node(py="3.12"), 0.0)
    s.add_job(spec(py="3.11"), 0.0)
    s.add_batches("j1", batches(10), final_count=10)
    assert s.assign(1.0) == []
    s.add_node("a2", node("n2", py="3.11"), 0.0)
    issued = s.assign(1.0)
    assert issued
    assert {a.agent_id for a in issued} == {"a2"}


def test_max_parallelism_caps_active_leases_cluster_wide() -> None:
    s = Scheduler()
    s.add_node("a1", node("n1", workers=4), 0.0)
    s.add_node("a2", node("n2", workers=4), 0.0)
    job = s.add_job(spec(max_parallelism=3), 0.0)
    job.seconds_per_call = 0.05  # 4-input leases: inputs stay pending
    s.add_batches("j1", batches(100), final_count=100)
    issued = s.assign(1.0)
    assert len(issued) == 3
    assert len(job.leases) == 3
    assert s.assign(1.0) == []
    assert finish(s, issued[0]).accepted
    assert len(s.assign(2.0)) == 1
    assert len(job.leases) == 3


def test_max_parallelism_sizes_leases_by_its_slots() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=8, cpus=8), 0.0)
    job = s.add_job(spec(max_parallelism=2), 0.0)
    job.seconds_per_call = 1e-6
    s.add_batches("j1", batches(100), final_count=100)
    assert ranges(s.assign(1.0)) == [(0, 50), (50, 100)]


def test_ready_workers_limit_leases() -> None:
    s, job = scheduled(100, workers=4)
    s.touch_node("a1", 1.0, ready_workers=1)
    assert len(s.assign(1.0)) == 1


def test_two_jobs_share_a_node() -> None:
    s, job = scheduled(100, workers=4)
    job2 = s.add_job(spec("j2", fhash="hash-2"), 1.0)
    job2.seconds_per_call = 0.001
    s.add_batches("j2", batches(100), final_count=100)
    issued = s.assign(2.0)
    assert collections.Counter(a.lease.job_id for a in issued) == {"j1": 2, "j2": 2}


# ---- fair share between users --------------------------------------------------------------


def add(s: Scheduler, job_id: str, owner: str, n: int, now: float) -> JobState:
    """A job of `owner` with `n` inputs, its call time known."""
    job = s.add_job(spec(job_id, fhash=f"hash-{job_id}"), now, owner=owner)
    job.seconds_per_call = 0.001
    s.add_batches(job_id, batches(n), final_count=n)
    return job


def by_owner(s: Scheduler) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for job in s.jobs.values():
        counts[job.owner] += len(job.leases)
    return dict(counts)


def test_a_small_job_of_another_user_gets_half_the_slots_at_once_beside_a_huge_one() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=8, cpus=8), 0.0)
    add(s, "huge", "alice", 10_000_000, 0.0)
    add(s, "also", "alice", 1_000, 0.5)
    small = add(s, "small", "bob", 10, 1.0)  # the newest job: first come first served would give it nothing
    issued = s.assign(2.0)
    assert len(issued) == 8
    assert by_owner(s) == {"alice": 4, "bob": 4}  # alice's two jobs share her half: no double share
    assert collections.Counter(a.lease.job_id for a in issued) == {"huge": 2, "also": 2, "small": 4}
    assert small.pending.size == 2  # the rest of bob's 10 inputs goes to the next slot that frees up


def test_three_users_get_a_third_each_across_nodes() -> None:
    s = Scheduler()
    for i in range(3):
        s.add_node(f"a{i}", node(f"n{i}", workers=3, cpus=3), 0.0)
    for i, user in enumerate(["ann", "ben", "cat"]):
        add(s, f"j-{user}", user, 1_000_000, float(i))
    assert len(s.assign(5.0)) == 9
    assert by_owner(s) == {"ann": 3, "ben": 3, "cat": 3}


def test_a_user_with_two_jobs_does_not_get_twice_the_share() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=6, cpus=6), 0.0)
    add(s, "b1", "bob", 1_000_000, 0.0)
    add(s, "b2", "bob", 1_000_000, 1.0)
    add(s, "c1", "cat", 1_000_000, 2.0)
    s.assign(3.0)
    assert by_owner(s) == {"bob": 3, "cat": 3}
    assert {j: len(job.leases) for j, job in s.jobs.items()} == {"b1": 2, "b2": 1, "c1": 3}


def test_slots_that_free_up_go_to_the_user_with_fewer_leases_until_the_shares_are_even() -> None:
    """A user who came first holds every slot; nothing is preempted, and each lease that ends hands
    its slot to the user who came later, until both have half."""
    s = Scheduler()
    s.add_node("a1", node(workers=8, cpus=8), 0.0)
    add(s, "huge", "alice", 10_000_000, 0.0)
    held = s.assign(1.0)
    assert by_owner(s) == {"alice": 8}
    add(s, "small", "bob", 1_000, 2.0)
    assert s.assign(2.0) == []  # no free slot: no call is cut short
    shares = []
    for lease in held[:6]:
        assert finish(s, lease, now=3.0).accepted
        (new,) = s.assign(3.0)
        shares.append(new.lease.job_id)
    assert shares == ["small", "small", "small", "small", "huge", "huge"]
    assert by_owner(s) == {"alice": 4, "bob": 4}


def test_jobs_of_no_user_count_as_one_user() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=4, cpus=4), 0.0)
    add(s, "admin1", "", 1_000, 0.0)
    add(s, "admin2", "", 1_000, 1.0)
    add(s, "dan1", "dan", 1_000, 2.0)
    s.assign(3.0)
    assert by_owner(s) == {"": 2, "dan": 2}


# ---- single-tenant nodes change hands between leases ------------------------------------------


def tenant_setup() -> tuple[Scheduler, list[ActiveLease]]:
    s = Scheduler()
    s.add_node("c1", node(workers=4, cpus=4), 0.0, single_tenant=True)
    s.hold("c1", "old")
    add(s, "old", "alice", 1_000_000, 0.0)
    add(s, "new", "bob", 1_000, 1.0)
    issued = s.assign(1.0)
    assert {a.lease.job_id for a in issued} == {"old"} and len(issued) == 4  # bob's job may not run there
    return s, issued


def test_a_single_tenant_node_handed_to_another_job_finishes_the_old_jobs_leases_first() -> None:
    s, running = tenant_setup()
    assert s.hold("c1", "new") == []  # nothing requeued: the calls running there go on
    assert set(s.jobs["old"].leases) == {a.lease.lease_id for a in running}
    for lease in running[:3]:
        assert finish(s, lease, now=2.0).accepted  # results of the tenant before still count
        assert s.assign(2.0) == []  # neither the old job (not its node now) nor the new (one old lease runs)
    assert finish(s, running[3], now=3.0).accepted
    issued = s.assign(3.0)
    assert {a.lease.job_id for a in issued} == {"new"} and len(issued) == 4


def test_a_lost_lease_of_the_tenant_before_counts_as_done_for_the_handover() -> None:
    s, running = tenant_setup()
    s.hold("c1", "new")
    for lease in running[:3]:
        finish(s, lease, now=2.0)
    s.requeue([running[3].lease.lease_id])  # its delivery was lost: its inputs run elsewhere
    issued = s.assign(3.0)
    assert {a.lease.job_id for a in issued} == {"new"} and len(issued) == 4
    done = sum(a.lease.hi - a.lease.lo for a in running[:3])
    assert s.jobs["old"].pending.size == 1_000_000 - done  # the lost lease's inputs are pending again


def test_a_node_released_after_a_handover_preempts_no_call_of_the_job_before() -> None:
    """Bob's job ends (or he cancels it) while alice's calls still run on the node handed to him: they run
    to their end and count, and none runs twice (found in review: the release requeued them)."""
    s, running = tenant_setup()
    s.hold("c1", "new")
    assert s.hold("c1", None) == []
    assert set(s.jobs["old"].leases) == {a.lease.lease_id for a in running}
    assert all(finish(s, lease, now=2.0).accepted for lease in running)
    done = sum(a.lease.hi - a.lease.lo for a in running)
    assert s.jobs["old"].pending.size == 1_000_000 - done and s.jobs["old"].done.size == done


def test_a_single_tenant_node_that_is_gone_requeues_what_ran_there() -> None:
    s, running = tenant_setup()
    assert sorted(s.remove_node("c1")) == sorted(a.lease.lease_id for a in running)
    assert s.jobs["old"].leases == {} and s.jobs["old"].pending.size == 1_000_000


# ---- prefetch: a busy slot's next lease waits on its node -------------------------------------


def prefetching(
    n: int = 200, workers: int = 2, spc: float | None = 0.05, prefetch: int = 1, **spec_kw: object
) -> tuple[Scheduler, JobState]:
    s = Scheduler(prefetch_per_slot=prefetch)
    s.add_node("a1", node(workers=workers, cpus=workers, runs_after=True), 0.0)
    job = s.add_job(spec(**spec_kw), 0.0)  # type: ignore[arg-type]
    job.seconds_per_call = spc
    s.add_batches("j1", batches(n), final_count=n)
    return s, job


def test_each_busy_slot_gets_its_next_lease_ahead_naming_the_lease_it_follows() -> None:
    s, job = prefetching()
    issued = s.assign(1.0)
    first, second = issued[:2], issued[2:]
    assert [a.lease.after for a in first] == [0, 0]
    assert [a.lease.after for a in second] == [a.lease.lease_id for a in first]
    assert [a.queued for a in issued] == [False, False, True, True]
    assert [a.lease.hi - a.lease.lo for a in issued] == [4, 4, 4, 4]  # 0.2 s of 0.05 s calls each
    assert (job.running, job.queued, s.nodes["a1"].running) == (2, 2, 2)
    assert s.assign(1.0) == []  # one lease ahead per slot (prefetch_per_slot)
    assert finish(s, first[0], now=2.0, elapsed=0.2).accepted
    assert not job.leases[second[0].lease.lease_id].queued  # it runs now, in the slot of the lease before
    (nxt,) = s.assign(2.0)
    assert nxt.lease.after == second[0].lease.lease_id and nxt.queued
    assert (job.running, job.queued) == (2, 2)
    status = job_status(s, job, 2.0)
    assert status.running == 2 and status.phase == "running on 2 workers"


def test_prefetch_goes_as_deep_as_prefetch_per_slot() -> None:
    s, job = prefetching(workers=1, prefetch=3)
    issued = s.assign(1.0)
    assert [a.lease.after for a in issued] == [0, *(a.lease.lease_id for a in issued[:3])]
    assert (job.running, job.queued) == (1, 3)


def test_near_the_end_prefetched_leases_shrink_so_the_slots_finish_together() -> None:
    s, job = prefetching(n=10)
    issued = s.assign(1.0)
    # 4 + 4 to the free slots; the last 2 as 1 behind each (not 2 behind one of them: that slot would end last)
    assert [(a.lease.hi - a.lease.lo, bool(a.lease.after)) for a in issued] == [
        (4, False),
        (4, False),
        (1, True),
        (1, True),
    ]


def test_leases_of_trivial_calls_are_not_split_finer_for_prefetch() -> None:
    s, job = prefetching(n=100_000, spc=1e-7)
    assert [a.lease.hi - a.lease.lo for a in s.assign(1.0)] == [50_000, 50_000]  # guided: nothing left to prefetch
    s.add_batches("j1", [m.BatchMeta(1, 100_000, 100_000)], final_count=200_000)
    assert [a.lease.hi - a.lease.lo for a in s.assign(2.0)] == [50_000, 50_000]  # a lease's cost beats finer balance


def test_no_prefetch_when_off_for_probes_for_long_calls_or_for_agents_that_cannot_hold_them() -> None:
    for s, job in (prefetching(prefetch=0), prefetching(spc=None), prefetching(spc=2.0)):
        issued = s.assign(1.0)
        assert len(issued) == 2 and all(a.lease.after == 0 for a in issued) and job.queued == 0
    s, job = prefetching()
    s.nodes["a1"].info = node(workers=2, cpus=2, runs_after=False)  # an agent older than prefetch
    assert len(s.assign(1.0)) == 2 and job.queued == 0


def test_the_probe_teaches_the_call_time_then_slots_prefetch() -> None:
    s, job = prefetching(spc=None)
    probes = s.assign(1.0)
    assert [a.lease.hi - a.lease.lo for a in probes] == [1, 1]
    finish(s, probes[0], now=2.0, elapsed=0.05)
    issued = s.assign(2.0)
    assert [a.lease.hi - a.lease.lo for a in issued] == [4, 4, 4]  # a free slot, then one ahead of each
    assert sorted(a.lease.after for a in issued) == [0, probes[1].lease.lease_id, issued[0].lease.lease_id]


def test_max_parallelism_counts_running_calls_not_prefetched_leases() -> None:
    s, job = prefetching(workers=4, max_parallelism=1)
    issued = s.assign(1.0)
    assert [a.lease.after for a in issued] == [0, issued[0].lease.lease_id]
    assert (job.running, job.queued) == (1, 1)


def test_a_slot_is_not_prefetched_for_a_user_when_another_would_get_it_once_it_frees() -> None:
    """Alice holds both slots and their next leases; bob's job arrives. Each slot runs alice's lease
    already promised to it, then goes to bob: prefetch never keeps his job waiting longer than that."""
    s = Scheduler()
    s.add_node("a1", node(workers=2, cpus=2, runs_after=True), 0.0)
    alice = add(s, "big", "alice", 100_000, 0.0)
    held = s.assign(1.0)
    assert (alice.running, alice.queued) == (2, 2)
    bob = add(s, "small", "bob", 1_000, 2.0)
    bob.seconds_per_call = None  # a probe first: never prefetched
    assert s.assign(2.0) == []
    finish(s, held[0], now=3.0)  # its prefetched lease runs now; the next time the slot frees, it is bob's
    assert s.assign(3.0) == []
    finish(s, held[2], now=4.0)  # the slot is free: bob's probe
    (probe,) = s.assign(4.0)
    assert probe.lease.job_id == "small" and probe.lease.after == 0
    assert by_owner(s) == {"alice": 2, "bob": 1}  # alice: one running, one prefetched behind it
    finish(s, probe, now=5.0, elapsed=0.001)  # bob's calls are short: his slot prefetches now too
    issued = s.assign(5.0)
    assert [a.lease.job_id for a in issued] == ["small", "small"]
    assert [bool(a.lease.after) for a in issued] == [False, True]
    assert (bob.running, bob.queued, alice.running, alice.queued) == (1, 1, 1, 1)


def test_a_single_tenant_handover_waits_for_the_prefetched_leases_of_the_job_before() -> None:
    s = Scheduler()
    s.add_node("c1", node(workers=2, cpus=2, runs_after=True), 0.0, single_tenant=True)
    s.hold("c1", "old")
    old = add(s, "old", "alice", 1_000_000, 0.0)
    add(s, "new", "bob", 1_000, 1.0)
    held = s.assign(1.0)
    assert (old.running, old.queued) == (2, 2)
    s.hold("c1", "new")
    for lease in held[:3]:
        assert finish(s, lease, now=2.0).accepted
        assert s.assign(2.0) == []  # the old job's leases, prefetched ones too, run there first
    assert finish(s, held[3], now=3.0).accepted
    issued = s.assign(3.0)
    assert {a.lease.job_id for a in issued} == {"new"} and len(issued) == 4  # its call time is known: 2 + 2
    assert s.nodes["c1"].running == 2


def test_a_cancelled_job_stops_its_prefetched_leases_and_a_lost_node_requeues_them() -> None:
    s, job = prefetching()
    issued = s.assign(1.0)
    ids = sorted(a.lease.lease_id for a in issued)
    assert sorted(lid for _, lid in s.finish_job("j1", m.JOB_CANCELLED)) == ids
    assert job.leases == {} and job.queued == 0 and s.nodes["a1"].leases == set()
    assert (s.nodes["a1"].running, s.nodes["a1"].cpu_used, s.nodes["a1"].queued) == (0, 0.0, {})
    s, job = prefetching()
    issued = s.assign(1.0)
    assert sorted(s.remove_node("a1")) == sorted(a.lease.lease_id for a in issued)
    assert job.leases == {} and job.queued == 0 and job.pending.size == 200


def test_a_lease_the_agent_lost_hands_its_slot_to_the_one_that_followed_it() -> None:
    s, job = prefetching()
    first, _, after0, _ = s.assign(1.0)
    s.requeue([first.lease.lease_id])  # its delivery was lost; the prefetched one is still held
    assert not job.leases[after0.lease.lease_id].queued
    assert (job.running, job.queued, s.nodes["a1"].running) == (2, 1, 2)
    assert [a.lease.after for a in s.assign(2.0)] == [after0.lease.lease_id]


def test_a_restart_restores_prefetched_leases_as_running_until_their_slots_settle() -> None:
    """The store keeps no `after`: a restarted daemon counts every lease as holding a worker, so it hands
    out less until they end, never more; the agent still runs them one after the other."""
    s, job = prefetching()
    issued = s.assign(1.0)
    s2 = Scheduler()
    s2.add_node("a1", node(workers=2, cpus=2, runs_after=True), 2.0)
    stored = [(dataclasses.replace(a.lease, after=0), "a1") for a in issued]
    job2 = s2.restore_job(job.spec, 0.0, batches(200), 200, [], stored)
    assert (job2.running, job2.queued, s2.nodes["a1"].running) == (4, 0, 4)
    assert s2.assign(2.0) == []
    for a in issued[:3]:
        finish(s2, a, now=3.0, elapsed=0.2)
    new = s2.assign(3.0)  # one lease still held there: a free slot, and one lease ahead of each
    assert [a.lease.after for a in new] == [0, issued[3].lease.lease_id, new[0].lease.lease_id]


# ---- infeasible ---------------------------------------------------------------------------


def test_infeasible_with_no_nodes_waits() -> None:
    assert Scheduler().infeasible(spec(py="2.7", func_cpu=1000)) is None


def test_infeasible_python_version_names_the_versions() -> None:
    s = Scheduler()
    s.add_node("a1", node("n1", py="3.10"), 0.0)
    s.add_node("a2", node("n2", py="3.12"), 0.0)
    s.add_node("a3", node("n3", py="3.12"), 0.0)
    reason = why_not(s, spec(py="3.11"))
    assert reason is not None
    assert "Python 3.11" in reason
    assert "Python 3.10 (1 node)" in reason
    assert "Python 3.12 (2 nodes)" in reason


def test_infeasible_resources_names_the_largest_node() -> None:
    s = Scheduler()
    s.add_node("a1", node("n1", cpus=4, ram_gb=16), 0.0)
    s.add_node("a2", node("n2", cpus=16, ram_gb=64), 0.0)
    s.add_node("a3", node("n3", cpus=96, ram_gb=512, py="3.12"), 0.0)  # other Python: not a candidate
    reason = why_not(s, spec(func_cpu=32))
    assert reason is not None
    assert "func_cpu=32" in reason
    assert "16 CPUs" in reason
    assert "64.0 GB" in reason
    reason = why_not(s, spec(func_ram=100))
    assert reason is not None
    assert "func_ram=100" in reason
    assert "16 CPUs" in reason


def test_feasible_is_none() -> None:
    s = Scheduler()
    s.add_node("a1", node("n1", py="3.12"), 0.0)
    s.add_node("a2", node("n2", cpus=8, ram_gb=32), 0.0)
    assert s.infeasible(spec()) is None
    assert s.infeasible(spec(func_cpu=8, func_ram=32)) is None


# ---- exactly-once ------------------------------------------------------------------------


def test_result_accepted_once_and_duplicate_dropped() -> None:
    s, job = scheduled(4, workers=2)
    a, b = s.assign(1.0)
    c = finish(s, a)
    assert c.accepted
    assert (c.lo, c.hi) == (0, 2)
    assert not c.job_done
    dup = finish(s, a)
    assert not dup.accepted
    assert dup.reason == "duplicate"
    c = finish(s, b)
    assert c.accepted
    assert c.job_done
    assert job.state == m.JOB_DONE
    assert job.done.size == 4


def test_unknown_job_is_dropped() -> None:
    s, job = scheduled(4)
    c = s.complete("nope", 1, 0, 1, 0.1, False, 1.0)
    assert not c.accepted
    assert c.reason == "unknown job"


def test_lease_range_mismatch_is_dropped() -> None:
    s, job = scheduled(4, workers=2)
    a, _ = s.assign(1.0)
    c = s.complete("j1", a.lease.lease_id, a.lease.lo + 1, 1, 0.1, False, 1.0)
    assert not c.accepted
    assert job.done.size == 0
    assert a.lease.lease_id in job.leases


def _dead_agent_scenario() -> tuple[Scheduler, JobState, ActiveLease, list[ActiveLease]]:
    """L1 = [0, 4) on a1; a1 is presumed dead; [0, 4) is re-leased on a2 as [0, 2) + [2, 4)."""
    s, job = scheduled(4, workers=1)
    (original,) = s.assign(1.0)
    assert ranges([original]) == [(0, 4)]
    assert s.remove_node("a1") == [original.lease.lease_id]
    assert pending(job) == [(0, 4)]
    assert job.leases == {}
    s.add_node("a2", node("n2", workers=2), 2.0)
    again = s.assign(3.0)
    assert ranges(again) == [(0, 2), (2, 4)]
    assert {a.agent_id for a in again} == {"a2"}
    return s, job, original, again


def test_late_result_of_original_lease_supersedes_the_re_leased_ones() -> None:
    s, job, original, again = _dead_agent_scenario()
    c = finish(s, original, now=4.0)
    assert c.accepted
    assert (c.lo, c.hi) == (0, 4)
    assert sorted(c.superseded) == sorted(a.lease.lease_id for a in again)
    assert c.job_done
    assert s.nodes["a2"].leases == set()  # the superseded leases freed a2's slots
    for a in again:
        late = finish(s, a, now=5.0)
        assert not late.accepted
    assert job.done.size == 4


def test_late_result_of_original_lease_dropped_when_part_is_done() -> None:
    s, job, original, again = _dead_agent_scenario()
    assert finish(s, again[0]).accepted  # [0, 2) done by a2
    c = finish(s, original, now=4.0)
    assert not c.accepted
    assert c.reason == "duplicate"
    assert job.done.size == 2
    c = finish(s, again[1])
    assert c.accepted
    assert c.job_done


def test_short_late_result_of_original_lease_requeues_the_rest_of_a_superseded_lease() -> None:
    s, job, original, again = _dead_agent_scenario()
    lease = original.lease
    c = s.complete("j1", lease.lease_id, 0, 3, 0.1, False, 4.0)  # only [0, 3) came back
    assert c.accepted
    assert (c.lo, c.hi) == (0, 3)
    assert sorted(c.superseded) == sorted(a.lease.lease_id for a in again)
    assert pending(job) == [(3, 4)]
    assert not finish(s, again[1]).accepted  # [2, 4) was superseded
    (last,) = s.assign(5.0)
    assert ranges([last]) == [(3, 4)]
    c = finish(s, last)
    assert c.accepted
    assert c.job_done


def test_short_late_result_leaves_disjoint_leases_alone() -> None:
    s, job, original, again = _dead_agent_scenario()
    c = s.complete("j1", original.lease.lease_id, 0, 2, 0.1, False, 4.0)
    assert c.accepted
    assert c.superseded == [again[0].lease.lease_id]
    assert again[1].lease.lease_id in job.leases
    assert finish(s, again[1]).accepted
    assert job.state == m.JOB_DONE


def test_requeue_puts_inputs_back_and_frees_the_node() -> None:
    s, job = scheduled(8, workers=2)
    a, b = s.assign(1.0)
    s.requeue([a.lease.lease_id])
    assert a.lease.lease_id not in job.leases
    assert s.nodes["a1"].leases == {b.lease.lease_id}
    assert pending(job) == [(a.lease.lo, a.lease.hi)]
    assert job.n_pending == a.lease.hi - a.lease.lo
    s.requeue([a.lease.lease_id, 9999])  # unknown or already requeued: nothing happens
    assert job.n_pending == a.lease.hi - a.lease.lo


def test_add_node_with_same_node_id_requeues_the_old_agents_leases() -> None:
    s, job = scheduled(8, workers=2)
    issued = s.assign(1.0)
    requeued = s.add_node("a1-new", node("n1", workers=2), 2.0)  # the agent restarted
    assert sorted(requeued) == sorted(a.lease.lease_id for a in issued)
    assert "a1" not in s.nodes
    assert job.n_pending == 8


def test_silent_nodes() -> None:
    s = Scheduler()
    s.add_node("a1", node("n1"), 0.0)
    s.add_node("a2", node("n2"), 5.0)
    s.touch_node("a1", 8.0)
    assert s.silent_nodes(12.0, timeout=5.0) == ["a2"]
    assert s.silent_nodes(12.0, timeout=10.0) == []


# ---- errors and short results ---------------------------------------------------------------


def test_error_fails_the_job_and_stops_the_other_leases() -> None:
    s, job = scheduled(6, workers=3)
    a, b, c = s.assign(1.0)
    assert ranges([a, b, c]) == [(0, 2), (2, 4), (4, 6)]
    done = s.complete("j1", b.lease.lease_id, 2, 1, 0.1, True, 2.0)  # input 3 raised
    assert done.accepted
    assert done.failed
    assert (done.lo, done.hi) == (2, 3)
    assert sorted(done.stopped) == sorted([("a1", a.lease.lease_id), ("a1", c.lease.lease_id)])
    assert job.state == m.JOB_FAILED
    assert job.leases == {}
    assert job.n_pending == 0
    assert s.nodes["a1"].leases == set()
    later = finish(s, a)
    assert not later.accepted
    assert "failed" in later.reason
    assert s.assign(3.0) == []


def test_error_on_first_input_of_lease() -> None:
    s, job = scheduled(4, workers=1)
    (a,) = s.assign(1.0)
    c = s.complete("j1", a.lease.lease_id, 0, 0, 0.1, True, 2.0)
    assert c.accepted and c.failed
    assert (c.lo, c.hi) == (0, 0)
    assert job.state == m.JOB_FAILED


def test_short_result_without_error_requeues_the_rest() -> None:
    s, job = scheduled(10, workers=1)
    (a,) = s.assign(1.0)
    assert ranges([a]) == [(0, 10)]
    c = s.complete("j1", a.lease.lease_id, 0, 4, 0.1, False, 2.0)
    assert c.accepted
    assert (c.lo, c.hi) == (0, 4)
    assert not c.job_done
    assert pending(job) == [(4, 10)]
    assert job.n_pending == 6
    (b,) = s.assign(3.0)
    assert ranges([b]) == [(4, 10)]
    assert b.lease.batch_seq == 0
    assert finish(s, b).job_done


def test_finish_job_cancels() -> None:
    s, job = scheduled(10, workers=2)
    issued = s.assign(1.0)
    stopped = s.finish_job("j1", m.JOB_CANCELLED)
    assert sorted(stopped) == sorted(("a1", a.lease.lease_id) for a in issued)
    assert job.state == m.JOB_CANCELLED
    assert s.add_batches("j1", [m.BatchMeta(5, 10, 5)]) == []  # no more inputs for a finished job
    s.forget_job("j1")
    assert "j1" not in s.jobs
    assert s.finish_job("j1", m.JOB_CANCELLED) == []


# ---- uploads -------------------------------------------------------------------------------


def test_add_batches_is_idempotent_for_the_same_seq() -> None:
    s, job = scheduled(10, final=False)
    assert job.n_uploaded == 10
    again = s.add_batches("j1", [m.BatchMeta(0, 0, 10)])
    assert again == []
    assert job.n_uploaded == 10
    assert job.n_pending == 10
    new = s.add_batches("j1", [m.BatchMeta(0, 0, 10), m.BatchMeta(1, 10, 5)], final_count=15)
    assert new == [m.BatchMeta(1, 10, 5)]
    assert job.n_uploaded == 15
    assert job.n_pending == 15
    assert job.n_inputs == 15


def test_job_not_done_until_the_final_count_is_known() -> None:
    s, job = scheduled(4, final=False, workers=1)
    (a,) = s.assign(1.0)
    c = finish(s, a)
    assert c.accepted
    assert not c.job_done
    assert job.state == m.RUNNING
    s.add_batches("j1", [], final_count=4)
    assert job.complete()


def test_empty_batch() -> None:
    s, job = scheduled(0, workers=1)
    assert job.n_pending == 0
    assert job.complete()
    assert s.assign(1.0) == []


# ---- restore after a restart -----------------------------------------------------------------


def test_restore_job_pending_is_batches_minus_done_minus_leased() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=4), 0.0)
    held = m.Lease(7, "j1", "hash-1", 0, 0, 3, 6)
    job = s.restore_job(spec(), 1.0, batches(10, 10), 20, [(0, 3), (12, 15)], [(held, "a1")])
    assert pending_set(job) == set(range(6, 12)) | set(range(15, 20))
    assert job.n_pending == 11
    assert all(iv.lo >= 10 or iv.hi <= 10 for iv in job.pending)  # pending intervals stay inside their batch
    assert set(job.leases) == {7}
    assert job.leases[7].delivered == 0
    assert s.nodes["a1"].leases == {7}
    assert job.done.size == 6
    assert job.n_uploaded == 20
    assert s.next_lease_id == 8
    # the job runs to completion from there
    assert finish(s, job.leases[7]).accepted
    for _ in range(10):
        for a in s.assign(2.0):
            finish(s, a)
    assert job.state == m.JOB_DONE
    assert job.done.size == 20


def test_restore_job_requeues_leases_of_unknown_agents() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=4), 0.0)
    ghost = m.Lease(3, "j1", "hash-1", 0, 0, 4, 10)
    job = s.restore_job(spec(), 1.0, batches(10), 10, [(0, 4)], [(ghost, "gone")])
    assert job.leases == {}
    assert pending_set(job) == set(range(4, 10))
    assert job.n_pending == 6
    assert s.next_lease_id == 4


def test_restore_job_requeued_lease_inside_a_batch_keeps_the_rest_of_the_batch() -> None:
    s = Scheduler()
    s.add_node("a1", node(workers=4), 0.0)
    ghost = m.Lease(5, "j1", "hash-1", 0, 0, 2, 4)
    job = s.restore_job(spec(), 1.0, batches(10), 10, [], [(ghost, "gone")])
    assert pending_set(job) == set(range(10))
    assert job.n_pending == 10


def test_restore_job_complete_when_all_done() -> None:
    s = Scheduler()
    job = s.restore_job(spec(), 1.0, batches(5, 5), 10, [(0, 10)], [])
    assert job.complete()
    assert job.n_pending == 0


# ---- status -------------------------------------------------------------------------------


def test_job_status_fields_and_phase() -> None:
    s = Scheduler()
    job = s.add_job(spec(), 10.0)
    job.seconds_per_call = 0.001
    st0 = job_status(s, job, 11.0)
    assert st0.phase == "waiting for a node to join the cluster"
    assert st0.workers == 0
    assert st0.state == m.RUNNING
    assert st0.function_name == "square"
    assert st0.created == 10.0
    s.add_node("a1", node(workers=2), 11.0)
    assert job_status(s, job, 11.0).phase == "waiting for inputs"
    s.add_batches("j1", batches(8), final_count=8)
    s.touch_node("a1", 11.0, ready_workers=0)
    status = job_status(s, job, 11.0)
    assert status.phase == "queued: waiting for free workers"
    assert status.n_uploaded == 8
    assert status.n_inputs == 8
    assert status.workers == 2
    s.touch_node("a1", 11.0, ready_workers=2)
    a, b = s.assign(12.0)
    status = job_status(s, job, 12.0)
    assert status.running == 2
    assert status.phase == "running on 2 workers"
    finish(s, a, now=13.0)
    status = job_status(s, job, 13.0)
    assert status.n_done == 4
    assert status.running == 1
    assert status.phase == "running on 1 worker"
    finish(s, b, now=14.0)
    status = job_status(s, job, 15.0)
    assert status.n_done == 8
    assert status.state == m.JOB_DONE
    assert status.calls_per_second == pytest.approx(8 / 2.0)


# ---- randomized exactly-once ------------------------------------------------------------------


class Harness:
    """Drives a Scheduler the way the control plane does, and checks the exactly-once invariants."""

    def __init__(self, counts: list[int], spc: float | None, max_lease_inputs: int = 100_000) -> None:
        self.s = Scheduler(target_lease_seconds=0.2, max_lease_inputs=max_lease_inputs)
        self.job = self.s.add_job(spec(), 0.0)
        self.job.seconds_per_call = spc
        self.metas = batches(*counts)
        self.n = sum(counts)
        self.uploaded = 0  # batches uploaded so far
        self.issued: dict[int, m.Lease] = {}
        self.accepted: collections.Counter[int] = collections.Counter()
        self.now = 0.0
        self.next_agent = 0
        self.add_node()

    # -- actions --

    def add_node(self, node_id: str | None = None, workers: int = 2) -> None:
        self.next_agent += 1
        agent = f"a{self.next_agent}"
        info = node(
            node_id or f"n{self.next_agent}", workers=workers, cpus=workers, runs_after=self.next_agent % 3 != 0
        )
        self.s.add_node(agent, info, self.now)  # most agents take prefetched leases

    def upload(self, count: int = 1) -> None:
        """Upload the next batches; sometimes re-send an old one (a retried upload)."""
        new = self.metas[self.uploaded : self.uploaded + count]
        retry = self.metas[: self.uploaded][-1:]
        self.uploaded += len(new)
        final = self.n if self.uploaded == len(self.metas) else None
        self.s.add_batches("j1", retry + new, final_count=final)
        if self.job.state == m.RUNNING and self.job.complete():  # as ControlPlane.add_inputs does
            self.s.finish_job("j1", m.JOB_DONE)

    def assign(self) -> None:
        self.now += 1
        for a in self.s.assign(self.now):
            assert a.lease.lease_id not in self.issued
            self.issued[a.lease.lease_id] = a.lease

    def complete(self, lease_id: int, n_ok: int) -> None:
        """A result of any lease ever issued: active, stale, superseded or already accepted."""
        self.now += 1
        lease = self.issued[lease_id]
        n_ok = min(n_ok, lease.hi - lease.lo)
        c = self.s.complete("j1", lease_id, lease.lo, n_ok, 0.001 * max(n_ok, 1), False, self.now)
        if c.accepted:
            assert (c.lo, c.hi) == (lease.lo, lease.lo + n_ok)
            for i in range(c.lo, c.hi):
                self.accepted[i] += 1
                assert self.accepted[i] == 1, f"input {i} accepted twice"

    def remove_node(self, index: int) -> None:
        agents = sorted(self.s.nodes)
        if agents:
            self.s.remove_node(agents[index % len(agents)])

    def restart_agent(self, index: int) -> None:
        """An agent re-registers under a new agent id: the old one's leases are requeued."""
        agents = sorted(self.s.nodes)
        if agents:
            self.add_node(self.s.nodes[agents[index % len(agents)]].info.node_id)

    def requeue(self, lease_ids: list[int]) -> None:
        self.s.requeue(lease_ids)

    def restart_daemon(self) -> None:
        """Rebuild the scheduler from what the store keeps, as the daemon does after a restart."""
        old, job = self.s, self.job
        if job.state != m.RUNNING:
            return  # the store restores running jobs only
        self.s = Scheduler(old.target_lease_seconds, old.max_lease_inputs, max(self.issued, default=0) + 1)
        for agent, n in old.nodes.items():
            self.s.add_node(agent, n.info, self.now)
        self.job = self.s.restore_job(
            job.spec,
            job.created,
            self.metas[: self.uploaded],
            job.n_inputs,
            list(job.done),
            [(a.lease, a.agent_id) for a in job.leases.values()],
        )
        assert set(self.job.leases) == set(job.leases)
        if self.job.complete():  # as ControlPlane._restore does
            self.s.finish_job("j1", m.JOB_DONE)

    def fail(self, lease_id: int, n_ok: int) -> None:
        """A result whose input lo + n_ok raised."""
        self.now += 1
        lease = self.issued[lease_id]
        n_ok = min(n_ok, lease.hi - lease.lo - 1)
        running = {(a.agent_id, lid) for lid, a in self.job.leases.items() if lid != lease_id}
        c = self.s.complete("j1", lease_id, lease.lo, n_ok, 0.1, True, self.now)
        if not c.accepted:
            return
        assert c.failed
        assert set(c.stopped) == running
        assert self.job.state == m.JOB_FAILED
        for i in range(c.lo, c.hi):
            self.accepted[i] += 1
            assert self.accepted[i] == 1, f"input {i} accepted twice"

    # -- checks --

    def check(self) -> None:
        s, job = self.s, self.job
        done = {i for lo, hi in job.done for i in range(lo, hi)}
        assert done == {i for i, c in self.accepted.items() if c}
        assert all(c <= 1 for c in self.accepted.values())
        assert job.done.size == len(done)
        for lid, active in job.leases.items():
            assert s.lease_owner[lid] == "j1"
            assert active.agent_id in s.nodes, "an active lease on a removed agent"
            assert lid in s.nodes[active.agent_id].leases
        for agent, n in s.nodes.items():
            assert n.leases == {lid for lid, a in job.leases.items() if a.agent_id == agent}
            assert n.cpu_used == pytest.approx(n.running * job.spec.func_cpu)
            assert n.pool_leases[m.PROCESS_POOL] == n.running <= n.info.workers
            # prefetched leases: each follows one lease held on its node, one each, in chains of prefetch_per_slot
            assert set(n.queued) <= n.leases and set(n.queued.values()) <= n.leases
            assert {v: k for k, v in n.queued.items()} == n.successor
            assert set(n.queued) == {lid for lid, a in job.leases.items() if a.agent_id == agent and a.queued}
            assert all(n.info.runs_after and n.queued[lid] not in n.queued for lid in n.queued)
        assert job.queued == sum(a.queued for a in job.leases.values())
        if job.state != m.RUNNING:
            return
        # pending, active leases and done partition the uploaded inputs
        uploaded = {i for b in self.metas[: self.uploaded] for i in range(b.start, b.start + b.count)}
        parts: list[set[int]] = [done]
        for iv in job.pending:
            start, count = job.batches[iv.seq]
            assert iv.start == start and start <= iv.lo < iv.hi <= start + count, iv
            parts.append(set(range(iv.lo, iv.hi)))
        for a in job.leases.values():
            start, count = job.batches[a.lease.batch_seq]
            assert start <= a.lease.lo < a.lease.hi <= start + count, a.lease
            parts.append(set(range(a.lease.lo, a.lease.hi)))
        assert sum(len(p) for p in parts) == len(uploaded), "pending, leases and done overlap"
        assert set().union(*parts) == uploaded, "inputs lost"
        assert job.n_pending == sum(iv.hi - iv.lo for iv in job.pending)

    def drain(self) -> None:
        """Finish the job: upload the rest, keep a node up, complete every lease fully."""
        while self.uploaded < len(self.metas):
            self.upload(len(self.metas))
        if not self.s.nodes:
            self.add_node()
        for _ in range(10 * self.n + 10):
            if self.job.state != m.RUNNING:
                break
            self.assign()
            self.check()
            for lid in sorted(self.job.leases):
                lease = self.issued[lid]
                self.complete(lid, lease.hi - lease.lo)
            self.check()
        assert self.job.state == m.JOB_DONE
        assert sorted(self.accepted) == list(range(self.n))
        assert set(self.accepted.values()) <= {1}


def random_run(rng: random.Random) -> None:
    counts = [rng.randrange(1, 12) for _ in range(rng.randrange(1, 5))]
    h = Harness(counts, spc=rng.choice([None, 0.001, 0.05, 1.0]), max_lease_inputs=rng.choice([3, 100_000]))
    h.upload(rng.randrange(1, len(counts) + 1))
    for _ in range(rng.randrange(5, 60)):
        op = rng.random()
        if op < 0.3:
            h.assign()
        elif op < 0.65 and h.issued:
            lid = rng.choice(sorted(h.issued))
            lease = h.issued[lid]
            width = lease.hi - lease.lo
            h.complete(lid, width if rng.random() < 0.6 else rng.randrange(0, width + 1))
        elif op < 0.72:
            h.remove_node(rng.randrange(100))
        elif op < 0.8:
            h.add_node(workers=rng.randrange(1, 4))
        elif op < 0.85:
            h.restart_agent(rng.randrange(100))
        elif op < 0.9 and h.issued:
            h.requeue(rng.sample(sorted(h.issued), min(len(h.issued), rng.randrange(1, 3))))
        elif op < 0.94:
            h.restart_daemon()
        else:
            h.upload(1)
        h.check()
    h.drain()


def random_failing_run(rng: random.Random) -> None:
    """Like random_run, then a call raises: the job fails and nothing is accepted after it."""
    counts = [rng.randrange(1, 12) for _ in range(rng.randrange(1, 4))]
    h = Harness(counts, spc=rng.choice([None, 0.001]))
    h.upload(len(counts))
    for _ in range(rng.randrange(1, 20)):
        h.assign()
        if h.issued and rng.random() < 0.5:
            lid = rng.choice(sorted(h.issued))
            h.complete(lid, rng.randrange(0, 12))
        h.check()
    if h.job.state != m.RUNNING or not h.job.leases:
        return
    h.fail(rng.choice(sorted(h.job.leases)), rng.randrange(0, 12))
    assert h.job.state == m.JOB_FAILED
    assert h.job.leases == {} and h.job.n_pending == 0
    assert all(not n.leases for n in h.s.nodes.values())
    before = dict(h.accepted)
    for lid in sorted(h.issued):
        h.complete(lid, 100)
    assert dict(h.accepted) == before
    assert h.s.assign(h.now) == []


@pytest.mark.parametrize("seed", range(100))
def test_random_runs_ending_in_an_error(seed: int) -> None:
    random_failing_run(random.Random(seed))


@pytest.mark.parametrize("seed", range(300))
def test_random_interleavings_accept_each_input_exactly_once(seed: int) -> None:
    random_run(random.Random(seed))


if hypothesis is not None:

    @hypothesis.settings(max_examples=100, deadline=None, database=None)
    @hypothesis.given(st.randoms(use_true_random=False))
    def test_hypothesis_random_interleavings(rng: random.Random) -> None:
        random_run(rng)

    class SchedulerMachine(stateful.RuleBasedStateMachine):
        """Random sequences of assign / complete / remove_node / add_node / requeue."""

        @stateful.initialize(
            counts=st.lists(st.integers(1, 10), min_size=1, max_size=4),
            spc=st.sampled_from([None, 0.001, 0.05]),
        )
        def start(self, counts: list[int], spc: float | None) -> None:
            self.h = Harness(counts, spc)
            self.h.upload(1)

        @stateful.rule()
        def assign(self) -> None:
            self.h.assign()

        @stateful.rule(pick=st.integers(0, 10**6), n_ok=st.integers(0, 20), full=st.booleans())
        def complete(self, pick: int, n_ok: int, full: bool) -> None:
            if self.h.issued:
                lid = sorted(self.h.issued)[pick % len(self.h.issued)]
                self.h.complete(lid, 10**6 if full else n_ok)

        @stateful.rule(index=st.integers(0, 10))
        def remove_node(self, index: int) -> None:
            self.h.remove_node(index)

        @stateful.rule(workers=st.integers(1, 3))
        def add_node(self, workers: int) -> None:
            self.h.add_node(workers=workers)

        @stateful.rule(index=st.integers(0, 10))
        def restart_agent(self, index: int) -> None:
            self.h.restart_agent(index)

        @stateful.rule(picks=st.lists(st.integers(0, 10**6), min_size=1, max_size=3))
        def requeue(self, picks: list[int]) -> None:
            if self.h.issued:
                ids = sorted(self.h.issued)
                self.h.requeue([ids[p % len(ids)] for p in picks])

        @stateful.rule()
        def upload(self) -> None:
            self.h.upload(1)

        @stateful.rule()
        def restart_daemon(self) -> None:
            self.h.restart_daemon()

        @stateful.invariant()
        def consistent(self) -> None:
            if hasattr(self, "h"):
                self.h.check()

        def teardown(self) -> None:
            if hasattr(self, "h"):
                self.h.drain()

    SchedulerMachine.TestCase.settings = hypothesis.settings(
        max_examples=60, stateful_step_count=40, deadline=None, database=None
    )
    test_hypothesis_scheduler_state_machine = SchedulerMachine.TestCase

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed (the seeded random interleavings above still run)")
    def test_hypothesis_scheduler_state_machine() -> None:
        pass


def test_a_pool_made_for_a_job_takes_that_job_even_when_it_named_no_image() -> None:
    s = Scheduler()
    info = m.NodeInfo("n1", "h", cpus=2, ram_bytes=16 * 10**9, python_version="3.11", workers=2, runtime="podman")
    s.add_node("a", info, 0.0)
    s.standby = [m.StandbyImage("base:1")]
    spec = m.JobSpec("j", "f", "fh", "3.11", func_cpu=2, func_ram=1)
    s.add_job(spec, 0.0)
    s.add_batches("j", [m.BatchMeta(0, 0, 4)], final_count=4)
    wants = s.plan_wants()
    (want,) = wants["a"]
    assert (want.image, want.cpus, want.count) == ("base:1", 2, 1)
    pool = m.PoolState("job-x", want.image, "3.11", cpus=2, ram_bytes=want.ram_bytes, slots=1, ready=1, job_id="j")
    s.touch_node("a", 1.0, pools=[pool])
    (lease,) = s.assign(1.0)
    assert lease.lease.pool == "job-x"
    other = m.JobSpec("k", "f", "fh2", "3.11")
    s.add_job(other, 1.0)
    s.add_batches("k", [m.BatchMeta(0, 0, 1)], final_count=1)
    assert s.assign(1.0) == []  # another job never runs on a pool made for j


def test_a_container_node_gets_no_lease_before_it_reports_a_ready_pool() -> None:
    s = Scheduler()
    info = m.NodeInfo("n1", "h", cpus=2, ram_bytes=16 * 10**9, python_version="3.11", workers=2, runtime="podman")
    s.add_node("a", info, 0.0)
    s.standby = [m.StandbyImage("base:1")]
    s.add_job(m.JobSpec("j", "f", "fh", "3.11", func_ram=1), 0.0)
    s.add_batches("j", [m.BatchMeta(0, 0, 4)], final_count=4)
    assert s.assign(0.0) == []  # registered, but no warm container yet
    preparing = m.PoolState("standby-x", "base:1", "3.11", cpus=1, slots=2, ready=0, state="preparing", default=True)
    s.touch_node("a", 1.0, pools=[preparing])
    assert s.assign(1.0) == []
    ready = dataclasses.replace(preparing, ready=2, state="ready")
    s.touch_node("a", 2.0, pools=[ready])
    assert [lease.lease.pool for lease in s.assign(2.0)] == ["standby-x", "standby-x"]


def test_a_job_of_an_image_claims_the_node_that_parked_a_pool_of_it_and_a_parked_pool_takes_no_lease() -> None:
    s = Scheduler()
    for agent_id in ("a", "b"):
        info = m.NodeInfo(agent_id, "h", cpus=2, ram_bytes=16 * 10**9, python_version="3.11", workers=2,
                          runtime="podman")  # fmt: skip
        s.add_node(agent_id, info, 0.0)
    s.standby = [m.StandbyImage("base:1")]
    standby = m.PoolState("standby-x", "base:1", "3.11", cpus=1, slots=2, ready=2, default=True)
    parked = m.PoolState("job-alt", "alt:1", "3.11", cpus=1, slots=2, state="parked")
    s.touch_node("a", 0.0, pools=[standby])
    s.touch_node("b", 0.0, pools=[standby, parked])  # "b" sorts after "a" among equally busy nodes
    s.add_job(m.JobSpec("j", "f", "fh", "3.11", image="alt:1", func_ram=1, max_parallelism=2), 0.0)
    s.add_batches("j", [m.BatchMeta(0, 0, 4)], final_count=4)
    assert s.assign(0.0) == []  # the parked pool is for no job until its node is asked for it
    wants = s.plan_wants()
    assert wants["a"] == () and [w.image for w in wants["b"]] == ["alt:1"]

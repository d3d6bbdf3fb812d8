"""timeout=, retries=, return_exceptions= and infra retries, end to end: a real burlad, two real agents."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import burla
from burla import remote_parallel_map
from tests.cluster import BackgroundMap, Cluster, wait_for

pytestmark = pytest.mark.e2e


def beat_then_hang(item: tuple[str, int]) -> int:
    """Input 1 hangs, writing the time every 10 ms (its last beat says when it was killed); the others return."""
    folder, x = item
    if x == 1:
        Path(folder, "start").write_text(repr(time.time()))

        def beat() -> None:
            while True:
                Path(folder, "beat.tmp").write_text(repr(time.time()))
                os.replace(Path(folder, "beat.tmp"), Path(folder, "beat"))
                time.sleep(0.01)

        threading.Thread(target=beat, daemon=True).start()
        time.sleep(60)
    return x * 10


def idle_workers(cluster: Cluster) -> int:
    return sum(n["stats"].get("idle", 0) for n in cluster.status()["nodes"])


def test_a_call_past_its_timeout_is_killed_its_worker_replaced_and_the_others_go_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    limit = 1.0
    results = remote_parallel_map(
        beat_then_hang, [(str(tmp_path), x) for x in range(8)], timeout=limit, return_exceptions=True, spinner=False
    )
    error = results[1]
    assert isinstance(error, burla.CallTimeoutError) and error.input_index == 1
    assert "input #1 ran past its timeout of 1 s on node" in str(error) and error.node
    assert [r for i, r in enumerate(results) if i != 1] == [x * 10 for x in range(8) if x != 1]
    started = float((tmp_path / "start").read_text())
    last_beat = float((tmp_path / "beat").read_text())
    late = last_beat - (started + limit)
    print(f"\ntimeout kill: {late * 1000:.0f} ms after the deadline")  # the figure the issue asks for (-s)
    assert -0.05 < late < 5.0  # never early; the agent looks every 0.1 s (generous: a noisy 2-core machine)
    wait_for(lambda: idle_workers(cluster) == 4, 15, "the killed worker to be replaced")
    assert remote_parallel_map(abs, range(-4, 0), timeout=5, spinner=False) == [4, 3, 2, 1]


def plumbing_seen(x: int) -> list[str]:
    import os

    return sorted(k for k in ("BURLA_WORKER_PROGRESS", "BURLA_WORKER_SOCKET", "BURLA_WORKER_NONCE") if k in os.environ)


def test_a_call_sees_none_of_its_workers_plumbing(cluster: Cluster) -> None:
    """The progress file the agent's timeout watch reads is not the call's to find (found in review: a call
    that cut it short crashed the watch)."""
    assert remote_parallel_map(plumbing_seen, range(4), timeout=5, spinner=False) == [[]] * 4
    assert remote_parallel_map(abs, range(-4, 0), timeout=5, spinner=False) == [4, 3, 2, 1]


def test_without_return_exceptions_a_timeout_fails_the_job(cluster: Cluster, tmp_path: Path) -> None:
    with pytest.raises(burla.CallTimeoutError, match=r"input #1 ran past its timeout of 0\.5 s") as info:
        remote_parallel_map(beat_then_hang, [(str(tmp_path), x) for x in range(3)], timeout=0.5, spinner=False)
    assert info.value.input_index == 1


def test_a_generator_yields_what_finished_and_the_timeout_in_its_place(cluster: Cluster, tmp_path: Path) -> None:
    got = list(
        remote_parallel_map(
            beat_then_hang,
            [(str(tmp_path), x) for x in range(4)],
            timeout=0.5,
            generator=True,
            return_exceptions=True,
            spinner=False,
        )  # fmt: skip
    )
    assert sorted(r for r in got if isinstance(r, int)) == [0, 20, 30]
    assert [type(r) for r in got if not isinstance(r, int)] == [burla.CallTimeoutError]


def count_attempt(folder: str, x: int) -> int:
    """This call's attempt number: the lines in the input's own file, one per call of it so far."""
    path = Path(folder, str(x))
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


def fails_twice(item: tuple[str, int]) -> tuple[int, int]:
    folder, x = item
    attempt = count_attempt(folder, x)
    if attempt <= 2:
        raise ValueError(f"attempt {attempt} of input {x} fails")
    return x, attempt


def test_retries_run_a_failing_call_again_until_it_succeeds(cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    results = remote_parallel_map(
        fails_twice, [(str(tmp_path), x) for x in range(4)], retries=2, retry_delay=0.1, spinner=False
    )
    assert results == [(x, 3) for x in range(4)]
    assert time.monotonic() - started >= 0.3  # the backoff: 0.1 s, then 0.2 s


def test_out_of_retries_the_last_failure_is_raised(cluster: Cluster, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"attempt 2 of input 0 fails"):
        remote_parallel_map(fails_twice, [(str(tmp_path), 0)], retries=1, retry_delay=0, spinner=False)


def test_retry_on_retries_only_the_failures_it_names(cluster: Cluster, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"attempt 1 of input 0 fails"):
        remote_parallel_map(fails_twice, [(str(tmp_path), 0)], retries=3, retry_on=(KeyError,), spinner=False)
    assert remote_parallel_map(
        fails_twice, [(str(tmp_path), 1)], retries=3, retry_on=(LookupError, ValueError), retry_delay=0, spinner=False
    ) == [(1, 3)]


def every_tenth_raises(x: int) -> int:
    if x % 10 == 0:
        raise ValueError(f"input {x} is a multiple of ten")
    return x * 2


def test_return_exceptions_gives_every_input_its_slot(cluster: Cluster) -> None:
    results = remote_parallel_map(every_tenth_raises, range(1000), return_exceptions=True, spinner=False)
    assert len(results) == 1000
    for i, r in enumerate(results):
        if i % 10 == 0:
            assert isinstance(r, ValueError) and str(r) == f"input {i} is a multiple of ten"
            assert r.burla_input_index == i  # type: ignore[attr-defined]
            assert r.__traceback__ is not None  # the remote frames
        else:
            assert r == i * 2
    streamed = list(
        remote_parallel_map(every_tenth_raises, range(1000), return_exceptions=True, generator=True, spinner=False)
    )
    assert sorted(r for r in streamed if isinstance(r, int)) == [i * 2 for i in range(1000) if i % 10]
    assert sorted(r.burla_input_index for r in streamed if isinstance(r, ValueError)) == list(range(0, 1000, 10))


def _refuse_on_a_worker() -> int:
    import os

    if "BURLA_WORKER_SLOT" in os.environ:
        raise ImportError("this input's class is not importable on the cluster")
    return 0


class LoadsOnlyHere:
    """An input that pickles here and cannot be unpickled on a worker."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _refuse_on_a_worker, ()


def test_with_return_exceptions_inputs_that_cannot_load_fail_the_job_at_once(cluster: Cluster) -> None:
    """Each next input would fail the same way: the job fails with the reason, not one input per lease."""
    with pytest.raises(burla.errors.UnpicklingError, match="could not load the function or its inputs"):
        remote_parallel_map(abs, [LoadsOnlyHere() for _ in range(2000)], return_exceptions=True, spinner=False)


def test_bad_arguments_are_refused_before_anything_runs(cluster: Cluster) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"timeout": 0}, "timeout must be"),
        ({"timeout": float("inf")}, "timeout must be"),
        ({"timeout": "1"}, "timeout must be"),
        ({"retries": -1}, "retries must be"),
        ({"retries": 1.5}, "retries must be"),
        ({"retries": 10**6}, "retries must be"),
        ({"retries": 1, "retry_on": ValueError("x")}, "retry_on must be"),
        ({"retries": 1, "retry_on": [ValueError]}, "retry_on must be"),
        ({"retries": 1, "retry_on": (int,)}, "retry_on must be"),
        ({"retry_on": ValueError}, "pass retries="),
        ({"retries": 1, "retry_delay": -1}, "retry_delay must be"),
        ({"retries": 1, "retry_delay": float("nan")}, "retry_delay must be"),
        ({"return_exceptions": 1}, "return_exceptions must be"),
    ]
    for kwargs, match in cases:
        with pytest.raises(burla.InvalidArgumentError, match=match):
            remote_parallel_map(abs, [1], spinner=False, **kwargs)


def slow_counted(item: tuple[str, int]) -> tuple[int, int]:
    folder, x = item
    attempt = count_attempt(folder, x)
    time.sleep(0.3)
    return x, attempt


def test_an_agent_killed_mid_job_reruns_its_calls_elsewhere_and_counts_their_attempts(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    n = 40
    job = BackgroundMap(slow_counted, [(str(tmp_path), x) for x in range(n)])
    wait_for(lambda: all(node["busy"] for node in own_cluster.status()["nodes"]), 15, "both agents to run calls")
    time.sleep(0.5)
    own_cluster.kill_agent(0)  # the agent and its workers, mid-call: no report of what it ran
    seen: dict[str, Any] = {}

    def lost_recorded() -> bool:
        jobs = own_cluster.status()["jobs"]
        seen.update(jobs[0] if jobs else {})
        return any(a["kind"] == "lost" for a in seen.get("attempts", ()))

    wait_for(lost_recorded, 30, "the lost calls in the job's record")
    job.join(90)
    assert not job.is_alive() and not job.errors
    results = job.results
    assert [x for x, _ in results] == list(range(n))  # each input's result once, in order
    runs = {x: len(Path(tmp_path, str(x)).read_text().splitlines()) for x in range(n)}
    rerun = sorted(x for x, count in runs.items() if count > 1)
    assert rerun and all(runs[x] == 2 for x in rerun)  # lost once, run again once
    assert {x for x, attempt in results if attempt == 2} <= set(rerun)
    lost = [a for a in seen["attempts"] if a["kind"] == "lost"]
    assert all(a["attempt"] == 1 and a["retried"] and "stopped heartbeating" in a["message"] for a in lost)
    assert seen["retried"] >= len(lost)
    daemon = own_cluster.status()["daemon"]
    assert daemon.get("calls_lost", 0) == len(lost) and daemon.get("agents_expired", 0) == 1
    print(f"\nagent killed: {len(rerun)} inputs ran twice, {len(lost)} leases lost")

"""What happens when parts fail: workers die, agents vanish, burlad restarts, the user hits Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import burla
from burla import remote_parallel_map
from tests.cluster import BackgroundMap, Cluster, run_client, wait_for

pytestmark = pytest.mark.e2e


def exits_on_three(x: int) -> int:
    if x == 3:
        os._exit(3)
    return x


def segfaults_on_two(x: int) -> int:
    if x == 2:
        import ctypes

        ctypes.string_at(0)
    return x


def test_a_worker_that_exits_fails_its_input_and_is_replaced(cluster: Cluster) -> None:
    with pytest.raises(burla.WorkerDiedError, match=r"input #3 exited with code 3") as info:
        remote_parallel_map(exits_on_three, range(6), spinner=False)
    assert info.value.input_index == 3
    wait_for(lambda: sum(n["stats"].get("idle", 0) for n in cluster.status()["nodes"]) == 4, 10, "4 idle workers")
    assert remote_parallel_map(abs, range(-4, 0), spinner=False) == [4, 3, 2, 1]


def test_a_segfault_names_the_signal(cluster: Cluster) -> None:
    with pytest.raises(burla.WorkerDiedError, match=r"input #2 was killed by SIGSEGV \(segmentation fault\)"):
        remote_parallel_map(segfaults_on_two, range(4), spinner=False)


def sigkills_itself_on_one(x: int) -> int:
    if x == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_a_sigkill_is_not_blamed_on_memory_without_an_oom_kill(cluster: Cluster) -> None:
    with pytest.raises(burla.WorkerDiedError, match=r"input #1 was killed by SIGKILL") as info:
        remote_parallel_map(sigkills_itself_on_one, range(3), spinner=False)
    assert "out-of-memory killer killed" not in str(info.value)
    assert "not Burla's memory limit" in str(info.value)


def hog_memory(x: int) -> int:
    if x == 1:
        blocks = []
        for _ in range(40):
            blocks.append(bytearray(25 * 1024 * 1024))  # grows to 1 GB, 25 MB at a time
            time.sleep(0.01)
    return x


def test_a_call_over_func_ram_is_killed_and_named(cluster: Cluster) -> None:
    with pytest.raises(burla.MemoryLimitError) as info:
        remote_parallel_map(hog_memory, range(3), func_ram=0.3, spinner=False)
    assert info.value.input_index == 1
    assert "input #1" in str(info.value) and "func_ram of 0.3 GB" in str(info.value)


def numbered(x: int) -> tuple[int, int]:
    time.sleep(0.2)
    return x, os.getpid()


def test_an_agent_killed_mid_job_loses_nothing(own_cluster: Cluster) -> None:
    results: list[tuple[int, int]] = []
    thread = threading.Thread(target=lambda: results.extend(remote_parallel_map(numbered, range(60), spinner=False)))
    thread.start()
    wait_for(lambda: any(n["busy"] for n in own_cluster.status()["nodes"]), 10, "the job to start")
    time.sleep(0.5)
    own_cluster.kill_agent(0)  # the agent and its workers, mid-lease
    thread.join(60)
    assert not thread.is_alive()
    assert [x for x, _ in results] == list(range(60))  # every input once, in order
    assert own_cluster.status()["daemon"].get("agents_expired", 0) == 1


def test_burlad_restarted_mid_job_loses_nothing(own_cluster: Cluster) -> None:
    job = BackgroundMap(numbered, range(60))
    wait_for(lambda: any(n["busy"] for n in own_cluster.status()["nodes"]), 10, "the job to start")
    time.sleep(0.5)
    own_cluster.restart_daemon()  # SIGKILL, then a new burlad on the same state
    job.join(90)
    assert not job.is_alive() and not job.errors, job.errors
    assert [x for x, _ in job.results] == list(range(60))
    assert own_cluster.status()["daemon"].get("jobs_restored", 0) == 1


def prefetched_everywhere(cluster: Cluster) -> bool:
    """Every node holds leases queued behind its running ones (prefetched), as its last report says."""
    nodes = cluster.status()["nodes"]
    return bool(nodes) and all(n["stats"].get("queued_leases", 0) > 0 for n in nodes)


@pytest.mark.parametrize("what", ["agent killed", "burlad restarted"])
def test_prefetched_leases_are_neither_lost_nor_run_twice_when_a_part_fails(own_cluster: Cluster, what: str) -> None:
    """Leases queued on a node behind its running ones: a killed agent's run elsewhere, a restarted daemon
    keeps them with the agent that holds them; each input's result comes back once."""
    job = BackgroundMap(numbered, range(80))  # 0.2 s calls: after the probes, one call per lease, each with its next
    wait_for(lambda: prefetched_everywhere(own_cluster), 20, "prefetched leases on every node")
    if what == "agent killed":
        own_cluster.kill_agent(0)
    else:
        own_cluster.restart_daemon()
    job.join(90)
    assert not job.is_alive() and not job.errors, job.errors
    assert [x for x, _ in job.results] == list(range(80))
    counters = own_cluster.status()["daemon"]
    assert counters.get("agents_expired" if what == "agent killed" else "jobs_restored", 0) == 1


WAITING_CLIENT = """
import os, time
from burla import remote_parallel_map
def wait_for_go(x):
    while not os.path.exists(GO):
        time.sleep(0.05)
    return x
print(remote_parallel_map(wait_for_go, range(2), spinner=False), flush=True)
"""

LONG_POLLS = {"BURLA_DAEMON_POLL_TIMEOUT": "30", "BURLA_DAEMON_AGENT_TIMEOUT": "90"}


@pytest.mark.parametrize("own_cluster", [{"agents": 1, "workers": 2, "env": LONG_POLLS}], indirect=True)
def test_burlad_stops_at_once_on_sigterm_and_its_job_in_flight_resumes(own_cluster: Cluster, tmp_path: Path) -> None:
    # In flight at SIGTERM: the client's events websocket, the agent's 30 s long-poll, two leases.
    go = tmp_path / "go"
    script = tmp_path / "client.py"
    script.write_text(f"GO = {str(go)!r}\n{WAITING_CLIENT}")
    with subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, **own_cluster.client_env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as client:
        wait_for(lambda: sum(n["busy"] for n in own_cluster.status()["nodes"]) == 2, 30, "2 busy workers")
        daemon = own_cluster.daemon
        assert daemon is not None
        daemon.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = daemon.wait(10)
        took = time.monotonic() - sent
        assert code == 0, own_cluster.log_text()[-3000:]
        assert took < 3, f"burlad took {took:.2f}s to exit on SIGTERM"
        own_cluster.daemon = None
        own_cluster.start_daemon()  # the same state and address: the job was kept and goes on
        go.touch()
        out, err = client.communicate(timeout=90)
    assert client.returncode == 0, err
    assert out.strip() == "[0, 1]"
    assert own_cluster.status()["daemon"].get("jobs_restored", 0) == 1


CTRL_C_CLIENT = """
import time
from burla import remote_parallel_map
def slow(x):
    time.sleep(60)
    return x
print("starting", flush=True)
try:
    remote_parallel_map(slow, range(4), spinner=False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    raise
"""


def test_ctrl_c_cancels_the_job_on_the_cluster(own_cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CTRL_C_CLIENT)
    with subprocess.Popen(
        [sys.executable, str(script)], env={**os.environ, **own_cluster.client_env()}, stdout=subprocess.PIPE, text=True
    ) as proc:
        wait_for(lambda: sum(n["busy"] for n in own_cluster.status()["nodes"]) == 4, 20, "4 busy workers")
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        wait_for(lambda: all(n["busy"] == 0 for n in own_cluster.status()["nodes"]), 5, "the workers freed")
        freed = time.monotonic() - sent
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode != 0 and "interrupted" in out
    assert freed < 1.5
    wait_for(lambda: sum(n["stats"].get("idle", 0) for n in own_cluster.status()["nodes"]) == 4, 10, "fresh workers")
    assert own_cluster.status()["daemon"].get("jobs_cancelled", 0) == 1


def test_an_abandoned_generator_cancels_its_job(cluster: Cluster) -> None:
    results = remote_parallel_map(numbered, range(200), generator=True, spinner=False)
    next(results)
    results.close()  # type: ignore[attr-defined]
    wait_for(lambda: all(j["state"] != "running" for j in cluster.status()["jobs"]), 5, "the job cancelled")


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x


def wait_cancelled(cluster: Cluster) -> None:
    wait_for(lambda: all(j["state"] != "running" for j in cluster.status()["jobs"]), 10, "the job cancelled")
    assert cluster.status()["daemon"].get("jobs_cancelled", 0) == 1


def inputs_that_raise() -> Any:
    yield from range(5000)
    raise OSError("the input file went away")


def test_inputs_that_raise_cancel_the_job(own_cluster: Cluster) -> None:
    with pytest.raises(OSError, match="the input file went away"):
        remote_parallel_map(slow_square, inputs_that_raise(), spinner=False)
    wait_cancelled(own_cluster)


SLOW_JOB = """
from burla import remote_parallel_map
import time

def slow(x):
    time.sleep(0.05)
    return x
"""
LEAVES_A_LOOP = (
    SLOW_JOB
    + """
for result in remote_parallel_map(slow, range(5000), generator=True, spinner=False):
    raise SystemExit("the caller's loop stops with the job running")
"""
)


def test_a_process_that_exits_mid_job_cancels_it(own_cluster: Cluster, tmp_path: Path) -> None:
    result = run_client(LEAVES_A_LOOP, own_cluster.client_env(), tmp_path)
    assert "the caller's loop stops" in result.stderr
    wait_cancelled(own_cluster)


KILLED_CLIENT = (
    SLOW_JOB
    + """
remote_parallel_map(slow, range(5000), spinner=False)
"""
)


@pytest.mark.parametrize("own_cluster", [{"env": {"BURLA_DAEMON_CLIENT_GRACE": "2"}}], indirect=True)
def test_a_job_whose_client_is_gone_is_cancelled_after_the_grace(own_cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(KILLED_CLIENT)
    env = {**os.environ, **own_cluster.client_env()}
    with subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path) as proc:
        wait_for(lambda: sum(n["busy"] for n in own_cluster.status()["nodes"]) == 4, 20, "4 busy workers")
        proc.kill()  # no atexit, no cancel: only the daemon can notice
        proc.wait()
    jobs = wait_for(
        lambda: [j for j in own_cluster.status()["jobs"] if j["state"] != "running"] or None, 20, "the job cancelled"
    )
    assert jobs[0]["state"] == "cancelled"
    assert own_cluster.status()["daemon"].get("jobs_abandoned", 0) == 1

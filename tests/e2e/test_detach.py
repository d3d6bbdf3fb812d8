"""Detached jobs: `remote_parallel_map(..., detach=True)`, reattached with `burla.job(ID)` and `burla jobs ...`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import burla
from burla import remote_parallel_map
from tests.cluster import Cluster, run_client, wait_for

PYTHON = sys.executable

DETACHING_CLIENT = """
import os, time
from burla import remote_parallel_map
def slow_square(x):
    import time
    print(f"input {x}", flush=True)
    time.sleep(0.2)
    return x * x
job = remote_parallel_map(slow_square, range(40), spinner=False, detach=True)
print(job.id, flush=True)
os._exit(0)  # gone at once, no atexit: as a killed process or a sleeping laptop would
"""

REATTACHING_CLIENT = """
import json, sys
import burla
job = burla.job(sys.argv[1])
print(json.dumps({"results": job.results(), "status": job.status().state, "detached": job.status().detached}))
"""


GRACELESS = {"env": {"BURLA_DAEMON_CLIENT_GRACE": "0.5"}}  # a plain job nobody follows is cancelled at once


@pytest.mark.parametrize("own_cluster", [GRACELESS], indirect=True)
def test_a_detached_job_runs_on_without_its_caller_and_is_reattached_after_a_daemon_restart(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    """The caller exits once its inputs are uploaded; the job runs on, survives a restart of burlad, and
    another process fetches its results, exactly once each and in input order, twice over."""
    env = own_cluster.client_env()
    done = run_client(DETACHING_CLIENT, env, tmp_path)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().splitlines()[-1]
    wait_for(lambda: any(n["busy"] for n in own_cluster.status()["nodes"]), 20, "the job to run")
    own_cluster.restart_daemon()  # SIGKILL, then a new burlad on the same state: nobody follows the job
    script = tmp_path / "reattach.py"
    script.write_text(REATTACHING_CLIENT)
    for _ in range(2):  # fetched again: a detached job's results are kept until job_retention
        r = subprocess.run([PYTHON, str(script), job_id], env={**os.environ, **env}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out == {"results": [x * x for x in range(40)], "status": "done", "detached": True}
    assert own_cluster.status()["daemon"].get("jobs_restored", 0) == 1
    assert own_cluster.status()["daemon"].get("jobs_abandoned", 0) == 0


def printing_square(x: int) -> int:
    time.sleep(0.05)
    print(f"square of {x}")
    return x * x


@pytest.mark.parametrize("own_cluster", [GRACELESS], indirect=True)
def test_reattached_job_results_logs_status_and_listing(own_cluster: Cluster) -> None:
    job = remote_parallel_map(printing_square, range(30), spinner=False, detach=True)
    assert isinstance(job, burla.Job) and len(job.id) == 32
    time.sleep(1.5)  # past client_grace: nobody followed it, and it was not cancelled
    again = burla.job(job.id)
    assert sorted(again.as_completed()) == [x * x for x in range(30)]
    assert again.results() == [x * x for x in range(30)]
    status = again.status()
    assert (status.state, status.n_inputs, status.n_done, status.detached) == ("done", 30, 30, True)
    assert status.finished >= status.created > 0
    lines = "".join(again.logs())
    assert sorted(lines.splitlines()) == sorted(f"square of {x}" for x in range(30))
    assert "".join(again.logs(follow=True)) == lines  # a finished job: follow ends at once
    listed = {j["job_id"]: j for j in httpx.get(f"{own_cluster.url}/v1/jobs", headers=_admin(own_cluster),
                                                 timeout=10).json()["jobs"]}  # fmt: skip
    assert listed[job.id]["detached"] and listed[job.id]["state"] == "done"
    again.cancel()  # a finished job stays as it is
    assert again.results() == [x * x for x in range(30)]


def _admin(cluster: Cluster) -> dict[str, str]:
    return {"authorization": f"Bearer {cluster.admin_token}"}


def waits_then_returns(x: int) -> int:
    time.sleep(0.3)
    return x


def test_logs_follow_a_running_job_until_it_ends_and_cancel_stops_it(cluster: Cluster) -> None:
    job = remote_parallel_map(printing_square, range(20), spinner=False, detach=True)
    followed = "".join(job.logs(follow=True))  # returns once the job has ended
    assert sorted(followed.splitlines()) == sorted(f"square of {x}" for x in range(20))
    slow = remote_parallel_map(waits_then_returns, range(200), spinner=False, detach=True)
    wait_for(lambda: slow.status().n_done > 0, 30, "the job to run")
    slow.cancel()
    with pytest.raises(burla.JobCancelledError):
        slow.results()
    assert slow.status().state == "cancelled"


def every_fifth_raises(x: int) -> int:
    if x % 5 == 0:
        raise ValueError(f"input {x} is a multiple of five")
    return x


def test_a_detached_job_with_return_exceptions_has_each_failure_in_its_slot(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    job = remote_parallel_map(every_fifth_raises, range(40), spinner=False, detach=True, return_exceptions=True,
                              max_parallelism=2)  # fmt: skip
    results = burla.job(job.id).results()
    assert [r for i, r in enumerate(results) if i % 5] == [x for x in range(40) if x % 5]
    failed = [r for i, r in enumerate(results) if i % 5 == 0]
    assert all(isinstance(e, ValueError) for e in failed), failed
    assert [str(e) for e in failed] == [f"input {x} is a multiple of five" for x in range(0, 40, 5)]
    assert [e.burla_input_index for e in failed] == list(range(0, 40, 5))
    completed = list(job.as_completed())
    assert len(completed) == 40 and sum(isinstance(r, ValueError) for r in completed) == 8
    status = job.status()
    assert (status.state, status.n_done, status.failed) == ("done", 40, 8)
    from burla import cli

    capsys.readouterr()
    assert cli.main(["jobs", "results", job.id]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[1:5] == [1, 2, 3, 4]
    assert lines[5] == {"error": {"type": "ValueError", "message": "input 5 is a multiple of five", "input_index": 5}}


def test_another_users_job_and_unknown_ids_are_not_found(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    job = remote_parallel_map(printing_square, range(3), spinner=False, detach=True)
    r = httpx.post(f"{cluster.url}/v1/users", json={"name": "mallory"}, headers=_admin(cluster), timeout=10)
    assert r.status_code == 200, r.text
    monkeypatch.setenv("BURLA_API_KEY", r.json()["api_key"])
    with pytest.raises(burla.JobNotFoundError):
        burla.job(job.id)
    monkeypatch.setenv("BURLA_API_KEY", cluster.admin_token)
    with pytest.raises(burla.JobNotFoundError):
        burla.job("0" * 32)
    with pytest.raises(burla.InvalidArgumentError, match="job_id"):
        burla.job("../etc")
    assert burla.job(job.id).results() == [0, 1, 4]


def test_bad_detach_arguments_say_what_to_do(cluster: Cluster) -> None:
    with pytest.raises(burla.InvalidArgumentError, match="detach must be True or False"):
        remote_parallel_map(printing_square, [1], detach="yes")  # type: ignore[arg-type]
    with pytest.raises(burla.InvalidArgumentError, match="not both"):
        remote_parallel_map(printing_square, [1], detach=True, generator=True)
    with pytest.raises(burla.InvalidArgumentError, match="at least one input"):
        remote_parallel_map(printing_square, [], detach=True)


def test_a_refused_detached_create_raises_its_reason_and_nothing_else(
    cluster: Cluster, capfd: pytest.CaptureFixture[str]
) -> None:
    """Found in review: the cancel sent after a refused create got a 404 and printed a traceback as well."""
    with pytest.raises(burla.BurlaError) as refused:
        remote_parallel_map(printing_square, [1, 2], detach=True, func_cpu=512, spinner=False)
    assert "512" in str(refused.value)
    time.sleep(0.2)  # the portal's task has ended
    assert "Traceback" not in capfd.readouterr().err


INTERRUPTED_UPLOAD = """
import os, signal, threading, time
from burla import remote_parallel_map
def identity(x):
    return x
def inputs():
    for i in range(10**9):
        if i == 50_000:
            print("uploading", flush=True)
        yield b"x" * 100
try:
    remote_parallel_map(identity, inputs(), spinner=False, detach=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_while_a_detached_job_uploads_cancels_it(cluster: Cluster, tmp_path: Path) -> None:
    script = tmp_path / "upload.py"
    script.write_text(INTERRUPTED_UPLOAD)
    proc = subprocess.Popen([PYTHON, str(script)], env={**os.environ, **cluster.client_env()}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "uploading"

    def running_job() -> str | None:
        jobs = [j for j in cluster.status()["jobs"] if j["function_name"] == "identity" and j["state"] == "running"]
        return jobs[0]["job_id"] if jobs else None

    job_id = wait_for(running_job, 30, "the job to be created")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert "interrupted" in out, err

    def state() -> str:
        return str(httpx.get(f"{cluster.url}/v1/jobs/{job_id}", headers=_admin(cluster), timeout=10).json()["state"])

    wait_for(lambda: state() == "cancelled", 10, "the job to be cancelled")


def test_burla_jobs_commands(cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from burla import cli

    job = remote_parallel_map(printing_square, range(5), spinner=False, detach=True)
    job.results()
    capsys.readouterr()
    assert cli.main(["jobs", "list"]) == 0
    assert job.id[:8] in capsys.readouterr().out
    assert cli.main(["jobs", "show", job.id[:10]]) == 0  # a unique prefix will do
    shown = capsys.readouterr().out
    assert job.id in shown and "done" in shown and "detached" in shown
    assert cli.main(["jobs", "results", job.id]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [0, 1, 4, 9, 16]
    assert cli.main(["jobs", "results", job.id, "--pickle", str(tmp_path / "r.pkl")]) == 0
    assert pickle.loads((tmp_path / "r.pkl").read_bytes()) == [0, 1, 4, 9, 16]
    assert cli.main(["jobs", "logs", job.id]) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == [f"square of {x}" for x in range(5)]
    assert cli.main(["jobs", "cancel", job.id]) == 0
    assert cli.main(["jobs", "show", "f" * 32]) == 1
    assert "no job" in capsys.readouterr().err


INTERRUPTED_READ = """
import sys
import burla
job = burla.job(sys.argv[1])
print("reading", flush=True)
try:
    job.results()
except KeyboardInterrupt:
    print("stopped reading", job.status().state, flush=True)
"""


def test_ctrl_c_in_a_reattached_read_stops_following_and_the_job_runs_on(cluster: Cluster, tmp_path: Path) -> None:
    job = remote_parallel_map(waits_then_returns, range(40), spinner=False, detach=True)
    script = tmp_path / "read.py"
    script.write_text(INTERRUPTED_READ)
    proc = subprocess.Popen([PYTHON, str(script), job.id], env={**os.environ, **cluster.client_env()}, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "reading"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert out.strip() == "stopped reading running", err
    assert job.results() == list(range(40))


def test_a_reattached_read_rides_out_a_daemon_restart(own_cluster: Cluster) -> None:
    """Read while the job runs, the daemon restarts mid-read: each result once, in order."""
    import threading

    job = remote_parallel_map(waits_then_returns, range(60), spinner=False, detach=True)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(burla.job(job.id).results()))
    reader.start()
    wait_for(lambda: job.status().n_done >= 8, 30, "some results")
    own_cluster.restart_daemon()
    reader.join(120)
    assert not reader.is_alive()
    assert got == [list(range(60))]


def _rss_mb(pid: int) -> int:
    """The process's peak resident memory, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def hundred_bytes(x: int) -> bytes:
    return str(x).encode().rjust(100, b"x")  # each its own (a constant would be pickled once per lease)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_a_big_detached_jobs_results_stay_on_the_daemons_disk(own_cluster: Cluster) -> None:
    """Two million results of 100 bytes (200 MB): the daemon's memory holds none of them at once, neither
    while the job runs nor while a reattached reader streams them all in input order."""
    assert own_cluster.daemon is not None
    pid = own_cluster.daemon.pid
    job = remote_parallel_map(hundred_bytes, range(2_000_000), spinner=False, detach=True)
    wait_for(lambda: job.status().state == "done", 300, "the job to finish", interval=0.5)
    results = burla.job(job.id).results()
    assert len(results) == 2_000_000 and results[7] == b"x" * 99 + b"7" and results[-1] == hundred_bytes(1_999_999)
    del results
    on_disk = sum(f.stat().st_size for f in (own_cluster.root / "daemon").rglob("*") if f.is_file())
    assert on_disk > 200e6
    assert _rss_mb(pid) < 160, f"burlad peaked at {_rss_mb(pid)} MB for 200 MB of results"

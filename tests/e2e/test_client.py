"""What the user sees of the client: the spinner, bounded memory, `burla login`."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster, run_client

pytestmark = pytest.mark.e2e


def run_in_terminal(script: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> str:
    """Run a client script with its stdout on a pseudo-terminal, as in a user's shell."""
    path = cwd / "tty_client.py"
    path.write_text(script)
    parent, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(path)], stdin=child, stdout=child, stderr=child, env={**os.environ, **env}, cwd=cwd
    )
    os.close(child)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([parent], [], [], 0.1)
            if ready:
                try:
                    data = os.read(parent, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(10) == 0, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(parent)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return b"".join(chunks).decode(errors="replace")


SPINNER_CLIENT = """
import time
from burla import remote_parallel_map
def nap(x):
    time.sleep(0.4)
    print(f"line from {{x}}")
    return x
results = remote_parallel_map(nap, range(12), spinner={spinner})
print("RESULTS", results == list(range(12)))
"""


def test_the_spinner_shows_progress_on_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    out = run_in_terminal(SPINNER_CLIENT.format(spinner=True), cluster.client_env(), tmp_path)
    assert "nap: " in out and "/12 done" in out  # the live status line
    assert "running on" in out
    assert all(f"line from {x}" in out for x in range(12))  # prints still come through, above it
    assert "RESULTS True" in out


def test_no_spinner_when_asked_or_off_a_terminal(cluster: Cluster, tmp_path: Path) -> None:
    out = run_in_terminal(SPINNER_CLIENT.format(spinner=False), cluster.client_env(), tmp_path)
    assert "/12 done" not in out and "RESULTS True" in out
    piped = run_client(SPINNER_CLIENT.format(spinner=True), cluster.client_env(), tmp_path)
    assert piped.returncode == 0 and "/12 done" not in piped.stdout + piped.stderr
    assert "\x1b[" not in piped.stdout  # no escape codes into a pipe


MEMORY_CLIENT = """
import resource
from burla import remote_parallel_map
def inputs():
    for i in range(200_000):
        yield bytes([i % 256]) * 1000  # 200 MB of inputs in all
def kb(_):
    return None
remote_parallel_map(kb, range(4), spinner=False)  # warm up the client
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = remote_parallel_map(kb, inputs(), spinner=False)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("COUNT", len(results), "GROWN_MB", grown // 1024)
"""


def test_inputs_from_a_generator_never_all_sit_in_client_memory(cluster: Cluster, tmp_path: Path) -> None:
    result = run_client(MEMORY_CLIENT, cluster.client_env(), tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[words.index("COUNT") + 1] == "200000"
    assert int(words[words.index("GROWN_MB") + 1]) < 80  # 200 MB went through


def test_burla_login_remembers_the_cluster(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BURLA_CLUSTER_URL")
    monkeypatch.delenv("BURLA_API_KEY")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    bad = run_client(
        f"import sys\nfrom burla.cli import main\nsys.exit(main(['login', '{cluster.url}', '--api-key', 'wrong']))\n",
        env,
        tmp_path,
    )
    assert bad.returncode == 1 and "refused the key (401)" in bad.stderr
    good = run_client(
        f"import sys\nfrom burla.cli import main\n"
        f"sys.exit(main(['login', '{cluster.url}', '--api-key', '{cluster.admin_token}']))\n",
        env,
        tmp_path,
    )
    assert good.returncode == 0 and "Logged in" in good.stdout, good.stderr
    saved = tmp_path / "config" / "burla" / "credentials.json"
    assert oct(saved.stat().st_mode & 0o777) == "0o600"
    use = run_client(
        "from burla import remote_parallel_map\nprint(remote_parallel_map(abs, [-7], spinner=False))\n", env, tmp_path
    )
    assert use.returncode == 0 and use.stdout.strip() == "[7]", use.stderr


def test_a_caller_that_exits_right_after_its_map_leaves_no_job_behind(cluster: Cluster, tmp_path: Path) -> None:
    """The last job's ack waits for a next job to ride on; a process that exits first still sends it, so the
    daemon forgets the finished job now, not after daemon.job_retention."""
    from tests.cluster import wait_for

    def job_ids() -> set[str]:
        return {j["job_id"] for j in cluster.status()["jobs"]}

    before = job_ids()  # other tests' detached jobs are kept for daemon.job_retention: not this one's
    done = run_client("from burla import remote_parallel_map\nprint(remote_parallel_map(abs, [-1, -2], spinner=False))",
                      cluster.client_env(), tmp_path)  # fmt: skip
    assert done.stdout.strip() == "[1, 2]", done.stderr
    wait_for(lambda: job_ids() <= before, 10, "the finished job to be forgotten")

"""The embedded default: a local cluster started on demand, shared, stopped when idle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from burla import _local, remote_parallel_map
from burla.common.local import local_cluster_home
from tests.cluster import run_client, wait_for

pytestmark = pytest.mark.e2e

CLIENT = """
from burla import remote_parallel_map
def square(x):
    print("squaring", x)
    return x * x
assert remote_parallel_map(square, range(10), spinner=False) == [x * x for x in range(10)]
print("ok")
"""


@pytest.fixture
def local_home() -> Iterator[Path]:
    yield local_cluster_home()
    _local.stop()


def discovery(home: Path) -> dict[str, object]:
    return dict(json.loads((home / "daemon.json").read_text()))


def test_the_first_call_starts_a_local_cluster_and_later_ones_reuse_it(local_home: Path, tmp_path: Path) -> None:
    assert _local.discover() is None
    assert remote_parallel_map(abs, [-1, -2, -3], spinner=False) == [1, 2, 3]
    first = discovery(local_home)
    result = run_client(CLIENT, {}, tmp_path)  # another process of the same user
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("squaring") == 10 and result.stdout.strip().endswith("ok")
    assert discovery(local_home)["pid"] == first["pid"]


def test_concurrent_first_calls_start_one_cluster(local_home: Path, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    procs = [
        subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip().endswith("ok")
    log = (local_home / "daemon.log").read_text()
    assert log.count("serving on") == 1


def test_the_local_cluster_stops_when_idle_and_starts_again(local_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURLA_EMBEDDED_IDLE_TIMEOUT", "1.5")
    assert remote_parallel_map(abs, [-5], spinner=False) == [5]
    pid = int(discovery(local_home)["pid"])  # type: ignore[arg-type]
    wait_for(lambda: _local.discover() is None, 20, "the idle local cluster to stop")
    wait_for(lambda: not _local._alive(pid), 10, "the idle daemon process to exit")
    assert remote_parallel_map(abs, [-6], spinner=False) == [6]  # a new one, found by the same client
    assert int(discovery(local_home)["pid"]) != pid  # type: ignore[arg-type]


STARTER = """
import sys
from burla import _local, remote_parallel_map
assert remote_parallel_map(abs, [-1], spinner=False) == [1]
print("started", flush=True)
sys.stdin.readline()  # the test stops the cluster meanwhile
(daemon,) = _local._STARTED.values()
print("exit code", daemon.wait(10), flush=True)
"""


def stop_with_cli() -> float:
    """`burla local stop` in a process of its own: the seconds it took."""
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "burla.cli", "local", "stop"], capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "local cluster stopped" and not result.stderr
    return took


def assert_stopped_cleanly(home: Path, since: int = 0) -> None:
    """The daemon stopped on SIGTERM, after its agent stopped on SIGTERM of itself (exit code 0).

    `since`: where the daemon's log stood before this daemon started.
    """
    log = (home / "daemon.log").read_text()[since:]
    assert "stopping on SIGTERM" in log, log[-3000:]
    assert "node agent" in log and "stopped: exit code 0" in log, log[-3000:]
    assert "killing it" not in log
    assert log.rstrip().endswith("local cluster stopped"), log[-3000:]


@pytest.mark.parametrize("starter", ["this process", "another process, still running", "a process that exited"])
def test_burla_local_stop_returns_at_once_and_stops_the_cluster_cleanly(
    local_home: Path, tmp_path: Path, starter: str
) -> None:
    # The daemon is a child of the process that started it: before, that process kept it as a zombie,
    # which answers kill(pid, 0), and `burla local stop` waited its full 10 s before SIGKILL.
    alive = None
    if starter == "this process":
        assert remote_parallel_map(abs, [-1], spinner=False) == [1]
    elif starter == "another process, still running":
        (tmp_path / "starter.py").write_text(STARTER)
        alive = subprocess.Popen(
            [sys.executable, str(tmp_path / "starter.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert alive.stdout is not None and alive.stdin is not None
        assert alive.stdout.readline().strip() == "started"
    else:
        subprocess.run([sys.executable, "-m", "burla.cli", "local", "start"], check=True, timeout=60)
    pid = int(discovery(local_home)["pid"])  # type: ignore[arg-type]

    took = stop_with_cli()

    assert took < 5, f"`burla local stop` took {took:.1f}s"
    assert _local.discover() is None
    assert_stopped_cleanly(local_home)
    if starter == "this process":
        assert _local._STARTED[pid].wait(5) == 0  # exited of itself, not killed
    if alive is not None:
        out, _ = alive.communicate("\n", timeout=30)
        assert out.strip() == "exit code 0"


def test_a_stop_as_soon_as_the_cluster_serves_is_clean_too(local_home: Path) -> None:
    # Before, the daemon and its agent listened for SIGTERM only once started: a stop just after the start
    # killed the agent mid-start (exit code -15), or the daemon itself, leaving its agent behind.
    for _ in range(3):
        log = local_home / "daemon.log"
        since = len(log.read_text()) if log.exists() else 0
        _local.ensure_started()
        assert _local.stop() == "stopped"
        assert_stopped_cleanly(local_home, since)


def test_the_wheel_installs_only_the_burla_package(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("burla-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"burla"}
    for part in ("burla/daemon/cli.py", "burla/node_agent/worker_shim.py", "burla/schemas/envelope.py"):
        assert part in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "burla = burla.cli:main" in text and "burlad = burla.daemon.cli:main" in text


def test_burla_local_start_with_nodes_runs_the_cluster_life_on_this_machine(local_home: Path) -> None:
    import httpx

    started = subprocess.run(
        [sys.executable, "-m", "burla.cli", "local", "start", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr
    info = discovery(local_home)
    headers = {"authorization": f"Bearer {info['admin_token']}"}

    def nodes() -> list[dict[str, object]]:
        r = httpx.get(f"{info['url']}/v1/cluster/nodes", headers=headers, timeout=10)
        r.raise_for_status()
        return list(r.json()["nodes"])

    wait_for(lambda: sorted(n["state"] for n in nodes()) == ["READY", "READY"], 90, "2 local nodes READY")
    pids = [int(p.read_text()) for p in (local_home / "daemon" / "nodes").glob("*/pid")]
    assert len(pids) == 2
    assert remote_parallel_map(abs, [-1, -2, -3], spinner=False) == [1, 2, 3]
    again = subprocess.run(
        [sys.executable, "-m", "burla.cli", "local", "start", "--nodes", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "burla local stop" in again.stderr  # says how to change it
    assert _local.stop()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(lambda: all(gone(p) for p in pids), 30, "the local nodes ended with their cluster")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def _listening_inode(port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def test_the_agent_forked_from_the_daemon_holds_none_of_its_descriptors_and_is_replaced_when_it_dies(
    local_home: Path,
) -> None:
    assert remote_parallel_map(abs, [-1, -2], spinner=False) == [1, 2]
    info = discovery(local_home)
    daemon = int(str(info["pid"]))
    (agent,) = _children(daemon)
    assert os.getsid(agent) == agent  # a session of its own, as `start_new_session` gives
    held = {os.readlink(f"/proc/{agent}/fd/{fd}") for fd in os.listdir(f"/proc/{agent}/fd")}
    assert not [h for h in held if h.endswith(("burlad.lock", "start.lock"))], held
    socket_of_daemon = f"socket:[{_listening_inode(int(str(info['url']).rsplit(':', 1)[1]))}]"
    assert socket_of_daemon not in held and str(local_home / "agent.log") in held
    assert "registered with" in (local_home / "agent.log").read_text()

    os.kill(agent, 9)
    wait_for(lambda: [pid for pid in _children(daemon) if pid != agent], 30, "another agent")
    assert remote_parallel_map(abs, [-3], spinner=False) == [3]  # on the agent started in its place
    assert discovery(local_home)["pid"] == info["pid"]

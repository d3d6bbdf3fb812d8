"""What a call can read of the agent's secrets: with `agent.worker_user`, nothing; without, no token in its env.

A real burlad and a real agent (as root) on this host; each call tries the daemon's tokens.json and
database, the agent's state dir, its /proc environ and cmdline, and looks for a token in os.environ.
Needs root and a spare user (BURLA_WORKER_USER, default burla-worker; .ci/run makes it); skipped
without them, unless BURLA_REQUIRE_WORKER_USER=1 (as in CI).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import burla
from burla import remote_parallel_map
from tests.cluster import PYTHON, Cluster, as_user, skip_or_fail
from tests.e2e.test_failures import hog_memory

pytestmark = pytest.mark.e2e

WORKER_USER = os.environ.get("BURLA_WORKER_USER", "burla-worker")
AGENT_USER = os.environ.get("BURLA_PODMAN_USER", "burla")  # a non-root user to run an agent as


def worker_user_missing() -> str | None:
    if os.geteuid() != 0:
        return "workers run as another user only under an agent that runs as root: run these tests as root"
    try:
        pwd.getpwnam(WORKER_USER)
    except KeyError:
        return f"no user {WORKER_USER} for workers (useradd --system --no-create-home {WORKER_USER}, as .ci/run does)"
    return None


def require_worker_user() -> None:
    skip_or_fail(worker_user_missing(), "BURLA_REQUIRE_WORKER_USER")


def snoop(targets: dict[str, str]) -> dict[str, Any]:
    """Run on a worker: who it is, its environment, and what it could read of each target path."""
    read: dict[str, str] = {}
    for name, path in targets.items():
        try:
            if os.path.isdir(path):
                read[name] = "listed: " + ",".join(sorted(os.listdir(path)))
            else:
                with open(path, "rb") as f:
                    read[name] = "read: " + f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError as e:
            read[name] = type(e).__name__
    with open("scratch.txt", "w") as f:  # its working dir is its own
        f.write("a call's scratch file")
    return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "env": dict(os.environ), "read": read,
            "cwd": os.getcwd()}  # fmt: skip


def targets(cluster: Cluster, agent_state: Path) -> dict[str, str]:
    assert cluster.daemon is not None
    agent_pid = cluster.agents[0].pid  # no prefix: the agent process itself
    daemon = cluster.root / "daemon"
    return {
        "tokens.json": str(daemon / "tokens.json"),
        "burla.db": str(daemon / "burla.db"),
        "daemon state dir": str(daemon),
        "agent state dir": str(agent_state),
        "agent node_id": str(agent_state / "node_id"),
        "agent environ": f"/proc/{agent_pid}/environ",
        "daemon environ": f"/proc/{cluster.daemon.pid}/environ",
        "agent cmdline": f"/proc/{agent_pid}/cmdline",
        "daemon cmdline": f"/proc/{cluster.daemon.pid}/cmdline",
    }


def tokens_in(cluster: Cluster, text: str) -> list[str]:
    return [name for name, token in (("admin", cluster.admin_token), ("node", cluster.node_token)) if token in text]


def start(root: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Cluster:
    """A daemon, then one agent whose environment holds the tokens where users keep them: its own node
    token, a client's API key, and the node token under a name of the operator's (caught by its value)."""
    cluster = Cluster(root, agents=0)
    cluster.env.update({**cluster.client_env(), "MY_NODE_TOKEN": cluster.node_token, **env})
    cluster.start_agent(0)
    cluster.wait_nodes(1)
    cluster.use(monkeypatch)
    return cluster


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A cluster root other users may pass through (pytest's tmp dirs are 0700): only the daemon's and the
    agent's own modes stand between a worker and their files."""
    root = Path(tempfile.mkdtemp(prefix="burla-worker-user-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_call_as_the_worker_user_reads_none_of_the_agents_secrets(
    open_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_worker_user()
    user = pwd.getpwnam(WORKER_USER)
    cluster = start(open_root, monkeypatch, {"BURLA_AGENT_WORKER_USER": WORKER_USER})
    try:
        results = remote_parallel_map(snoop, [targets(cluster, open_root / "agent0")] * 2, spinner=False)
        # the agent still watches and stops workers of another user: a call over its func_ram is killed
        with pytest.raises(burla.MemoryLimitError, match="input #1"):
            remote_parallel_map(hog_memory, range(3), func_ram=0.3, spinner=False)
        assert remote_parallel_map(abs, range(-4, 0), spinner=False) == [4, 3, 2, 1]
        log = cluster.log_text()
    finally:
        cluster.stop()
    for seen in results:
        assert (seen["uid"], seen["gid"]) == (user.pw_uid, user.pw_gid)
        assert set(seen["groups"]) <= {user.pw_gid}, "supplementary groups (root's) kept"
        home = user.pw_dir if os.path.isdir(user.pw_dir) else seen["cwd"]  # no home (useradd -M): its working dir
        assert seen["env"]["HOME"] == home and seen["env"]["USER"] == WORKER_USER
        env_text = "\n".join(f"{k}={v}" for k, v in seen["env"].items())
        assert not tokens_in(cluster, env_text), "a token in the worker's environment"
        assert not [k for k in seen["env"] if "TOKEN" in k.upper() or "API_KEY" in k.upper()]
        read = seen["read"]
        for name in ("tokens.json", "burla.db", "daemon state dir", "agent state dir", "agent node_id",
                     "agent environ", "daemon environ"):  # fmt: skip
            assert read[name] == "PermissionError", f"a call read {name}: {read[name][:200]}"
        for name in ("agent cmdline", "daemon cmdline"):  # everyone's to read: it must hold no token
            assert read[name].startswith("read: ") and not tokens_in(cluster, read[name]), read[name]
    assert "Traceback" not in log


def test_without_a_worker_user_a_call_still_sees_no_token(open_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = start(open_root, monkeypatch, {})
    try:
        (seen,) = remote_parallel_map(snoop, [targets(cluster, open_root / "agent0")], spinner=False)
    finally:
        cluster.stop()
    assert seen["uid"] == os.getuid()
    env_text = "\n".join(f"{k}={v}" for k, v in seen["env"].items())
    assert not tokens_in(cluster, env_text), "a token in the worker's environment"
    assert not [k for k in seen["env"] if k.startswith("BURLA_") and not k.startswith(("BURLA_WORKER_", "BURLA_LOG_"))]
    assert not tokens_in(cluster, seen["read"]["agent cmdline"])
    # the agent's own user reads what it reads (the paths above are the right ones): worker_user is the fence
    assert tokens_in(cluster, seen["read"]["tokens.json"]) == ["admin", "node"]
    assert tokens_in(cluster, seen["read"]["agent environ"]) == ["admin", "node"]


def agent_refuses(env: dict[str, str], prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), PYTHON, "-m", "burla.daemon", "agent", "http://127.0.0.1:9", "--workers", "1"],
        env={**os.environ, "BURLA_AGENT_TOKEN": "burla_node_x", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_worker_user_the_agent_cannot_be_is_a_config_error(tmp_path: Path) -> None:
    result = agent_refuses({"BURLA_AGENT_WORKER_USER": "no-such-user-here", "BURLA_AGENT_STATE_DIR": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "agent.worker_user" in result.stderr and "no user 'no-such-user-here'" in result.stderr
    assert "Traceback" not in result.stderr
    require_worker_user()
    try:
        home = pwd.getpwnam(AGENT_USER).pw_dir
    except KeyError:
        pytest.skip(f"no user {AGENT_USER} to run an agent as (scripts/setup-podman makes it)")
    state = Path(tempfile.mkdtemp(prefix="burla-agent-"))
    try:
        shutil.chown(state, AGENT_USER, AGENT_USER)
        result = agent_refuses(
            {"BURLA_AGENT_WORKER_USER": WORKER_USER, "BURLA_AGENT_STATE_DIR": str(state)},
            prefix=as_user(AGENT_USER, home, Path("/tmp")),
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)
    assert result.returncode == 2, result.stderr
    assert "agent.worker_user" in result.stderr and "runs as root" in result.stderr and "CAP_SETUID" in result.stderr


def test_a_state_dir_the_worker_user_cannot_reach_stops_the_agent_saying_so(tmp_path: Path) -> None:
    require_worker_user()
    state = tmp_path / "agent"  # below pytest's 0700 tmp dirs: the worker user cannot pass
    result = agent_refuses({"BURLA_AGENT_WORKER_USER": WORKER_USER, "BURLA_AGENT_STATE_DIR": str(state)})
    assert result.returncode == 1, result.stderr
    assert f"workers cannot run as agent.worker_user '{WORKER_USER}'" in result.stderr
    assert str(state / "envs") in result.stderr and "Traceback" not in result.stderr

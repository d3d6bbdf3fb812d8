"""A real cluster for end-to-end tests: `burlad serve` and agents as processes."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """`burlad serve` plus node agents, each a real process, on 127.0.0.1."""

    def __init__(
        self,
        root: Path,
        agents: int = 2,
        workers: int = 2,
        env: dict[str, str] | None = None,
        podman_user: str | None = None,
        agent_args: list[str] | None = None,
        agent_user: str | None = None,
        port: int | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """`podman_user`: agents run the Podman runtime as that user; `agent_user`: they run as that user.

        `tls`: (certificate, key, CA) files: burlad serves HTTPS, agents get `--ca-file CA`, and the
        client `BURLA_CA_FILE`."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.podman = podman_user is not None
        self.podman_user = podman_user or agent_user
        self.agent_args = agent_args or []
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.ca_file = str(tls[2]) if tls else ""
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.ca_file) if tls else True
        if tls:
            self.agent_args = [*self.agent_args, "--ca-file", self.ca_file]
        self.workers = workers
        self.env = {
            **os.environ,
            "BURLA_DAEMON_POLL_TIMEOUT": "1",
            "BURLA_DAEMON_AGENT_TIMEOUT": "3",
            "BURLA_DAEMON_BAD_TOKEN_BURST": "1000000",  # tests send bad tokens on purpose; one tests the slow-down
            **({"BURLA_DAEMON_TLS_CERT": str(tls[0]), "BURLA_DAEMON_TLS_KEY": str(tls[1])} if tls else {}),
            **(env or {}),
        }
        self.daemon: subprocess.Popen[bytes] | None = None
        self.agents: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []
        self.cleanup: list[Path] = []
        self.agent_dirs: dict[int, Path] = {}
        try:
            self.start_daemon()
            for i in range(agents):
                self.start_agent(i)
            if agents:
                self.wait_nodes(agents)
        except BaseException:
            self.stop()  # a half-started cluster must not outlive its test
            raise

    # ---- processes -------------------------------------------------------------------

    def _spawn(
        self, name: str, args: list[str], extra_env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with open(log, "ab") as f:
            return subprocess.Popen(
                [*(prefix or []), PYTHON, "-m", "burla.daemon", *args],
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**self.env, **(extra_env or {})},
                start_new_session=True,
            )

    def start_daemon(self) -> None:
        self.daemon = self._spawn(
            "daemon",
            ["serve", "--port", str(self.port), "--state-dir", str(self.root / "daemon"), "--log-level", "INFO"],
        )
        wait_for(self._healthy, 30, "burlad to serve")
        tokens = json.loads((self.root / "daemon" / "tokens.json").read_text())
        self.admin_token, self.node_token = tokens["admin"], tokens["node"]

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=1, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def start_agent(self, i: int, workers: int | None = None, extra: list[str] | None = None) -> None:
        args = ["agent", self.url, "--workers", str(workers or self.workers),
                "--log-level", "INFO", *self.agent_args, *(extra or [])]  # fmt: skip
        token = {"BURLA_AGENT_TOKEN": self.node_token}  # as users are told to: never in argv
        if self.podman_user is None:
            self.agents[i] = self._spawn(f"agent{i}", [*args, "--state-dir", str(self.root / f"agent{i}")], token)
            return
        # An agent of another user runs in directories that user owns (kept across restarts: its cache).
        state = self.agent_dirs.get(i)
        if state is None:
            state = self.agent_dirs[i] = Path(tempfile.mkdtemp(prefix=f"burla-agent{i}-"))
            shutil.chown(state, self.podman_user, self.podman_user)
            self.cleanup.append(state)
        # every rootless Podman process of a user must share its runtime dir (scripts/setup-podman makes it)
        runtime_dir = Path(f"/tmp/burla-podman-{self.podman_user}")
        home = pwd.getpwnam(self.podman_user).pw_dir
        self.agents[i] = self._spawn(
            f"agent{i}",
            [*args, "--runtime", "podman" if self.podman else "process", "--state-dir", str(state)],
            token,
            prefix=as_user(self.podman_user, home, runtime_dir),
        )

    def kill_agent(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.agents.pop(i)
        children = _children(proc.pid) if self.podman_user else []
        if children and sig != signal.SIGKILL:  # runuser would SIGKILL its child: signal the agent itself
            for pid in children:
                os.kill(pid, sig)
        else:
            os.killpg(proc.pid, sig)  # the agent and its workers, as a machine dying would
        proc.wait(30)

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        self.daemon.wait(10)
        self.daemon = None

    def restart_daemon(self) -> None:
        self.kill_daemon()
        self.start_daemon()

    def stop(self) -> None:
        for i in list(self.agents):
            proc = self.agents.pop(i)
            if proc.poll() is None:
                # runuser SIGKILLs its child soon after a SIGTERM: stop the agent itself so it cleans up
                children = _children(proc.pid) if self.podman_user else []
                for pid in children or [proc.pid]:
                    os.kill(pid, signal.SIGTERM)
                if not children:
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(10)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    # ---- views -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        r = httpx.get(
            f"{self.url}/v1/cluster",
            headers={"authorization": f"Bearer {self.admin_token}"},
            timeout=10,
            verify=self.verify,
        )
        r.raise_for_status()
        return dict(r.json())

    def wait_nodes(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            dead = [i for i, proc in self.agents.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"agent {dead[0]} exited:\n{self.log_text()[-3000:]}")
            nodes = self.status()["nodes"]
            full = [node for node in nodes if node["workers"] >= 1 and node["stats"].get("idle", 0) >= 1]
            return nodes if len(nodes) == n and len(full) == n else None

        return wait_for(ready, timeout, f"{n} ready nodes")

    def client_env(self) -> dict[str, str]:
        env = {"BURLA_CLUSTER_URL": self.url, "BURLA_API_KEY": self.admin_token}
        return {**env, "BURLA_CA_FILE": self.ca_file} if self.ca_file else env

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Choose this cluster for the test's client, by the environment, as a user would."""
        for key, value in self.client_env().items():
            monkeypatch.setenv(key, value)

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs if p.exists())


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def skip_or_fail(missing: str | None, required_by: str) -> None:
    """Skip the calling test for what is `missing`; fail it instead where `$required_by` is 1 (as in CI)."""
    if missing:
        if os.environ.get(required_by) == "1":
            pytest.fail(f"{required_by}=1 but {missing}")
        pytest.skip(missing)


def as_user(user: str, home: str, runtime_dir: Path) -> list[str]:
    """A command prefix running as `user` with its own Podman configuration (not the tests' XDG dirs)."""
    return ["runuser", "-u", user, "--", "env", "-u", "XDG_CONFIG_HOME", "-u", "XDG_DATA_HOME",
            f"HOME={home}", f"XDG_RUNTIME_DIR={runtime_dir}"]  # fmt: skip


def run_client(script: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run `script` as a user would, in its own Python process."""
    path = cwd / "client_script.py"
    path.write_text(script)
    return subprocess.run(
        [PYTHON, str(path)], env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


class BackgroundMap:
    """`remote_parallel_map` in a thread of its own, as a caller blocked in it while the test breaks things."""

    def __init__(self, function_: Any, inputs: Any, **kwargs: Any) -> None:
        from burla import remote_parallel_map

        self.results: list[Any] = []
        self.errors: list[BaseException] = []

        def run() -> None:
            try:
                self.results.extend(remote_parallel_map(function_, inputs, spinner=False, **kwargs))
            except BaseException as e:  # noqa: BLE001 - the test asserts on it
                self.errors.append(e)

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

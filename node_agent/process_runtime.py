"""Workers as plain processes on the agent's host (the embedded default).

They run as the agent's own user, or as `agent.worker_user` (see `worker_user`):
then a call cannot read the agent's tokens or state files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from . import worker_user
from .environments import INSTALL_HOME
from .pools import PoolSpec
from .runtime import LIST_DISTRIBUTIONS, Runtime, WorkerProcess, WorkerSetupError, build_shim_tree, worker_env

# Run as the worker user at start: it can run the interpreter, import the shim and reach the environment cache.
_PROBE = "import os, sys, burla.node_agent.worker_shim; os.listdir(sys.argv[1]); print('%d.%d' % sys.version_info[:2])"


class _Process(WorkerProcess):
    def __init__(self, proc: trio.Process) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.stdout = proc.stdout
        self.stderr = proc.stderr

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        if self._proc.returncode is None:
            self._proc.kill()


class ProcessRuntime(Runtime):
    name = "process"

    def __init__(self, python: str = "", worker_user_spec: str = "") -> None:
        """`worker_user_spec`: `agent.worker_user`; ConfigError if the agent cannot start workers as that user."""
        self.python = python or sys.executable
        self.user = worker_user.resolve(worker_user_spec)
        self._version = ""
        self._dists: dict[str, str] | None = None
        self._listing = trio.Lock()
        self.shim_root: Path | None = None
        self.run_dir: Path | None = None

    async def prepare(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.shim_root = build_shim_tree(run_dir / "shim")
        if self.user is not None:
            await self._prepare_worker_user(self.user)
        elif self.python == sys.executable:
            self._version = f"{sys.version_info.major}.{sys.version_info.minor}"
        else:
            result = await trio.run_process(
                [self.python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                capture_stdout=True,
            )
            self._version = result.stdout.decode().strip()

    async def _prepare_worker_user(self, user: worker_user.WorkerUser) -> None:
        """Open the environment cache to the worker user's group, then check that it can start a worker."""
        assert self.shim_root is not None and self.run_dir is not None
        env_root = self.env_root or self.run_dir
        env_root.mkdir(parents=True, exist_ok=True)
        if self.env_root is not None:
            worker_user.open_state_dir(user, env_root.parent)
            worker_user.share(user, env_root, tree=False)  # the cache's own files: `EnvCache` shares them
        worker_user.share(user, self.shim_root)
        env = {**self._env(), "PYTHONPATH": str(self.shim_root)}

        def cannot(said: str) -> WorkerSetupError:
            return WorkerSetupError(
                f"workers cannot run as {worker_user.KEY} {user.name!r}: {self.python} with the shim in "
                f"{self.shim_root} and the environment cache {env_root} failed ({said}). That user must be able "
                "to run the interpreter and pass through every folder above them (o+x): give the agent a "
                "state_dir and an interpreter outside private homes (e.g. /var/lib/burla/agent)"
            )

        try:
            result = await trio.run_process(
                [self.python, "-c", _PROBE, str(env_root)], capture_stdout=True, capture_stderr=True, check=False,
                env=env, cwd="/", **user.popen_options(),
            )  # fmt: skip
        except OSError as e:
            raise cannot(f"{type(e).__name__}: {e}") from None
        if result.returncode != 0:
            last = (result.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
            raise cannot(last[0] if last else f"exit code {result.returncode}")
        self._version = result.stdout.decode().strip()

    def _env(self) -> dict[str, str]:
        env = worker_env(secrets=self.secrets)
        if self.user is not None:
            env.update(self.user.env())
        return env

    def _options(self) -> worker_user.Ids:
        return self.user.popen_options() if self.user is not None else {}

    def python_version(self) -> str:
        return self._version

    async def distributions(self, spec: PoolSpec) -> dict[str, str]:
        async with self._listing:  # once: asked early by the supervisor, then by each environment
            return await self._list_distributions()

    async def _list_distributions(self) -> dict[str, str]:
        if self._dists is None:
            env = self._env()
            env["PYTHONPATH"] = str(self.shim_root)
            result = await trio.run_process(
                [self.python, "-c", LIST_DISTRIBUTIONS], capture_stdout=True, env=env,
                cwd=str(self.run_dir) if self.user is None else "/", **self._options(),
            )  # fmt: skip
            self._dists = dict(json.loads(result.stdout)["dists"])
        return self._dists

    async def start_worker(self, slot: int, env: dict[str, str], spec: PoolSpec) -> WorkerProcess:
        assert self.shim_root is not None and self.run_dir is not None, "prepare() first"
        full_env = self._env()
        full_env.update(env)
        full_env["PYTHONPATH"] = str(self.shim_root)
        full_env.pop("PYTHONHOME", None)
        cwd = self.run_dir / f"w{slot}"
        cwd.mkdir(exist_ok=True)
        if self.user is not None:
            worker_user.give(self.user, cwd)
            if not os.path.isdir(self.user.home):  # a system user without one: its working dir, not the agent's
                full_env["HOME"] = str(cwd)
        proc = await trio.lowlevel.open_process(
            [self.python, "-m", "burla.node_agent.worker_shim"],
            env=full_env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C at the agent's terminal is the agent's, not the workers'
            **self._options(),
        )
        return _Process(proc)

    def worker_path(self, host_path: str) -> str | None:
        if self.user is None:
            return host_path  # same host, same user: workers read the agent's files as they are
        if self.env_root is not None and Path(host_path).is_relative_to(self.env_root):
            return host_path  # shared with the worker user's group
        return None  # e.g. a daemon's payload files: private to it, sent over the socket instead

    def share(self, path: Path, tree: bool = True) -> None:
        if self.user is not None:
            worker_user.share(self.user, path, tree)

    def installer_options(self, target: Path) -> dict[str, Any]:
        """With a worker user, installers run as it too: a package's build code is a job's code, and must
        not run as the agent. It writes `target` and a home of its own inside (`INSTALL_HOME`, removed after)."""
        options = super().installer_options(target)
        if self.user is None:
            return options
        home = target / INSTALL_HOME
        home.mkdir()
        for path in (target, home):
            worker_user.give(self.user, path)
        options["env"].update(self.user.env(), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
        return {**options, "cwd": str(home), **self.user.popen_options()}

    def statistics(self) -> dict[str, Any]:
        user = {"worker_user": self.user.name} if self.user is not None else {}
        return {"runtime": self.name, "python": self.python, "python_version": self._version, **user}

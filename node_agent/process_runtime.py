"""Workers as plain processes on the agent's host (the embedded default)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .pools import PoolSpec
from .runtime import LIST_DISTRIBUTIONS, Runtime, WorkerProcess, build_shim_tree, worker_env


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

    def __init__(self, python: str = "") -> None:
        self.python = python or sys.executable
        self._version = ""
        self._dists: dict[str, str] | None = None
        self.shim_root: Path | None = None
        self.run_dir: Path | None = None

    async def prepare(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.shim_root = build_shim_tree(run_dir / "shim")
        if self.python == sys.executable:
            self._version = f"{sys.version_info.major}.{sys.version_info.minor}"
        else:
            result = await trio.run_process(
                [self.python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                capture_stdout=True,
            )
            self._version = result.stdout.decode().strip()

    def python_version(self) -> str:
        return self._version

    async def distributions(self, spec: PoolSpec) -> dict[str, str]:
        if self._dists is None:
            env = worker_env()
            env["PYTHONPATH"] = str(self.shim_root)
            result = await trio.run_process(
                [self.python, "-c", LIST_DISTRIBUTIONS], capture_stdout=True, env=env, cwd=str(self.run_dir)
            )
            self._dists = dict(json.loads(result.stdout)["dists"])
        return self._dists

    async def start_worker(self, slot: int, env: dict[str, str], spec: PoolSpec) -> WorkerProcess:
        assert self.shim_root is not None and self.run_dir is not None, "prepare() first"
        full_env = worker_env()
        full_env.update(env)
        full_env["PYTHONPATH"] = str(self.shim_root)
        full_env.pop("PYTHONHOME", None)
        cwd = self.run_dir / f"w{slot}"
        cwd.mkdir(exist_ok=True)
        proc = await trio.lowlevel.open_process(
            [self.python, "-m", "burla.node_agent.worker_shim"],
            env=full_env,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C at the agent's terminal is the agent's, not the workers'
        )
        return _Process(proc)

    def worker_path(self, host_path: str) -> str | None:
        return host_path  # same host, same user: workers read the agent's files as they are

    def statistics(self) -> dict[str, Any]:
        return {"runtime": self.name, "python": self.python, "python_version": self._version}

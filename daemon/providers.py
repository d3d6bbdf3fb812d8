"""Where the cluster's machines come from: the interface every provider has, and the local one.

A provider creates, lists and deletes the machines ("instances") of one cluster, and knows the CPUs
and RAM of each node group's machine type. It decides nothing: `daemon/scaling.py` says how many,
the node keeper (`daemon/node_keeper.py`) says which and when, the provider does it.

* `LocalProvider` (`provider = "local"`): each instance is a `burlad agent` subprocess on this
  machine, with its own state dir and its group's CPU count, so standby, grow and idle shutdown
  can be tried on a laptop.
* `GceProvider` (`daemon/gce.py`, `provider = "gce"`): Compute Engine instances whose startup script
  installs this Burla version from the daemon and starts `burlad agent`.

Every node learns how to join from a `Boot`: the daemon's URL as nodes reach it, a token valid for
that one instance, and the Burla version to run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from burla.common.config import NodeGroupConfig
from burla.common.local import process_alive

log = logging.getLogger("burla.daemon")

INSTANCE_TOKEN_ENV = "BURLA_AGENT_TOKEN"
INSTANCE_NAME_ENV = "BURLA_AGENT_INSTANCE"
CA_FILE_ENV = "BURLA_AGENT_CA_FILE"
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Boot:
    """What a new node needs to join this cluster."""

    url: str  # the daemon, as nodes reach it
    token: str  # valid for this one instance's registration
    version: str  # the Burla version the node must run
    pip_args: str = ""  # for its `pip install burla==VERSION`: "--no-index" when the daemon serves a wheelhouse
    ca_pem: str = ""  # the CA an https `url` is verified by ("": the system's trust)


@dataclasses.dataclass(frozen=True)
class Instance:
    name: str
    group: int  # index of its node group in the cluster spec (-1: not one of ours any more)
    zone: str = ""
    status: str = "RUNNING"  # the provider's word: PROVISIONING, STAGING, RUNNING, STOPPING, TERMINATED
    detail: str = ""  # why it stopped, when the provider says


class ProviderError(Exception):
    """A node could not be created, for a reason that trying again will not fix by itself.

    The message names the machine type, the zones tried and the provider's reason; `reason` is the
    provider's code (QUOTA_EXCEEDED, PERMISSION_DENIED, ...), for the caller's error.
    """

    def __init__(self, message: str, reason: str = "", zones: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.reason, self.zones = reason, zones


class Provider(Protocol):
    name: str

    async def machine(self, group: NodeGroupConfig) -> tuple[int, int]:
        """(CPUs, RAM bytes) of one node of `group`."""
        ...

    async def create(self, name: str, group_index: int, group: NodeGroupConfig, boot: Boot) -> Instance:
        """Start one instance; ProviderError when it cannot be had."""
        ...

    async def delete(self, name: str) -> None:
        """Delete one instance (gone already: fine)."""
        ...

    async def list(self) -> list[Instance]:
        """Every instance of this cluster the provider has, booting and stopped ones too."""
        ...

    async def aclose(self) -> None: ...


_CPUS_IN_NAME = re.compile(r"-(\d+)(?:g)?$")


def cpus_of_machine_type(machine_type: str) -> int:
    """The CPUs a machine type's name states ("e2-standard-4": 4), or 1."""
    match = _CPUS_IN_NAME.search(machine_type)
    return max(1, int(match.group(1))) if match else 1


class LocalProvider:
    """Nodes as `burlad agent` subprocesses of this machine, one state dir each under `root`."""

    name = "local"

    def __init__(self, root: Path, label: str, runtime: str = "process") -> None:
        self.root, self.label, self.runtime = root, label, runtime
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._groups: dict[str, int] = {}

    async def machine(self, group: NodeGroupConfig) -> tuple[int, int]:
        cpus = group.cpus or cpus_of_machine_type(group.machine_type)
        return cpus, group.ram or 4 * GB * cpus

    async def create(self, name: str, group_index: int, group: NodeGroupConfig, boot: Boot) -> Instance:
        cpus, ram = await self.machine(group)
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        (home / "group").write_text(str(group_index))
        cmd = [sys.executable, "-P", "-m", "burla.daemon", "agent", boot.url, "--state-dir", str(home / "agent")]
        cmd += ["--cpus", str(cpus), "--ram", str(ram), "--workers", str(cpus)]
        env = {**os.environ, INSTANCE_TOKEN_ENV: boot.token, INSTANCE_NAME_ENV: name}
        if boot.ca_pem:
            (home / "ca.pem").write_text(boot.ca_pem)
            env[CA_FILE_ENV] = str(home / "ca.pem")
        with open(home / "agent.log", "ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        (home / "pid").write_text(str(proc.pid))
        self._procs[name] = proc
        self._groups[name] = group_index
        log.info("local node %s started (pid %d, %d CPUs)", name, proc.pid, cpus)
        return Instance(name, group_index, status="RUNNING")

    async def delete(self, name: str) -> None:
        import trio

        proc = self._procs.pop(name, None)
        pid = proc.pid if proc is not None else _read_pid(self.root / name)

        def stop() -> None:  # blocking: in a thread, so the daemon's loop goes on meanwhile
            if pid is not None:
                _kill_group(pid)
                if proc is not None:
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        log.warning("local node %s (pid %d) outlived SIGKILL by 10 s", name, pid)
            shutil.rmtree(self.root / name, ignore_errors=True)

        await trio.to_thread.run_sync(stop)
        self._groups.pop(name, None)

    async def list(self) -> list[Instance]:
        found = []
        for home in sorted(p for p in self.root.iterdir() if p.is_dir()):
            pid = _read_pid(home)
            try:
                group = int((home / "group").read_text())
            except (OSError, ValueError):
                group = -1
            proc = self._procs.get(home.name)
            alive = proc.poll() is None if proc is not None else pid is not None and process_alive(pid)
            found.append(Instance(home.name, group, status="RUNNING" if alive else "TERMINATED"))
        return found

    async def aclose(self) -> None:
        # The nodes outlive this daemon on purpose: a restarted daemon adopts them (`list`). Their Popen
        # objects are let go without a "still running" ResourceWarning; init reaps the processes.
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.returncode = 0
        self._procs.clear()


def _read_pid(home: Path) -> int | None:
    try:
        return int((home / "pid").read_text())
    except (OSError, ValueError):
        return None


def _kill_group(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the node's process group (its agent and workers), then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:  # a child of this process (the daemon started it) stays a zombie, and "alive", until reaped
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass  # not our child (a daemon before a restart started it): init reaps it
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

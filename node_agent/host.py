"""Facts about the agent's host: CPUs, RAM, GPUs, a stable node id, memory use."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import IO

from burla.common import local

_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def gpus() -> tuple[str, ...]:
    """GPU model names from nvidia-smi, when there is one."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.strip()) if out.returncode == 0 else ()


def hostname() -> str:
    return socket.gethostname()


class StateDirLock:
    """One agent per state directory: holds an exclusive lock and the node's id."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if state_dir.stat().st_uid == os.geteuid():
            os.chmod(state_dir, 0o700)  # the agent's alone (`worker_user` lets its workers' group pass through)
        self._file: IO[str] = open(os.open(state_dir / "agent.lock", os.O_WRONLY | os.O_CREAT, 0o600), "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise RuntimeError(
                f"another node agent is using the state directory {state_dir}; give this one its own with --state-dir"
            ) from None
        id_file = state_dir / "node_id"
        if not id_file.exists():
            local.write_file(id_file, uuid.uuid4().hex.encode())
        self.node_id = id_file.read_text().strip()

    def release(self) -> None:
        self._file.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (0 if it is gone)."""
    total = 0
    stack = [pid]
    seen = set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm", "rb") as f:
                total += int(f.read().split()[1]) * _PAGE
            with open(f"/proc/{p}/task/{p}/children", "rb") as f:
                stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total

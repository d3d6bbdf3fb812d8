"""The embedded default: find this user's local cluster, or start one.

The local cluster is ``burlad serve --embedded`` in the background, shared by
every process of the user (as ``ray.init()`` starts a local Ray). It writes
``daemon.json`` once it serves; a file lock keeps two processes from starting
two clusters at once: the process that starts the cluster hands the lock to
the new daemon, which lets go of it once ``daemon.json`` is written, so no
other process starts a second cluster while the first is still coming up. It
stops itself after ``embedded.idle_timeout``.

The daemon is a child of the process that started it, which reaps it (a
thread waits on it), so it never lingers as that process's zombie. `stop`
does not watch the daemon's pid but its state directory's lock, which the
daemon lets go once it and its agent have finished.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from burla.schemas.local import DISCOVERY_FILE, START_LOCK_FD_ENV, local_cluster_home, state_dir_free

from .errors import ClusterUnavailableError

# Local daemons this process started: kept so they can be reaped when they exit.
_STARTED: dict[int, subprocess.Popen[bytes]] = {}


def _alive(pid: int) -> bool:
    child = _STARTED.get(pid)
    if child is not None:  # our own child: its reaper sets returncode once it has exited
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def discover() -> dict[str, str] | None:
    """The running local cluster's URL and admin token, or None."""
    try:
        info = json.loads((local_cluster_home() / DISCOVERY_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _alive(int(info.get("pid", 0))) or _finished(info):
        return None
    return info


def _finished(info: dict[str, str]) -> bool:
    """Whether the daemon `info` describes has finished, its agent stopped too (or it died)."""
    if "state_dir" in info:  # held until everything has stopped, whatever its pid looks like now
        return state_dir_free(Path(info["state_dir"]))
    return not _alive(int(info["pid"]))  # an older daemon, which lets go of its lock before its agent stops


def start() -> subprocess.Popen[bytes] | None:
    """Start the local cluster without waiting for it; None if another process is starting one."""
    home = local_cluster_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "start.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # someone else is starting it: ensure_started waits for theirs
        if discover() is not None:
            return None
        return _spawn(home, lock.fileno())


def _spawn(home: Path, lock_fd: int) -> subprocess.Popen[bytes]:
    """Start a local daemon, handing it the start lock (held as `lock_fd`) until it serves."""
    (home / DISCOVERY_FILE).unlink(missing_ok=True)
    with open(home / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            # -P and cwd: a `burla/` folder in the caller's directory must not shadow the installed package
            [sys.executable, "-P", "-m", "burla.daemon", "serve", "--embedded"],
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # outlives this process, and ignores its Ctrl-C
            pass_fds=(lock_fd,),
            env={**os.environ, START_LOCK_FD_ENV: str(lock_fd)},
        )
    _STARTED[proc.pid] = proc
    # Reaped as soon as it exits, so it is never a zombie of this process that others take for alive.
    threading.Thread(target=proc.wait, name=f"burla-reap-{proc.pid}", daemon=True).start()
    return proc


def ensure_started(timeout: float = 60.0, starting: subprocess.Popen[bytes] | None = None) -> dict[str, str]:
    """The local cluster, started if it is not running (or `starting`, one `start()` began)."""
    info = discover()
    if info is not None:
        return info
    home = local_cluster_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "daemon.log"
    deadline = time.monotonic() + timeout
    with open(home / "start.lock", "w") as lock:
        while True:  # held by whoever is starting a cluster, and by that daemon until it serves
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterUnavailableError(
                        f"another process has been starting the local Burla cluster for {timeout:.0f}s. "
                        f"Its log, {log_path}, ends with:\n{_tail(log_path)}"
                    ) from None
                time.sleep(0.005)
        info = discover()
        if info is not None:
            return info
        if starting is not None and starting.poll() is not None:
            raise _failed(starting, log_path)
        proc = starting if starting is not None else _spawn(home, lock.fileno())
        while time.monotonic() < deadline:
            info = discover()
            if info is not None and int(info["pid"]) == proc.pid:
                return info
            if proc.poll() is not None:
                raise _failed(proc, log_path)
            time.sleep(0.005)
        proc.kill()
        raise ClusterUnavailableError(
            f"the local Burla cluster did not start within {timeout:.0f}s. Its log, {log_path}, ends with:\n"
            f"{_tail(log_path)}"
        )


def stop(timeout: float = 10.0) -> str | None:
    """Stop the local cluster: "stopped", "killed" if it ignored SIGTERM for `timeout`; None if none ran."""
    info = discover()
    if info is None:
        return None
    pid = int(info["pid"])
    outcome = "stopped"
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _finished(info):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)  # the last resort: it ignored SIGTERM
                outcome = "killed"
                break
            time.sleep(0.01)
    except ProcessLookupError:
        pass  # it exited meanwhile
    (local_cluster_home() / DISCOVERY_FILE).unlink(missing_ok=True)
    return outcome


def _failed(proc: subprocess.Popen[bytes], log_path: Path) -> ClusterUnavailableError:
    return ClusterUnavailableError(
        f"the local Burla cluster failed to start (exit code {proc.returncode}). "
        f"Its log, {log_path}, ends with:\n{_tail(log_path)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

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

The cluster is shared across virtualenvs, so the one found may run another
Burla version: `ensure_started` replaces it by one of this version when it
runs no job (see `_usable`).
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
from typing import Any

from burla.common import version as _version
from burla.common.local import DISCOVERY_FILE, START_LOCK_FD_ENV, local_cluster_home, process_alive, state_dir_free

from .errors import ClusterUnavailableError, VersionMismatchError

# Local daemons this process started: kept so they can be reaped when they exit.
_STARTED: dict[int, subprocess.Popen[bytes]] = {}

BUSY_WAIT = 30.0  # seconds to wait for a busy local cluster of another Burla version to finish its jobs
COLLECT_GRACE = 2.0  # seconds its clients get to collect the results of a finished job before it is stopped


def _alive(pid: int) -> bool:
    child = _STARTED.get(pid)
    if child is not None:  # our own child: its reaper sets returncode once it has exited
        return child.poll() is None
    return process_alive(pid)


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
    """The local cluster of this Burla version, started if need be (or `starting`, one `start()` began).

    One of another version is stopped first if it runs no job, and used as it is if it runs some but
    states this version's protocol; otherwise this waits up to `BUSY_WAIT` for its jobs to finish.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = discover()
        if info is None:
            info = _start(deadline, timeout, starting)
            starting = None
        usable = _usable(info)
        if usable is not None:
            return usable
        if time.monotonic() > deadline:  # processes of two Burla versions keep replacing each other's
            raise ClusterUnavailableError(
                f"for {timeout:.0f}s, every local Burla cluster found was of another version than this one "
                f"({_version.version()}): processes of another version keep starting theirs"
            )


def _start(deadline: float, timeout: float, starting: subprocess.Popen[bytes] | None) -> dict[str, str]:
    """A local cluster: ours, or the one another process started meanwhile."""
    home = local_cluster_home()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "daemon.log"
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


def _usable(info: dict[str, str]) -> dict[str, str] | None:
    """`info` if this process can use that cluster; None once it is stopped to make way for ours.

    The local cluster is shared across virtualenvs, so it may run another Burla version (or an older
    install of this one): then it is replaced when it runs no job, used while it runs some if it states
    this version's protocol, and otherwise waited for, up to `BUSY_WAIT`.
    """
    ours = (_version.version(), _version.protocol())
    theirs = _stated_version(info)
    if theirs == ours:
        return info
    from burla.schemas.messages import compatible  # not at import: `import burla` stays cheap

    told = False
    deadline = time.monotonic() + BUSY_WAIT
    collected_by = 0.0
    while True:
        jobs = _jobs(info)
        running = [job for job in jobs or () if job.get("state") == "running"]
        if not running:
            # A finished job is listed until its client has all its events: give that client a moment.
            collected_by = collected_by or time.monotonic() + COLLECT_GRACE
            if jobs and time.monotonic() < collected_by:
                time.sleep(0.05)
                continue
            if (current := discover()) is not None and current["pid"] == info["pid"]:
                _stop_daemon(current)  # idle (or not answering): make way for ours
            return None
        collected_by = 0.0
        version, protocol = theirs or ("(unknown)", 0)
        if compatible(*ours, version, protocol):
            return info  # replaced by a later call that finds it idle
        what = _describe(running)
        if time.monotonic() > deadline:
            raise VersionMismatchError(
                f"the local Burla cluster runs Burla {version} (protocol {protocol}), not this process's "
                f"{ours[0]} (protocol {ours[1]}), and after {BUSY_WAIT:.0f}s it is still busy with {what}. "
                f"Call again once that has finished (the cluster is then restarted on Burla {ours[0]}), or stop it "
                "now with `burla local stop` (its jobs are kept and resume when the local cluster next starts)."
            )
        if not told:
            print(
                f"burla: the local cluster runs Burla {version}, not {ours[0]} as this process, and is busy with "
                f"{what}; waiting up to {BUSY_WAIT:.0f}s for it to finish, then restarting it on Burla {ours[0]}",
                file=sys.stderr,
                flush=True,
            )
            told = True
        time.sleep(0.25)


def _stated_version(info: dict[str, str]) -> tuple[str, int] | None:
    """The Burla version and protocol of the local cluster `info` names; None if it does not answer."""
    if "version" in info:
        return str(info["version"]), int(info.get("protocol") or 0)
    answer = _get(info, "/v1/info")  # a daemon older than versions in daemon.json
    if answer is None:
        return None
    return str(answer.get("version") or "(unknown)"), int(answer.get("protocol") or 0)


def _jobs(info: dict[str, str]) -> list[dict[str, Any]] | None:
    """The jobs the local cluster lists: running, or finished and not yet collected; None if it does not answer."""
    status = _get(info, "/v1/cluster")
    return None if status is None else list(status.get("jobs", ()))


def _get(info: dict[str, str], route: str) -> dict[str, Any] | None:
    import httpx

    try:
        r = httpx.get(info["url"] + route, headers={"authorization": f"Bearer {info['admin_token']}"}, timeout=10)
        return dict(r.json()) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, TypeError):
        return None


def _describe(jobs: list[dict[str, Any]]) -> str:
    named = []
    for job in jobs[:3]:
        total = job["n_inputs"] if job.get("n_inputs") is not None else f"{job.get('n_uploaded', 0)}+"
        named.append(
            f"job {job['job_id'][:8]} ({job.get('function_name') or '?'}: {job.get('n_done', 0)} of {total} done)"
        )
    return ", ".join(named) + (f" and {len(jobs) - 3} more jobs" if len(jobs) > 3 else "")


def stop(timeout: float = 10.0) -> str | None:
    """Stop the local cluster: "stopped", "killed" if it ignored SIGTERM for `timeout`; None if none ran."""
    info = discover()
    return None if info is None else _stop_daemon(info, timeout)


def _stop_daemon(info: dict[str, str], timeout: float = 10.0) -> str:
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

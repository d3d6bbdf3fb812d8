"""Large payloads between parts on the same machine: files, not HTTP bodies.

The daemon keeps large payloads as files under its payload directory (in
memory, on tmpfs, for the embedded cluster). A client or agent on the same
host that can read that directory skips the HTTP copy of a large batch: the
client writes ``<job_id>/b<seq>`` there itself and sends only its name; the
daemon hands an agent the name instead of the bytes.

A part proves it can use the directory by reading the daemon's probe file
(a random secret, mode 0600) and sending the secret back. Same hostname is
not enough: two containers, or two users, on one host may not share it.

The embedded local cluster is found the same way by every process of the
user: its daemon writes ``DISCOVERY_FILE`` in ``local_cluster_home()``, and
the client that starts it hands it the start lock as the file descriptor
named in ``START_LOCK_FD_ENV``, held until that file is written.

A daemon holds ``STATE_LOCK`` in its state directory while it runs (the
embedded one until its agent has stopped too): once `state_dir_free` is true,
that daemon has finished, whatever its pid looks like to others.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
from pathlib import Path

PROBE = ".probe"
DISCOVERY_FILE = "daemon.json"
START_LOCK_FD_ENV = "BURLA_EMBEDDED_START_LOCK_FD"
STATE_LOCK = "burlad.lock"


def state_home() -> Path:
    """Where Burla keeps this user's state: $BURLA_HOME, else the XDG state directory."""
    base = os.environ.get("BURLA_HOME")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "burla"


def local_cluster_home() -> Path:
    """The embedded local cluster's directory: its discovery file, start lock and logs."""
    return state_home() / "local"


def state_dir_free(state_dir: Path) -> bool:
    """Whether no daemon holds `state_dir` (tried without waiting; the lock is let go at once)."""
    try:
        fd = os.open(state_dir / STATE_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def host_id() -> str:
    """This machine, this boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def write_probe(payload_dir: Path) -> str:
    secret = secrets.token_hex(16)
    fd = os.open(payload_dir / PROBE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return secret


def read_probe(payload_dir: str, host: str) -> str | None:
    """The probe secret, if this process is on `host` and can read `payload_dir`."""
    if not payload_dir or host != host_id():
        return None
    try:
        with open(Path(payload_dir) / PROBE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def batch_ref(job_id: str, seq: int) -> str:
    return f"{job_id}/b{seq}"


def write_file(path: Path, data: bytes | memoryview) -> None:
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
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

"""Process workers as another user than the agent (`agent.worker_user`), so a call cannot read its secrets.

The agent holds the node token (in its environment, which /proc shows to its
own user only), its per-agent token (in memory), and its state directory; a
daemon on the same host keeps tokens.json there too. A worker started with
another uid, that user's primary group and no supplementary groups reads none
of it. What workers do need is handed to that group: the state directory may be
passed through (mode 0710, not listed) to reach the environment cache, whose
files the group may read; the agent's own files there stay 0600. The shim tree
and the agent's socket, in the agent's run directory, are readable by all, and
each worker's working directory is its user's.

Starting processes as another user needs root, or the capabilities named in
`NEEDED` (to set the ids, to stop those workers, to hand files to their group).
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import stat
from pathlib import Path
from typing import TypedDict

from burla.errors import ConfigError

KEY = "agent.worker_user"

#: Capabilities the agent needs, by name and bit (linux/capability.h); root has them all.
NEEDED = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7}


class Ids(TypedDict, total=False):
    """The `subprocess.Popen` options that say whose a process is (none: the agent's)."""

    user: int
    group: int
    extra_groups: list[int]


@dataclasses.dataclass(frozen=True)
class WorkerUser:
    name: str
    uid: int
    gid: int
    home: str

    def popen_options(self) -> Ids:
        """`subprocess.Popen` options that start a process as this user, its group, no other groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def env(self) -> dict[str, str]:
        """The variables that name the user, as a login would set them (not the agent's HOME)."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def missing_capabilities(status: str) -> list[str]:
    """Which of `NEEDED` the process whose /proc/<pid>/status text this is lacks (its CapEff line)."""
    effective = 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
    return [name for name, bit in NEEDED.items() if not (effective >> bit) & 1]


def resolve(spec: str, status: str | None = None) -> WorkerUser | None:
    """The user `agent.worker_user` names (a name or a uid), checked; None when it is empty.

    Raises ConfigError, naming the key, for an unknown user, root, the agent's own user, or an agent that
    lacks the privileges to start processes as someone else. `status`: this process's /proc status text.
    """
    spec = spec.strip()
    if not spec:
        return None
    try:
        entry = pwd.getpwuid(int(spec)) if spec.isdigit() else pwd.getpwnam(spec)
    except (KeyError, ValueError, OverflowError):
        raise ConfigError(
            f"{KEY}: there is no user {spec!r} on this host; create one for workers (useradd --system "
            f"--no-create-home burla-worker) or leave {KEY} empty to run them as the agent's own user"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(f"{KEY}: {spec!r} is root, who reads everything; name an unprivileged user")
    if entry.pw_uid == os.geteuid():
        raise ConfigError(
            f"{KEY}: {spec!r} is the agent's own user, which keeps nothing from its workers; name another "
            f"user, or leave {KEY} empty"
        )
    if status is None:
        with open("/proc/self/status") as f:
            status = f.read()
    missing = missing_capabilities(status)
    if missing:
        raise ConfigError(
            f"{KEY}: running workers as {spec!r} needs an agent that runs as root (or has {', '.join(missing)}); "
            f"start the agent as root, or leave {KEY} empty"
        )
    return WorkerUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/")


def open_state_dir(user: WorkerUser, state_dir: Path) -> None:
    """Let `user`'s group pass through the agent's state directory (0710: not list it), its files kept 0600.

    What the workers read below it (the environment cache) is handed over by `share`.
    """
    os.chown(state_dir, -1, user.gid)
    os.chmod(state_dir, 0o710)
    for entry in state_dir.iterdir():
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, 0o600)


def share(user: WorkerUser, path: Path, tree: bool = True) -> None:
    """Make `path` (and, with `tree`, all below it) readable by `user`'s group: the agent's own, its group
    theirs, g+r, g+x on folders and on what its owner may run. Nothing stays writable to them, not even
    what an installer running as them wrote (a later job's calls must not change an earlier job's packages)."""
    agent = os.geteuid()
    paths = [path]
    if tree and path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            paths.extend(Path(root) / name for name in dirs + files)
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode) | stat.S_IRGRP | stat.S_IRUSR
        if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR:
            mode |= stat.S_IXGRP | stat.S_IXUSR
        mode &= ~(stat.S_IWGRP | stat.S_IWOTH | stat.S_ISUID | stat.S_ISGID)
        if (st.st_uid, st.st_gid) != (agent, user.gid):
            os.chown(p, agent, user.gid)
        if mode != stat.S_IMODE(st.st_mode):
            os.chmod(p, mode)


def give(user: WorkerUser, path: Path) -> None:
    """Make the folder `path` the user's own (a worker's working directory), readable by it alone."""
    os.chown(path, user.uid, user.gid)
    os.chmod(path, 0o700)

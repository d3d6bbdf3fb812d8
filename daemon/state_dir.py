"""The daemon's hold on its state directory, and the tokens file it keeps there.

One burlad per state directory (`lock_state_dir`); `tokens.json` holds the plaintext of the
tokens for people to read (SQLite keeps only their hashes).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from pathlib import Path
from typing import IO

from burla.common import local


class StateDirInUse(RuntimeError):
    """Another burlad serves from this state directory."""


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold `state_dir` for this process: two daemons on one SQLite file would hand out the same inputs.

    Tried for a moment only: `local.state_dir_free` holds it for a few microseconds when it looks.
    """
    lock = open(state_dir / local.STATE_LOCK, "a+")
    deadline = time.monotonic() + 0.1
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.005)
                continue
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise StateDirInUse(
                f"another burlad (pid {holder}) is serving from {state_dir}: stop it first, "
                "or give this one another --state-dir"
            ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def new_token(role: str) -> str:
    """A fresh token; the prefix says what it is and keeps it from looking like a flag."""
    return f"burla_{role}_{secrets.token_urlsafe(32)}"


TOKENS_FILE = "tokens.json"  # in the state dir, 0600: the tokens' plaintext, for people (SQLite keeps hashes)


def read_tokens(path: Path) -> dict[str, str]:
    """The tokens a state dir's tokens.json holds ({} if none can be read)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str) and v}

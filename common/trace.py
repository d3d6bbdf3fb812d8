"""Timestamped trace lines across client, daemon and agent, for diagnosing latency.

Set ``BURLA_TRACE=/path/to/file`` in the environment of every process; each
appends ``<unix time> <pid> <where> <what>`` lines to that file. Off (and
free) otherwise.
"""

from __future__ import annotations

import os
import time

_PATH = os.environ.get("BURLA_TRACE") or None


def enabled() -> bool:
    return _PATH is not None


def trace(where: str, what: str) -> None:
    if _PATH is None:
        return
    with open(_PATH, "a") as f:
        f.write(f"{time.time():.6f} {os.getpid()} {where} {what}\n")

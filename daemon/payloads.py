"""Large payloads (input batches, result lists) as files beside the database.

SQLite is fast for many small rows and slow for megabyte blobs: each one is a
chain of overflow pages written to the WAL, written again at checkpoint, and
zeroed on delete when the library is built with secure_delete (Debian's is).
Payloads over `inline_limit` therefore live in one file each under
``<root>/<job_id>/``; the row that owns one holds its file name, and a finished
job's files go with one rmtree. A file is written before the row that names it
is committed, so a crash leaves at most an orphan file, which `sweep` removes
at the next start. Content-addressed blobs live beside them in ``<root>/.blobs``
(see blobs.py), which `sweep` leaves alone.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from burla.common import local

INLINE_LIMIT = 256 * 1024
_PART = re.compile(r"^[0-9A-Za-z_-][0-9A-Za-z_.-]{0,79}$")  # a job id or a file name: never "..", never a "/"


def _part(value: str, what: str) -> str:
    if not _PART.match(value) or value.startswith(".."):
        raise ValueError(f"{what} {value[:80]!r} cannot name a payload file")
    return value


class PayloadStore:
    def __init__(self, root: Path, inline_limit: int = INLINE_LIMIT) -> None:
        self.root = root.resolve()
        self.inline_limit = inline_limit
        root.mkdir(parents=True, exist_ok=True)
        self.host = local.host_id()
        self.secret = local.write_probe(self.root)

    def is_large(self, data: bytes | memoryview) -> bool:
        return len(data) > self.inline_limit

    def put(self, job_id: str, name: str, data: bytes | memoryview) -> str:
        """Write a payload; returns the reference to keep in the database."""
        local.write_file(self.root / _part(job_id, "job id") / _part(name, "payload name"), data)
        return f"{job_id}/{name}"

    def path(self, ref: str) -> Path:
        """The file of a reference that `put` returned: only ever under `root`."""
        job_id, _, name = ref.partition("/")
        return self.root / _part(job_id, "job id") / _part(name, "payload name")

    def exists(self, ref: str) -> bool:
        try:
            return self.path(ref).is_file()
        except ValueError:
            return False

    def get(self, ref: str) -> bytes:
        with open(self.path(ref), "rb") as f:
            return f.read()

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / _part(job_id, "job id"), ignore_errors=True)

    def sweep(self, keep: Iterable[str]) -> int:
        """Remove the payloads of jobs not in `keep`; returns how many folders went."""
        keep = set(keep)
        removed = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name not in keep and not folder.name.startswith("."):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed


def ram_backed_dir(name: str) -> Path | None:
    """A directory in memory (tmpfs) for this user, if the system has one."""
    candidates = [os.environ.get("XDG_RUNTIME_DIR"), f"/dev/shm/burla-{os.getuid()}"]
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate)
        base = path if candidate != candidates[-1] else path.parent
        if base.is_dir() and os.access(base, os.W_OK):
            target = (path / "burla" / name) if candidate == candidates[0] else path / name
            try:
                target.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError:
                continue
            return target
    return None

"""Files on disk as deterministic blobs: the tars of distributions and the zip of local code.

Both are built deterministically (same files -> same bytes -> same sha256 digest):

* A distribution's tar is an uncompressed pax tar; entries are regular files only, sorted by name, with mtime 0,
  uid/gid 0, empty user/group names, mode 0o755 when any executable bit is set else 0o644.
* The local code zip is a ZIP_DEFLATED zip, entries sorted by name, dated 1980-01-01 00:00:00, with an entry for
  every directory (zipimport needs them for namespace packages), so ``sys.path.insert(0, zip)`` imports it.

Files are listed with their stat (`File`), so a digest is cached on (path, mtime_ns, size) of every file, and a
blob's bytes are read only when the cluster lacks it; a file that changed since it was listed fails the build.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from typing import IO

from .errors import BurlaError

ZIP_DATE = (1980, 1, 1, 0, 0, 0)

File = tuple[str, str, int, int, bool]  # (name in the blob, path on disk, st_mtime_ns, st_size, executable)
Unit = tuple[str, str, bool]  # (name in the blob, path on disk, is a directory to pack whole)


def stat_file(name: str, path: str) -> File | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # removed since it was installed
    if not stat.S_ISREG(st.st_mode):
        return None
    return (name, path, st.st_mtime_ns, st.st_size, bool(st.st_mode & 0o111))


def collect(units: Iterable[Unit], walk_limit: int | None) -> tuple[File, ...]:
    """The files of `units`: whole directory trees (no __pycache__, *.pyc or hidden folders) or single files.

    The first unit to give a name keeps it. Files over `walk_limit` bytes inside directories are left out.
    """
    files: dict[str, File] = {}
    for name, path, is_dir in units:
        if not is_dir:
            entry = stat_file(name, path)
            if entry is not None:
                files.setdefault(name, entry)
            continue
        for directory, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(directory, path)
            prefix = name if rel == "." else f"{name}/{rel.replace(os.sep, '/')}"
            for filename in filenames:
                if filename.endswith((".pyc", ".pyo")):
                    continue
                entry = stat_file(f"{prefix}/{filename}", os.path.join(directory, filename))
                if entry is None or (walk_limit is not None and entry[3] > walk_limit):
                    continue
                files.setdefault(entry[0], entry)
    return tuple(files[name] for name in sorted(files))


_DIGESTS: dict[tuple[str, tuple[File, ...]], str] = {}


def blob(kind: str, files: tuple[File, ...], blobs: dict[str, bytes | Callable[[], bytes]]) -> str:
    """The digest of the tar or zip of `files` (cached on their stat), and its bytes or builder added to `blobs`."""
    key = (kind, files)
    digest = _DIGESTS.get(key)
    if digest is None:
        if kind == "zip":
            data = _zip_bytes(files)  # at most max_code_bytes: keep the bytes, the caller likely sends them
            digest = hashlib.sha256(data).hexdigest()
            blobs[digest] = data
        else:
            sink = _Sink(keep=False)  # a tar of installed files can be big: hash it as it streams
            _write_tar(files, sink)
            digest = sink.hash.hexdigest()
        if len(_DIGESTS) > 1024:
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    blobs.setdefault(digest, functools.partial(_build, kind, files, digest))
    return digest


def _build(kind: str, files: tuple[File, ...], digest: str) -> bytes:
    if kind == "zip":
        data = _zip_bytes(files)
    else:
        sink = _Sink(keep=True)
        _write_tar(files, sink)
        data = b"".join(sink.chunks)
    if hashlib.sha256(data).hexdigest() != digest:
        raise BurlaError("files of your environment changed while it was being sent to the cluster: run the job again")
    return data


class _Sink:
    """A write-only file that hashes what is written, and keeps it if asked."""

    def __init__(self, keep: bool) -> None:
        self.hash = hashlib.sha256()
        self.size = 0
        self.keep = keep
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.keep:
            self.chunks.append(bytes(data))
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass


def _open_unchanged(entry: File) -> IO[bytes]:
    f = open(entry[1], "rb")
    st = os.fstat(f.fileno())
    if (st.st_mtime_ns, st.st_size) != (entry[2], entry[3]):
        f.close()
        raise BurlaError(f"{entry[1]} changed while your environment was being packed: run the job again")
    return f


def _write_tar(files: tuple[File, ...], sink: _Sink) -> None:
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for entry in files:
            info = tarfile.TarInfo(entry[0])
            info.size = entry[3]
            info.mtime = 0
            info.mode = 0o755 if entry[4] else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with _open_unchanged(entry) as f:
                tar.addfile(info, f)


def _zip_bytes(files: tuple[File, ...]) -> bytes:
    directories = {name.rsplit("/", i)[0] + "/" for name, *_ in files for i in range(1, name.count("/") + 1)}
    entries: list[tuple[str, File | None]] = [(d, None) for d in directories] + [(f[0], f) for f in files]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, entry in sorted(entries, key=lambda e: e[0]):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.create_system = 3  # unix, so external_attr holds the mode on every platform
            if entry is None:
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b"")
                continue
            info.external_attr = (0o100755 if entry[4] else 0o100644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with _open_unchanged(entry) as f:
                data = f.read()
            zf.writestr(info, data)
    return buf.getvalue()

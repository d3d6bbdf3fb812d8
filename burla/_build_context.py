"""Packing a Dockerfile and its build context for `remote_parallel_map(..., dockerfile=)`.

The client sends the cluster one tarball; a node agent extracts it into a
directory and runs ``podman build -f <dockerfile> <directory>``, caching the
image by the tarball's digest. So the tarball must be what ``docker build -f
DOCKERFILE CONTEXT`` (or ``podman build``) would send, and byte-for-byte the
same whenever the files are:

* The context is a directory, by default the Dockerfile's own. Files matched
  by the ignore file at its root are left out, with Docker's ``.dockerignore``
  rules (see `_dockerignore.IgnoreMatcher`). As Podman does, a ``.containerignore`` there is
  used instead of ``.dockerignore`` when both exist. The Dockerfile and the
  ignore files are always sent, even when they match a pattern.
* A Dockerfile outside the context is added as ``.burla/Dockerfile`` (another
  name if the context already has that path), and that name is appended to
  the ignore file in the tarball (a ``.dockerignore`` is added if there is
  none), as Docker does, so that ``COPY . .`` does not copy it.
* The tarball is an **uncompressed** POSIX (pax) tar: its digest depends on
  the files alone, not on a zlib version (compress it for transport if you
  like). Entries are sorted by name; mtime is 0, uid and gid 0, user and
  group names empty; files are 0o755 when any executable bit is set, else
  0o644; directories are 0o755; symlinks are stored as symlinks (never
  followed) with their target as is. Sockets, FIFOs and devices are skipped.
  Every directory holding a packed entry has its own entry, and an empty
  directory that is not ignored is kept, as Docker keeps it.
* The files are counted (by size, from ``lstat``) before any is read, and the
  walk stops as soon as they pass `max_bytes`, so a huge directory costs one
  partial directory walk and a clear `TooLargeError`, not a full read.
* The tarball is built in memory: it is never written into the context, so
  it can never include itself.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import io
import os
import stat
import tarfile

from ._dockerignore import BadPatternError, IgnoreMatcher
from ._units import size_text
from .errors import InvalidArgumentError, TooLargeError

DEFAULT_MAX_BYTES = 100 * 1000**2
IGNORE_FILES = (".containerignore", ".dockerignore")  # the first that exists is used, as Podman does
RESERVED_DOCKERFILE = ".burla/Dockerfile"  # where a Dockerfile from outside the context goes
LARGEST_SHOWN = 5  # how many files and top-level entries a TooLargeError names


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """A packed build context, ready to send.

    `tarball` is an uncompressed pax tar of the context; `digest` the sha256
    hex of those bytes; `dockerfile` the Dockerfile's path inside it, relative
    with "/" separators (for ``podman build -f``). `files` counts the regular
    files and symlinks packed, `size` the bytes of the regular files.
    """

    digest: str
    tarball: bytes = dataclasses.field(repr=False)
    dockerfile: str
    files: int
    size: int


# --------------------------------------------------------------------------- packing


@dataclasses.dataclass
class _Entry:
    name: str  # relative, "/"-separated
    kind: str  # "file", "dir" or "symlink"
    path: str = ""  # absolute path to read a file from
    size: int = 0
    target: str = ""  # of a symlink
    data: bytes | None = None  # contents given rather than read


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def _unreadable(path: str, error: OSError, root: str, ignore_name: str) -> InvalidArgumentError:
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    return InvalidArgumentError(
        f"Cannot read {path} in the build context {root}: {error.strerror or error}. "
        f"Make it readable, or add {rel!r} to {os.path.join(root, ignore_name)} to leave it out."
    )


def _too_large(root: str, entries: dict[str, _Entry], total: int, max_bytes: int, ignore_name: str) -> TooLargeError:
    files = [e for e in entries.values() if e.kind == "file"]
    tops: dict[str, int] = {}
    for e in files:
        top, sep, _ = e.name.partition("/")
        tops[top + sep] = tops.get(top + sep, 0) + e.size
    largest_tops = heapq.nlargest(LARGEST_SHOWN, tops.items(), key=lambda kv: (kv[1], kv[0]))
    largest_files = heapq.nlargest(LARGEST_SHOWN, files, key=lambda e: (e.size, e.name))
    lines = [
        f"The build context {root} holds at least {size_text(total)} of files (counting stopped there), "
        f"over the {size_text(max_bytes)} limit on what Burla sends to the cluster to build a dockerfile=.",
        "Largest top-level entries: " + ", ".join(f"{name} ({size_text(n)})" for name, n in largest_tops) + ".",
    ]
    if any("/" in e.name for e in largest_files):
        lines.append("Largest files: " + ", ".join(f"{e.name} ({size_text(e.size)})" for e in largest_files) + ".")
    lines.append(
        f"If the build does not need them, add them to {ignore_name} ({os.path.join(root, ignore_name)}), "
        "or pass context= a smaller directory."
    )
    return TooLargeError("\n".join(lines))


def _resolve_inputs(dockerfile: str | os.PathLike[str], context: str | os.PathLike[str] | None) -> tuple[str, str]:
    """The Dockerfile's absolute path (as given) and the context's real path; or InvalidArgumentError."""
    given = os.fspath(dockerfile)
    path = os.path.abspath(given)
    if not os.path.exists(path):
        raise InvalidArgumentError(
            f"dockerfile={given!r}: no such file ({path}). Pass the path of your Dockerfile; "
            f"a relative path is relative to the current directory ({os.getcwd()})."
        )
    if os.path.isdir(path):
        raise InvalidArgumentError(
            f"dockerfile={given!r} is a directory ({path}), not a Dockerfile. "
            f"Pass the file's path, e.g. dockerfile={os.path.join(given, 'Dockerfile')!r}."
        )
    if not os.path.isfile(path):
        raise InvalidArgumentError(
            f"dockerfile={given!r} ({path}) is not a regular file. Pass the path of a Dockerfile."
        )
    if context is None:
        root = os.path.dirname(path)
    else:
        given_context = os.fspath(context)
        root = os.path.abspath(given_context)
        if not os.path.isdir(root):
            what = "is not a directory" if os.path.exists(root) else "no such directory"
            raise InvalidArgumentError(
                f"context={given_context!r}: {what} ({root}). Pass context= the directory to build in "
                "(what COPY and ADD read from), or leave it out to use the Dockerfile's directory."
            )
    return path, os.path.realpath(root)


def _read_ignore_file(root: str) -> tuple[str, IgnoreMatcher, str | None]:
    """The ignore file's name (the one in use, or .dockerignore), its matcher, and its text if any."""
    for name in IGNORE_FILES:
        path = os.path.join(root, name)
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if not _inside(real, root) or not os.path.isfile(real):
            raise InvalidArgumentError(
                f"{path} is not a file in the build context {root}: it must be a file of ignore patterns."
            )
        try:
            with open(real, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except OSError as e:
            raise _unreadable(path, e, root, name) from None
        try:
            return name, IgnoreMatcher.from_text(text), text
        except BadPatternError as e:
            raise InvalidArgumentError(f"{path}, {e}. Fix or remove that pattern.") from None
    return IGNORE_FILES[-1], IgnoreMatcher(), None


def _walk(
    root: str, matcher: IgnoreMatcher, forced: set[str], start: int, max_bytes: int, ignore_name: str
) -> tuple[dict[str, _Entry], int]:
    """Every entry the context sends, without reading any file; stops once over `max_bytes`."""
    forced_dirs = {name.rsplit("/", i)[0] for name in forced for i in range(1, name.count("/") + 1)}
    entries: dict[str, _Entry] = {}
    total = start
    stack: list[tuple[str, str]] = [("", root)]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            with os.scandir(abs_dir) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise _unreadable(abs_dir, e, root, ignore_name) from None
        subdirs: list[tuple[str, str]] = []
        for child in children:
            name = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we walk
            except OSError as e:
                raise _unreadable(child.path, e, root, ignore_name) from None
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISREG(st.st_mode):
                kind = "file"
            elif stat.S_ISLNK(st.st_mode):
                kind = "symlink"
            else:
                continue  # socket, FIFO, device: Docker cannot send these either
            if name not in forced and matcher.excluded(name):
                if kind == "dir" and (name in forced_dirs or matcher.may_reinclude_under(name)):
                    subdirs.append((name, child.path))
                continue
            entry = _Entry(name, kind, child.path)
            if kind == "file":
                entry.size = st.st_size
                total += st.st_size
            elif kind == "symlink":
                try:
                    entry.target = os.readlink(child.path)
                except OSError as e:
                    raise _unreadable(child.path, e, root, ignore_name) from None
            else:
                subdirs.append((name, child.path))
            entries[name] = entry
            if total > max_bytes:
                raise _too_large(root, entries, total, max_bytes, ignore_name)
        stack.extend(reversed(subdirs))
    return entries, total


def _reserved_name(entries: dict[str, _Entry]) -> str:
    """A name for an outside Dockerfile that no packed entry is in the way of."""

    def free(name: str) -> bool:
        parent = name.rpartition("/")[0]
        return name not in entries and (not parent or entries.get(parent, _Entry(parent, "dir")).kind == "dir")

    candidates = [RESERVED_DOCKERFILE, ".burla.Dockerfile"]
    candidates += [f"{c}.{i}" for i in range(1, 1000) for c in candidates[:2]]
    return next(c for c in candidates if free(c))


def _read_file(entry: _Entry, budget: int, root: str, ignore_name: str) -> tuple[bytes, bool]:
    """A file's bytes (at most `budget` + 1 of them) and whether it is executable; never follows a symlink."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(entry.path, flags)
        with open(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgumentError(
                    f"{entry.path} in the build context {root} stopped being a regular file while it was "
                    "packed. Try again, or add it to .dockerignore."
                )
            return f.read(budget + 1), bool(st.st_mode & 0o111)
    except OSError as e:
        raise _unreadable(entry.path, e, root, ignore_name) from None


def _tarinfo(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_build_context(
    dockerfile: str | os.PathLike[str],
    context: str | os.PathLike[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> BuildContext:
    """Pack `dockerfile` and its build context `context` into a deterministic tarball.

    Args:
        dockerfile: the Dockerfile's path (relative to the current directory).
        context: the build context directory (default: the Dockerfile's
            directory), as in ``docker build -f DOCKERFILE CONTEXT``.
        max_bytes: the most bytes of files to send.

    Raises:
        InvalidArgumentError: no such Dockerfile or context directory, a bad
            ignore pattern, or a file that cannot be read.
        TooLargeError: the files to send come to more than `max_bytes`; the
            message names the largest.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InvalidArgumentError(f"max_bytes={max_bytes!r}: pass a number of bytes (an int >= 0).")
    dockerfile_path, root = _resolve_inputs(dockerfile, context)
    ignore_name, matcher, ignore_text = _read_ignore_file(root)

    real_dockerfile = os.path.realpath(dockerfile_path)
    inside = _inside(real_dockerfile, root) and real_dockerfile != root
    outside_data = b""
    if inside:
        dockerfile_name = os.path.relpath(real_dockerfile, root).replace(os.sep, "/")
    else:
        try:
            with open(real_dockerfile, "rb") as f:
                outside_data = f.read(max_bytes + 1)
        except OSError as e:
            raise InvalidArgumentError(
                f"Cannot read the Dockerfile {dockerfile_path}: {e.strerror or e}. Make it readable."
            ) from None
        if len(outside_data) > max_bytes:
            raise TooLargeError(f"The Dockerfile {dockerfile_path} alone is over the limit of {size_text(max_bytes)}.")
        dockerfile_name = ""

    forced = set(IGNORE_FILES) | ({dockerfile_name} if inside else set())
    entries, _ = _walk(root, matcher, forced, len(outside_data), max_bytes, ignore_name)
    if inside and entries.get(dockerfile_name, _Entry("", "")).kind != "file":
        raise InvalidArgumentError(f"The Dockerfile {dockerfile_path} could not be packed: it changed while packing.")

    if not inside:
        # As Docker does: add it under a reserved name, and ignore that name so `COPY . .` leaves it out.
        dockerfile_name = _reserved_name(entries)
        entries[dockerfile_name] = _Entry(dockerfile_name, "file", size=len(outside_data), data=outside_data)
        line = f"/{dockerfile_name}\n"
        text = ignore_text or ""
        text += ("" if not text or text.endswith("\n") else "\n") + line
        entries[ignore_name] = _Entry(ignore_name, "file", data=text.encode("utf-8", "surrogateescape"))

    for name in list(entries):  # every parent directory gets an entry, excluded or not
        parent = name.rpartition("/")[0]
        while parent and parent not in entries:
            entries[parent] = _Entry(parent, "dir")
            parent = parent.rpartition("/")[0]

    buf = io.BytesIO()
    size = files = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            entry = entries[name]
            if entry.kind == "dir":
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
                continue
            files += 1
            if entry.kind == "symlink":
                info = _tarinfo(name, tarfile.SYMTYPE, 0o777)
                info.linkname = entry.target
                tar.addfile(info)
                continue
            if entry.data is not None:
                data, executable = entry.data, False
            else:
                data, executable = _read_file(entry, max_bytes - size, root, ignore_name)
            size += len(data)
            if size > max_bytes:  # a file grew since the walk
                entry.size = len(data)
                raise _too_large(root, entries, size, max_bytes, ignore_name)
            info = _tarinfo(name, tarfile.REGTYPE, 0o755 if executable else 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tarball = buf.getvalue()
    return BuildContext(
        digest=hashlib.sha256(tarball).hexdigest(),
        tarball=tarball,
        dockerfile=dockerfile_name,
        files=files,
        size=size,
    )


__all__ = ["BuildContext", "IgnoreMatcher", "pack_build_context"]

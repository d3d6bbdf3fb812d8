"""burla._build_context: the deterministic build-context tarball (the .dockerignore matcher: test_dockerignore.py)."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import tarfile
import time
from pathlib import Path

import pytest

from burla._build_context import BuildContext, pack_build_context
from burla._dockerignore import IgnoreMatcher
from burla.errors import BurlaError, InvalidArgumentError, TooLargeError

DOCKERFILE = b"FROM python:3.12-slim\nCOPY . /app\n"


def write(path: Path, data: bytes | str = b"", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no disk space (and would take long to read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def members(ctx: BuildContext) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(ctx.tarball), mode="r:") as tar:
        return {m.name: m for m in tar.getmembers()}


def contents(ctx: BuildContext) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(ctx.tarball), mode="r:") as tar:
        for m in tar.getmembers():
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                with f:
                    out[m.name] = f.read()
    return out


def tree(root: Path) -> dict[str, str | bytes]:
    """Every path under `root`: a file's bytes, "dir", or "-> target" for a symlink."""
    out: dict[str, str | bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


# --------------------------------------------------------------------------- packing


def make_project(root: Path) -> None:
    write(root / "Dockerfile", DOCKERFILE)
    write(root / ".dockerignore", "# caches\n**/__pycache__\n*.log\nbuild/\ndocs\n!docs/keep.md\n")
    write(root / "app.py", "print('hi')\n")
    write(root / "pkg/__init__.py")
    write(root / "pkg/mod.py", "x = 1\n")
    write(root / "pkg/debug.log", "kept: *.log is for the root only\n")
    write(root / "debug.log", "dropped\n")
    write(root / "__pycache__/app.cpython-312.pyc", b"\0")
    write(root / "pkg/__pycache__/mod.cpython-312.pyc", b"\0")
    write(root / "build/out.bin", b"\1" * 100)
    write(root / "docs/keep.md", "# kept\n")
    write(root / "docs/drop.md", "# dropped\n")
    (root / "empty").mkdir()


def test_pack_extracts_to_exactly_the_expected_files(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    make_project(root)
    ctx = pack_build_context(root / "Dockerfile")

    expected = {
        ".dockerignore": (root / ".dockerignore").read_bytes(),
        "Dockerfile": DOCKERFILE,
        "app.py": b"print('hi')\n",
        "docs": "dir",
        "docs/keep.md": b"# kept\n",
        "empty": "dir",
        "pkg": "dir",
        "pkg/__init__.py": b"",
        "pkg/debug.log": b"kept: *.log is for the root only\n",
        "pkg/mod.py": b"x = 1\n",
    }
    assert list(members(ctx)) == sorted(expected)  # sorted entries
    out = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(ctx.tarball), mode="r:") as tar:
        tar.extractall(out, filter="data")
    assert tree(out) == expected

    assert ctx.dockerfile == "Dockerfile"
    assert ctx.files == 7
    assert ctx.size == sum(len(v) for v in expected.values() if isinstance(v, bytes))
    assert ctx.digest == hashlib.sha256(ctx.tarball).hexdigest()
    assert ctx.tarball[:2] != b"\x1f\x8b"  # a plain tar, not gzip
    assert "tarball" not in repr(ctx)


def test_dockerfile_and_dockerignore_are_sent_even_when_ignored(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    write(tmp_path / ".dockerignore", "*\n")
    write(tmp_path / "secret.env", "X=1\n")
    ctx = pack_build_context(tmp_path / "Dockerfile")
    assert list(members(ctx)) == [".dockerignore", "Dockerfile"]


def test_dockerfile_inside_an_ignored_directory(tmp_path: Path) -> None:
    write(tmp_path / "docker/Dockerfile.gpu", DOCKERFILE)
    write(tmp_path / "docker/other.txt", "x")
    write(tmp_path / ".dockerignore", "docker\n")
    write(tmp_path / "main.py", "")
    ctx = pack_build_context(tmp_path / "docker/Dockerfile.gpu", context=tmp_path)
    assert ctx.dockerfile == "docker/Dockerfile.gpu"
    assert list(members(ctx)) == [".dockerignore", "docker", "docker/Dockerfile.gpu", "main.py"]
    assert contents(ctx)["docker/Dockerfile.gpu"] == DOCKERFILE


def test_containerignore_wins_over_dockerignore(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    write(tmp_path / ".containerignore", "a.txt\n")
    write(tmp_path / ".dockerignore", "b.txt\n")
    write(tmp_path / "a.txt")
    write(tmp_path / "b.txt")
    ctx = pack_build_context(tmp_path / "Dockerfile")
    assert list(members(ctx)) == [".containerignore", ".dockerignore", "Dockerfile", "b.txt"]


def test_dockerfile_outside_the_context(tmp_path: Path) -> None:
    write(tmp_path / "ci/Dockerfile", DOCKERFILE)
    write(tmp_path / "ci/unrelated.txt", "not sent")
    app = tmp_path / "app"
    write(app / "main.py", "print(1)\n")
    write(app / "scratch.tmp", "dropped")
    write(app / ".dockerignore", "*.tmp")  # no final newline
    ctx = pack_build_context(tmp_path / "ci/Dockerfile", context=app)

    assert ctx.dockerfile == ".burla/Dockerfile"
    assert list(members(ctx)) == [".burla", ".burla/Dockerfile", ".dockerignore", "main.py"]
    files = contents(ctx)
    assert files[".burla/Dockerfile"] == DOCKERFILE
    # As Docker does, the added Dockerfile is ignored so that `COPY . .` leaves it out.
    assert files[".dockerignore"] == b"*.tmp\n/.burla/Dockerfile\n"
    matcher = IgnoreMatcher.from_text(files[".dockerignore"].decode())
    assert matcher.excluded(".burla/Dockerfile") and matcher.excluded("scratch.tmp")
    assert not matcher.excluded("main.py")
    assert ctx.files == 3
    assert ctx.size == len(DOCKERFILE) + len(files[".dockerignore"]) + len(b"print(1)\n")


def test_dockerfile_outside_a_context_without_ignore_file(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    write(tmp_path / "ctx/main.py")
    ctx = pack_build_context(tmp_path / "Dockerfile", context=tmp_path / "ctx")
    assert contents(ctx) == {".burla/Dockerfile": DOCKERFILE, ".dockerignore": b"/.burla/Dockerfile\n", "main.py": b""}


def test_outside_dockerfile_does_not_clobber_a_burla_directory(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    write(tmp_path / "ctx/.burla/Dockerfile", "mine")
    ctx = pack_build_context(tmp_path / "Dockerfile", context=tmp_path / "ctx")
    files = contents(ctx)
    assert ctx.dockerfile != ".burla/Dockerfile"
    assert files[ctx.dockerfile] == DOCKERFILE
    assert files[".burla/Dockerfile"] == b"mine"


def test_context_defaults_to_the_dockerfile_directory_and_paths_are_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "proj/Dockerfile", DOCKERFILE)
    write(tmp_path / "proj/main.py")
    write(tmp_path / "sibling.txt")
    monkeypatch.chdir(tmp_path)
    ctx = pack_build_context("proj/Dockerfile")
    assert list(members(ctx)) == ["Dockerfile", "main.py"]
    assert pack_build_context("proj/Dockerfile", context=".").dockerfile == "proj/Dockerfile"


def test_dockerfile_symlink_is_resolved(tmp_path: Path) -> None:
    write(tmp_path / "docker/Dockerfile.real", DOCKERFILE)
    (tmp_path / "Dockerfile").symlink_to("docker/Dockerfile.real")
    ctx = pack_build_context(tmp_path / "Dockerfile")
    assert ctx.dockerfile == "docker/Dockerfile.real"
    assert members(ctx)["Dockerfile"].issym()


def make_tree(root: Path, names: list[str]) -> None:
    files = {
        "Dockerfile": DOCKERFILE,
        "b/x.py": b"x = 1\n",
        "a/y.py": b"y = 2\n",
        "a/deep/z.sh": b"#!/bin/sh\n",
        "c.txt": b"c",
    }
    for name in names:
        write(root / name, files[name], mode=0o700 if name.endswith(".sh") else 0o600)
    (root / "empty").mkdir(mode=0o700)


def test_digest_is_deterministic(tmp_path: Path) -> None:
    names = ["Dockerfile", "b/x.py", "a/y.py", "a/deep/z.sh", "c.txt"]
    one, two = tmp_path / "one", tmp_path / "two"
    make_tree(one, names)
    make_tree(two, list(reversed(names)))  # other creation order, so another directory order
    for path in two.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000), follow_symlinks=False)
        if path.is_file():
            path.chmod(path.stat().st_mode | 0o044)  # other group/other bits: not kept
    first = pack_build_context(one / "Dockerfile")
    assert pack_build_context(two / "Dockerfile").digest == first.digest

    os.utime(one / "c.txt", (time.time() + 100, time.time() + 100))
    assert pack_build_context(one / "Dockerfile").digest == first.digest
    (one / "c.txt").write_bytes(b"d")  # one byte changed
    changed = pack_build_context(one / "Dockerfile")
    assert changed.digest != first.digest
    (one / "c.txt").write_bytes(b"c")
    assert pack_build_context(one / "Dockerfile").digest == first.digest
    (one / "c.txt").chmod(0o744)  # executable now
    assert pack_build_context(one / "Dockerfile").digest != first.digest


def test_tar_metadata_is_normalised(tmp_path: Path) -> None:
    make_tree(tmp_path, ["Dockerfile", "b/x.py", "a/y.py", "a/deep/z.sh", "c.txt"])
    (tmp_path / "link").symlink_to("c.txt")
    infos = members(pack_build_context(tmp_path / "Dockerfile"))
    modes = {name: stat.S_IMODE(m.mode) for name, m in infos.items()}
    assert modes == {
        "Dockerfile": 0o644,
        "a": 0o755,
        "a/deep": 0o755,
        "a/deep/z.sh": 0o755,  # the executable bit is kept
        "a/y.py": 0o644,
        "b": 0o755,
        "b/x.py": 0o644,
        "c.txt": 0o644,
        "empty": 0o755,
        "link": 0o777,
    }
    for m in infos.values():
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert not m.pax_headers


def test_symlinks_are_kept_as_symlinks_and_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write(outside / "password", "hunter2")
    root = tmp_path / "ctx"
    write(root / "Dockerfile", DOCKERFILE)
    write(root / "pkg/mod.py", "x = 1\n")
    (root / "mod.py").symlink_to("pkg/mod.py")
    (root / "pkgdir").symlink_to("pkg", target_is_directory=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "password").symlink_to(outside / "password")
    (root / "dangling").symlink_to("nowhere")
    ctx = pack_build_context(root / "Dockerfile")

    infos = members(ctx)
    assert sorted(infos) == ["Dockerfile", "dangling", "escape", "mod.py", "password", "pkg", "pkg/mod.py", "pkgdir"]
    links = {name: m.linkname for name, m in infos.items() if m.issym()}
    assert links == {
        "dangling": "nowhere",
        "escape": str(outside),
        "mod.py": "pkg/mod.py",
        "password": str(outside / "password"),
        "pkgdir": "pkg",
    }
    assert b"hunter2" not in ctx.tarball
    assert ctx.files == 7
    assert ctx.size == len(DOCKERFILE) + len(b"x = 1\n")


def test_context_given_through_a_symlink(tmp_path: Path) -> None:
    write(tmp_path / "real/Dockerfile", DOCKERFILE)
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    ctx = pack_build_context(tmp_path / "alias/Dockerfile")
    assert ctx.dockerfile == "Dockerfile"
    assert list(members(ctx)) == ["Dockerfile"]


def test_sockets_and_fifos_are_skipped(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    os.mkfifo(tmp_path / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
    ctx = pack_build_context(tmp_path / "Dockerfile")  # a FIFO read would block
    assert list(members(ctx)) == ["Dockerfile"]


def test_too_large_names_the_context_limit_and_largest_entries(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    sparse(tmp_path / "data/a.bin", 700_000)
    sparse(tmp_path / "data/b.bin", 800_000)
    with pytest.raises(TooLargeError) as info:
        pack_build_context(tmp_path / "Dockerfile", max_bytes=1_000_000)
    message = str(info.value)
    assert isinstance(info.value, InvalidArgumentError) and isinstance(info.value, BurlaError)
    assert str(tmp_path) in message
    assert "at least 1.5 MB" in message  # its size, so far
    assert "the 1 MB limit" in message
    assert "data/ (1.5 MB)" in message  # the largest top-level directory
    assert "data/b.bin (800.0 kB)" in message and "data/a.bin (700.0 kB)" in message
    assert ".dockerignore" in message and "context= a smaller directory" in message


def test_too_large_stops_walking_early(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    sparse(tmp_path / "a.bin", 50 * 1000**3)  # reading these would take minutes
    sparse(tmp_path / "b.bin", 60 * 1000**3)
    start = time.monotonic()
    with pytest.raises(TooLargeError) as info:
        pack_build_context(tmp_path / "Dockerfile")
    assert time.monotonic() - start < 1
    message = str(info.value)
    assert "a.bin (50,000 MB)" in message and "the 100 MB limit" in message
    assert "b.bin" not in message  # the walk stopped before it


def test_exactly_at_the_limit_is_fine(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", b"x" * 600)
    write(tmp_path / "data", b"y" * 400)
    ctx = pack_build_context(tmp_path / "Dockerfile", max_bytes=1000)
    assert ctx.size == 1000
    with pytest.raises(TooLargeError):
        pack_build_context(tmp_path / "Dockerfile", max_bytes=999)


def test_ignored_files_do_not_count_toward_the_limit(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    write(tmp_path / ".dockerignore", "data/\n")
    sparse(tmp_path / "data/huge.bin", 10 * 1000**3)
    assert pack_build_context(tmp_path / "Dockerfile", max_bytes=1000).files == 2


def test_missing_dockerfile(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="no such file") as info:
        pack_build_context(tmp_path / "Dockerfile")
    assert str(tmp_path / "Dockerfile") in str(info.value)


def test_dockerfile_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="is a directory"):
        pack_build_context(tmp_path)


def test_dockerfile_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "Dockerfile")
    with pytest.raises(InvalidArgumentError, match="not a regular file"):
        pack_build_context(tmp_path / "Dockerfile")


def test_context_is_missing_or_not_a_directory(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    with pytest.raises(InvalidArgumentError, match="no such directory") as info:
        pack_build_context(tmp_path / "Dockerfile", context=tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    with pytest.raises(InvalidArgumentError, match="is not a directory"):
        pack_build_context(tmp_path / "Dockerfile", context=tmp_path / "Dockerfile")


def test_bad_dockerignore_pattern(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    write(tmp_path / ".dockerignore", "*.pyc\n[oops\n")
    with pytest.raises(InvalidArgumentError, match=r"\.dockerignore, line 2, '\[oops'"):
        pack_build_context(tmp_path / "Dockerfile")


def test_bad_max_bytes(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    with pytest.raises(InvalidArgumentError, match="max_bytes"):
        pack_build_context(tmp_path / "Dockerfile", max_bytes=-1)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    write(tmp_path / "Dockerfile", DOCKERFILE)
    secret = write(tmp_path / "secret.key", "k", mode=0)
    try:
        with pytest.raises(InvalidArgumentError, match="Cannot read") as info:
            pack_build_context(tmp_path / "Dockerfile")
        assert str(secret) in str(info.value) and ".dockerignore" in str(info.value)
        write(tmp_path / ".dockerignore", "secret.key\n")
        assert "secret.key" not in members(pack_build_context(tmp_path / "Dockerfile"))
    finally:
        secret.chmod(0o600)

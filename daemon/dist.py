"""The wheels the daemon serves to booting nodes: its own Burla, and an optional wheelhouse.

A node's startup script installs exactly the daemon's Burla version from the daemon itself
(`GET /v1/dist/`, a plain "find links" page pip reads), so nodes need no package index for Burla,
and an edited checkout runs on its nodes as it runs here. The wheel is built from the modules this
process runs (the package folders that `burla`, `burla.common`, `burla.daemon`, `burla.node_agent` and
`burla.schemas` were imported from) with the installed metadata: the same bytes for the same source.
Burla's dependencies come from the node's package index, or, for nodes without one, from the
`[cluster] wheelhouse` folder (e.g. filled with `pip wheel -w WHEELHOUSE burla`), served beside it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.metadata
import os
import re
import tempfile
import threading
import zipfile
from pathlib import Path

PACKAGES = ("burla", "burla.common", "burla.daemon", "burla.node_agent", "burla.schemas")
_FILE = re.compile(r"^[A-Za-z0-9_.+-]{1,200}\.(?:whl|tar\.gz)$")
_ENTRY_POINTS = "[console_scripts]\nburla = burla.cli:main\nburlad = burla.daemon.cli:main\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same source makes the same wheel


def wheel_name(version: str) -> str:
    return f"burla-{version}-py3-none-any.whl"


def _metadata(version: str) -> str:
    try:
        dist = importlib.metadata.distribution("burla")
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    except importlib.metadata.PackageNotFoundError:
        text = None
    if not text:
        text = f"Metadata-Version: 2.1\nName: burla\nVersion: {version}\n"
    return re.sub(r"(?m)^Version: .*$", f"Version: {version}", text, count=1)


def _sources() -> list[tuple[str, Path]]:
    """(path in the wheel, file) of every module of the packages this process imported Burla from."""
    import importlib

    found = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        folder = Path(next(iter(module.__path__)))
        prefix = package.replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            found.append((f"{prefix}/{path.name}", path))
    return found


def build_wheel(dest: Path, version: str) -> Path:
    """Write Burla's wheel into `dest` (once per content) and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / wheel_name(version)
    info = f"burla-{version}.dist-info"
    entries = [(name, file.read_bytes()) for name, file in _sources()]
    entries += [
        (f"{info}/METADATA", _metadata(version).encode()),
        (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: burlad\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{info}/entry_points.txt", _ENTRY_POINTS.encode()),
    ]
    record = []
    for name, data in entries:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    entries.append((f"{info}/RECORD", ("\n".join(record) + "\n").encode()))
    fd, name = tempfile.mkstemp(dir=dest, prefix=".burla-wheel-")  # one per build: builds never share it
    os.close(fd)
    tmp = Path(name)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries:
            item = zipfile.ZipInfo(name, _EPOCH)
            item.external_attr = 0o644 << 16
            item.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(item, data)
    os.replace(tmp, path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class Dist:
    """The files under /v1/dist/: Burla's wheel (built on first use) and the wheelhouse's files."""

    def __init__(self, build_dir: Path, version: str, wheelhouse: str = "") -> None:
        self.build_dir, self.version = build_dir, version
        self.wheelhouse = Path(wheelhouse).expanduser() if wheelhouse else None
        self._wheel: Path | None = None
        self._lock = threading.Lock()  # pages are made in threads: many nodes boot at once
        self._digests: dict[tuple[str, int, int], str] = {}

    def files(self) -> dict[str, Path]:
        with self._lock:
            if self._wheel is None:
                self._wheel = build_wheel(self.build_dir, self.version)
        files = {}
        if self.wheelhouse is not None and self.wheelhouse.is_dir():
            for path in sorted(self.wheelhouse.iterdir()):
                if _FILE.match(path.name) and path.is_file() and not path.name.startswith("burla-"):
                    files[path.name] = path
        files[self._wheel.name] = self._wheel
        return files

    def index(self) -> str:
        """A find-links page: one link per file, with its sha256 for pip to check."""
        links = []
        for name, path in self.files().items():
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            digest = self._digests.get(key)
            if digest is None:
                digest = self._digests[key] = _sha256(path)
            links.append(f'<a href="{html.escape(name)}#sha256={digest}">{html.escape(name)}</a><br>')
        return "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n"

    def file(self, name: str) -> Path | None:
        """The file of that name, or None (a name that is not one of ours never becomes a path)."""
        if not _FILE.match(name):
            return None
        return self.files().get(name)

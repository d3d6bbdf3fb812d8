"""The user's environment on a node: installed once, cached, shared read-only by its workers.

For a job's manifest (`burla.schemas.environment`) the agent works out what
the workers' own environment (the image, or the process workers'
interpreter) lacks, and installs each missing distribution into its own
folder of a content-addressed cache: ``<root>/dists/py3.11/<name>-<version>``
(index packages, with uv or pip, ``--no-deps``: the manifest pins every
one), or ``...-<digest>`` (packages that travelled as files). The client's
local code is one zip in ``<root>/code``. A worker of the job then starts with
the code zip and those folders first on its import path. A second job with
the same environment installs nothing; the cache lives in the agent's state
directory, so it survives a restart.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import platform
import shutil
import sys
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from burla.common import local
from burla.schemas.environment import FILES, Distribution, Environment, normalize

from .runtime import WorkerSetupError

log = logging.getLogger("burla.agent")

_COMPLETE = ".burla-complete"
INSTALL_HOME = ".burla-install-home"  # an installer's HOME inside its target folder, where one needs its own
_INSTALLS_AT_ONCE = 4
_TAIL_LINES = 20

Fetch = Callable[[str], Awaitable[bytes]]
Phase = Callable[[str], None]
Share = Callable[[Path, bool], None]  # let workers read a path (and, if True, all below it)
InstallerOptions = Callable[[Path], dict[str, Any]]  # how to run an installer into a folder (`Runtime`)


def _share_nothing(path: Path, tree: bool) -> None:
    """Workers run as the agent's user (or in containers of it): they read what it writes."""


def _as_agent(target: Path) -> dict[str, Any]:
    return {}


class PackageInstallError(WorkerSetupError):
    """A package of the job's environment cannot be installed on this node. Says which, and why.

    The client raises `burla.errors.InstallError` for it (a `messages.PoolError` of kind "install").
    """


def _tail(text: str) -> str:
    return "\n".join(line for line in text.strip().splitlines()[-_TAIL_LINES:])


def compatible(tags: tuple[str, ...], python: str, machine: str) -> bool:
    """Can a wheel with these tags run on CPython `python` ("3.11") on Linux/`machine`?"""
    if not tags:
        return True  # no WHEEL file: installed from an sdist or in place; nothing says otherwise
    major, minor = python.split(".")[:2]
    pythons = {f"cp{major}{minor}", f"py{major}{minor}", f"py{major}", f"cp{major}"}
    for tag in tags:
        try:
            py, _abi, plat = tag.rsplit("-", 2)
        except ValueError:
            continue
        if not pythons & set(py.split(".")):
            continue
        for p in plat.split("."):
            if p == "any" or (p.startswith(("linux_", "manylinux", "musllinux")) and p.endswith(machine)):
                return True
    return False


class EnvCache:
    def __init__(
        self,
        root: Path,
        fetch: Fetch,
        hostname: str,
        installer: str = "auto",
        share: Share = _share_nothing,
        installer_options: InstallerOptions = _as_agent,
    ) -> None:
        """`share`: makes what the cache holds readable by workers of another user (`Runtime.share`);
        `installer_options`: as whom and with what environment uv or pip run (`Runtime.installer_options`)."""
        self.root = root
        self.fetch = fetch
        self.hostname = hostname
        self.installer = installer
        self.share = share
        self.installer_options = installer_options
        self.machine = platform.machine()
        (root / "dists").mkdir(parents=True, exist_ok=True)
        (root / "code").mkdir(exist_ok=True)
        (root / "manifests").mkdir(exist_ok=True)
        share(root, True)  # what earlier agents of this state dir installed, too
        self._locks: collections.defaultdict[str, trio.Lock] = collections.defaultdict(trio.Lock)
        self._limiter = trio.CapacityLimiter(_INSTALLS_AT_ONCE)
        self.counters: collections.Counter[str] = collections.Counter()

    # ---- manifests and code -----------------------------------------------------------

    async def manifest(self, digest: str) -> Environment:
        path = self.root / "manifests" / f"{digest}.json"
        if not path.exists():
            data = await self._fetch(digest, "the environment manifest")
            local.write_file(path, data)
        return Environment.loads(path.read_bytes())

    async def _fetch(self, digest: str, what: str) -> bytes:
        try:
            return await self.fetch(f"blobs/{digest}")
        except LookupError:
            raise PackageInstallError(f"the daemon has no {what} ({digest[:12]})") from None

    async def _code(self, digest: str) -> str:
        path = self.root / "code" / f"{digest}.zip"
        async with self._locks[f"code:{digest}"]:
            if not path.exists():
                data = await self._fetch(digest, "code of the job")
                tmp = path.with_suffix(".part")
                local.write_file(tmp, data)
                self.share(tmp, False)
                os.replace(tmp, path)
        return str(path)

    # ---- distributions --------------------------------------------------------------------

    def folder(self, dist: Distribution, python: str) -> Path:
        name = f"{dist.name}-{dist.version}" + (f"-{dist.blob[:16]}" if dist.source == FILES else "")
        return self.root / "dists" / f"py{python}" / name

    async def prepare(self, digest: str, present: dict[str, str], python: str, phase: Phase) -> list[str]:
        """The import path (host paths) a worker of this environment starts with; installs what is missing.

        `present`: what the workers' own environment has ({normalized name: version}).
        """
        manifest = await self.manifest(digest)
        if manifest.python_version != python:
            raise PackageInstallError(
                f"the client runs Python {manifest.python_version}; this node's workers run Python {python}"
            )
        present = {normalize(k): v for k, v in present.items()}
        needed = [d for d in manifest.distributions if present.get(d.name) != d.version]
        for dist in needed:
            if dist.source == FILES and not compatible(dist.tags, python, self.machine):
                raise PackageInstallError(
                    f"{dist.name} {dist.version} was built for {', '.join(dist.tags)}, but this node runs "
                    f"CPython {python} on Linux {self.machine}: build it for that platform, or install it from an "
                    "index where the node can find a matching wheel"
                )
        missing = [d for d in needed if not (self.folder(d, python) / _COMPLETE).exists()]
        self.counters["dists_reused"] += len(needed) - len(missing)
        if missing:
            phase(f"installing {len(missing)} package{'s' * (len(missing) != 1)}")
            errors: list[PackageInstallError] = []

            async def install(dist: Distribution) -> None:
                try:
                    await self._install(dist, manifest, python)
                except PackageInstallError as e:
                    errors.append(e)

            async with trio.open_nursery() as nursery:
                for dist in missing:
                    nursery.start_soon(install, dist)
            if errors:
                raise errors[0] if len(errors) == 1 else PackageInstallError("\n\n".join(str(e) for e in errors))
        paths = [await self._code(manifest.code)] if manifest.code else []
        paths += [str(self.folder(d, python)) for d in needed]
        self.counters["environments_prepared"] += 1
        return paths

    async def _install(self, dist: Distribution, manifest: Environment, python: str) -> None:
        final = self.folder(dist, python)
        async with self._locks[str(final)], self._limiter:
            if (final / _COMPLETE).exists():  # another job installed it meanwhile
                return
            tmp = final.with_name(f".{final.name}.part")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.share(tmp.parent, False)  # dists/py3.X, new for the first install of a Python
            try:
                if dist.source == FILES:
                    data = await self._fetch(dist.blob, f"files of {dist.name} {dist.version}")
                    await trio.to_thread.run_sync(_unpack, data, tmp)
                else:
                    await self._from_index(dist, manifest, tmp)
                shutil.rmtree(tmp / INSTALL_HOME, ignore_errors=True)
                (tmp / _COMPLETE).write_text(f"{dist.name}=={dist.version}\n")
                self.share(tmp, True)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        self.counters["installs"] += 1
        log.info("installed %s %s into %s", dist.name, dist.version, final)

    async def _from_index(self, dist: Distribution, manifest: Environment, target: Path) -> None:
        requirement = f"{dist.name}=={dist.version}"
        indexes: list[str] = []
        if manifest.index_url:
            indexes += ["--index-url", manifest.index_url]
        for url in manifest.extra_index_urls:
            indexes += ["--extra-index-url", url]
        uv = _uv() if self.installer in ("auto", "uv") else None
        if uv is not None:
            command = [uv, "pip", "install", "--no-deps", "--target", str(target), "--python", sys.executable,
                       "--quiet", *indexes, requirement]  # fmt: skip
        else:
            command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                       "--disable-pip-version-check", "--no-warn-script-location", "--quiet", *indexes, requirement]  # fmt: skip
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, **self.installer_options(target)
        )
        if result.returncode != 0:
            output = (result.stderr or b"").decode(errors="replace") + (result.stdout or b"").decode(errors="replace")
            raise PackageInstallError(
                f"{requirement} failed to install on node {self.hostname} "
                f"({'uv' if uv else 'pip'} exited with code {result.returncode}):\n{_tail(output)}"
            )

    def statistics(self) -> dict[str, Any]:
        return dict(self.counters)


def _uv() -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the `uv` package from PyPI

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        return None


def _unpack(data: bytes, target: Path) -> None:
    """Unpack a package's files (a tar from the client), refusing anything that would land outside `target`."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts:
                raise PackageInstallError(f"refusing to unpack {member.name!r}: it points outside the package folder")
        tar.extractall(target, filter="data")

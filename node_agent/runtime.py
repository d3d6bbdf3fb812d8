"""Where workers run: the interface every runtime implements.

A runtime starts one worker (a process, or a process in a container) that
runs the worker shim and connects back to the agent's socket. The agent does
everything else: it hands out work, watches memory, and replaces workers that
die. `ProcessRuntime` runs plain processes; the Podman runtime runs warm
rootless containers.
"""

from __future__ import annotations

import abc
import importlib.util
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import burla
from burla.schemas import worker as proto

from .pools import PoolSpec


class WorkerProcess(abc.ABC):
    """One started worker, as the agent sees it."""

    #: The worker's pid on this host, for memory accounting (None if unknown).
    pid: int | None = None
    #: The worker's raw stdout/stderr (what C code and subprocesses print), if captured.
    stdout: trio.abc.ReceiveStream | None = None
    stderr: trio.abc.ReceiveStream | None = None

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the worker to exit; its exit code, negative for a signal."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Stop the worker now (SIGKILL or the runtime's equivalent)."""

    #: The kernel's count of out-of-memory kills when its current lease started (see `deaths.oom_kills`).
    oom_kills_at_start: int | None = None
    #: The runtime knows that the kernel killed it for going over its memory limit (a container's cgroup).
    oom_killed: bool = False


class WorkerSetupError(Exception):
    """Workers cannot run here: the runtime cannot start, or a pool's image cannot be pulled, built or used.

    Says why. On the wire it becomes a `messages.PoolError` report, and the job fails with it.
    """


class Runtime(abc.ABC):
    name = "abstract"
    #: Workers are containers of images (pools come from the standby spec and the daemon's wants).
    containers = False
    #: The runtime (the kernel, through cgroups) enforces each worker's RAM: no watchdog needed.
    enforces_memory = False
    #: Marks what this agent's runtime creates, so a restarted agent of the node can clean it up.
    label = "burla"
    #: The node's cache of users' environments (the agent sets it): workers must be able to read it.
    env_root: Path | None = None
    #: What no worker may see (the agent's tokens; the agent sets it): a variable holding one is not passed on.
    secrets: tuple[str, ...] = ()

    @abc.abstractmethod
    async def prepare(self, run_dir: Path) -> None:
        """Get ready to start workers whose sockets and files live in `run_dir`."""

    @abc.abstractmethod
    def python_version(self) -> str:
        """The Python minor version workers run ("3.11"); for containers, the agent's own."""

    async def prepare_pool(
        self,
        spec: PoolSpec,
        fetch_build: Callable[[str], Awaitable[bytes]],
        phase: Callable[[str], None] = lambda _: None,
    ) -> str:
        """Make a pool's workers startable (pull or build its image); returns their Python version.

        `phase` hears what it is doing, in words ("pulling image X"), for the spinner.
        Raises WorkerSetupError, saying why, when they cannot run.
        """
        return self.python_version()

    async def distributions(self, spec: PoolSpec) -> dict[str, str]:
        """The distributions a pool's workers already have ({name: version}): not installed again."""
        return {}

    @abc.abstractmethod
    async def start_worker(self, slot: int, env: dict[str, str], spec: PoolSpec) -> WorkerProcess:
        """Start a worker of pool `spec` in `slot`; `env` carries the socket and progress paths."""

    def worker_path(self, host_path: str) -> str | None:
        """Where a worker sees a file of this host, or None if it cannot read it."""
        return None

    def share(self, path: Path, tree: bool = True) -> None:  # noqa: B027 - workers that read all the agent wrote
        """Let workers read `path` (and all below it, with `tree`), which the agent wrote for them."""

    def installer_options(self, target: Path) -> dict[str, Any]:
        """`trio.run_process` options for an installer of a job's packages into `target` (a new folder).

        Whatever it runs (a package's build code) gets no token in its environment.
        """
        return {"env": worker_env(secrets=self.secrets)}

    async def aclose(self) -> None:  # noqa: B027 - optional for runtimes with nothing to release
        """Release what `prepare` set up."""

    def statistics(self) -> dict[str, Any]:
        return {"runtime": self.name}


# Run by a worker's python3: its version and its distributions (of two with one name, the first on its path).
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json, sys; "
    "print(json.dumps({'python': '%d.%d' % sys.version_info[:2], "
    "'dists': {d.metadata['Name']: d.version for d in reversed(list(m.distributions())) if d.metadata['Name']}}))"
)


def build_shim_tree(dest: Path) -> Path:
    """Copy the worker shim, `burla.schemas`, the root of `burla` and cloudpickle into `dest`.

    Workers put `dest` first on their import path: it has everything the shim
    imports and nothing else of Burla's, so it works in any Python of the
    right minor version, in any container.
    """
    import cloudpickle

    from burla import _source_layout, node_agent, schemas

    if dest.exists():
        shutil.rmtree(dest)
    pkg = dest / "burla"
    (pkg / "node_agent").mkdir(parents=True)
    # burla's own root: it loads nothing on import, and its finder of a source checkout does nothing here
    _copy_module(Path(burla.__file__), pkg / "__init__.py")
    _copy_module(Path(_source_layout.__file__), pkg / "_source_layout.py")
    (pkg / "node_agent" / "__init__.py").write_text("")
    _copy_module(Path(node_agent.__file__).parent / "worker_shim.py", pkg / "node_agent" / "worker_shim.py")
    # with their bytecode: each worker would compile them again (one of another user cannot even keep it)
    shutil.copytree(Path(schemas.__file__).parent, pkg / "schemas")
    shutil.copytree(Path(cloudpickle.__file__).parent, dest / "cloudpickle")
    return dest


def _copy_module(source: Path, dest: Path) -> None:
    """Copy a module and its bytecode for this Python, if there is some (copy2 keeps the mtime it checks)."""
    shutil.copy2(source, dest)
    compiled = Path(importlib.util.cache_from_source(str(source)))
    if compiled.exists():
        target = Path(importlib.util.cache_from_source(str(dest)))
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(compiled, target)


def worker_env(base: dict[str, str] | None = None, secrets: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment a process worker starts with: the agent's, minus what must not leak.

    Every ``BURLA_*`` variable goes (the agent's config: its token, a client's API key, a daemon's
    tokens), and so does any other that holds one of `secrets` (a token under another name).
    """
    env = dict(os.environ if base is None else base)
    secrets = tuple(s for s in secrets if s)
    for key, value in list(env.items()):
        if (key.startswith("BURLA_") and key != proto.LOG_FLUSH_ENV) or any(s in value for s in secrets):
            del env[key]
    return env

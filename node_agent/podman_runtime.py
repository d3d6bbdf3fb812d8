"""Workers as warm rootless Podman containers, through the Podman API socket.

Each worker is a container of its pool's image running the worker shim,
which is bind-mounted read-only with `burla.schemas` and cloudpickle (the
image needs nothing but a python3 of the clients' minor version). The shim
connects to the agent's unix socket, bind-mounted too; no service listens
inside a container. A container sees nothing else of the host but the
environment cache (read-only) and its own progress file: not the agent's
state, not the Podman API socket (which would let it start containers that
see everything of the agent's user), and no token in its environment.

The agent starts ``podman system service`` as its own user unless a socket is
configured, and talks to it with the `podman` package (in threads: it is
synchronous). Images are pulled when missing (credentials: the user's
``podman login``, or ``agent.registry_auth_file``), built from a client's
build context for ``dockerfile=`` (tagged by the context's digest, so the
second build is a cache hit), and checked once for python3 and its version.

Limits: with cgroups v2 and delegated controllers, each container gets
``--memory`` and ``--cpus`` and the kernel enforces them. Without (cgroups v1,
as on some VMs), the agent enforces RAM itself by watching the container's
processes, as for process workers, and pins each container to its CPUs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from burla.schemas import worker as proto

from .pools import PoolSpec
from .runtime import LIST_DISTRIBUTIONS, Runtime, WorkerProcess, WorkerSetupError, build_shim_tree, worker_env

log = logging.getLogger("burla.agent")

SHIM_DIR = "/burla/shim"
RUN_DIR = "/burla/run"
ENV_DIR = "/burla/env"
_SERVICE_WAIT = 30.0
_EXIT_RECORD_WAIT = 10  # seconds for Podman to record the exit of a container whose process is gone


def _podman() -> Any:
    try:
        import podman
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise WorkerSetupError("the podman runtime needs the podman package: pip install 'burla[podman]'") from e
    return podman


def _tail(lines: Any, n: int = 25) -> str:
    """The last lines of a podman build log (JSON lines or text)."""
    out: list[str] = []
    for raw in lines or ():
        try:
            item = json.loads(raw)
            text = item.get("stream") or item.get("error") or ""
        except (ValueError, TypeError, AttributeError):
            text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        out.extend(line for line in str(text).splitlines() if line.strip())
    return "\n".join(out[-n:])


class _Container(WorkerProcess):
    def __init__(self, runtime: PodmanRuntime, container_id: str, pid: int) -> None:
        self.runtime = runtime
        self.id = container_id
        self.pid = pid or None
        self.stdout = self.stderr = None  # the shim sends what calls print over its socket
        self.oom_killed = False

    async def wait(self) -> int:
        gone = False  # its process is known to have exited: Podman's record of it is all we wait for
        if self.pid:
            try:
                fd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                gone = True
            except OSError:  # no pidfds here: Podman tells us when it exits
                pass
            else:
                try:
                    await trio.lowlevel.wait_readable(fd)
                    gone = True
                finally:
                    os.close(fd)
        timeout = _EXIT_RECORD_WAIT if gone else None
        code, self.oom_killed = await trio.to_thread.run_sync(self.runtime._wait_and_remove, self.id, timeout)
        return code

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)  # rootless: the container's init runs as our user
                return
            except ProcessLookupError:
                return
            except PermissionError:
                pass
        threading.Thread(target=self.runtime._kill, args=(self.id,), daemon=True).start()


class PodmanRuntime(Runtime):
    name = "podman"
    containers = True

    def __init__(
        self,
        socket_url: str = "",
        network: bool = True,
        registry_auth_file: str = "",
        label: str = "burla",
    ) -> None:
        self.socket_url = socket_url
        self.network = network
        self.registry_auth_file = registry_auth_file
        self.label = label
        self.enforces_memory = False
        self.limits = False
        self._service: trio.Process | None = None
        self._local = threading.local()
        self._images: dict[str, dict[str, Any]] = {}  # image id -> {"python": "3.11", "dists": {name: version}}
        self._prepare_lock = trio.Lock()
        self.shim_root: Path | None = None
        self.run_dir: Path | None = None
        self._service_dir: Path | None = None
        self.counters: dict[str, int] = {"pulls": 0, "builds": 0, "build_cache_hits": 0, "containers_started": 0}

    @classmethod
    def from_config(cls, config: Any) -> PodmanRuntime:
        return cls(config.podman_socket, config.container_network, config.registry_auth_file)

    # ---- the service -----------------------------------------------------------------

    def client(self) -> Any:
        """A PodmanClient for this thread (the package uses requests sessions)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = _podman().PodmanClient(base_url=self.socket_url, timeout=600)
        return client

    async def prepare(self, run_dir: Path) -> None:
        _podman()
        self.run_dir = run_dir
        self.shim_root = build_shim_tree(run_dir / "shim")
        if not self.socket_url:
            # the API gives whoever reaches it all of this user's rights: a private folder, never a mounted one
            self._service_dir = Path(tempfile.mkdtemp(prefix="burla-podman-"))
            socket_path = self._service_dir / "podman.sock"
            env = worker_env(secrets=self.secrets)  # Podman needs none of Burla's variables, tokens least
            if self.registry_auth_file:
                env["REGISTRY_AUTH_FILE"] = self.registry_auth_file
            self._service = await trio.lowlevel.open_process(
                ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
                env=env,
                stdin=-3,  # DEVNULL
                start_new_session=True,
            )
            self.socket_url = f"unix://{socket_path}"
        with trio.move_on_after(_SERVICE_WAIT) as waited:
            while True:
                try:
                    if await trio.to_thread.run_sync(lambda: self.client().ping()):
                        break
                except _podman_errors():  # not up yet
                    pass
                if self._service is not None and self._service.returncode is not None:
                    raise WorkerSetupError(f"`podman system service` exited with code {self._service.returncode}")
                await trio.sleep(0.05)
        if waited.cancelled_caught:
            raise WorkerSetupError(f"the Podman API at {self.socket_url} did not answer within {_SERVICE_WAIT:.0f}s")
        info = await trio.to_thread.run_sync(lambda: self.client().info())
        host = info.get("host", {})
        controllers = set(host.get("cgroupControllers") or ())
        self.limits = host.get("cgroupVersion") == "v2" and {"memory", "cpu"} <= controllers
        self.enforces_memory = self.limits
        removed = await trio.to_thread.run_sync(self._remove_stale)
        log.info(
            "podman %s at %s: cgroups %s, limits %s, %d stale containers removed",
            info.get("version", {}).get("Version", "?"), self.socket_url, host.get("cgroupVersion"),
            "enforced by the kernel" if self.limits else "enforced by the agent", removed,
        )  # fmt: skip

    def _remove_stale(self) -> int:
        """Containers an earlier agent of this node left behind."""
        stale = self.client().containers.list(all=True, filters={"label": [f"burla.node={self.label}"]})
        for container in stale:
            try:
                container.remove(force=True)
            except _podman_errors() as e:  # gone already, most likely
                log.debug("stale container %s: not removed (%s)", container.id[:12], e)
        return len(stale)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(self._remove_stale)
            except _podman_errors() as e:  # the service may be gone
                log.info("containers of this node not removed at exit: %s", e)
            if self._service is not None and self._service.returncode is None:
                self._service.terminate()
                with trio.move_on_after(5):
                    await self._service.wait()
                self._service.kill()
            if self._service_dir is not None:
                shutil.rmtree(self._service_dir, ignore_errors=True)

    def worker_path(self, host_path: str) -> str | None:
        if self.env_root is not None and Path(host_path).is_relative_to(self.env_root):
            return str(Path(ENV_DIR) / Path(host_path).relative_to(self.env_root))
        return None  # other host files are not visible in containers

    def python_version(self) -> str:
        import sys

        return f"{sys.version_info.major}.{sys.version_info.minor}"

    def statistics(self) -> dict[str, Any]:
        return {"runtime": self.name, "limits": "kernel" if self.limits else "agent", **self.counters}

    # ---- images --------------------------------------------------------------------------

    async def prepare_pool(
        self,
        spec: PoolSpec,
        fetch_build: Callable[[str], Awaitable[bytes]],
        phase: Callable[[str], None] = lambda _: None,
    ) -> str:
        async with self._prepare_lock:  # one pull or build at a time; the second waiter finds it done
            exists = await trio.to_thread.run_sync(lambda: self.client().images.exists(spec.image))
            if not exists and spec.build:
                phase(f"building image {spec.image}")
                context = await fetch_build(spec.build)
                await trio.to_thread.run_sync(self._build, spec, context)
            elif not exists:
                phase(f"pulling image {spec.image}")
                await trio.to_thread.run_sync(self._pull, spec.image)
            elif spec.build:
                self.counters["build_cache_hits"] += 1
            phase(f"starting containers of {spec.image}")
            python = await trio.to_thread.run_sync(self._python_of, spec.image)
        if spec.python_version and python != spec.python_version:
            raise WorkerSetupError(
                f"its python3 is Python {python}, but the client runs Python {spec.python_version}; "
                f"use an image with Python {spec.python_version}"
            )
        return python

    def _pull(self, image: str) -> None:
        podman = _podman()
        try:
            self.client().images.pull(image)
        except (podman.errors.APIError, podman.errors.ImageNotFound) as e:
            raise WorkerSetupError(f"cannot pull it: {e}") from None
        if not self.client().images.exists(image):
            raise WorkerSetupError("cannot pull it: the registry returned no image")
        self.counters["pulls"] += 1

    def _build(self, spec: PoolSpec, context: bytes) -> None:
        import tarfile

        podman = _podman()
        with tarfile.open(fileobj=io.BytesIO(context)) as tar:
            names = set(tar.getnames())
        dockerfile = next((n for n in (".burla/Dockerfile", "Dockerfile", "Containerfile") if n in names), None)
        if dockerfile is None:
            raise WorkerSetupError("the build context has no Dockerfile")
        try:
            self.client().images.build(
                fileobj=io.BytesIO(context), custom_context=True, dockerfile=dockerfile, tag=spec.image, rm=True
            )
        except podman.errors.BuildError as e:
            raise WorkerSetupError(f"the Dockerfile did not build: {e.msg}\n{_tail(e.build_log)}") from None
        except podman.errors.APIError as e:
            raise WorkerSetupError(f"the Dockerfile did not build: {e}") from None
        self.counters["builds"] += 1

    def _python_of(self, image: str) -> str:
        return str(self._inspect(image)["python"])

    async def distributions(self, spec: PoolSpec) -> dict[str, str]:
        found = await trio.to_thread.run_sync(self._inspect, spec.image)
        return dict(found["dists"])

    def _inspect(self, image: str) -> dict[str, Any]:
        """The python3 version of an image and its distributions, once per image id."""
        image_id = self.client().images.get(image).id
        if image_id in self._images:
            return self._images[image_id]
        code, output = self._run_once(image, ["python3", "-c", LIST_DISTRIBUTIONS])
        text = output.decode(errors="replace").strip()
        if code == 127 or "executable file" in text and "not found" in text:
            raise WorkerSetupError("it has no python3; Burla runs functions with the image's python3")
        if code != 0:
            raise WorkerSetupError(f"its python3 does not run (exit code {code}): {text[-500:]}")
        try:
            found: dict[str, Any] = json.loads(text.splitlines()[-1])
            str(found["python"])
        except (ValueError, KeyError, IndexError):
            raise WorkerSetupError(f"its python3 did not say its version (said {text[-200:]!r})") from None
        self._images[image_id] = found
        return found

    def _run_once(self, image: str, command: list[str]) -> tuple[int, bytes]:
        """Run a throwaway container to completion: its exit code and output."""
        podman = _podman()
        try:
            container = self.client().containers.create(
                image, command, network_mode="none", labels={"burla.node": self.label}
            )
        except podman.errors.APIError as e:
            raise WorkerSetupError(f"cannot run it: {e}") from None
        try:
            try:
                container.start()
            except podman.errors.APIError as e:  # e.g. the command is not in the image
                text = str(e)
                if "not found" in text or "no such file" in text.lower():
                    return 127, text.encode()
                raise WorkerSetupError(f"cannot run it: {e}") from None
            code = int(container.wait())
            logs = container.logs(stdout=True, stderr=True)
            output = logs if isinstance(logs, bytes) else b"".join(logs)
            return code, output
        finally:
            try:
                container.remove(force=True)
            except podman.errors.APIError:
                pass

    # ---- workers --------------------------------------------------------------------------

    async def start_worker(self, slot: int, env: dict[str, str], spec: PoolSpec) -> WorkerProcess:
        assert self.run_dir is not None and self.shim_root is not None, "prepare() first"
        inside = {
            key: value.replace(str(self.run_dir), RUN_DIR) if key.startswith("BURLA_WORKER_") else value
            for key, value in env.items()
        }
        inside["PYTHONPATH"] = SHIM_DIR
        inside["PYTHONUNBUFFERED"] = "1"
        container_id, pid = await trio.to_thread.run_sync(self._start, slot, inside, spec)
        self.counters["containers_started"] += 1
        if pid and not self.limits and spec.cpus > 0:
            _pin(pid, slot, spec.cpus)
        return _Container(self, container_id, pid)

    def _start(self, slot: int, env: dict[str, str], spec: PoolSpec) -> tuple[str, int]:
        podman = _podman()
        # of the run dir, only the agent's socket and this worker's progress file: not the shim's writable
        # original (a job could change what later jobs' workers run), nor the other workers' files
        mounts = [{"type": "bind", "source": str(self.shim_root), "target": SHIM_DIR, "read_only": True}]
        for key in (proto.SOCKET_ENV, proto.PROGRESS_ENV):
            inside = env[key]  # under RUN_DIR (`start_worker`)
            mounts.append({"type": "bind", "source": str(self.run_dir) + inside[len(RUN_DIR) :], "target": inside})
        if self.env_root is not None:  # the node's cache of users' packages and code, read-only
            mounts.append({"type": "bind", "source": str(self.env_root), "target": ENV_DIR, "read_only": True})
        kwargs: dict[str, Any] = {
            "command": ["python3", "-m", "burla.node_agent.worker_shim"],
            "environment": env,
            "mounts": mounts,
            "labels": {"burla.node": self.label, "burla.pool": spec.key},
            "name": f"burla-{self.label}-{slot}-{os.urandom(3).hex()}",
            "working_dir": "/tmp",
        }
        if not self.network:
            kwargs["network_mode"] = "none"
        if self.limits:
            if spec.ram_bytes:
                kwargs["mem_limit"] = int(spec.ram_bytes)
            if spec.cpus:
                kwargs["nano_cpus"] = int(spec.cpus * 1e9)
        try:
            container = self.client().containers.create(spec.image, **kwargs)
            container.start()
            container.reload()
        except podman.errors.APIError as e:
            raise WorkerSetupError(f"cannot start a container of it: {e}") from None
        return container.id, int(container.attrs.get("State", {}).get("Pid") or 0)

    def _wait_and_remove(self, container_id: str, timeout: float | None) -> tuple[int, bool]:
        """The container's exit code and whether it ran out of memory; then it is removed.

        `timeout` bounds the wait where its process is known to be gone: Podman's wait
        endpoint has been seen to hang now and then, and a slot must never wait on it forever.
        """
        client = self.client()
        code, oom = -signal.SIGKILL, False
        try:
            container = client.containers.get(container_id)
        except _podman_errors():  # removed underneath us
            return code, oom
        try:
            code = int(container.wait(condition=["exited", "stopped"], timeout=timeout))
            container.reload()
            oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        except _podman_errors() as e:  # removed underneath us, or the wait timed out
            log.warning("container %s: no exit code from Podman (%s: %s)", container_id[:12], type(e).__name__, e)
        try:
            container.remove(force=True)
        except _podman_errors() as e:
            log.debug("container %s: not removed (%s)", container_id[:12], e)
        if code > 128:  # the shell convention: 128 + the signal that killed it
            code = -(code - 128)
        return code, oom

    def _kill(self, container_id: str) -> None:
        try:
            self.client().containers.get(container_id).kill()
        except _podman_errors():  # gone already
            pass


def _podman_errors() -> tuple[type[BaseException], ...]:
    """What a call to Podman's API raises when it fails: connection and HTTP errors (requests' and
    podman-py's, all OSErrors) and podman-py's own; anything else is a bug, and is not caught."""
    return (OSError, _podman().errors.PodmanError)


def _pin(pid: int, slot: int, cpus: float) -> None:
    """Without cgroup limits, keep a container on its share of CPUs (slot by slot, round robin)."""
    available = sorted(os.sched_getaffinity(0))
    width = max(1, int(round(cpus)))
    if width >= len(available):
        return
    start = (slot * width) % len(available)
    chosen = {available[(start + i) % len(available)] for i in range(width)}
    try:
        os.sched_setaffinity(pid, chosen)
    except OSError:
        pass

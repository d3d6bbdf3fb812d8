"""The embedded default: a local burlad and one node agent, started on demand.

`burla.remote_parallel_map` with no cluster configured runs
``burlad serve --embedded``. That process binds a port, starts one node agent
beside it, and writes ``daemon.json`` (URL, pid, admin token) in the local
state directory so later calls from any process of this user find it. It
stops itself, and its agent, after ``embedded.idle_timeout`` with no job.

The socket is bound and the agent started before the daemon's heavy imports,
so the agent's and its workers' start-up overlaps the daemon's. That agent is
forked from this process once trio, the wire schemas and the config are
imported (`fork_agent`), so it does not import them again; an agent started
again after a crash is a process of its own (`start_agent`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import IO, Any, Union

from burla.common.config import ClusterConfig, Config, NodeGroupConfig
from burla.common.local import DISCOVERY_FILE, START_LOCK_FD_ENV, local_cluster_home

from .state_dir import TOKENS_FILE, lock_state_dir, new_token, read_tokens

log = logging.getLogger("burla.daemon")


def _tokens(state_dir: Path) -> dict[str, str]:
    """The local cluster's tokens, known before burlad opens its store: its agent starts meanwhile."""
    tokens = read_tokens(state_dir / TOKENS_FILE)
    return {role: tokens.get(role) or new_token(role) for role in ("admin", "node")}


def run_embedded(config: Config) -> None:
    """Serve a local cluster until idle or stopped (blocks)."""
    start_lock = os.environ.pop(START_LOCK_FD_ENV, "")
    home = local_cluster_home()
    home.mkdir(parents=True, exist_ok=True)
    config.daemon.state_dir = config.daemon.state_dir or str(home / "daemon")
    state_dir = Path(config.daemon.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    # Held until the agent has stopped too: `burla local stop` knows by it that everything has finished.
    with lock_state_dir(state_dir) as state_lock:
        _run_embedded(config, home, state_dir, state_lock, int(start_lock) if start_lock else -1)
    log.info("local cluster stopped")


def _run_embedded(config: Config, home: Path, state_dir: Path, state_lock: IO[str], start_lock: int) -> None:
    tokens = _tokens(state_dir)
    ram_dir: Path | None = None
    if not config.daemon.payload_dir:
        # Client and cluster share this machine, so a job cannot outlive a reboot: its payloads only
        # need to outlive a crash of burlad, and memory (tmpfs) is many times faster than the disk.
        from .payloads import ram_backed_dir

        ram = ram_backed_dir(f"{hashlib.sha256(str(home).encode()).hexdigest()[:12]}-payloads")  # one per home
        if ram is not None:
            config.daemon.payload_dir = str(ram)
            ram_dir = ram
    config.daemon.tls_cert = config.daemon.tls_key = ""  # loopback only: plain HTTP, as its clients expect
    config.daemon.admin_token = config.daemon.admin_token or tokens["admin"]
    config.daemon.node_token = config.daemon.node_token or tokens["node"]

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.daemon.host, config.daemon.port if config.daemon.port != 8080 else 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"

    # the live one is last: _watch replaces a dead one; with `nodes`, the node keeper keeps them instead
    private = [sock.fileno(), state_lock.fileno(), *([start_lock] if start_lock >= 0 else [])]
    agents: list[AgentProcess] = [] if config.embedded.nodes else [fork_agent(config, url, home, private)]
    if config.embedded.nodes:
        config.cluster = local_nodes(config.embedded.nodes, config.cluster)
    try:
        import trio

        trio.run(_serve_embedded, config, sock, url, agents, home, state_lock, start_lock)
    finally:
        if agents:
            _stop(agents[-1])
        else:
            _delete_local_nodes(state_dir)
        _remove_discovery(home)
        if ram_dir is not None:  # a clean exit: nothing needs the payloads, give the memory back
            shutil.rmtree(ram_dir, ignore_errors=True)


def local_nodes(count: int, cluster: ClusterConfig) -> ClusterConfig:
    """`burla local start --nodes N`: N local nodes, each with its share of this machine's CPUs, kept warm."""
    cpus = max(1, (os.cpu_count() or 1) // count)
    group = NodeGroupConfig(machine_type="local", cpus=cpus, standby=count)
    return dataclasses.replace(
        cluster, provider="local", name="local", groups=[group], max_cpus=max(cluster.max_cpus, cpus * count * 4)
    )


def _delete_local_nodes(state_dir: Path) -> None:
    """The local cluster's nodes end with it (a [cluster] daemon's nodes outlive it, to be adopted)."""
    import trio

    from .providers import LocalProvider

    async def delete_all() -> None:
        provider = LocalProvider(state_dir / "nodes", "local")
        async with trio.open_nursery() as nursery:
            for instance in await provider.list():
                nursery.start_soon(provider.delete, instance.name)

    trio.run(delete_all)


class ForkedAgent:
    """An agent `fork_agent` started: waited for, signalled and reaped as a `subprocess.Popen` is."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone all the same
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"agent {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code

    def _signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


AgentProcess = Union[subprocess.Popen[bytes], ForkedAgent]


def fork_agent(config: Config, url: str, home: Path, private: list[int]) -> ForkedAgent:
    """Start the local cluster's agent as a fork of this process, which has imported what both need.

    The child is what `start_agent` starts: its own session, cwd and log, stdin from /dev/null, none of
    this daemon's tokens but the node token, and none of `private`, the descriptors only the daemon holds
    (its socket, its locks). It never returns: it exits when its agent does.
    """
    import trio  # noqa: F401 - imported once, for this daemon and its agent

    from burla.schemas import messages  # noqa: F401

    workers = config.embedded.workers or config.agent.workers
    agent = dataclasses.replace(
        config.agent, url=url, state_dir=str(home / "agent"), token=config.daemon.node_token, workers=workers
    )
    agent_config = dataclasses.replace(
        config, agent=agent, daemon=dataclasses.replace(config.daemon, admin_token="", node_token="")
    )
    log_fd = os.open(home / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child writes this process's buffered output again
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return ForkedAgent(pid)
    code = 1
    try:
        os.setsid()  # as start_new_session: it ignores the daemon's Ctrl-C
        os.chdir(home)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        for fd in (null, log_fd, *private):
            os.close(fd)
        early_stop: list[int] = []  # as `burlad agent`: a SIGTERM before it listens is kept, not fatal
        signal.signal(signal.SIGTERM, lambda signum, frame: early_stop.append(signum))
        from .cli import run_agent

        code = run_agent(agent_config, early_stop)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)


def start_agent(config: Config, url: str, home: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-P", "-m", "burla.daemon", "agent", url, "--state-dir", str(home / "agent")]
    workers = config.embedded.workers or config.agent.workers
    if workers:
        cmd += ["--workers", str(workers)]
    log = open(home / "agent.log", "ab")
    env = {**os.environ, "BURLA_AGENT_TOKEN": config.daemon.node_token}  # never in argv, where `ps` shows it
    return subprocess.Popen(
        cmd, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )


def _stop(proc: AgentProcess, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("node agent (pid %d) did not stop within %gs of SIGTERM: killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
            return
    log.info("node agent (pid %d) stopped: exit code %d", proc.pid, proc.returncode)


def _remove_discovery(home: Path) -> None:
    path = home / DISCOVERY_FILE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


async def _serve_embedded(
    config: Config,
    sock: socket.socket,
    url: str,
    agents: list[AgentProcess],
    home: Path,
    state_lock: IO[str],
    start_lock: int,
) -> None:
    import trio

    from .server import serve, write_private

    # Listening before daemon.json is written: a `burla local stop` as soon as it serves is a clean stop too.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            running = await nursery.start(
                partial(
                    serve,
                    config.daemon,
                    sock=sock,
                    standby=config.standby,
                    state_lock=state_lock,
                    cluster=config.cluster if config.embedded.nodes else None,
                )  # fmt: skip
            )
            discovery = {
                "url": url,
                "pid": os.getpid(),
                "admin_token": running.admin_token,
                "started": running.plane.started,
                "state_dir": str(running.state_dir),  # its lock is held until this daemon has finished
                "version": running.plane.version,  # a client of another version replaces this cluster when idle
                "protocol": running.plane.protocol,
            }
            write_private(home / DISCOVERY_FILE, discovery)
            if start_lock >= 0:
                os.close(start_lock)  # other clients waiting to start a cluster now find this one
            nursery.start_soon(_watch, config, running, agents, home, nursery.cancel_scope)


async def _cancel_on_signal(signals: Any, scope: Any) -> None:
    async for signum in signals:
        log.info("stopping on %s", signal.Signals(signum).name)
        scope.cancel()
        return


async def _watch(config: Config, running: Any, agents: list[AgentProcess], home: Path, scope: Any) -> None:
    """Restart the agent if it dies; stop everything once idle."""
    import trio

    plane = running.plane
    while True:
        await trio.sleep(0.5)
        if agents and agents[-1].poll() is not None:
            agents.append(start_agent(config, running.url, home))
        idle = plane.clock() - plane.last_activity
        if not plane.busy() and idle > config.embedded.idle_timeout:
            scope.cancel()
            return

"""Run burlad: the control plane behind hypercorn, plus its housekeeping."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from burla.common import tls
from burla.common.config import ClusterConfig, DaemonConfig, StandbyConfig
from burla.common.trace import trace
from burla.errors import ConfigError
from burla.schemas import messages as m

from . import bounds
from .app import create_app
from .service import ControlPlane
from .state_dir import TOKENS_FILE, lock_state_dir
from .store import Store, hash_token

if TYPE_CHECKING:
    from .providers import Provider

log = logging.getLogger("burla.daemon")

# hypercorn reads sockets 64 KiB at a time; inputs and results are megabytes.
_RECV_BYTES = 1024 * 1024


@dataclasses.dataclass
class Running:
    """A started daemon, as `task_status.started()` reports it."""

    url: str
    plane: ControlPlane
    cancel_scope: trio.CancelScope
    state_dir: Path

    @property
    def admin_token(self) -> str:
        return self.plane.tokens["admin"]

    @property
    def node_token(self) -> str:
        return self.plane.tokens["node"]


def _tune_hypercorn() -> None:
    import hypercorn.trio.tcp_server as tcp_server

    tcp_server.MAX_RECV = max(tcp_server.MAX_RECV, _RECV_BYTES)


def write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON readable only by this user, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


async def serve(
    config: DaemonConfig,
    *,
    sock: socket.socket | None = None,
    standby: StandbyConfig | None = None,
    state_lock: IO[str] | None = None,
    cluster: ClusterConfig | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled, on `sock` if given. Reports a `Running` once listening.

    `state_lock`: the state dir's lock, taken by the caller (`lock_state_dir`), who lets it go.
    """
    tls_files = tls.server_files(config.tls_cert, config.tls_key)  # checked before anything listens
    state_dir = config.resolved_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if state_dir.stat().st_uid == os.geteuid():
        os.chmod(state_dir, 0o700)  # tokens.json, the database and the payloads: no other user's to list or read
    with (
        contextlib.nullcontext(state_lock) if state_lock is not None else lock_state_dir(state_dir),
        contextlib.closing(Store(state_dir / "burla.db", config.payload_dir or None)) as store,
    ):
        plane = ControlPlane(store, config)
        if standby is not None and standby.images:  # burla.toml's standby spec wins at start
            images = [m.StandbyImage(i, standby.python_version, standby.per_cpu) for i in standby.images]
            if images != plane.standby():
                plane.set_standby(images)
        if set(plane.tokens) >= {"admin", "node"}:
            write_private(state_dir / TOKENS_FILE, plane.tokens)  # for people: SQLite keeps only hashes
        else:
            log.warning("%s/tokens.json is missing or stale: the tokens still work, but their plaintext is "
                        "unknown here; set daemon.admin_token and daemon.node_token to choose new ones", state_dir)  # fmt: skip
        app = create_app(plane)
        _tune_hypercorn()
        hc = HypercornConfig()
        hc.bind = [f"fd://{sock.fileno()}" if sock is not None else f"{config.host}:{config.port}"]
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")
        hc.websocket_max_message_size = config.max_input_bytes + config.max_function_bytes + 64 * 1024**2
        hc.graceful_timeout = 1.0
        bounds.hypercorn_limits(hc, config)
        if tls_files is not None:
            hc.certfile, hc.keyfile = tls_files
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn_serve, app, hc))
            nursery.start_soon(plane.housekeeping)
            scheme = "https" if tls_files is not None else "http"
            url = _url_of(sock, scheme) if sock is not None else binds[0].replace("0.0.0.0", "127.0.0.1")
            if cluster is not None and cluster.provider:
                node_url = cluster.node_url or config.public_url or url
                ca_pem = _node_ca(cluster, config, node_url)
                await nursery.start(_keep_nodes, plane, cluster, state_dir, node_url, ca_pem)
            log.info("burlad %s serving on %s (state in %s)", plane.boot_id, url, state_dir)
            trace("daemon", "serving")
            task_status.started(Running(url, plane, nursery.cancel_scope, state_dir))


def make_provider(cluster: ClusterConfig, state_dir: Path) -> Provider:
    """The provider `[cluster] provider` names, or ConfigError saying what to set."""
    from .providers import LocalProvider, ProviderError  # here: a daemon of no [cluster] loads none of these

    if cluster.provider == "local":
        return LocalProvider(state_dir / "nodes", cluster.name)
    if cluster.provider == "gce":
        try:
            from .gce import GceProvider
        except ImportError as e:
            raise ConfigError(f"[cluster] provider = \"gce\" needs `pip install 'burla[gcp]'` ({e})") from None
        try:
            return GceProvider(
                cluster.project, cluster.region, cluster.zones, cluster.name, cluster.network,
                cluster.service_account, endpoint=cluster.api_endpoint,
            )  # fmt: skip
        except ProviderError as e:
            raise ConfigError(str(e)) from None
    raise ConfigError(f'[cluster] provider: {cluster.provider!r} is not "local" or "gce"')


def _node_ca(cluster: ClusterConfig, config: DaemonConfig, node_url: str) -> str:
    """The CA (PEM) that nodes verify an https `node_url` by: `[cluster] ca_file`, else the daemon's own
    certificate when it serves TLS (a self-signed one is its own CA); "" for the system's trust."""
    if not node_url.startswith("https://"):
        return ""
    if cluster.ca_file:
        return tls.read_ca(cluster.ca_file, "cluster.ca_file")
    if config.tls_cert:
        return tls.read_ca(config.tls_cert, "daemon.tls_cert")
    return ""


async def _keep_nodes(
    plane: ControlPlane, cluster: ClusterConfig, state_dir: Path, node_url: str, ca_pem: str, task_status: Any
) -> None:
    """The cluster's machines, for as long as the daemon serves (see node_keeper.py)."""
    from .cluster_link import PlaneCluster
    from .dist import Dist
    from .node_keeper import NodeKeeper, StoreBook, with_spec

    cluster_from_file = bool(cluster.groups)  # burla.toml's groups win over a spec set while burlad ran
    if not cluster.groups and not plane.store.meta("cluster_spec"):
        raise ConfigError("[cluster] has a provider but no [[cluster.groups]]: say which machines to start")
    stored = plane.store.meta("cluster_spec")
    if stored and not cluster_from_file:  # set with `burla cluster spec set` while an earlier burlad ran
        cluster = with_spec(cluster, m.ClusterSpec.from_wire(json.loads(stored)))
    provider = make_provider(cluster, state_dir)
    plane.dist = Dist(state_dir / "dist", plane.version, cluster.wheelhouse)
    await trio.to_thread.run_sync(plane.dist.files)  # the wheel built once, before any node asks
    keeper = NodeKeeper(cluster, provider, StoreBook(plane.store), node_url, plane.version, hash_token)
    keeper.ca_pem = ca_pem
    keeper.cluster = PlaneCluster(plane)
    plane.keeper = keeper
    try:
        await keeper.run(task_status=task_status)
    finally:
        with trio.CancelScope(shield=True):
            await provider.aclose()


def _url_of(sock: socket.socket, scheme: str) -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://{host}:{port}"

"""One typed configuration for `burlad serve` and `burlad agent`.

Values come, lowest precedence first, from the defaults below, `burla.toml`,
environment variables (``BURLA_<SECTION>_<KEY>``, e.g. ``BURLA_DAEMON_PORT``)
and command-line flags. Every key is documented in ``burla.toml.example``.
Durations are seconds and sizes bytes; in the file and the environment they
may also be written with units ("250ms", "10min", "256MB", "4GiB").
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from burla.errors import ConfigError

from . import local

SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
KB = 1000
MB = 1000**2
GB = 1000**3
MiB = 1024**2
GiB = 1024**3


def default_state_dir() -> Path:
    return local.state_home()


@dataclasses.dataclass
class DaemonConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: str = ""  # default: $BURLA_HOME/daemon or ~/.local/state/burla/daemon
    payload_dir: str = ""  # large inputs and results, one file each; default: <state_dir>/payloads
    public_url: str = ""  # the URL agents use to reach this daemon, when it differs
    tls_cert: str = ""  # a PEM certificate chain: with tls_key, burlad serves HTTPS
    tls_key: str = ""  # the certificate's PEM private key
    header_timeout: float = 30 * SECONDS  # a request's headers must arrive within this (an idle connection closes)
    read_timeout: float = 60 * SECONDS  # a connection silent this long mid-request (or a silent websocket) is closed
    body_timeout: float = 30 * MINUTES  # the longest one request's body may take to arrive
    poll_timeout: float = 2 * SECONDS  # how long an agent's long-poll waits for work
    agent_timeout: float = 10 * SECONDS  # silence after which an agent's leases run elsewhere
    target_lease_seconds: float = 0.2  # work per lease once a function's call time is known
    max_lease_inputs: int = 100_000
    prefetch_per_slot: int = 1  # leases queued on a node behind each busy worker's, so it never waits (0: none)
    infra_retries: int = 3  # times a call whose node is lost (silent agent, preempted) runs again before it fails
    max_function_bytes: int = 100 * MB
    max_input_bytes: int = 256 * MB
    max_result_bytes: int = 256 * MB  # one call's pickled return value; workers refuse a larger one, naming the input
    max_build_context_bytes: int = 100 * MB  # a dockerfile= build context, packed
    max_blob_bytes: int = 2 * GB  # one upload: a build context, or a package of the user's environment
    max_log_bytes_per_job: int = 256 * MB  # output past this is dropped, and counted
    no_node_timeout: float = 5 * MINUTES  # a job with no node able to run it fails after this
    job_retention: float = 1 * HOURS  # finished jobs nobody collected, and detached ones, are deleted after this
    # a running job that no client follows for this long is cancelled (longer than a client's reconnect window)
    client_grace: float = 3 * MINUTES
    admin_token: str = ""  # default: generated at first start, kept in the state dir
    node_token: str = ""
    bad_token_burst: int = 20  # bad tokens a minute from one address answered at once; later ones wait
    bad_token_max_delay: float = 2 * SECONDS  # the longest such a wait (0: never slow down)

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir() / "daemon"


@dataclasses.dataclass
class AgentConfig:
    url: str = ""  # the daemon
    token: str = ""  # the daemon's node token, or the instance token of a node the daemon started
    ca_file: str = ""  # a PEM CA the daemon's https certificate is verified by (besides the system's)
    instance: str = ""  # the cloud instance this agent runs on (set by a node's startup script)
    state_dir: str = ""  # default: $BURLA_HOME/agent or ~/.local/state/burla/agent
    runtime: str = "process"
    workers: int = 0  # warm workers; 0 means workers_per_cpu * CPUs
    workers_per_cpu: float = 1.0
    cpus: int = 0  # 0: what the host has
    ram: int = 0  # bytes; 0: what the host has
    python: str = ""  # interpreter for process workers; default: the agent's own
    worker_user: str = ""  # process workers run as this user (name or uid; the agent must be root); "": the agent's
    memory_check_interval: float = 0.05 * SECONDS
    log_flush_interval: float = 0.1 * SECONDS
    max_backoff: float = 1 * SECONDS  # reconnect backoff cap when the daemon is unreachable
    podman_socket: str = ""  # the Podman API; default: the agent starts `podman system service` itself
    container_network: bool = True  # containers reach the network (rootless: slirp4netns)
    registry_auth_file: str = ""  # credentials for private registries; default: the user's `podman login`
    warm_containers_per_cpu: float = 4.0  # containers a Podman node keeps running per CPU, jobs' and warm ones
    installer: str = "auto"  # installs clients' packages: "uv", "pip", or "auto" (uv when there is one)

    def resolved_state_dir(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir() / "agent"


@dataclasses.dataclass
class ClientConfig:
    replicate_environment: bool = True  # send the client's packages and local code to the workers
    exclude_packages: list[str] = dataclasses.field(default_factory=list)  # never sent, e.g. ["torch"]
    requirements: list[str] = dataclasses.field(default_factory=list)  # extra exact pins, e.g. ["requests==2.32.3"]


@dataclasses.dataclass
class StandbyConfig:
    images: list[str] = dataclasses.field(default_factory=list)  # kept warm on container nodes; first: default
    per_cpu: float = 1.0  # warm containers per CPU, per image
    python_version: str = ""  # the images' Python minor version, when you want it checked up front


@dataclasses.dataclass
class NodeGroupConfig:
    """One kind of node the cluster runs (`[[cluster.groups]]`)."""

    machine_type: str = "n2-standard-4"  # gce: its CPUs and RAM come from the Compute API
    standby: int = 0  # nodes of this group kept free and warm while the cluster is started
    cpus: int = 0  # local provider: each node's CPUs (0: from machine_type, as "e2-standard-4" says 4)
    ram: int = 0  # local provider: each node's RAM in bytes (0: 4 GB per CPU)
    disk_gb: int = 50
    image: str = "projects/debian-cloud/global/images/family/debian-12"  # the boot disk's image
    spot: bool = False  # preemptible: cheaper, and the cloud may take it back at any time
    accelerator_type: str = ""  # e.g. "nvidia-l4"
    accelerator_count: int = 0


@dataclasses.dataclass
class ClusterConfig:
    """The machines the daemon starts and deletes itself (no provider: agents are started by hand)."""

    provider: str = ""  # "", "local" (agent subprocesses on this machine) or "gce"
    name: str = "burla"  # instances carry the label burla-cluster=<name>; a restarted daemon adopts them
    project: str = ""  # gce
    region: str = ""  # gce, e.g. "us-central1"
    zones: list[str] = dataclasses.field(default_factory=list)  # tried in order; empty: the region's zones
    groups: list[NodeGroupConfig] = dataclasses.field(default_factory=list)
    max_cpus: int = 1000  # the most CPUs the cluster's nodes may have in all, booting ones included
    grow: bool = False  # every job may start nodes (remote_parallel_map(grow=True) asks for one job)
    idle_timeout: float = 60 * SECONDS  # a node beyond standby with no job for this long is deleted
    standby_idle_timeout: float = 0.0  # the whole cluster unused this long: standby is deleted (0: never)
    boot_timeout: float = 10 * MINUTES  # a node whose agent has not registered by then failed
    node_url: str = ""  # the daemon's URL as nodes reach it (default: daemon.public_url)
    ca_file: str = ""  # a PEM CA nodes verify an https node_url by (default: daemon.tls_cert when burlad serves TLS)
    network: str = "default"  # gce: the VPC network of the nodes
    service_account: str = ""  # gce: the nodes' service account (default: the project's compute default)
    wheelhouse: str = ""  # a folder of wheels (Burla's dependencies) the daemon serves to booting nodes
    api_endpoint: str = ""  # gce: the Compute API's URL; empty: Google's (set for an emulator or a proxy)


@dataclasses.dataclass
class EmbeddedConfig:
    idle_timeout: float = 10 * MINUTES  # the local cluster stops after this long unused
    workers: int = 0  # workers of the local agent; 0: one per CPU
    nodes: int = 0  # 0: one agent sharing this machine; N: N local cluster nodes (the [cluster] life, one job each)


@dataclasses.dataclass
class Config:
    daemon: DaemonConfig = dataclasses.field(default_factory=DaemonConfig)
    agent: AgentConfig = dataclasses.field(default_factory=AgentConfig)
    embedded: EmbeddedConfig = dataclasses.field(default_factory=EmbeddedConfig)
    standby: StandbyConfig = dataclasses.field(default_factory=StandbyConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    cluster: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Defaults, then the TOML file, then ``BURLA_*`` variables, then `overrides`.

        `overrides` maps "section.key" to a value (flags); None values are skipped.
        """
        env = os.environ if env is None else env
        config = cls()
        file = find_config_file(path, env)
        if file is not None:
            try:
                data = tomllib.loads(file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"cannot read config file {file}: {e}") from None
            for section, values in data.items():
                if not isinstance(values, dict):
                    raise ConfigError(f"{file}: [{section}] must be a table")
                for key, value in values.items():
                    config.set(f"{section}.{key}", value, source=str(file))
        for part in dataclasses.fields(config):
            for f in dataclasses.fields(getattr(config, part.name)):
                name = f"BURLA_{part.name}_{f.name}".upper()
                if name in env:
                    config.set(f"{part.name}.{f.name}", env[name], source=f"${name}")
        for key, value in (overrides or {}).items():
            if value is not None:
                config.set(key, value, source="command line")
        return config

    def set(self, key: str, value: Any, source: str = "") -> None:
        where = f" (from {source})" if source else ""
        section_name, _, field_name = key.partition(".")
        section = getattr(self, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section {section_name!r}{where}")
        fields = {f.name: f for f in dataclasses.fields(section)}
        if field_name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {key!r}{where}; keys of [{section_name}]: {known}")
        hint = typing.get_type_hints(type(section))[field_name]
        setattr(section, field_name, _coerce(key, field_name, hint, value, where))


def find_config_file(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    if env.get("BURLA_CONFIG"):
        return find_config_file(env["BURLA_CONFIG"], {})
    for candidate in (Path("burla.toml"), Path.home() / ".config" / "burla" / "burla.toml"):
        if candidate.is_file():
            return candidate
    return None


_DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "b": 1, "kb": KB, "mb": MB, "gb": GB, "tb": 1000**4,
    "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024**4,
}  # fmt: skip
_NUMBER_WITH_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(text: str) -> float:
    m = _NUMBER_WITH_UNIT.match(text)
    if not m or m.group(2).lower() not in {"", *_DURATION_UNITS}:
        raise ValueError(f"{text!r} is not a duration (like 30, 250ms, 10min, 2h)")
    return float(m.group(1)) * _DURATION_UNITS.get(m.group(2).lower(), 1)


def parse_size(text: str) -> int:
    m = _NUMBER_WITH_UNIT.match(text)
    if not m or m.group(2).lower() not in {"", *_SIZE_UNITS}:
        raise ValueError(f"{text!r} is not a size (like 1048576, 256MB, 4GiB)")
    return int(float(m.group(1)) * _SIZE_UNITS.get(m.group(2).lower(), 1))


_SIZE_FIELDS = {
    "max_function_bytes", "max_input_bytes", "max_result_bytes", "max_log_bytes_per_job", "max_build_context_bytes", "max_blob_bytes", "ram",
}  # fmt: skip


def _coerce(key: str, name: str, hint: Any, value: Any, where: str) -> Any:
    if isinstance(hint, types.UnionType):  # "str | None" and the like
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if typing.get_origin(hint) is list and dataclasses.is_dataclass(item := typing.get_args(hint)[0]):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ValueError(f"{value!r} is not a list of tables (write [[{key}]] sections)")
            return [_table(f"{key}[{i}]", item, v, where) for i, v in enumerate(value)]
        if typing.get_origin(hint) is list:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{value!r} is not a list of strings")
            return list(value)
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in {"1", "true", "yes", "on"}:
                    return True
                if value.lower() in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(f"{value!r} is not true or false")
            return bool(value)
        if hint is float:
            if isinstance(value, str):
                return parse_duration(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{value!r} is not a duration (like 30, 250ms, 10min)")
            return float(value)
        if hint is int:
            if isinstance(value, str):
                return parse_size(value) if name in _SIZE_FIELDS else int(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{value!r} is not a number")
            return int(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError(f"{value!r} is not a string")
            return value
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"bad value for {key}{where}: {e}") from None
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _table(key: str, cls: Any, values: dict[str, Any], where: str) -> Any:
    """One table of an array of tables (`[[cluster.groups]]`) as its dataclass, each key checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {key}.{unknown[0]}{where}; keys of {key}: {', '.join(sorted(fields))}")
    return cls(**{name: _coerce(f"{key}.{name}", name, hints[name], v, where) for name, v in values.items()})


def python_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"

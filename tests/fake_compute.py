"""A fake Google Compute Engine for tests: the REST API on a real socket, and instances that really boot.

Google's API cannot be reached from the test machines, but its real client library can talk to a local
server that speaks the same wire format. This module is that server. Point the real clients at it::

    from tests.fake_compute import FakeCompute

    with FakeCompute(project="p", zones=["us-central1-a", "us-central1-b"]) as gce:
        instances = compute_v1.InstancesClient(**gce.client_kwargs())
        ops = compute_v1.ZoneOperationsClient(**gce.client_kwargs())
        op = instances.insert(project="p", zone="us-central1-a", instance_resource=...)
        ops.wait(project="p", zone="us-central1-a", operation=op.name)
        gce.wait_for(lambda: "burla-1" in gce.log("node-1"))

``client_kwargs()`` is ``credentials=AnonymousCredentials(), transport="rest",
client_options=ClientOptions(api_endpoint=gce.endpoint)``. Build the ``ZoneOperationsClient`` yourself
with the same arguments: the one that ``insert(...).result()`` builds internally ignores
``client_options`` and would go to Google (see ../shared/NOTES-google.md).

What it serves (paths as google-cloud-compute's rest transports send them, JSON in camelCase):

- instances: insert, get, list (``filter``, ``maxResults``/``pageToken``), delete, aggregatedList,
  getSerialPortOutput (``/serialPort``);
- zoneOperations: get, wait, list, delete;
- machineTypes: get, list, aggregatedList, from a built-in table of real types (``MACHINE_TYPES``);
- zones: get, list; regions: get (with ``quotas``), list.

Everything else answers 404 with Google's error shape. Filters understand ``field = value``,
``field != value``, ``field:value`` (``*`` for "has the field"), ``field eq regex``, ``field ne regex``,
and several terms combined by ``AND`` or in parentheses (``(a = b) (c = d)``); ``field`` may be a dotted
path such as ``labels.burla-cluster``. ``OR`` is refused with a 400, like any filter the fake cannot read.

Life of an instance, as on GCE: ``insert`` answers at once with a zone operation in ``RUNNING``; the
instance is ``PROVISIONING``, then ``STAGING``, then ``RUNNING`` after ``boot_delay`` seconds, and the insert
operation is ``DONE`` at that moment. ``startup_delay`` seconds later (the guest OS booting) the fake runs
the instance's metadata item ``startup-script`` as a VM does: ``bash`` as the current user, in the
instance's own directory (also its ``HOME``), in a process group of its own, with its output appended to
``log(name)`` (also served, prefixed as Google's script runner does, as the serial port output). The
script reads its metadata as on a VM, from a metadata server at ``$GCE_METADATA_HOST`` that answers only
requests with ``Metadata-Flavor: Google``::

    curl -s -H 'Metadata-Flavor: Google' \\
      "http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes/burla-token"

``delete`` answers an operation in ``RUNNING``; the instance is ``STOPPING`` at once, its processes are
killed, and it disappears when the operation is ``DONE`` (``delete_delay``). Killing is thorough: the
process group, every process that carries the instance's marker in its environment (daemons that called
``setsid`` still inherit it), and with ``netns=True`` every process in the instance's network namespace.

Faults, settable at any time from the test (each applies to requests made after it):

- ``exhaust(zone)``: inserts there end in an operation ``DONE`` with ``error.errors[0].code ==
  "ZONE_RESOURCE_POOL_EXHAUSTED"`` (``httpErrorStatusCode`` 503), and no instance;
- ``quota_exceeded(metric="CPUS", region=..., limit=...)``: inserts end in ``QUOTA_EXCEEDED`` with Google's
  message (``Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1.``) and ``errorDetails.quotaInfo``;
  ``set_quota("CPUS", 24, region)`` instead counts the ``guestCpus`` of the region's live instances;
- ``deny(api=None)``: requests (to one API method such as ``"instances.insert"``, or to all) answer HTTP
  403 with Google's error body; the library raises ``google.api_core.exceptions.Forbidden``;
- ``boot_delay``, ``startup_delay``, ``delete_delay``: attributes, read when an instance is inserted/deleted;
- ``fail_startup(name=None)``: the named instance's (or every later instance's) startup script is not run;
  a stand-in that prints an error and exits 1 runs instead, and the serial port says
  ``startup-script exit status 1``;
- ``preempt(name)``: a spot preemption: ``STOPPING``, its processes killed, ``TERMINATED`` (or gone, when
  its ``scheduling.instanceTerminationAction`` is ``DELETE``), and a ``compute.instances.preempted`` zone
  operation, as GCE records one;
- ``vanish(name)``: deleted by someone else: processes killed, the instance gone at once.

Unknown machine types (insert 400, get 404), unknown zones (400), an existing name (409), a machine type
given as a bare name (400: Google wants ``zones/Z/machineTypes/T``), label and name syntax, and metadata
sizes (256 KiB a value, 512 KiB in all) are refused as Google does, so a provider bug shows up here first.

With ``netns=True`` (root and ``ip`` needed, else ``NetnsUnavailable``) each instance gets its own network
namespace with one address on a bridge that the fake makes: ``host_ip`` (10.231.X.1/24, X the first /24 of
10.231.0.0/16 that no other fake on this host holds: 0 when it is alone) is the host's side, the N-th
instance is 10.231.X.N+1. The namespace has no default route: an instance reaches only its
bridge, so no 127.0.0.1 shortcut to the daemon applies. Its metadata server listens on ``host_ip``. Names
carry a random suffix; namespaces and links are removed on delete and at ``close()``, and a later fake
removes those of a test process that died without closing.

The test's side (all thread-safe; the fake serves from its own threads, so tests may be sync or trio):
``endpoint``, ``host_ip``, ``client_kwargs()``, ``instances()`` / ``instance(name)`` (snapshots: status, zone,
labels, metadata, ip, dir, pid, exit_code, the resource as served), ``log(name)``, ``serial_output(name)``,
``requests`` / ``calls(api)`` (what the library sent), ``wait_for(predicate, timeout)``, the faults above,
``reset_faults()``, and ``close()`` (also run at interpreter exit, so no process outlives a forgetful test).
``wait_for`` sleeps: from a trio test call it as ``await trio.to_thread.run_sync(gce.wait_for, predicate)``.

Not implemented: instances stop/start/reset/setMetadata/setLabels, bulkInsert, regionOperations and
globalOperations, images and disks APIs (disks in the insert are echoed back, not made), IAM, the metadata
server's ``wait_for_change`` and service-account tokens, ``orderBy``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import http.server
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

GOOGLE = "https://www.googleapis.com/compute/v1"
METADATA_VALUE_LIMIT = 256 * 1024
METADATA_TOTAL_LIMIT = 512 * 1024
NAME_RE = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")


def _machine_types() -> dict[str, dict[str, Any]]:
    """Real machine types with their real vCPUs and memory (MB), and accelerators where they are bundled."""
    table: dict[str, dict[str, Any]] = {
        "e2-micro": {"guestCpus": 2, "memoryMb": 1024, "isSharedCpu": True},
        "e2-small": {"guestCpus": 2, "memoryMb": 2048, "isSharedCpu": True},
        "e2-medium": {"guestCpus": 2, "memoryMb": 4096, "isSharedCpu": True},
        "n1-standard-1": {"guestCpus": 1, "memoryMb": 3840},
    }
    for n in (2, 4, 8, 16, 32):
        table[f"e2-standard-{n}"] = {"guestCpus": n, "memoryMb": n * 4096}
        table[f"e2-highcpu-{n}"] = {"guestCpus": n, "memoryMb": n * 1024}
    for n in (2, 4, 8, 16):
        table[f"e2-highmem-{n}"] = {"guestCpus": n, "memoryMb": n * 8192}
    for n in (2, 4, 8, 16, 32, 64, 96):
        table[f"n1-standard-{n}"] = {"guestCpus": n, "memoryMb": n * 3840}
    for n in (2, 4, 8, 16, 32, 48, 64, 80, 96, 128):
        table[f"n2-standard-{n}"] = {"guestCpus": n, "memoryMb": n * 4096}
        table[f"n2-highmem-{n}"] = {"guestCpus": n, "memoryMb": n * 8192}
    for n in (2, 4, 8, 16, 32, 48, 64, 80, 96):
        table[f"n2-highcpu-{n}"] = {"guestCpus": n, "memoryMb": n * 1024}
    for n in (4, 8, 16, 30, 60):
        table[f"c2-standard-{n}"] = {"guestCpus": n, "memoryMb": n * 4096}
    for gpus, cpus, mem in ((1, 12, 87040), (2, 24, 174080), (4, 48, 348160), (8, 96, 696320)):
        table[f"a2-highgpu-{gpus}g"] = {"guestCpus": cpus, "memoryMb": mem, "gpu": ("nvidia-tesla-a100", gpus)}
    table["a3-highgpu-8g"] = {"guestCpus": 208, "memoryMb": 1916928, "gpu": ("nvidia-h100-80gb", 8)}
    for cpus, gpus in ((4, 1), (8, 1), (12, 1), (16, 1), (24, 2), (32, 1), (48, 4), (96, 8)):
        table[f"g2-standard-{cpus}"] = {"guestCpus": cpus, "memoryMb": cpus * 4096, "gpu": ("nvidia-l4", gpus)}
    return table


MACHINE_TYPES: dict[str, dict[str, Any]] = _machine_types()
"""name -> {"guestCpus", "memoryMb", optional "isSharedCpu", optional "gpu": (accelerator type, count)}."""

DEFAULT_ZONES = ("us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f")

# API method -> the IAM permission Google names when it refuses it.
PERMISSIONS = {
    "instances.insert": "compute.instances.create",
    "instances.get": "compute.instances.get",
    "instances.list": "compute.instances.list",
    "instances.aggregatedList": "compute.instances.list",
    "instances.delete": "compute.instances.delete",
    "instances.getSerialPortOutput": "compute.instances.getSerialPortOutput",
    "zoneOperations.get": "compute.zoneOperations.get",
    "zoneOperations.wait": "compute.zoneOperations.get",
    "zoneOperations.list": "compute.zoneOperations.list",
    "zoneOperations.delete": "compute.zoneOperations.delete",
    "machineTypes.get": "compute.machineTypes.get",
    "machineTypes.list": "compute.machineTypes.list",
    "machineTypes.aggregatedList": "compute.machineTypes.list",
    "zones.get": "compute.zones.get",
    "zones.list": "compute.zones.list",
    "regions.get": "compute.regions.get",
    "regions.list": "compute.regions.list",
}


class NetnsUnavailable(RuntimeError):
    """``netns=True`` needs root and the ``ip`` tool; the message says which is missing (tests skip on it)."""


class ApiError(Exception):
    """An HTTP error answered in Google's JSON shape."""

    STATUS_TEXT = {400: "invalid", 403: "forbidden", 404: "notFound", 409: "alreadyExists"}

    def __init__(self, code: int, message: str, reason: str | None = None, details: list[Any] | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or self.STATUS_TEXT.get(code, "backendError")
        self.details = details or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
        }
        if self.details:
            error["details"] = self.details
        return {"error": error}


@dataclass
class Request:
    """One API request as the fake saw it: ``api`` is Google's method name, e.g. ``"instances.insert"``."""

    api: str
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Instance:
    """What a test sees of an instance (``FakeCompute.instances()``); a snapshot, not live."""

    name: str
    zone: str
    status: str
    machine_type: str
    labels: dict[str, str]
    metadata: dict[str, str]
    ip: str
    dir: Path
    pid: int | None
    exit_code: int | None
    resource: dict[str, Any]


@dataclass
class _Inst:
    name: str
    zone: str
    resource: dict[str, Any]
    dir: Path
    ip: str
    marker: str
    boot_delay: float
    startup_delay: float
    fail_startup: bool
    netns: str | None = None
    veth: str | None = None
    metadata_server: _Server | None = None
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    serial: list[str] = field(default_factory=list)

    @property
    def metadata(self) -> dict[str, str]:
        return {i["key"]: i.get("value", "") for i in self.resource.get("metadata", {}).get("items", [])}

    @property
    def status(self) -> str:
        return str(self.resource["status"])


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: Callable[[_Handler], None]):
        self.handle_request_fn = handler
        super().__init__(address, _Handler)
        self.address = f"{address[0]}:{self.server_address[1]}"
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _any(self) -> None:
        self.server.handle_request_fn(self)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _any

    def reply(self, code: int, body: bytes, content_type: str, headers: Mapping[str, str] = {}) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).astimezone().isoformat(timespec="milliseconds")


def _last(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _region(zone: str) -> str:
    return zone.rsplit("-", 1)[0]


# -- filters ---------------------------------------------------------------------------------------

_TERM_RE = re.compile(r"""\s*([A-Za-z_][\w.\-]*)\s*(!=|=|:|\beq\b|\bne\b)\s*("(?:[^"\\]|\\.)*"|'[^']*'|[^\s()]+)\s*""")


def _parse_filter(text: str) -> list[tuple[str, str, str]]:
    """``a = b AND (c != "d")`` -> [(a, =, b), (c, !=, d)]; ``ValueError`` on what the fake cannot read."""
    terms, rest = [], text.strip()
    while rest:
        rest = rest.lstrip()
        if rest.startswith("(") and rest.endswith(")") and "(" not in rest[1:-1]:
            rest = rest[1:-1]
            continue
        if rest.startswith("("):
            close = rest.index(")")
            terms.extend(_parse_filter(rest[1:close]))
            rest = rest[close + 1 :]
        else:
            m = _TERM_RE.match(rest)
            if not m:
                raise ValueError(text)
            value = m.group(3)
            if value[0] in "\"'":
                value = value[1:-1]
            terms.append((m.group(1), m.group(2), value))
            rest = rest[m.end() :]
        rest = rest.lstrip()
        if rest.upper().startswith("OR"):
            raise ValueError(text)
        if rest.upper().startswith("AND"):
            rest = rest[3:]
    return terms


def _field(resource: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(resource, dict) or part not in resource:
            return None
        resource = resource[part]
    return resource


def _matches(resource: dict[str, Any], terms: list[tuple[str, str, str]]) -> bool:
    for path, op, want in terms:
        value = _field(resource, path)
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        if op == "=" and not (
            value is not None and (text == want or (want.endswith("*") and text.startswith(want[:-1])))
        ):
            return False
        if op == "!=" and value is not None and text == want:
            return False
        if op == ":" and not (value is not None and (want == "*" or want in text)):
            return False
        if op == "eq" and not (value is not None and re.fullmatch(want, text)):
            return False
        if op == "ne" and value is not None and re.fullmatch(want, text):
            return False
    return True


# -- the fake --------------------------------------------------------------------------------------


class FakeCompute:
    """A fake Compute Engine for one project; a context manager (``close()`` on exit).

    ``zones``: names, or a mapping zone -> options: ``{"status": "UP" | "DOWN", "machine_types": [names]}``
    (a zone offers every type of ``machine_types`` unless it names its own). ``machine_types``: replaces
    the built-in ``MACHINE_TYPES`` table. ``netns``: one network namespace per instance (root only).
    ``workdir``: where instance directories go (a temporary directory, removed at close, by default).
    ``env``: extra environment for startup scripts, which otherwise get this process's ``PATH``, ``LANG``,
    a ``HOME`` and ``TMPDIR`` of their own, ``GCE_METADATA_HOST`` and ``FAKE_COMPUTE_INSTANCE`` (the name).
    """

    def __init__(
        self,
        project: str = "fake-project",
        zones: Iterable[str] | Mapping[str, Mapping[str, Any]] = DEFAULT_ZONES,
        *,
        netns: bool = False,
        machine_types: Mapping[str, Mapping[str, Any]] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        boot_delay: float = 0.2,
        startup_delay: float = 0.0,
        delete_delay: float = 0.1,
        wait_timeout: float = 2.0,
    ):
        self.project = project
        self.project_number = str(100000000000 + secrets.randbelow(900000000000))
        zone_opts = dict(zones) if isinstance(zones, Mapping) else {z: {} for z in zones}
        self.zones: dict[str, dict[str, Any]] = {z: dict(o) for z, o in zone_opts.items()}
        self.machine_types = {k: dict(v) for k, v in (machine_types or MACHINE_TYPES).items()}
        self.boot_delay = boot_delay
        """Seconds from insert to ``RUNNING`` (half of it ``PROVISIONING``, half ``STAGING``)."""
        self.startup_delay = startup_delay
        """Seconds from ``RUNNING`` to the startup script's start (the guest OS booting)."""
        self.delete_delay = delete_delay
        """Seconds an instance stays ``STOPPING`` before a delete operation is ``DONE`` and it is gone."""
        self.wait_timeout = wait_timeout
        """The most seconds ``zoneOperations.wait`` blocks before answering an unfinished operation (GCE: 120)."""
        self.requests: list[Request] = []
        """Every API request, in order (metadata server requests are not recorded)."""
        self.env = dict(env or {})
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._instances: dict[tuple[str, str], _Inst] = {}
        self._operations: dict[tuple[str, str], dict[str, Any]] = {}
        self._ids = itertools.count(1000000000000000000 + secrets.randbelow(10**18))
        self._exhausted: set[tuple[str, str | None]] = set()
        self._forced_quota: list[dict[str, Any]] = []
        self._quotas: dict[tuple[str, str], float] = {}
        self._denied: set[str | None] = set()
        self._fail_all_startups = False
        self._fail_startup_names: set[str] = set()
        self._closed = False
        self.netns = netns
        self._net: _Bridge | None = _Bridge.create() if netns else None
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="fake-compute-"))
        self.host_ip = self._net.host_ip if self._net else "127.0.0.1"
        """The address at which instances reach this host (the daemon should listen there)."""
        self._server = _Server(("127.0.0.1", 0), self._handle_api)
        atexit.register(self.close)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        """The ``api_endpoint`` for ``ClientOptions``."""

    # -- the test's API --------------------------------------------------------------------------

    def __enter__(self) -> FakeCompute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any ``compute_v1.*Client``: anonymous credentials, REST, this endpoint."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        return {
            "credentials": AnonymousCredentials(),
            "transport": "rest",
            "client_options": ClientOptions(api_endpoint=self.endpoint),
        }

    def instances(self) -> dict[str, Instance]:
        """Every instance not yet gone, by name (names are unique across zones in these tests)."""
        with self._lock:
            return {i.name: self._view(i) for i in self._instances.values()}

    def instance(self, name: str) -> Instance:
        """One instance by name; ``KeyError`` if there is none."""
        with self._lock:
            return self._view(self._find(name))

    def log(self, name: str) -> str:
        """What the instance's startup script has written to stdout and stderr so far ("" before it runs)."""
        path = self._find(name).dir / "startup-script.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def serial_output(self, name: str) -> str:
        """The serial port output, as ``getSerialPortOutput`` serves it: boot lines and the script's output."""
        with self._lock:
            inst = self._find(name)
            head, tail = list(inst.serial), []
        runner = "google_metadata_script_runner"
        if "startup-script-started" in head:
            head.remove("startup-script-started")
            lines = self.log(name).splitlines()
            head += [f"{runner}[1]: startup-script: {line}" for line in lines]
            with self._lock:
                if inst.exit_code is not None:
                    tail = [f"{runner}[1]: startup-script exit status {inst.exit_code}"]
                    tail.append(f"{runner}[1]: Finished running startup scripts.")
        return "".join(line + "\n" for line in head + tail)

    def exhaust(self, zone: str, exhausted: bool = True, *, machine_type: str | None = None) -> None:
        """Inserts in ``zone`` (of ``machine_type`` only, if given) fail with ZONE_RESOURCE_POOL_EXHAUSTED."""
        with self._lock:
            (self._exhausted.add if exhausted else self._exhausted.discard)((zone, machine_type))

    def quota_exceeded(
        self, metric: str = "CPUS", region: str | None = None, limit: float = 24.0, *, exceeded: bool = True
    ) -> None:
        """Every insert (in ``region``, or anywhere) fails with QUOTA_EXCEEDED naming ``metric`` and ``limit``."""
        with self._lock:
            self._forced_quota = [q for q in self._forced_quota if (q["metric"], q["region"]) != (metric, region)]
            if exceeded:
                self._forced_quota.append({"metric": metric, "region": region, "limit": limit})

    def set_quota(self, metric: str, limit: float | None, region: str | None = None) -> None:
        """A real limit: ``"CPUS"`` counts the guestCpus, ``"INSTANCES"`` the instances, of live instances
        in the region (every zone's region if ``region`` is None); an insert beyond it fails QUOTA_EXCEEDED.
        ``regions.get`` reports it in ``quotas``. ``limit=None`` removes it."""
        with self._lock:
            for r in [region] if region else sorted({_region(z) for z in self.zones}):
                if limit is None:
                    self._quotas.pop((metric, r), None)
                else:
                    self._quotas[(metric, r)] = float(limit)

    def deny(self, api: str | None = None, denied: bool = True) -> None:
        """Requests to ``api`` (e.g. ``"instances.insert"``; None: every API) answer HTTP 403."""
        with self._lock:
            (self._denied.add if denied else self._denied.discard)(api)

    def fail_startup(self, name: str | None = None, failing: bool = True) -> None:
        """The startup script of instance ``name`` (None: every instance inserted from now on) fails:
        a stand-in that prints an error and exits 1 runs in its place."""
        with self._lock:
            if name is None:
                self._fail_all_startups = failing
            else:
                (self._fail_startup_names.add if failing else self._fail_startup_names.discard)(name)
                with contextlib.suppress(KeyError):
                    self._find(name).fail_startup = failing

    def reset_faults(self) -> None:
        """Undo every ``exhaust``, ``quota_exceeded``, ``set_quota``, ``deny`` and ``fail_startup``."""
        with self._lock:
            self._exhausted.clear()
            self._forced_quota.clear()
            self._quotas.clear()
            self._denied.clear()
            self._fail_all_startups = False
            self._fail_startup_names.clear()

    def preempt(self, name: str) -> None:
        """A spot preemption, done when this returns: the processes are dead, the instance TERMINATED
        (gone if its ``scheduling.instanceTerminationAction`` is ``DELETE``)."""
        with self._lock:
            inst = self._find(name)
            inst.resource["status"] = "STOPPING"
            inst.stopped.set()
            self._changed.notify_all()
        self._kill(inst)
        with self._lock:
            inst.resource["status"] = "TERMINATED"
            inst.resource["lastStopTimestamp"] = _now()
            inst.serial.append("Instance was preempted.")
            op = self._new_operation(inst.zone, "compute.instances.preempted", inst)
            op["user"] = "system"
            op["statusMessage"] = "Instance was preempted."
            self._finish_operation(op)
            if _field(inst.resource, "scheduling.instanceTerminationAction") == "DELETE":
                self._remove(inst)
            self._changed.notify_all()

    def vanish(self, name: str) -> None:
        """Someone deleted the instance by hand: when this returns its processes are dead and it is gone."""
        with self._lock:
            inst = self._find(name)
            inst.resource["status"] = "STOPPING"
            inst.stopped.set()
        self._kill(inst)
        with self._lock:
            op = self._new_operation(inst.zone, "delete", inst)
            op["user"] = "someone-else@example.com"
            self._finish_operation(op)
            self._remove(inst)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
        """Call ``predicate()`` until it returns something true, and return that; ``TimeoutError`` after
        ``timeout`` seconds (the message shows the instances and their script logs)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"not true after {timeout} s: {predicate!r}\n{self._describe()}")
            time.sleep(interval)

    def calls(self, api: str) -> list[Request]:
        """The recorded requests to one API method, e.g. ``gce.calls("instances.insert")``."""
        with self._lock:
            return [r for r in self.requests if r.api == api]

    def close(self) -> None:
        """Kill every instance's processes, remove namespaces and links, stop the servers. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            insts = list(self._instances.values())
            for inst in insts:
                inst.stopped.set()
            self._changed.notify_all()
        try:
            for inst in insts:
                self._kill(inst)
                with self._lock:
                    self._remove(inst)
        finally:
            self._server.stop()
            if self._net:
                self._net.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- internals -------------------------------------------------------------------------------

    def _describe(self) -> str:
        lines = []
        for name, inst in self.instances().items():
            lines.append(f"  {name} ({inst.zone}): {inst.status}, pid {inst.pid}, exit {inst.exit_code}")
            lines += [f"    | {line}" for line in self.log(name).splitlines()[-15:]]
        return "instances:\n" + "\n".join(lines) if lines else "no instances"

    def _view(self, inst: _Inst) -> Instance:
        return Instance(
            name=inst.name,
            zone=inst.zone,
            status=inst.status,
            machine_type=_last(inst.resource["machineType"]),
            labels=dict(inst.resource.get("labels", {})),
            metadata=inst.metadata,
            ip=inst.ip,
            dir=inst.dir,
            pid=inst.proc.pid if inst.proc else None,
            exit_code=inst.exit_code,
            resource=json.loads(json.dumps(inst.resource)),
        )

    def _find(self, name: str) -> _Inst:
        for inst in self._instances.values():
            if inst.name == name:
                return inst
        raise KeyError(f"no instance {name!r}; there are {sorted(i.name for i in self._instances.values())}")

    def _link(self, *parts: str) -> str:
        return "/".join([GOOGLE, "projects", self.project, *parts])

    def _new_operation(self, zone: str, kind: str, inst: _Inst | None, target: str | None = None) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(7)[:13]}-{secrets.token_hex(4)}-{secrets.token_hex(4)}"
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "zone": self._link("zones", zone),
            "operationType": kind,
            "targetLink": target or (self._link("zones", zone, "instances", inst.name) if inst else ""),
            "status": "RUNNING",
            "user": "fake-service-account@fake.iam.gserviceaccount.com",
            "progress": 0,
            "insertTime": _now(),
            "startTime": _now(),
            "selfLink": self._link("zones", zone, "operations", name),
        }
        if inst is not None:
            op["targetId"] = inst.resource["id"]
        self._operations[(zone, name)] = op
        return op

    def _finish_operation(self, op: dict[str, Any], error: dict[str, Any] | None = None) -> None:
        op.update(status="DONE", progress=100, endTime=_now())
        if error:
            op["error"] = {"errors": [error["error"]]}
            op["httpErrorStatusCode"] = error["http"]
            op["httpErrorMessage"] = error["httpMessage"]
        self._changed.notify_all()

    def _later(self, seconds: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        timer.start()

    def _remove(self, inst: _Inst) -> None:
        self._instances.pop((inst.zone, inst.name), None)
        if inst.metadata_server:
            threading.Thread(target=inst.metadata_server.stop, daemon=True).start()
            inst.metadata_server = None
        if self._net and inst.netns:
            self._net.remove(inst)
        self._changed.notify_all()

    # -- processes -------------------------------------------------------------------------------

    def _run_instance(self, inst: _Inst, op: dict[str, Any]) -> None:
        try:
            self._boot(inst, op)
        finally:
            with self._lock:
                if op["status"] != "DONE":  # deleted or preempted before RUNNING: the insert still ends
                    self._finish_operation(op)

    def _boot(self, inst: _Inst, op: dict[str, Any]) -> None:
        if inst.stopped.wait(inst.boot_delay / 2):
            return
        with self._lock:
            if inst.stopped.is_set():
                return
            inst.resource["status"] = "STAGING"
            self._changed.notify_all()
        if inst.stopped.wait(inst.boot_delay / 2):
            return
        with self._lock:
            if inst.stopped.is_set():
                return
            inst.resource["status"] = "RUNNING"
            inst.resource["lastStartTimestamp"] = _now()
            inst.serial.append(f"Booting {inst.name} (fake-compute)")
            self._finish_operation(op)
        if inst.stopped.wait(inst.startup_delay):
            return
        with self._lock:
            if inst.stopped.is_set():
                return
            script = inst.metadata.get("startup-script")
            if script is None:
                inst.serial.append("google_metadata_script_runner[1]: No startup scripts to run.")
                return
            if inst.fail_startup:
                script = 'echo "fake-compute: this startup script fails (FakeCompute.fail_startup)" >&2\nexit 1\n'
            (inst.dir / "startup-script").write_text(script)
            inst.serial.append("google_metadata_script_runner[1]: Starting startup scripts (version fake).")
            inst.serial.append("startup-script-started")
            inst.proc = self._start_script(inst)
        code = inst.proc.wait()
        with self._lock:
            inst.exit_code = code
            self._changed.notify_all()

    def _start_script(self, inst: _Inst) -> subprocess.Popen[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
            "LANG": "C.UTF-8",
            "HOME": str(inst.dir),
            "TMPDIR": str(inst.dir / "tmp"),
            "GCE_METADATA_HOST": inst.metadata_server.address if inst.metadata_server else "",
            "FAKE_COMPUTE_INSTANCE": inst.name,
            "FAKE_COMPUTE_MARKER": inst.marker,
            **self.env,
        }
        (inst.dir / "tmp").mkdir(exist_ok=True)
        argv = ["bash", str(inst.dir / "startup-script")]
        if inst.netns:
            argv = ["ip", "netns", "exec", inst.netns, *argv]
        with open(inst.dir / "startup-script.log", "ab") as out:
            return subprocess.Popen(
                argv,
                cwd=inst.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _kill(self, inst: _Inst) -> None:
        """SIGKILL the script's process group, every process with the instance's marker, and every process
        in its namespace, until none is left; then reap the script."""
        marker = f"FAKE_COMPUTE_MARKER={inst.marker}".encode()
        for _ in range(50):
            pids: set[int] = set()
            if inst.proc and inst.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(inst.proc.pid, signal.SIGKILL)
            for entry in os.listdir("/proc"):
                if entry.isdigit() and int(entry) != os.getpid():
                    with contextlib.suppress(OSError):
                        if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                            pids.add(int(entry))
            if self._net and inst.netns:
                pids |= self._net.pids(inst.netns)
            pids = {p for p in pids if not _is_zombie(p)}
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        if inst.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                inst.proc.wait(timeout=5)

    # -- the metadata server ---------------------------------------------------------------------

    def _start_metadata_server(self, inst: _Inst) -> None:
        inst.metadata_server = _Server((self.host_ip, 0), lambda h: self._handle_metadata(inst, h))

    def _metadata_tree(self, inst: _Inst) -> dict[str, Any]:
        mt = _last(inst.resource["machineType"])
        return {
            "instance": {
                "attributes": inst.metadata,
                "hostname": f"{inst.name}.{inst.zone}.c.{self.project}.internal",
                "id": int(inst.resource["id"]),
                "machine-type": f"projects/{self.project_number}/machineTypes/{mt}",
                "name": inst.name,
                "zone": f"projects/{self.project_number}/zones/{inst.zone}",
                "network-interfaces": {"0": {"ip": inst.ip, "network": "projects/default"}},
                "tags": inst.resource.get("tags", {}).get("items", []),
                "scheduling": {"preemptible": "TRUE" if _is_spot(inst.resource) else "FALSE"},
            },
            "project": {"project-id": self.project, "numeric-project-id": int(self.project_number)},
        }

    def _handle_metadata(self, inst: _Inst, h: _Handler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        headers = {"Metadata-Flavor": "Google", "Server": "Metadata Server for VM"}
        if h.headers.get("Metadata-Flavor") != "Google" and h.headers.get("X-Google-Metadata-Request") != "True":
            body = b"Your client does not have permission to get URL from this server. Missing Metadata-Flavor:Google header.\n"
            return h.reply(403, body, "text/html; charset=UTF-8", headers)
        prefix = "/computeMetadata/v1/"
        node: Any = self._metadata_tree(inst)
        if url.path.rstrip("/") + "/" != prefix:
            if not url.path.startswith(prefix):
                return h.reply(404, b"Not Found\n", "text/html; charset=UTF-8", headers)
            for part in url.path[len(prefix) :].strip("/").split("/"):
                node = node.get(part) if isinstance(node, dict) else None
                if node is None:
                    return h.reply(404, b"Not Found\n", "text/html; charset=UTF-8", headers)
        recursive = query.get("recursive", "").lower() == "true"
        alt = query.get("alt", "json" if recursive else "text")
        if isinstance(node, dict) and not recursive:
            if alt == "json":
                out = json.dumps([k + "/" if isinstance(v, (dict, list)) else k for k, v in node.items()])
            else:
                out = "".join((k + "/" if isinstance(v, (dict, list)) else k) + "\n" for k, v in node.items())
            return h.reply(200, out.encode(), "application/text", headers)
        if alt == "json":
            return h.reply(200, json.dumps(node).encode(), "application/json", headers)
        if isinstance(node, dict):
            text = "".join(f"{k} {v if not isinstance(v, (dict, list)) else json.dumps(v)}\n" for k, v in node.items())
        elif isinstance(node, list):
            text = "".join(f"{v}\n" for v in node)
        else:
            text = str(node)
        return h.reply(200, text.encode(), "application/text", headers)

    # -- the API ---------------------------------------------------------------------------------

    ROUTES: list[tuple[str, str, str]] = [
        ("POST", r"zones/(?P<zone>[^/]+)/instances", "instances.insert"),
        ("GET", r"zones/(?P<zone>[^/]+)/instances", "instances.list"),
        ("GET", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "instances.get"),
        ("DELETE", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)", "instances.delete"),
        ("GET", r"zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)/serialPort", "instances.getSerialPortOutput"),
        ("GET", r"aggregated/instances", "instances.aggregatedList"),
        ("GET", r"zones/(?P<zone>[^/]+)/operations/(?P<name>[^/]+)", "zoneOperations.get"),
        ("POST", r"zones/(?P<zone>[^/]+)/operations/(?P<name>[^/]+)/wait", "zoneOperations.wait"),
        ("DELETE", r"zones/(?P<zone>[^/]+)/operations/(?P<name>[^/]+)", "zoneOperations.delete"),
        ("GET", r"zones/(?P<zone>[^/]+)/operations", "zoneOperations.list"),
        ("GET", r"zones/(?P<zone>[^/]+)/machineTypes/(?P<name>[^/]+)", "machineTypes.get"),
        ("GET", r"zones/(?P<zone>[^/]+)/machineTypes", "machineTypes.list"),
        ("GET", r"aggregated/machineTypes", "machineTypes.aggregatedList"),
        ("GET", r"zones/(?P<zone>[^/]+)", "zones.get"),
        ("GET", r"zones", "zones.list"),
        ("GET", r"regions/(?P<region>[^/]+)", "regions.get"),
        ("GET", r"regions", "regions.list"),
    ]

    def _handle_api(self, h: _Handler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        raw = h.read_body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        record = Request(api="", method=h.command, path=url.path, query=query, body=body)
        with self._lock:
            self.requests.append(record)
        try:
            if isinstance(body, str):
                raise ApiError(400, "Invalid JSON payload received.", "parseError")
            result = self._route(record)
            code, payload = 200, result
        except ApiError as e:
            code, payload = e.code, e.body()
        except Exception as e:  # a bug of the fake: say so loudly, as a 500
            code, payload = 500, ApiError(500, f"fake-compute bug: {e!r}", "backendError").body()
        record.status = code
        h.reply(code, json.dumps(payload).encode(), "application/json; charset=UTF-8")

    def _route(self, r: Request) -> dict[str, Any]:
        prefix = f"/compute/v1/projects/{self.project}/"
        if not r.path.startswith(prefix):
            m = re.match(r"/compute/v1/projects/([^/]+)/", r.path)
            if m:
                raise ApiError(404, f"The resource 'projects/{m.group(1)}' was not found")
            raise ApiError(404, f"The requested URL {r.path} was not found on this server.", "notFound")
        rest = r.path[len(prefix) :]
        for method, pattern, api in self.ROUTES:
            m = re.fullmatch(pattern, rest)
            if m and method == r.method:
                r.api = api
                args = m.groupdict()
                with self._lock:
                    if None in self._denied or api in self._denied:
                        target = f"projects/{self.project}/{rest}"
                        message = f"Required '{PERMISSIONS[api]}' permission for '{target}'"
                        details = [
                            {
                                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                "reason": "IAM_PERMISSION_DENIED",
                                "domain": "iam.googleapis.com",
                                "metadata": {"permission": PERMISSIONS[api], "resource": target},
                            }
                        ]
                        raise ApiError(403, message, "forbidden", details)
                    if "zone" in args and args["zone"] not in self.zones:
                        if api == "zones.get":
                            raise ApiError(
                                404, f"The resource 'projects/{self.project}/zones/{args['zone']}' was not found"
                            )
                        raise ApiError(400, f"Invalid value for field 'zone': '{args['zone']}'. Unknown zone.")
                    handler = getattr(self, "_api_" + api.replace(".", "_"))
                    result: dict[str, Any] = handler(r, **args)
                    return result
        raise ApiError(404, f"The requested URL {r.path} was not found on this server.", "notFound")

    def _page(self, items: list[Any], query: dict[str, str]) -> tuple[list[Any], str | None]:
        try:
            size = min(int(query.get("maxResults") or 500), 500)
            start = int(query.get("pageToken") or 0)
        except ValueError:
            raise ApiError(400, "Invalid value for the page token or maxResults.", "invalid") from None
        end = start + max(size, 1)
        return items[start:end], (str(end) if end < len(items) else None)

    def _filtered(self, items: list[dict[str, Any]], query: dict[str, str]) -> list[dict[str, Any]]:
        text = query.get("filter", "").strip()
        if not text:
            return items
        try:
            terms = _parse_filter(text)
        except (ValueError, IndexError):
            raise ApiError(400, f"Invalid list filter expression '{text}'.", "invalid") from None
        return [i for i in items if _matches(i, terms)]

    def _listing(self, kind: str, link: str, items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        page, token = self._page(self._filtered(items, query), query)
        out: dict[str, Any] = {"kind": kind, "id": link.split("/v1/", 1)[1], "items": page, "selfLink": link}
        if token:
            out["nextPageToken"] = token
        return out

    def _aggregated(
        self, kind: str, key: str, link: str, by_zone: dict[str, list[dict[str, Any]]], query: dict[str, str]
    ) -> dict[str, Any]:
        flat = [(zone, item) for zone in self.zones for item in self._filtered(by_zone.get(zone, []), query)]
        page, token = self._page(flat, query)
        items: dict[str, Any] = {}
        for zone in self.zones:
            scope = f"zones/{zone}"
            mine = [item for z, item in page if z == zone]
            if mine:
                items[scope] = {key: mine}
            else:
                items[scope] = {
                    "warning": {
                        "code": "NO_RESULTS_ON_PAGE",
                        "message": f"There are no results for scope '{scope}' on this page.",
                        "data": [{"key": "scope", "value": scope}],
                    }
                }
        out: dict[str, Any] = {"kind": kind, "id": link.split("/v1/", 1)[1], "items": items, "selfLink": link}
        if token:
            out["nextPageToken"] = token
        return out

    # instances

    def _api_instances_insert(self, r: Request, zone: str) -> dict[str, Any]:
        body = r.body if isinstance(r.body, dict) else {}
        name = body.get("name") or ""
        if not NAME_RE.match(name):
            raise ApiError(
                400,
                f"Invalid value for field 'resource.name': '{name}'. "
                "Must be a match of regex '(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            )
        if (zone, name) in self._instances:
            raise ApiError(409, f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already exists")
        mt_url = body.get("machineType") or ""
        m = re.fullmatch(
            r"(?:(?:https://www\.googleapis\.com/compute/v1/)?projects/[^/]+/)?zones/([^/]+)/machineTypes/([^/]+)",
            mt_url,
        )
        if not m:
            raise ApiError(
                400,
                f"Invalid value for field 'resource.machineType': '{mt_url}'. "
                "Must be a URL to a valid Compute resource of the correct type.",
            )
        if m.group(1) != zone:
            raise ApiError(
                400,
                f"Invalid value for field 'resource.machineType': '{mt_url}'. Cross-zone references are not allowed.",
            )
        mt = m.group(2)
        if mt not in self._zone_machine_types(zone):
            raise ApiError(
                400,
                f"Invalid value for field 'resource.machineType': '{mt_url}'. "
                f"Machine type with name '{mt}' does not exist in zone '{zone}'.",
            )
        labels = body.get("labels") or {}
        for k, v in labels.items():
            if not LABEL_KEY_RE.match(k) or not isinstance(v, str) or not LABEL_VALUE_RE.match(v):
                raise ApiError(
                    400,
                    f"Invalid value for field 'resource.labels': '{k}'. Label keys and values must match the label format.",
                )
        items = (body.get("metadata") or {}).get("items") or []
        total = 0
        for item in items:
            size = len(item.get("key", "").encode()) + len((item.get("value") or "").encode())
            total += size
            if len((item.get("value") or "").encode()) > METADATA_VALUE_LIMIT:
                raise ApiError(
                    400,
                    f"Invalid value for field 'resource.metadata': '{item.get('key')}'. Metadata value is too large: exceeds 262144 bytes.",
                )
        if total > METADATA_TOTAL_LIMIT:
            raise ApiError(
                400, "Invalid value for field 'resource.metadata'. Metadata total size exceeds 524288 bytes."
            )
        if not body.get("disks"):
            raise ApiError(
                400, "Invalid value for field 'resource.disks': ''. At least one boot disk must be specified."
            )

        inst_id = str(next(self._ids))
        resource = dict(body)
        resource.update(
            kind="compute#instance",
            id=inst_id,
            creationTimestamp=_now(),
            name=name,
            machineType=self._link("zones", zone, "machineTypes", mt),
            status="PROVISIONING",
            zone=self._link("zones", zone),
            selfLink=self._link("zones", zone, "instances", name),
            labels=dict(labels),
            labelFingerprint=secrets.token_urlsafe(8),
            cpuPlatform="Intel Cascade Lake",
            fingerprint=secrets.token_urlsafe(8),
            startRestricted=False,
            deletionProtection=bool(body.get("deletionProtection", False)),
        )
        resource["metadata"] = {"kind": "compute#metadata", "fingerprint": secrets.token_urlsafe(8), "items": items}
        inst_dir = self.workdir / zone / name
        shutil.rmtree(inst_dir, ignore_errors=True)
        inst_dir.mkdir(parents=True)
        inst = _Inst(
            name=name,
            zone=zone,
            resource=resource,
            dir=inst_dir,
            ip="127.0.0.1",
            marker=secrets.token_hex(8),
            boot_delay=self.boot_delay,
            startup_delay=self.startup_delay,
            fail_startup=self._fail_all_startups or name in self._fail_startup_names,
        )
        failure = self._insert_failure(zone, mt)
        op = self._new_operation(
            zone, "insert", inst if failure is None else None, self._link("zones", zone, "instances", name)
        )
        if failure is not None:
            op["targetId"] = inst_id
            self._later(min(self.boot_delay, 0.05), lambda: self._fail(op, failure))
            return dict(op)
        if self._net:
            self._net.add(inst)
        nics = body.get("networkInterfaces") or [{}]
        resource["networkInterfaces"] = [
            {
                "kind": "compute#networkInterface",
                "name": f"nic{i}",
                "network": nic.get("network") or self._link("global", "networks", "default"),
                "subnetwork": nic.get("subnetwork") or self._link("regions", _region(zone), "subnetworks", "default"),
                "networkIP": inst.ip if i == 0 else "0.0.0.0",
                "fingerprint": secrets.token_urlsafe(8),
                "stackType": "IPV4_ONLY",
                **({"accessConfigs": nic["accessConfigs"]} if nic.get("accessConfigs") else {}),
            }
            for i, nic in enumerate(nics)
        ]
        self._start_metadata_server(inst)
        self._instances[(zone, name)] = inst
        threading.Thread(target=self._run_instance, args=(inst, op), daemon=True, name=f"fake-gce-{name}").start()
        self._changed.notify_all()
        return dict(op)

    def _fail(self, op: dict[str, Any], failure: dict[str, Any]) -> None:
        with self._lock:
            self._finish_operation(op, failure)

    def _insert_failure(self, zone: str, mt: str) -> dict[str, Any] | None:
        if (zone, None) in self._exhausted or (zone, mt) in self._exhausted:
            message = (
                f"The zone 'projects/{self.project}/zones/{zone}' does not have enough resources available to "
                "fulfill the request.  Try a different zone, or try again later."
            )
            return {
                "error": {"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": message},
                "http": 503,
                "httpMessage": "SERVICE UNAVAILABLE",
            }
        region = _region(zone)
        for q in self._forced_quota:
            if q["region"] in (None, region):
                return self._quota_error(q["metric"], region, q["limit"], q["limit"])
        cpus = self.machine_types[mt]["guestCpus"]
        live = [i for i in self._instances.values() if _region(i.zone) == region and i.status not in ("TERMINATED",)]
        used = {
            "CPUS": sum(self.machine_types[_last(i.resource["machineType"])]["guestCpus"] for i in live),
            "INSTANCES": len(live),
        }
        want = {"CPUS": cpus, "INSTANCES": 1}
        for (metric, r), limit in self._quotas.items():
            if r == region and metric in used and used[metric] + want[metric] > limit:
                return self._quota_error(metric, region, limit, used[metric])
        return None

    def _quota_error(self, metric: str, region: str, limit: float, usage: float) -> dict[str, Any]:
        message = f"Quota '{metric}' exceeded.  Limit: {float(limit)} in region {region}."
        info = {
            "metricName": f"compute.googleapis.com/{metric.lower()}",
            "limitName": f"{metric}-per-project-region",
            "dimensions": {"region": region},
            "limit": float(limit),
        }
        return {
            "error": {"code": "QUOTA_EXCEEDED", "message": message, "errorDetails": [{"quotaInfo": info}]},
            "http": 403,
            "httpMessage": "FORBIDDEN",
        }

    def _instance_or_404(self, zone: str, name: str) -> _Inst:
        inst = self._instances.get((zone, name))
        if inst is None:
            raise ApiError(404, f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found")
        return inst

    def _api_instances_get(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        return dict(self._instance_or_404(zone, name).resource)

    def _api_instances_list(self, r: Request, zone: str) -> dict[str, Any]:
        items = [i.resource for (z, _), i in sorted(self._instances.items()) if z == zone]
        return self._listing("compute#instanceList", self._link("zones", zone, "instances"), items, r.query)

    def _api_instances_aggregatedList(self, r: Request) -> dict[str, Any]:
        by_zone: dict[str, list[dict[str, Any]]] = {}
        for (z, _), i in sorted(self._instances.items()):
            by_zone.setdefault(z, []).append(i.resource)
        link = self._link("aggregated", "instances")
        return self._aggregated("compute#instanceAggregatedList", "instances", link, by_zone, r.query)

    def _api_instances_delete(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        inst = self._instance_or_404(zone, name)
        op = self._new_operation(zone, "delete", inst)
        if inst.status != "STOPPING":
            inst.resource["status"] = "STOPPING"
        inst.stopped.set()
        delay = self.delete_delay

        def finish() -> None:
            self._kill(inst)
            time.sleep(delay)
            with self._lock:
                self._remove(inst)
                self._finish_operation(op)

        threading.Thread(target=finish, daemon=True).start()
        return dict(op)

    def _api_instances_getSerialPortOutput(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        self._instance_or_404(zone, name)
        data = self.serial_output(name).encode()
        start = int(r.query.get("start") or 0)
        chunk = data[start:]
        return {
            "kind": "compute#serialPortOutput",
            "contents": chunk.decode(errors="replace"),
            "start": str(start),
            "next": str(start + len(chunk)),
            "selfLink": self._link("zones", zone, "instances", name, "serialPort"),
        }

    # operations

    def _operation_or_404(self, zone: str, name: str) -> dict[str, Any]:
        op = self._operations.get((zone, name))
        if op is None:
            raise ApiError(404, f"The resource 'projects/{self.project}/zones/{zone}/operations/{name}' was not found")
        return op

    def _api_zoneOperations_get(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        return dict(self._operation_or_404(zone, name))

    def _api_zoneOperations_wait(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        op = self._operation_or_404(zone, name)
        deadline = time.monotonic() + self.wait_timeout
        while op["status"] != "DONE" and not self._closed and time.monotonic() < deadline:
            self._changed.wait(deadline - time.monotonic())
        return dict(op)

    def _api_zoneOperations_delete(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        self._operation_or_404(zone, name)
        del self._operations[(zone, name)]
        return {}

    def _api_zoneOperations_list(self, r: Request, zone: str) -> dict[str, Any]:
        items = [op for (z, _), op in self._operations.items() if z == zone]
        return self._listing("compute#operationList", self._link("zones", zone, "operations"), items, r.query)

    # machine types, zones, regions

    def _zone_machine_types(self, zone: str) -> list[str]:
        names = self.zones[zone].get("machine_types")
        return [n for n in (names if names is not None else self.machine_types) if n in self.machine_types]

    def _machine_type(self, zone: str, name: str) -> dict[str, Any]:
        spec = self.machine_types[name]
        gb = spec["memoryMb"] / 1024
        out: dict[str, Any] = {
            "kind": "compute#machineType",
            "id": str(abs(hash(name)) % 10**12),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": name,
            "description": f"{spec['guestCpus']} vCPU{'s' if spec['guestCpus'] > 1 else ''}, {gb:g} GB RAM",
            "guestCpus": spec["guestCpus"],
            "memoryMb": spec["memoryMb"],
            "imageSpaceGb": 0,
            "maximumPersistentDisks": 128,
            "maximumPersistentDisksSizeGb": "263168",
            "zone": zone,
            "selfLink": self._link("zones", zone, "machineTypes", name),
            "isSharedCpu": bool(spec.get("isSharedCpu", False)),
        }
        if spec.get("gpu"):
            out["accelerators"] = [{"guestAcceleratorType": spec["gpu"][0], "guestAcceleratorCount": spec["gpu"][1]}]
        return out

    def _api_machineTypes_get(self, r: Request, zone: str, name: str) -> dict[str, Any]:
        if name not in self._zone_machine_types(zone):
            raise ApiError(
                404, f"The resource 'projects/{self.project}/zones/{zone}/machineTypes/{name}' was not found"
            )
        return self._machine_type(zone, name)

    def _api_machineTypes_list(self, r: Request, zone: str) -> dict[str, Any]:
        items = [self._machine_type(zone, n) for n in self._zone_machine_types(zone)]
        return self._listing("compute#machineTypeList", self._link("zones", zone, "machineTypes"), items, r.query)

    def _api_machineTypes_aggregatedList(self, r: Request) -> dict[str, Any]:
        by_zone = {z: [self._machine_type(z, n) for n in self._zone_machine_types(z)] for z in self.zones}
        link = self._link("aggregated", "machineTypes")
        return self._aggregated("compute#machineTypeAggregatedList", "machineTypes", link, by_zone, r.query)

    def _zone(self, zone: str) -> dict[str, Any]:
        return {
            "kind": "compute#zone",
            "id": str(2000 + list(self.zones).index(zone)),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": zone,
            "description": zone,
            "status": self.zones[zone].get("status", "UP"),
            "region": self._link("regions", _region(zone)),
            "selfLink": self._link("zones", zone),
            "availableCpuPlatforms": ["Intel Cascade Lake", "AMD Milan"],
            "supportsPzs": False,
        }

    def _api_zones_get(self, r: Request, zone: str) -> dict[str, Any]:
        return self._zone(zone)

    def _api_zones_list(self, r: Request) -> dict[str, Any]:
        return self._listing("compute#zoneList", self._link("zones"), [self._zone(z) for z in self.zones], r.query)

    def _regions(self) -> list[str]:
        return list(dict.fromkeys(_region(z) for z in self.zones))

    def _region(self, region: str) -> dict[str, Any]:
        live = [i for i in self._instances.values() if _region(i.zone) == region and i.status != "TERMINATED"]
        usage = {
            "CPUS": sum(self.machine_types[_last(i.resource["machineType"])]["guestCpus"] for i in live),
            "INSTANCES": len(live),
        }
        quotas = [
            {"metric": metric, "limit": limit, "usage": float(usage.get(metric, 0))}
            for (metric, r), limit in sorted(self._quotas.items())
            if r == region
        ]
        return {
            "kind": "compute#region",
            "id": str(1000 + self._regions().index(region)),
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "name": region,
            "description": region,
            "status": "UP",
            "zones": [self._link("zones", z) for z in self.zones if _region(z) == region],
            "quotas": quotas,
            "selfLink": self._link("regions", region),
            "supportsPzs": False,
        }

    def _api_regions_get(self, r: Request, region: str) -> dict[str, Any]:
        if region not in self._regions():
            raise ApiError(404, f"The resource 'projects/{self.project}/regions/{region}' was not found")
        return self._region(region)

    def _api_regions_list(self, r: Request) -> dict[str, Any]:
        items = [self._region(x) for x in self._regions()]
        return self._listing("compute#regionList", self._link("regions"), items, r.query)


def _is_spot(resource: dict[str, Any]) -> bool:
    return bool(
        _field(resource, "scheduling.provisioningModel") == "SPOT" or _field(resource, "scheduling.preemptible")
    )


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


# -- network namespaces ----------------------------------------------------------------------------

REGISTRY = Path("/run/fake-compute")
NETNS_PREFIX = "brl-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class _Bridge:
    """One bridge with a /24 of 10.231.0.0/16 that no other bridge on this host uses, and a namespace
    plus a veth pair per instance. Registered under /run/fake-compute/<suffix> with the owner's pid, so
    that a later fake removes what a crashed test process left behind."""

    def __init__(self, suffix: str, subnet: int):
        self.suffix, self.subnet = suffix, subnet
        self.bridge = f"{NETNS_PREFIX}{suffix}"
        self.host_ip = f"10.231.{subnet}.1"
        self._next = itertools.count(2)

    @classmethod
    def create(cls) -> _Bridge:
        if os.geteuid() != 0:
            raise NetnsUnavailable("FakeCompute(netns=True) needs root (network namespaces); this process is not root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("FakeCompute(netns=True) needs the `ip` tool (iproute2), which is not on PATH")
        REGISTRY.mkdir(parents=True, exist_ok=True)
        with open(REGISTRY / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _sweep()
            used = {int(m) for m in re.findall(r"inet 10\.231\.(\d+)\.", _ip("-o", "-4", "addr", "show").stdout)}
            free = [n for n in range(256) if n not in used]
            if not free:
                raise NetnsUnavailable("no free /24 left in 10.231.0.0/16 for FakeCompute(netns=True)")
            net = cls(secrets.token_hex(3), free[0])
            (REGISTRY / net.suffix).write_text(f"{os.getpid()}\n")
            try:
                _ip("link", "add", net.bridge, "type", "bridge")
                _ip("addr", "add", f"{net.host_ip}/24", "dev", net.bridge)
                _ip("link", "set", net.bridge, "up")
            except subprocess.CalledProcessError as e:
                net.close()
                raise NetnsUnavailable(f"could not make bridge {net.bridge}: {e.stderr.strip()}") from e
        return net

    def add(self, inst: _Inst) -> None:
        n = next(self._next)
        if n > 254:
            raise ApiError(403, "FakeCompute(netns=True) holds at most 253 instances.", "quotaExceeded")
        ns, host, peer = f"{self.bridge}-{n}", f"bh{self.suffix}{n}", f"bn{self.suffix}{n}"
        inst.ip, inst.netns, inst.veth = f"10.231.{self.subnet}.{n}", ns, host
        try:
            _ip("netns", "add", ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{inst.ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as e:
            self.remove(inst)
            raise ApiError(
                500, f"fake-compute could not make namespace {ns}: {e.stderr.strip()}", "backendError"
            ) from e

    def pids(self, ns: str) -> set[int]:
        out = _ip("netns", "pids", ns, check=False).stdout
        return {int(p) for p in out.split() if p.isdigit()}

    def remove(self, inst: _Inst) -> None:
        if inst.netns:
            _ip("netns", "del", inst.netns, check=False)
        if inst.veth:
            _ip("link", "del", inst.veth, check=False)

    def close(self) -> None:
        _remove_suffix(self.suffix)


def _remove_suffix(suffix: str) -> None:
    bridge = f"{NETNS_PREFIX}{suffix}"
    for ns in _ip("netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(bridge + "-"):
            for pid in {int(p) for p in _ip("netns", "pids", name, check=False).stdout.split() if p.isdigit()}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(rf"\d+: (bh{suffix}\d+)[@:]", line)
        if m:
            _ip("link", "del", m.group(1), check=False)
    _ip("link", "del", bridge, check=False)
    with contextlib.suppress(FileNotFoundError):
        (REGISTRY / suffix).unlink()


def _sweep() -> None:
    """Remove the bridges and namespaces of fakes whose process is gone."""
    for entry in REGISTRY.iterdir():
        if entry.name.startswith("."):
            continue
        try:
            pid = int(entry.read_text().strip() or 0)
            os.kill(pid, 0)
            alive = True
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            _remove_suffix(entry.name)

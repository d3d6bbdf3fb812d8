"""Every message between client, daemon and node agents.

Bodies travel as envelopes (`schemas.envelope`): these dataclasses are the
JSON header's parts, and integer `*_blob` fields index the envelope's blobs.

Client -> daemon
    GET  /v1/info                 -> {"version": str, "protocol": int, limits...}: the client checks
                                  `compatible` against its own before it sends anything
    POST /v1/jobs                 {"spec": JobSpec, "batches": [BatchMeta], "final_count": n|None,
                                   "payload_proof": str?}
                                  blobs: [function, batch...] (none for a batch with a payload_ref)
    POST /v1/jobs/{id}/inputs     {"batches": [BatchMeta], "final_count": n|None}  blobs: [batch...]
    POST /v1/jobs/{id}/cancel     {"reason": str}
    PUT  /v1/blobs/{sha256}       a content-addressed upload: build context, environment manifest, code, package
    POST /v1/blobs/missing        {"digests": [...]} -> {"missing": [...]}
    WS   /v1/events               one per client; it sends {"op": "subscribe", "job": ID, "after": SEQ}
                                  and {"op": "ack", "job": ID}; the daemon sends envelopes
                                  {"job_id": ID, "events": [Event], "status": JobStatus} + blobs.
Agent -> daemon
    POST /v1/agents/register      NodeInfo                    -> Registered, or 409 "version_mismatch"
    POST /v1/agents/{id}/poll     AgentReport (long-poll)     -> Delivery
    POST /v1/agents/{id}/report   AgentReport + result blobs  -> Delivery (never waits)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .wire import Wire, nested

# Parts of two Burla versions work together only where they state the same protocol number (`compatible`).
# Bump it with any change that a part of the previous version cannot speak: a message field without a
# default, a changed meaning, the envelope, a route, the worker shim's socket protocol, how functions and
# results are pickled. Parts older than this number state none (0).
PROTOCOL_VERSION = 1


def compatible(version: str, protocol: int, other_version: str, other_protocol: int) -> bool:
    """Whether parts of these Burla versions and protocol numbers may work together."""
    return version == other_version or (protocol > 0 and protocol == other_protocol)


# Streams of a log line.
STDOUT = 1
STDERR = 2

# CallError.kind
EXCEPTION = "exception"  # the user's function raised
WORKER_DIED = "worker_died"  # the worker process exited or was killed mid-call
MEMORY = "memory"  # the call went over func_ram and was killed
SYSTEM = "system"  # burla could not run the call (unloadable function, unpicklable result)

# Event.kind
RESULTS = "results"
LOGS = "logs"
FAILED = "failed"
DONE = "done"
CANCELLED = "cancelled"
NOTICE = "notice"
STATUS = "status"  # live only, never stored

# Job states
RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
FINISHED_STATES = (JOB_DONE, JOB_FAILED, JOB_CANCELLED)


@dataclasses.dataclass(frozen=True)
class NodeInfo(Wire):
    """What an agent tells the daemon about its host when it registers."""

    node_id: str
    hostname: str
    cpus: int
    ram_bytes: int
    python_version: str  # "3.11": the minor version the workers run
    workers: int  # warm worker slots
    runtime: str = "process"
    gpus: tuple[str, ...] = ()
    agent_version: str = ""
    protocol: int = 0  # PROTOCOL_VERSION of the agent; 0: an agent older than protocol numbers


@dataclasses.dataclass(frozen=True)
class Registered(Wire):
    agent_id: str
    boot_id: str
    poll_timeout: float
    agent_timeout: float
    payload_host: str = ""  # where the daemon's payload files are (schemas.local)
    payload_dir: str = ""


@dataclasses.dataclass(frozen=True)
class JobSpec(Wire):
    job_id: str
    function_name: str
    function_hash: str
    python_version: str
    func_cpu: float = 1.0
    func_ram: float = 4.0  # GB per call
    max_parallelism: int | None = None
    client_version: str = ""
    image: str = ""  # an OCI image to run in ("": the nodes' default: processes, or the first standby image)
    build: str = ""  # digest of a dockerfile= build context the nodes build `image` from
    env: str = ""  # digest of the client's environment manifest (schemas.environment); "": none


@dataclasses.dataclass(frozen=True)
class BatchMeta(Wire):
    """A batch of consecutive inputs [start, start + count), pickled as one list."""

    seq: int
    start: int
    count: int
    payload_ref: str = ""  # set when the client wrote the batch into the daemon's payload dir itself


@dataclasses.dataclass(frozen=True)
class Lease(Wire):
    """Inputs [lo, hi) of one batch, given to one worker slot."""

    lease_id: int
    job_id: str
    function_hash: str
    batch_seq: int
    batch_start: int
    lo: int
    hi: int
    func_cpu: float = 1.0
    func_ram_bytes: int = 4 * 1024**3
    pool: str = ""  # the agent's pool of workers to run it on (PoolState.key)
    env: str = ""  # the job's environment manifest (JobSpec.env)


@dataclasses.dataclass(frozen=True)
class StandbyImage(Wire):
    """An image every podman node keeps warm: `per_cpu` containers per CPU."""

    image: str
    python_version: str = ""  # what its python3 is expected to be; agents check
    per_cpu: float = 1.0


@dataclasses.dataclass(frozen=True)
class PoolWant(Wire):
    """The daemon asks a node for warm workers of one shape, for one job."""

    job_id: str
    image: str
    build: str = ""
    cpus: float = 1.0  # per container
    ram_bytes: int = 0  # per container
    count: int = 1
    python_version: str = ""  # the client's: the image's python3 must be this minor version


@dataclasses.dataclass(frozen=True)
class PoolState(Wire):
    """A node's warm workers of one shape, as its agent reports them."""

    key: str
    image: str = ""  # "" for process workers
    python_version: str = ""
    cpus: float = 0.0  # per worker; 0: the node's CPUs are shared (process workers)
    ram_bytes: int = 0  # per worker; 0: shared
    slots: int = 0  # workers wanted
    ready: int = 0  # workers connected and taking work
    state: str = "ready"  # preparing (pulling/building/checking), ready, draining
    phase: str = ""  # what it is doing, in words ("pulling image X")
    job_id: str = ""  # the job it was made for ("": standby)
    default: bool = False  # takes jobs that name no image
    containers: tuple[Any, ...] = ()  # [id, state] per container, for `burla status`


@dataclasses.dataclass(frozen=True)
class PoolError(Wire):
    """A node cannot run a job: its image cannot be pulled, built or run, or its packages installed."""

    job_id: str
    image: str
    message: str
    node: str = ""
    kind: str = "image"  # "image" or "install"


@dataclasses.dataclass(frozen=True)
class CallError(Wire):
    """Why one input's call did not return."""

    index: int
    kind: str
    type_name: str
    message: str
    traceback: str = ""  # the remote traceback, formatted
    frames: tuple[Any, ...] = ()  # [filename, lineno, name, source line] per frame
    node: str = ""
    exc_blob: int | None = None  # the pickled exception, when it pickled


@dataclasses.dataclass(frozen=True)
class LeaseResult(Wire):
    """The outcome of a lease: results of inputs [lo, lo + n_ok), then maybe an error."""

    lease_id: int
    job_id: str
    lo: int
    n_ok: int
    elapsed: float
    results_blob: int
    error: CallError | None = None


@dataclasses.dataclass(frozen=True)
class LogChunk(Wire):
    """Lines printed by calls of one job: a pickled list of (index, stream, text)."""

    job_id: str
    lines: int
    nbytes: int
    blob: int


@dataclasses.dataclass(frozen=True)
class AgentReport(Wire):
    boot_id: str = ""  # the daemon boot the agent's ack_delivery refers to
    ack_delivery: int = 0  # highest delivery the agent has taken in
    ready_workers: int = 0
    running: tuple[int, ...] = ()  # leases the agent holds and has not had accepted
    results: tuple[LeaseResult, ...] = ()
    logs: tuple[LogChunk, ...] = ()
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    payload_proof: str = ""  # the daemon's probe secret: this agent reads its payload files
    job_phases: dict[str, str] = dataclasses.field(default_factory=dict)  # job -> what the node does for it
    pools: tuple[PoolState, ...] | None = None  # None: unchanged since the last report
    pool_errors: tuple[PoolError, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delivery(Wire):
    boot_id: str
    delivery: int = 0  # 0: nothing delivered
    leases: tuple[Lease, ...] = ()
    cancel_jobs: tuple[str, ...] = ()
    functions: dict[str, int] = dataclasses.field(default_factory=dict)  # hash -> blob
    batches: tuple[Any, ...] = ()  # [job_id, seq, blob]
    batch_refs: tuple[Any, ...] = ()  # [job_id, seq, file under the payload dir], for agents that read it
    wants: tuple[PoolWant, ...] | None = None  # the pools the daemon wants now (None: unchanged)
    standby: tuple[StandbyImage, ...] | None = None  # the standby spec (None: unchanged)


@dataclasses.dataclass(frozen=True)
class Event(Wire):
    """One entry of a job's event stream, as the client sees it."""

    seq: int
    kind: str
    lo: int = 0
    hi: int = 0
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    blob: int | None = None


@dataclasses.dataclass(frozen=True)
class JobStatus(Wire):
    job_id: str
    state: str
    function_name: str = ""
    n_inputs: int | None = None
    n_uploaded: int = 0
    n_done: int = 0
    running: int = 0  # leases out
    workers: int = 0  # worker slots the job could use now
    created: float = 0.0
    calls_per_second: float = 0.0
    phase: str = ""  # what the cluster is doing for the job, in words


@dataclasses.dataclass(frozen=True)
class NodeStatus(Wire):
    agent_id: str
    hostname: str
    state: str
    cpus: int
    ram_bytes: int
    python_version: str
    workers: int
    busy: int
    runtime: str = "process"
    last_seen_ago: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    pools: tuple[PoolState, ...] = ()


@dataclasses.dataclass(frozen=True)
class ClusterStatus(Wire):
    nodes: tuple[NodeStatus, ...] = ()
    jobs: tuple[JobStatus, ...] = ()
    daemon: dict[str, Any] = dataclasses.field(default_factory=dict)


nested("LeaseResult", "error", CallError)
nested("AgentReport", "results", LeaseResult)
nested("AgentReport", "pools", PoolState)
nested("AgentReport", "pool_errors", PoolError)
nested("Delivery", "wants", PoolWant)
nested("Delivery", "standby", StandbyImage)
nested("AgentReport", "logs", LogChunk)
nested("Delivery", "leases", Lease)
nested("ClusterStatus", "nodes", NodeStatus)
nested("NodeStatus", "pools", PoolState)
nested("ClusterStatus", "jobs", JobStatus)

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
import enum
from collections.abc import Sequence
from typing import Any

from .wire import ID, OPTIONAL_SHA256, SHA256, Wire, field

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
TIMEOUT = "timeout"  # the call ran past its JobSpec.timeout and was killed
LOST = "lost"  # the node running the call was lost (infrastructure), too many times


class ErrorType(enum.StrEnum):
    """CallError.type_name of the failures Burla itself reports (not a user's exception): the qualified
    name of the class in burla/errors.py that the client raises for it (mapped once, in _remote_errors)."""

    CALL = "burla.errors.CallError"
    WORKER_DIED = "burla.errors.WorkerDiedError"
    MEMORY_LIMIT = "burla.errors.MemoryLimitError"
    UNPICKLING = "burla.errors.UnpicklingError"
    UNPICKLABLE_RESULT = "burla.errors.UnpicklableResultError"
    RESULT_TOO_LARGE = "burla.errors.ResultTooLargeError"
    NO_NODES = "burla.errors.NoNodesError"
    IMAGE = "burla.errors.ImageError"
    INSTALL = "burla.errors.InstallError"
    NODE_START = "burla.errors.NodeStartError"
    CALL_TIMEOUT = "burla.errors.CallTimeoutError"
    NODE_LOST = "burla.errors.NodeLostError"


INSTANCE_NAME = r"(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)?"  # a Compute Engine instance name (RFC 1035), or ""
PROCESS_POOL = "process"  # the key of a process-runtime node's one pool: its workers share the node

# Event.kind
RESULTS = "results"
LOGS = "logs"
FAILED = "failed"
DONE = "done"
CANCELLED = "cancelled"
NOTICE = "notice"
CALL_FAILED = "call_failed"  # return_exceptions: inputs [lo, hi) failed, their slots hold the error; the job goes on
RETRY = "retry"  # an attempt of input `lo` failed and runs again (data: an Attempt)
STATUS = "status"  # live only, never stored

# Job states
RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
FINISHED_STATES = (JOB_DONE, JOB_FAILED, JOB_CANCELLED)

EXCEPTION_TREE_VERSION = 1
EXCEPTION_TREE_MAX_NODES = 64  # exceptions kept of one failure's chains and groups
EXCEPTION_TREE_MAX_FRAMES = 1000  # frames kept per exception: the first and last halves
EXCEPTION_TREE = """The blob of a CallError of kind EXCEPTION: a plain pickle of

    {"version": 1, "nodes": [node, ...]}   # nodes[0] is the exception the call raised

where each node is a dict of builtins:

    type_name         "module.QualName" of the exception's class
    message           str() of the exception
    frames            [filename, lineno, name, source line, module] per frame of its traceback
    exc               the exception pickled with cloudpickle, None if it did not pickle (or is a
                      group member: members travel inside their group's pickle)
    cause, context    index of the node of __cause__ / __context__, or None
    suppress_context  __suppress_context__
    group             for an exception group: the node index of each of .exceptions, else None

An older worker sent the pickled exception itself."""

# Bounds of what a peer may send (see `wire.field`).
MAX_INDEX = 2**53  # input indices and counts: exact as JSON numbers everywhere
MAX_BATCH_INPUTS = 10_000_000  # inputs in one batch (the client sends at most 100,000)
MAX_CPUS = 100_000
MAX_ERROR_MESSAGE = 1024 * 1024  # characters of a CallError's message (workers cut longer ones)
MAX_ERROR_TRACEBACK = 4 * 1024 * 1024
MAX_BYTES = 2**53
PYTHON_VERSION = r"(?:\d{1,2}\.\d{1,3})?"  # "3.11", or "" where unknown
PAYLOAD_REF = r"(?:[0-9A-Za-z_-]{1,64}/[0-9A-Za-z_.-]{1,80})?"  # <job id>/<file>, see common.local
MAX_TIMEOUT = 366 * 86400.0  # seconds: a call's timeout= (a year)
MAX_RETRIES = 100  # retries= of one job
MAX_RETRY_DELAY = 60.0  # seconds: the backoff between two attempts of one input never exceeds this
MAX_RETRY_ON = 64  # exception classes in retry_on=
TYPE_NAME = 1024  # characters of a "module.QualName"


@dataclasses.dataclass(frozen=True)
class NodeInfo(Wire):
    """What an agent tells the daemon about its host when it registers."""

    node_id: str = field(pattern=ID)
    hostname: str = field(max_len=255)
    cpus: int = field(lo=1, hi=MAX_CPUS)
    ram_bytes: int = field(lo=0, hi=MAX_BYTES)
    python_version: str = field(pattern=PYTHON_VERSION)  # "3.11": the minor version the workers run
    workers: int = field(lo=0, hi=MAX_CPUS)  # warm worker slots
    runtime: str = field("process", max_len=32)
    gpus: tuple[str, ...] = field((), max_items=64)
    agent_version: str = field("", max_len=64)
    protocol: int = field(0, lo=0, hi=2**31)  # PROTOCOL_VERSION of the agent; 0: an agent older than protocol numbers
    instance: str = field("", pattern=INSTANCE_NAME)  # the cloud instance it runs on, when the daemon started it
    runs_after: bool = False  # it holds a lease naming Lease.after until that lease ends (older agents: no prefetch)


@dataclasses.dataclass(frozen=True)
class Registered(Wire):
    agent_id: str = field(pattern=ID)
    boot_id: str = field(max_len=64)
    poll_timeout: float = field(lo=0, hi=3600)
    agent_timeout: float = field(lo=0, hi=86400)
    payload_host: str = ""  # where the daemon's payload files are (common.local)
    payload_dir: str = ""
    agent_token: str = field("", max_len=256)  # this agent's own token: its agent routes take no other
    max_result_bytes: int = field(0, lo=0, hi=MAX_BYTES)  # per call's pickled result; 0: no limit


@dataclasses.dataclass(frozen=True)
class JobSpec(Wire):
    job_id: str = field(pattern=ID)
    function_name: str = field(max_len=1000)
    function_hash: str = field(pattern=SHA256)  # sha256 of the pickled function: the daemon checks it
    python_version: str = field(pattern=PYTHON_VERSION)
    func_cpu: float = field(1.0, lo=0.001, hi=MAX_CPUS)
    func_ram: float = field(4.0, lo=0.001, hi=1e9)  # GB per call
    max_parallelism: int | None = field(None, lo=1, hi=MAX_INDEX)
    client_version: str = field("", max_len=64)
    image: str = field("", max_len=1024)  # an OCI image ("": the nodes' default: processes, or the first standby one)
    build: str = field("", pattern=OPTIONAL_SHA256)  # digest of a dockerfile= build context to build `image` from
    env: str = field("", pattern=OPTIONAL_SHA256)  # digest of the client's environment manifest; "": none
    grow: bool = False  # may start cluster nodes for what the free ones lack
    # Failures (the daemon and agent enforce these, not the client: they hold while it is away).
    timeout: float | None = field(None, lo=0.001, hi=MAX_TIMEOUT)  # seconds one call may run (agent kills it)
    retries: int = field(0, lo=0, hi=MAX_RETRIES)  # times a call that fails is run again
    # "module.QualName" of the classes a failure must be an instance of to be retried (): any Exception
    retry_on: tuple[str, ...] = field((), max_items=MAX_RETRY_ON)
    retry_delay: float = field(1.0, lo=0, hi=MAX_RETRY_DELAY)  # before the first retry; doubles, capped
    return_exceptions: bool = False  # a failed input's slot holds its error; the job goes on
    # runs on without its caller: never cancelled for want of a follower, its events kept until job_retention
    detach: bool = False


@dataclasses.dataclass(frozen=True)
class BatchMeta(Wire):
    """A batch of consecutive inputs [start, start + count), pickled as one list."""

    seq: int = field(lo=0, hi=MAX_INDEX)
    start: int = field(lo=0, hi=MAX_INDEX)
    count: int = field(lo=1, hi=MAX_BATCH_INPUTS)
    payload_ref: str = field("", pattern=PAYLOAD_REF)  # set when the client wrote the batch into the payload dir


@dataclasses.dataclass(frozen=True)
class Lease(Wire):
    """Inputs [lo, hi) of one batch, given to one worker slot."""

    lease_id: int = field(lo=0)
    job_id: str = field(pattern=ID)
    function_hash: str = field(pattern=SHA256)
    batch_seq: int = field(lo=0, hi=MAX_INDEX)
    batch_start: int = field(lo=0, hi=MAX_INDEX)
    lo: int = field(lo=0, hi=MAX_INDEX)
    hi: int = field(lo=0, hi=MAX_INDEX)
    func_cpu: float = field(1.0, lo=0, hi=MAX_CPUS)
    func_ram_bytes: int = field(4 * 1024**3, lo=0, hi=MAX_BYTES)
    pool: str = field("", max_len=256)  # the agent's pool of workers to run it on (PoolState.key)
    env: str = field("", pattern=OPTIONAL_SHA256)  # the job's environment manifest (JobSpec.env)
    # prefetched: the lease it follows in its slot on the node; it starts when that one ends, not before
    # (0: it starts on any free worker of its pool). See NodeInfo.runs_after.
    after: int = field(0, lo=0)
    timeout: float = field(0.0, lo=0, hi=MAX_TIMEOUT)  # seconds each call may run before the agent kills it (0: none)


MACHINE_TYPE = r"[a-z][-a-z0-9]{0,62}"
IMAGE_PATH = r"[-a-zA-Z0-9_./]{1,400}"
ZONE = r"[a-z][-a-z0-9]{0,62}"


@dataclasses.dataclass(frozen=True)
class NodeGroup(Wire):
    """One kind of node a cluster whose daemon starts its own keeps (burla.toml's [[cluster.groups]])."""

    machine_type: str = field("n2-standard-4", pattern=MACHINE_TYPE)
    standby: int = field(0, lo=0, hi=10_000)
    cpus: int = field(0, lo=0, hi=MAX_CPUS)
    ram: int = field(0, lo=0, hi=MAX_BYTES)
    disk_gb: int = field(50, lo=10, hi=65_536)
    image: str = field("projects/debian-cloud/global/images/family/debian-12", pattern=IMAGE_PATH)
    spot: bool = False
    accelerator_type: str = field("", pattern=r"(?:[a-z][-a-z0-9]{0,62})?")
    accelerator_count: int = field(0, lo=0, hi=16)


@dataclasses.dataclass(frozen=True)
class ClusterSpec(Wire):
    """What `burla cluster spec` reads and changes while burlad runs (the provider and project stay)."""

    groups: tuple[NodeGroup, ...] = field((), max_items=64)
    zones: tuple[str, ...] = field((), max_items=64)
    max_cpus: int = field(1000, lo=0, hi=10_000_000)
    grow: bool = False
    idle_timeout: float = field(60.0, lo=0, hi=1e7)
    standby_idle_timeout: float = field(0.0, lo=0, hi=1e9)
    boot_timeout: float = field(600.0, lo=1, hi=1e6)


@dataclasses.dataclass(frozen=True)
class StandbyImage(Wire):
    """An image every podman node keeps warm: `per_cpu` containers per CPU."""

    image: str = field(max_len=1024)
    python_version: str = field("", pattern=PYTHON_VERSION)  # what its python3 is expected to be; agents check
    per_cpu: float = field(1.0, lo=0, hi=64)

    def shape(self, node_cpus: int, node_ram_bytes: int) -> tuple[float, int, int]:
        """CPUs and RAM of each of its containers on a node of this size, and how many it keeps warm.

        The daemon (what fits) and the agent (what it starts) both use this one definition.
        """
        per_cpu = max(self.per_cpu, 1e-9)
        return 1.0 / per_cpu, int(node_ram_bytes / max(1.0, node_cpus * per_cpu)), max(1, int(node_cpus * per_cpu))


def default_image(standby: Sequence[StandbyImage]) -> str:
    """The image of a call that names none: the first standby image ("": none, so processes)."""
    return standby[0].image if standby else ""


@dataclasses.dataclass(frozen=True)
class PoolWant(Wire):
    """The daemon asks a node for warm workers of one shape, for one job."""

    job_id: str = field(pattern=ID)
    image: str = field(max_len=1024)
    build: str = field("", pattern=OPTIONAL_SHA256)
    cpus: float = field(1.0, lo=0, hi=MAX_CPUS)  # per container
    ram_bytes: int = field(0, lo=0, hi=MAX_BYTES)  # per container
    count: int = field(1, lo=0, hi=MAX_CPUS)
    python_version: str = field("", pattern=PYTHON_VERSION)  # the client's: the image's python3 must be this


@dataclasses.dataclass(frozen=True)
class PoolState(Wire):
    """A node's warm workers of one shape, as its agent reports them."""

    key: str = field(max_len=256)
    image: str = field("", max_len=1024)  # "" for process workers
    python_version: str = field("", pattern=PYTHON_VERSION)
    cpus: float = field(0.0, lo=0, hi=MAX_CPUS)  # per worker; 0: the node's CPUs are shared (process workers)
    ram_bytes: int = field(0, lo=0, hi=MAX_BYTES)  # per worker; 0: shared
    slots: int = field(0, lo=0, hi=MAX_CPUS)  # workers wanted
    ready: int = field(0, lo=0, hi=MAX_CPUS)  # workers connected and taking work
    state: str = field("ready", max_len=32)  # preparing (pulling/building/checking), ready, draining
    phase: str = field("", max_len=4096)  # what it is doing, in words ("pulling image X")
    job_id: str = field("", max_len=64)  # the job it was made for ("": standby)
    default: bool = False  # takes jobs that name no image
    containers: tuple[Any, ...] = field((), max_items=MAX_CPUS)  # [id, state] per container, for `burla status`


@dataclasses.dataclass(frozen=True)
class PoolError(Wire):
    """A node cannot run a job: its image cannot be pulled, built or run, or its packages installed."""

    job_id: str = field(pattern=ID)
    image: str = field(max_len=1024)
    message: str = field(max_len=256 * 1024)
    node: str = field("", max_len=255)
    kind: str = field("image", max_len=32)  # "image" or "install"


@dataclasses.dataclass(frozen=True)
class CallError(Wire):
    """Why one input's call did not return."""

    index: int = field(lo=-1, hi=MAX_INDEX)
    kind: str = field(max_len=32)
    type_name: str = field(max_len=1024)
    message: str = field(max_len=MAX_ERROR_MESSAGE)
    traceback: str = field("", max_len=MAX_ERROR_TRACEBACK)  # the remote traceback, formatted
    frames: tuple[Any, ...] = field((), max_items=2 * EXCEPTION_TREE_MAX_FRAMES)  # [file, line, name, source, module]
    node: str = field("", max_len=255)
    exc_blob: int | None = field(None, lo=0, hi=1024)  # the exception tree (EXCEPTION_TREE) of a kind EXCEPTION error
    # "module.QualName" of each class of the raised exception's MRO (kind EXCEPTION): what retry_on is matched by
    bases: tuple[str, ...] = field((), max_items=64)


@dataclasses.dataclass(frozen=True)
class LeaseResult(Wire):
    """The outcome of a lease: results of inputs [lo, lo + n_ok), then maybe an error."""

    lease_id: int = field(lo=0)
    job_id: str = field(pattern=ID)
    lo: int = field(lo=0, hi=MAX_INDEX)
    n_ok: int = field(lo=0, hi=MAX_BATCH_INPUTS)
    elapsed: float = field(lo=0, hi=1e9)
    results_blob: int = field(lo=0, hi=1_000_000)
    error: CallError | None = None


@dataclasses.dataclass(frozen=True)
class LogChunk(Wire):
    """Lines printed by calls of one job: a pickled list of (index, stream, text)."""

    job_id: str = field(pattern=ID)
    lines: int = field(lo=0, hi=MAX_BYTES)
    nbytes: int = field(lo=0, hi=MAX_BYTES)
    blob: int = field(lo=0, hi=1_000_000)


@dataclasses.dataclass(frozen=True)
class AgentReport(Wire):
    boot_id: str = field("", max_len=64)  # the daemon boot the agent's ack_delivery refers to
    ack_delivery: int = field(0, lo=0)  # highest delivery the agent has taken in
    ready_workers: int = field(0, lo=0, hi=MAX_CPUS)
    running: tuple[int, ...] = ()  # leases the agent holds and has not had accepted
    results: tuple[LeaseResult, ...] = ()
    logs: tuple[LogChunk, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict, max_items=256)
    payload_proof: str = field("", max_len=256)  # the daemon's probe secret: this agent reads its payload files
    job_phases: dict[str, str] = field(default_factory=dict, max_items=10_000)  # job -> what the node does for it
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
    # a payload too large to push on the websocket: GET /v1/jobs/{job}/events/{seq}/payload (`size` bytes),
    # or, for a client on the daemon's host, the file `ref` under the payload dir
    size: int = field(0, lo=0, hi=MAX_BYTES)
    ref: str = field("", pattern=PAYLOAD_REF)


@dataclasses.dataclass(frozen=True)
class Attempt(Wire):
    """One failed attempt of inputs [lo, hi) of a job, kept in the job's record."""

    lo: int = field(lo=0, hi=MAX_INDEX)
    hi: int = field(lo=0, hi=MAX_INDEX)
    attempt: int = field(1, lo=1, hi=2**31)  # 1: the first run
    kind: str = field(EXCEPTION, max_len=32)  # a CallError kind, or LOST
    type_name: str = field("", max_len=TYPE_NAME)
    message: str = field("", max_len=4096)
    node: str = field("", max_len=255)
    at: float = field(0.0, lo=0, hi=1e12)
    retried: bool = True  # False: the last attempt, which failed the input


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
    owner: str = ""  # the user who made it
    retried: int = 0  # attempts that failed and ran again (retries=, or a lost node)
    failed: int = 0  # inputs whose slot holds their error (return_exceptions=True)
    attempts: tuple[Attempt, ...] = ()  # the latest failed attempts (in `burla status` and GET /v1/jobs/ID)
    detached: bool = False  # made with detach=True: it runs without its caller, reattached with burla.job(id)
    finished: float = 0.0  # when it ended (0: running, or not known here)


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

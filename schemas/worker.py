"""The agent <-> worker protocol: envelopes behind a u64 length on a unix socket.

The worker connects to the socket path in ``BURLA_WORKER_SOCKET`` and says
`Hello`; then the agent sends `Run` frames and the worker answers each with
any number of `Logs` frames and exactly one `Done` frame. Each frame's header
is one of these dataclasses (its ``kind`` says which); the blobs are:

    Hello  none
    Run    the function and the batch, when the worker lacks them (`Run.function_blob`,
           `Run.batch_blob`); or `Run.batch_file`, a file the worker reads the pickled batch from
    Logs   one: a pickled list of (index, stream, text)
    Done   the pickled list of the n_ok results (blob `Done.RESULTS_BLOB`), then the exception
           tree (`messages.EXCEPTION_TREE`) that its error's `exc_blob` names, if any

While it runs a lease the worker writes the index of the input it is calling,
as a little-endian i64, at offset 0 of the file named by
``BURLA_WORKER_PROGRESS``: if the worker dies, the agent reads which input killed it.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

from . import envelope
from . import messages as m
from .wire import ID, SHA256, Wire, field

HELLO = "hello"
RUN = "run"
LOGS = "logs"
DONE = "done"

SOCKET_ENV = "BURLA_WORKER_SOCKET"
PROGRESS_ENV = "BURLA_WORKER_PROGRESS"
LOG_FLUSH_ENV = "BURLA_LOG_FLUSH_SECONDS"
PATHS_ENV = "BURLA_WORKER_PATHS"  # the job environment's import path, os.pathsep-separated, put first
SLOT_ENV = "BURLA_WORKER_SLOT"
NONCE_ENV = "BURLA_WORKER_NONCE"  # the worker says it in its Hello: which start of its slot it is

PROGRESS = struct.Struct("<q")
IDLE = -1  # progress value while no call runs


MAX_BLOB = 1024  # blob indices of a frame


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hello(Wire):
    """worker -> agent, once, when it has connected: `nonce` says which start of which slot it is."""

    kind: str = HELLO
    slot: str = field("", max_len=32)
    nonce: str = field("", max_len=64)
    pid: int = field(0, lo=0)
    python: str = field("", pattern=m.PYTHON_VERSION)
    executable: str = field("", max_len=4096)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run(Wire):
    """agent -> worker: call the function on inputs [lo, hi) of a batch whose first input is `batch_start`."""

    kind: str = RUN
    lease_id: int = field(lo=0)
    job_id: str = field(pattern=ID)
    function_hash: str = field(pattern=SHA256)
    batch: tuple[Any, ...] = field(max_items=2)  # [job_id, seq]: the key of the worker's cache of batches
    batch_start: int = field(lo=0, hi=m.MAX_INDEX)
    lo: int = field(lo=0, hi=m.MAX_INDEX)
    hi: int = field(lo=0, hi=m.MAX_INDEX)
    function_blob: int | None = field(None, lo=0, hi=MAX_BLOB)  # None: the worker has the function
    batch_blob: int | None = field(None, lo=0, hi=MAX_BLOB)
    batch_file: str | None = field(None, max_len=4096)  # where the worker reads the batch itself
    max_result_bytes: int = field(0, lo=0, hi=m.MAX_BYTES)  # per call's pickled result; 0: no limit
    # A worker started with no environment that has run nothing takes the lease's here: put first on its
    # import path, as `PATHS_ENV` would have at its start (its shim has imported nothing of the job's).
    paths: tuple[str, ...] = field((), max_items=100_001)  # the code zip, then a folder per distribution


@dataclasses.dataclass(frozen=True, kw_only=True)
class Logs(Wire):
    """worker -> agent: lines printed by calls of a job (`messages.LogChunk` without its blob index)."""

    kind: str = LOGS
    job_id: str = field(pattern=ID)
    lines: int = field(lo=0, hi=m.MAX_BYTES)
    nbytes: int = field(lo=0, hi=m.MAX_BYTES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Done(Wire):
    """worker -> agent: the outcome of a `Run`: results of inputs [lo, lo + n_ok), then maybe an error."""

    RESULTS_BLOB: ClassVar[int] = 0  # the pickled results are always the frame's first blob

    kind: str = DONE
    lease_id: int = field(lo=0)
    lo: int = field(lo=0, hi=m.MAX_INDEX)
    n_ok: int = field(0, lo=0, hi=m.MAX_BATCH_INPUTS)
    elapsed: float = field(0.0, lo=0, hi=1e9)
    error: m.CallError | None = None


def send(sock: socket.socket, message: Wire, blobs: Sequence[envelope.Blob] = ()) -> None:
    """Send one frame on a blocking socket (big blobs are written as they are, not copied)."""
    for part in envelope.parts(message.to_wire(), blobs, framed=True):
        sock.sendall(part)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[memoryview]] | None:
    """Receive one frame from a blocking socket; None at end of stream."""
    prefix = _recv_exactly(sock, envelope.FRAME_PREFIX)
    if prefix is None:
        return None
    body = _recv_exactly(sock, envelope.frame_length(prefix))
    if body is None:
        return None
    return envelope.unpack(body)


def _recv_exactly(sock: socket.socket, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None
        got += k
    return buf

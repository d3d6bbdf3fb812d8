"""The agent <-> worker protocol: envelopes behind a u64 length on a unix socket.

The worker connects to the socket path in ``BURLA_WORKER_SOCKET`` and says
hello; then the agent sends ``run`` frames and the worker answers each with
any number of ``logs`` frames and exactly one ``done`` frame.

    worker -> agent  {"kind": "hello", "pid": int, "python": "3.11", "executable": str}
    agent  -> worker {"kind": "run", "lease_id", "job_id", "function_hash",
                      "batch": [job_id, seq], "batch_start", "lo", "hi",
                      "function_blob": int|None, "batch_blob": int|None, "batch_file": str|None}
                     blobs: the function and the batch, when the worker lacks them; or
                     batch_file: a file the worker can read the pickled batch from
    worker -> agent  {"kind": "logs", "job_id", "lines", "nbytes"}
                     blob: pickled list of (index, stream, text)
    worker -> agent  {"kind": "done", "lease_id", "lo", "n_ok", "elapsed",
                      "error": CallError|None}
                     blobs: [pickled list of n_ok results, pickled exception?]

While it runs a lease the worker writes the index of the input it is calling,
as a little-endian i64, at offset 0 of the file named by
``BURLA_WORKER_PROGRESS``: if the worker dies, the agent reads which input killed it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

from . import envelope

HELLO = "hello"
RUN = "run"
LOGS = "logs"
DONE = "done"

SOCKET_ENV = "BURLA_WORKER_SOCKET"
PROGRESS_ENV = "BURLA_WORKER_PROGRESS"
LOG_FLUSH_ENV = "BURLA_LOG_FLUSH_SECONDS"
PATHS_ENV = "BURLA_WORKER_PATHS"  # the job environment's import path, os.pathsep-separated, put first

PROGRESS = struct.Struct("<q")
IDLE = -1  # progress value while no call runs


def send(sock: socket.socket, header: dict[str, Any], blobs: Sequence[bytes | memoryview] = ()) -> None:
    """Send one frame on a blocking socket (big blobs are written as they are, not copied)."""
    for part in envelope.parts(header, blobs, framed=True):
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

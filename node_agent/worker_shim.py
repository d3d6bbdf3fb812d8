"""The worker: a warm Python process that runs the user's function.

It runs inside every worker process or container, so it imports nothing but
the standard library, cloudpickle and `burla.schemas`. It connects to its
agent's unix socket, says hello, then runs leases: for each input of the
range it calls the function, captures what the call prints (tagged with the
input's index, sent in batches of whole lines), and answers with the pickled
list of results, or the first error with its remote traceback.

Run as ``python -m burla.node_agent.worker_shim`` with ``BURLA_WORKER_SOCKET``
(and optionally ``BURLA_WORKER_PROGRESS``) set.
"""

from __future__ import annotations

import codecs
import copyreg
import ctypes
import dataclasses
import importlib
import io
import linecache
import mmap
import os
import pickle
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import cloudpickle

from burla.schemas import envelope
from burla.schemas import messages as m
from burla.schemas import worker as proto
from burla.schemas.wire import Wire

_LOG_BATCH_BYTES = 256 * 1024  # send printed lines once this much is buffered
_BATCHES_KEPT = 4  # unpickled input batches cached per worker
_FUNCTIONS_KEPT = 16  # unpickled functions cached per worker


class Channel:
    """The socket to the agent; shared by the run loop and the log flusher."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, message: Wire, blobs: list[envelope.Blob] = ()) -> None:  # type: ignore[assignment]
        with self.lock:
            proto.send(self.sock, message, blobs)


class Output:
    """Collects what calls print; sends whole lines, tagged (index, stream), in batches.

    A line is assembled per stream, whoever wrote its pieces (Python's sys.stdout or C code
    and subprocesses through fd 1): each stream is one ordered sequence of bytes, as in a
    terminal. A whole line is tagged with the input being called when it completes.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.lock = threading.Lock()
        self.job_id: str | None = None
        self.index = -1
        self.entries: list[tuple[int, int, str]] = []
        self.partial: dict[int, str] = {}  # stream -> text after its last newline
        self.nbytes = 0
        self.before_end: Callable[[], None] | None = None  # e.g. drain what fds 1 and 2 still hold

    def write(self, stream: int, text: str) -> None:
        with self.lock:
            if stream in self.partial:
                text = self.partial.pop(stream) + text
            if "\n" in text:
                cut = text.rindex("\n") + 1
                whole, rest = text[:cut], text[cut:]
                self.entries.append((self.index, stream, whole))
                self.nbytes += len(whole)
            else:
                rest = text
            if rest:
                self.partial[stream] = rest
            full = self.nbytes >= _LOG_BATCH_BYTES
        if full:
            self.flush()

    def end_lease(self) -> None:
        """A lease ended: what fds 1 and 2 still hold comes first, then lines left without a newline go out."""
        if self.before_end is not None:
            self.before_end()
        with self.lock:
            for stream, text in self.partial.items():
                self.entries.append((self.index, stream, text))
                self.nbytes += len(text)
            self.partial.clear()
        self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.entries or self.job_id is None:
                return
            entries, nbytes = self.entries, self.nbytes
            self.entries, self.nbytes = [], 0
            lines = sum(text.count("\n") or 1 for _, _, text in entries)
            blob = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
            self.channel.send(proto.Logs(job_id=self.job_id, lines=lines, nbytes=nbytes), [blob])

    def run_flusher(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            try:
                self.flush()
            except OSError:
                return


class FdCapture:
    """What C code and subprocesses write to fds 1 and 2 goes through `Output` too.

    The fds become pipes read by a thread; at the end of each lease the run
    loop drains them, so a call's output reaches the agent before its result.
    """

    def __init__(self, output: Output) -> None:
        self.output = output
        self.lock = threading.Lock()
        self.readers: list[tuple[int, int, Any]] = []  # (read fd, stream, incremental decoder)
        for fd, stream in ((1, m.STDOUT), (2, m.STDERR)):
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.dup2(write_end, fd)
            os.close(write_end)
            self.readers.append((read_end, stream, codecs.getincrementaldecoder("utf-8")("replace")))
        threading.Thread(target=self._run, daemon=True, name="burla-fd-capture").start()

    def drain(self) -> None:
        with self.lock:
            for read_end, stream, decoder in self.readers:
                while True:
                    try:
                        data = os.read(read_end, 65536)
                    except BlockingIOError:
                        break
                    if not data:
                        break
                    text = decoder.decode(data)
                    if text:
                        self.output.write(stream, text)

    def _run(self) -> None:
        fds = [r for r, _, _ in self.readers]
        while True:
            ready, _, _ = select.select(fds, [], [], 0.5)
            if ready:
                self.drain()


class Stream(io.TextIOBase):
    """sys.stdout / sys.stderr inside a worker."""

    def __init__(self, output: Output, stream: int, fd: int) -> None:
        self._output = output
        self._stream = stream
        self._fd = fd

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if s:
            self._output.write(self._stream, s)
        return len(s)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd  # the process's own fd: what C code writes there the agent captures

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"


class Progress:
    """The index of the input being called, readable by the agent if we die."""

    def __init__(self, path: str | None) -> None:
        self._map: mmap.mmap | None = None
        self._cell: Any = ctypes.c_int64(proto.IDLE)
        if path:
            fd = os.open(path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, proto.PROGRESS.size)
            finally:
                os.close(fd)
            self._cell = ctypes.c_int64.from_buffer(self._map)
        self.set(proto.IDLE)

    def set(self, index: int) -> None:
        self._cell.value = index


def describe_exception(e: BaseException, index: int, skip_frames: int) -> tuple[m.CallError, bytes]:
    """A CallError for `e` (without the shim's own frames), and its exception tree (`m.EXCEPTION_TREE`).

    The error's `exc_blob` is left for whoever puts the tree into a frame to set.
    """
    tb = e.__traceback__
    for _ in range(skip_frames):
        if tb is not None:
            tb = tb.tb_next
    root_frames = _frames(tb)
    text = "".join(traceback.format_exception(type(e), e, tb))
    error = m.CallError(
        index=index,
        kind=m.EXCEPTION,
        type_name=_type_name(e),
        message=_bounded(_safe_str(e), m.MAX_ERROR_MESSAGE),
        traceback=_bounded(text, m.MAX_ERROR_TRACEBACK),
        frames=tuple(root_frames),
        node=socket.gethostname(),
        bases=tuple(f"{c.__module__}.{c.__qualname__}"[:1024] for c in type(e).__mro__[:64]),  # for retry_on
    )
    return error, pickle.dumps(exception_tree(e, root_frames), protocol=pickle.HIGHEST_PROTOCOL)


def exception_tree(e: BaseException, root_frames: list[list[Any]]) -> dict[str, Any]:
    """`e` with its causes, contexts and group members, as `m.EXCEPTION_TREE` describes.

    Pickled exceptions lose `__cause__`, `__context__`, their tracebacks and the tracebacks of an
    exception group's members: each exception of the graph becomes a node with its own frames and
    links, so the client rebuilds the whole chain and prints it as Python prints a local one.
    """
    nodes: list[dict[str, Any]] = []
    seen: dict[int, int] = {}

    def visit(exc: BaseException, member: bool, frames: list[list[Any]] | None = None) -> int | None:
        if id(exc) in seen:
            return seen[id(exc)]
        if len(nodes) >= m.EXCEPTION_TREE_MAX_NODES:
            return None
        i = seen[id(exc)] = len(nodes)
        node: dict[str, Any] = {
            "type_name": _type_name(exc),
            "message": _bounded(_safe_str(exc), m.MAX_ERROR_MESSAGE),
            "frames": _frames(exc.__traceback__) if frames is None else frames,
            "exc": None if member else _pickled(exc),  # a group's members travel inside the group
            "cause": None,
            "context": None,
            "suppress_context": bool(exc.__suppress_context__),
            "group": None,
        }
        nodes.append(node)
        if exc.__cause__ is not None:
            node["cause"] = visit(exc.__cause__, member=False)
        if exc.__context__ is not None:
            node["context"] = visit(exc.__context__, member=False)
        if isinstance(exc, BaseExceptionGroup):
            node["group"] = [visit(sub, member=True) for sub in exc.exceptions]
        return i

    visit(e, member=False, frames=root_frames)
    return {"version": m.EXCEPTION_TREE_VERSION, "nodes": nodes}


def _frames(tb: Any) -> list[list[Any]]:
    """[filename, lineno, name, source line, module] of each frame of a traceback."""
    frames: list[list[Any]] = [
        [frame.f_code.co_filename, lineno or 0, frame.f_code.co_name, "", frame.f_globals.get("__name__")]
        for frame, lineno in traceback.walk_tb(tb)
    ]
    if len(frames) > m.EXCEPTION_TREE_MAX_FRAMES:  # a RecursionError: its first and last frames tell the story
        half = m.EXCEPTION_TREE_MAX_FRAMES // 2
        frames = frames[:half] + frames[-half:]
    for frame in frames:
        frame[3] = _raw_line(frame[0], frame[1])
        if not isinstance(frame[4], str):
            frame[4] = ""
    return frames


class _ExceptionPickler(cloudpickle.Pickler):  # type: ignore[misc]
    """Pickles an exception so that it loads whatever its ``__init__`` takes.

    An exception pickles as ``cls(*self.args)`` plus its ``__dict__``, which fails to load for the
    common ``def __init__(self, message, code)`` (``args`` holds only what ``super().__init__`` got).
    An exception with the default ``__reduce__`` goes as ``cls.__new__(cls, *args)`` plus its
    ``__dict__`` instead, as any other object is pickled: nothing calls ``__init__`` again.
    """

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if isinstance(obj, BaseException) and cls.__reduce__ is BaseException.__reduce__:  # type: ignore[comparison-overlap]
            return copyreg.__newobj__, (cls, *obj.args), obj.__dict__ or None  # type: ignore[attr-defined]
        return super().reducer_override(obj)


def _pickled(e: BaseException) -> bytes | None:
    buffer = io.BytesIO()
    try:
        _ExceptionPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(e)
    except Exception:
        return None
    return buffer.getvalue()


def _type_name(e: BaseException) -> str:
    return f"{type(e).__module__}.{type(e).__qualname__}"


def _raw_line(filename: str, lineno: int | None) -> str:
    """The source line with its indentation (FrameSummary.line is stripped)."""
    return linecache.getline(filename, lineno or 0).rstrip("\r\n")


def _bounded(text: str, limit: int) -> str:
    """`text` within the wire's bound for it: its start and its end, which say the most."""
    if len(text) <= limit:
        return text
    cut = f"\n... ({len(text) - limit + 100:,} characters left out) ...\n"
    half = (limit - len(cut)) // 2
    return text[:half] + cut + text[-half:]


def system_error(index: int, type_name: str, message: str, traceback: str = "") -> m.CallError:
    return m.CallError(
        index,
        m.SYSTEM,
        type_name,
        _bounded(message, m.MAX_ERROR_MESSAGE),
        traceback=traceback,
        node=socket.gethostname(),
    )


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:
        return f"<{type(e).__name__}: str() failed>"


class Worker:
    def __init__(self, channel: Channel, output: Output, progress: Progress) -> None:
        self.channel = channel
        self.output = output
        self.progress = progress
        self.functions: dict[str, Callable[[Any], Any]] = {}  # the agent mirrors this cache
        self.batches: dict[tuple[str, int], list[Any]] = {}

    def serve(self) -> None:
        while True:
            message = proto.recv(self.channel.sock)
            if message is None:
                return
            header, blobs = message
            if header["kind"] == proto.RUN:
                self.run(proto.Run.from_wire(header), blobs)

    def _load(self, run: proto.Run, blobs: list[memoryview]) -> tuple[Callable[[Any], Any], list[Any]]:
        fn_hash = run.function_hash
        if run.function_blob is not None:
            self.functions[fn_hash] = cloudpickle.loads(blobs[run.function_blob])
            while len(self.functions) > _FUNCTIONS_KEPT:
                del self.functions[next(iter(self.functions))]
        key = (run.batch[0], run.batch[1])
        if run.batch_file:
            self.batches[key] = _load_file(run.batch_file)
        elif run.batch_blob is not None:
            self.batches[key] = pickle.loads(blobs[run.batch_blob])
        if run.batch_file or run.batch_blob is not None:
            while len(self.batches) > _BATCHES_KEPT:
                del self.batches[next(iter(self.batches))]
        return self.functions[fn_hash], self.batches[key]

    def run(self, run: proto.Run, blobs: list[memoryview]) -> None:
        if run.paths:  # the lease's environment, taken by this worker that has run nothing yet (as in `main`)
            sys.path[0:0] = run.paths
            importlib.invalidate_caches()  # no finder keeps a view of the path from before
        lo, hi, base = run.lo, run.hi, run.batch_start
        try:
            fn, items = self._load(run, blobs)
        except Exception as e:
            unloadable = system_error(
                lo,
                m.ErrorType.UNPICKLING,
                f"the worker could not load the function or its inputs: {type(e).__name__}: {_safe_str(e)}. "
                "Everything the function uses must be importable on the cluster.",
                traceback=traceback.format_exc(),
            )
            self.channel.send(proto.Done(lease_id=run.lease_id, lo=lo, error=unloadable), [pickle.dumps([])])
            return
        output, progress = self.output, self.progress
        output.job_id = run.job_id
        results: list[Any] = []
        append = results.append
        error: m.CallError | None = None
        exc_blob: bytes | None = None
        i = lo
        started = time.perf_counter()
        try:
            for i in range(lo, hi):
                progress.set(i)
                output.index = i
                append(fn(items[i - base]))
        except BaseException as e:  # the user's SystemExit and KeyboardInterrupt are errors of the call too
            error, exc_blob = describe_exception(e, i, skip_frames=1)
        elapsed = time.perf_counter() - started
        progress.set(proto.IDLE)
        output.end_lease()  # still tagged with the last input called: its output may still be in the pipes
        output.index = -1
        payload, results_error = _pickle_results(results, lo, run.max_result_bytes)
        if results_error is not None:
            error, exc_blob = results_error, None
            results = results[: results_error.index - lo]
            payload = pickle.dumps(results)
        frame = envelope.Blobs()
        frame.add(payload)  # proto.Done.RESULTS_BLOB
        if error is not None and exc_blob is not None:
            error = dataclasses.replace(error, exc_blob=frame.add(exc_blob))
        self.channel.send(
            proto.Done(lease_id=run.lease_id, lo=lo, n_ok=len(results), elapsed=elapsed, error=error), frame
        )


def _load_file(path: str) -> Any:
    """Unpickle a batch straight from the daemon's payload file (same host), without copying it first."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return pickle.loads(f.read())
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return pickle.loads(view)
            finally:
                view.release()


def _pickle_results(results: list[Any], lo: int, max_bytes: int = 0) -> tuple[bytes, m.CallError | None]:
    try:
        payload = cloudpickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    else:
        if not max_bytes or len(payload) <= max_bytes:
            return payload, None
        for offset, value in enumerate(results):  # which call returned too much (the lease may hold many)
            size = len(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)) if len(results) > 1 else len(payload)
            if size > max_bytes:
                return b"", system_error(
                    lo + offset,
                    m.ErrorType.RESULT_TOO_LARGE,
                    f"the return value of input #{lo + offset} ({type(value).__name__}) pickles to {size / 1e6:.1f} MB, "
                    f"over the cluster's limit of {max_bytes / 1e6:.0f} MB per result (daemon.max_result_bytes). "
                    "Write large outputs to the shared disk or object storage and return their paths.",
                )
        return payload, None
    for offset, value in enumerate(results):
        try:
            cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            return b"", system_error(
                lo + offset,
                m.ErrorType.UNPICKLABLE_RESULT,
                f"the return value of input #{lo + offset} ({type(value).__name__}) could not be pickled to send "
                f"it back: {type(e).__name__}: {_safe_str(e)}. Return plain data (numbers, strings, lists, dicts, "
                "arrays) instead.",
            )
    raise AssertionError("unreachable: the list failed to pickle but every item pickled")  # pragma: no cover


def main() -> None:
    # The job's environment first: its local code, then its packages, ahead of the image's own.
    extra = [p for p in os.environ.get(proto.PATHS_ENV, "").split(os.pathsep) if p]
    sys.path[0:0] = extra
    path = os.environ[proto.SOCKET_ENV]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    channel = Channel(sock)
    output = Output(channel)
    progress = Progress(os.environ.get(proto.PROGRESS_ENV))
    sys.stdin = open(os.devnull)
    capture = FdCapture(output)
    output.before_end = capture.drain
    sys.stdout = Stream(output, m.STDOUT, 1)
    sys.stderr = Stream(output, m.STDERR, 2)
    interval = float(os.environ.get(proto.LOG_FLUSH_ENV, "0.1"))
    threading.Thread(target=output.run_flusher, args=(interval,), daemon=True, name="burla-log-flusher").start()
    channel.send(
        proto.Hello(
            slot=os.environ.get(proto.SLOT_ENV, ""),
            nonce=os.environ.get(proto.NONCE_ENV, ""),
            pid=os.getpid(),
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
            executable=sys.executable,
        )
    )
    for name in (proto.SOCKET_ENV, proto.PROGRESS_ENV, proto.NONCE_ENV):
        os.environ.pop(name, None)  # the worker's plumbing, not the call's: its code has no use for them
    try:
        Worker(channel, output, progress).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    os._exit(0)  # skip interpreter teardown: user threads must not keep a dead worker alive


if __name__ == "__main__":
    main()

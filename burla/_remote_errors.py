"""Raising a remote call's failure here, as if the call had been local.

The user's own exception comes back pickled with the frames it went through
on the worker. We unpickle it, and give it a traceback made of synthetic
frames with the remote file names, line numbers and function names, so the
usual traceback shows where it happened. The source lines come from the local
file when it exists, or from what the worker sent. A note names the input.
"""

from __future__ import annotations

import linecache
import os
import pickle
import sys
import types
from typing import Any

from burla.schemas import messages as m

from . import errors

_BY_NAME: dict[str, type[errors.CallError] | type[errors.BurlaError]] = {
    m.ErrorType.CALL: errors.CallError,
    m.ErrorType.WORKER_DIED: errors.WorkerDiedError,
    m.ErrorType.MEMORY_LIMIT: errors.MemoryLimitError,
    m.ErrorType.UNPICKLING: errors.UnpicklingError,
    m.ErrorType.UNPICKLABLE_RESULT: errors.UnpicklableResultError,
    m.ErrorType.RESULT_TOO_LARGE: errors.ResultTooLargeError,
    m.ErrorType.NO_NODES: errors.NoNodesError,
    m.ErrorType.NODE_START: errors.NodeStartError,
    m.ErrorType.IMAGE: errors.ImageError,
    m.ErrorType.INSTALL: errors.InstallError,
    m.ErrorType.CALL_TIMEOUT: errors.CallTimeoutError,
    m.ErrorType.NODE_LOST: errors.NodeLostError,
}


class _Carrier(BaseException):
    """Raised inside a synthetic frame to capture it."""


def _synthetic_frame(filename: str, lineno: int, name: str, line: str) -> types.TracebackType:
    shown = linecache.getline(filename, lineno) or line  # what the traceback will print
    indent = len(shown) - len(shown.lstrip()) if shown.strip() else 0
    # A raise spanning two lines, starting at the remote line's indentation:
    # Python then draws no ^^^ markers, which would point at our code, not theirs.
    lineno = max(lineno, 1)
    if indent and lineno > 1:  # an indented statement needs a block to sit in
        source = "\n" * (lineno - 2) + "if 1:\n" + " " * indent + "raise (\n__carrier__)\n"
    else:
        source = "\n" * (lineno - 1) + "raise (\n__carrier__)\n"
    code = compile(source, filename, "exec").replace(co_name=name)
    try:
        exec(code, {"__carrier__": _Carrier(), "__name__": "__burla_remote__"})
    except _Carrier:
        tb = sys.exc_info()[2]
        assert tb is not None and tb.tb_next is not None
        return tb.tb_next
    raise AssertionError("unreachable")  # pragma: no cover


def _remember_source(filename: str, lineno: int, line: str) -> None:
    """Let linecache show a remote line whose file does not exist here."""
    if not line or os.path.exists(filename):
        return
    entry: Any = linecache.cache.get(filename)
    lines = list(entry[2]) if entry and len(entry) == 4 and entry[1] is None else []
    if len(lines) < lineno:
        lines += ["\n"] * (lineno - len(lines))
    lines[lineno - 1] = line if line.endswith("\n") else line + "\n"
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)  # mtime None: kept by checkcache


def remote_traceback(frames: Any) -> types.TracebackType | None:
    tb_next: types.TracebackType | None = None
    for frame in reversed(list(frames or ())):
        try:
            filename, lineno, name, line = str(frame[0]), int(frame[1] or 1), str(frame[2]), str(frame[3] or "")
            module = str(frame[4] or "") if len(frame) > 4 else ""
        except (TypeError, ValueError, IndexError):
            continue
        filename = local_path(filename, module)
        _remember_source(filename, lineno, line)
        fake = _synthetic_frame(filename, lineno, name, line)
        tb_next = types.TracebackType(tb_next, fake.tb_frame, fake.tb_lasti, fake.tb_lineno)
    return tb_next


def local_path(filename: str, module: str) -> str:
    """This machine's file of a remote frame's module, when the worker's copy lives elsewhere.

    Code of an installed package runs from the node's package cache (or a container's
    site-packages): the frame is shown with the same file it has here, as a local traceback
    would show it, provided the module's file here has the same path below its package root.
    """
    if not module or module == "__main__" or os.path.exists(filename):
        return filename
    loaded = sys.modules.get(module)
    local = getattr(loaded, "__file__", None) if loaded is not None else None
    if not isinstance(local, str) or not os.path.exists(local):
        return filename
    tail = module.replace(".", "/")
    for suffix in (tail + ".py", tail + "/__init__.py"):
        if filename.endswith("/" + suffix) and local.endswith("/" + suffix):
            return local
    return filename


def rebuild(data: dict[str, Any], exc_blob: bytes | bytearray | None) -> BaseException:
    """The exception to raise for a FAILED event."""
    kind = data.get("kind", m.EXCEPTION)
    index = int(data.get("index", -1))
    node = str(data.get("node", ""))
    message = str(data.get("message", ""))
    type_name = str(data.get("type_name", ""))
    text = str(data.get("traceback", ""))
    where = f"input #{index}" if index >= 0 else "the job"
    if kind == m.EXCEPTION:
        exc = _rebuild_tree(exc_blob, data, index, node)
        if exc is None:
            return errors.RemoteError(
                f"{where} raised {type_name}: {message} (the exception could not be rebuilt in this process; "
                "its class may not be importable here)",
                index,
                node,
                text,
                type_name,
            )
        try:
            exc.add_note(f"(raised remotely by {where}{f' on node {node}' if node else ''}, in a Burla worker)")
            exc.burla_input_index = index  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            pass
        return exc
    cls = _BY_NAME.get(type_name)
    if cls is None:
        cls = {m.MEMORY: errors.MemoryLimitError, m.WORKER_DIED: errors.WorkerDiedError}.get(kind, errors.CallError)
    if issubclass(cls, errors.CallError):
        return cls(message, index, node, text)
    return cls(message)


def _unpickled_exception(blob: Any) -> BaseException | None:
    if not isinstance(blob, bytes):
        return None
    try:
        loaded = pickle.loads(blob)
    except Exception:
        return None
    return loaded if isinstance(loaded, BaseException) else None


def _rebuild_tree(blob: bytes | bytearray | None, data: dict[str, Any], index: int, node: str) -> BaseException | None:
    """The raised exception with its causes, contexts and group members (`m.EXCEPTION_TREE`)."""
    if blob is None:
        return None
    try:
        tree = pickle.loads(blob)
    except Exception:
        return None
    if isinstance(tree, BaseException):  # an older worker: the exception alone
        tb = remote_traceback(data.get("frames"))
        return tree.with_traceback(tb) if tb is not None else tree
    nodes = tree.get("nodes") if isinstance(tree, dict) else None
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, dict) for n in nodes):
        return None
    built: dict[int, BaseException] = {}

    def node_at(i: Any) -> dict[str, Any] | None:
        return nodes[i] if isinstance(i, int) and 0 <= i < len(nodes) else None

    def build(i: int, exc: BaseException | None = None) -> BaseException | None:
        """Node i as an exception: unpickled, or `exc` (a group member that came inside its group)."""
        if exc is None and i in built:
            return built[i]
        spec = nodes[i]
        if exc is None:
            exc = _unpickled_exception(spec.get("exc"))
            if exc is None and i == 0:
                return None
            if exc is None:  # a cause or context whose class is not importable here
                exc = errors.RemoteError(
                    f"{spec.get('type_name', '')}: {spec.get('message', '')} (could not be rebuilt in this process)",
                    index,
                    node,
                    type_name=str(spec.get("type_name", "")),
                )
        built.setdefault(i, exc)
        tb = remote_traceback(spec.get("frames"))
        if tb is not None:
            exc.__traceback__ = tb
        for attr in ("cause", "context"):
            link = spec.get(attr)
            if node_at(link) is not None and link != i:
                setattr(exc, f"__{attr}__", built.get(link) or build(link))
        exc.__suppress_context__ = bool(spec.get("suppress_context"))
        members = spec.get("group")
        if isinstance(exc, BaseExceptionGroup) and isinstance(members, list):
            for member, j in zip(exc.exceptions, members, strict=False):
                if node_at(j) is not None and j not in built:
                    build(j, member)
        return exc

    return build(0)

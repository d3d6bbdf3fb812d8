"""A failure's whole traceback, worker to client: file names, source lines, causes, contexts, groups.

The worker's half (`worker_shim.describe_exception`) and the client's (`_remote_errors.rebuild`) run
here in one process, with the function pickled as the client pickles it and loaded as the worker
loads it, so these tests hold for whichever cloudpickle is installed (CI runs them with the newest
release and with the lowest that pyproject.toml allows).
"""

from __future__ import annotations

import importlib
import json
import linecache
import socket
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from burla import errors
from burla._pickling import pickle_function
from burla._remote_errors import local_path, rebuild
from burla.node_agent.worker_shim import describe_exception

HERE = __file__


class LocalProblem(Exception):
    """An exception class of the user's script, pickled by value with the function."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def checker(x: int) -> int:
    if x > 2:
        raise ValueError(f"too big: {x}")
    return x


def chained(x: int) -> int:
    try:
        {}["k"]
    except KeyError as e:
        raise RuntimeError("outer") from e
    return x


def implicit_context(x: int) -> int:
    try:
        [][x]
    except IndexError:
        raise LocalProblem("while handling", 7)  # noqa: B904 (the implicit context is the point)
    return x


def context_suppressed(x: int) -> int:
    try:
        1 / (x - x)
    except ZeroDivisionError:
        raise ValueError("no context shown") from None
    return x


def with_notes(x: int) -> int:
    e = TypeError("noted")
    e.add_note("first note")
    e.add_note(f"input was {x}")
    raise e


def grouped(x: int) -> int:
    problems: list[Exception] = []
    for i in range(3):
        try:
            if i == 1:
                try:
                    raise OSError("inner cause")
                except OSError as cause:
                    raise KeyError(i) from cause
            raise ValueError(f"member {i}")
        except Exception as e:
            problems.append(e)
    raise ExceptionGroup("several failed", problems)


def run_remotely(fn: Callable[[Any], Any], arg: Any) -> BaseException:
    """Pickle `fn` as the client does, load and call it as the worker does, rebuild what it raised."""
    loaded = cloudpickle.loads(pickle_function(fn))
    try:
        loaded(arg)
    except BaseException as e:
        error, blob = describe_exception(e, index=3, skip_frames=1)
        return rebuild(error.to_wire(), blob)
    raise AssertionError("the function did not raise")


def run_locally(fn: Callable[[Any], Any], arg: Any) -> BaseException:
    try:
        fn(arg)
    except BaseException as e:
        return e
    raise AssertionError("the function did not raise")


def frames_of(exc: BaseException) -> list[tuple[str, int, str, str]]:
    """(file, line, function, source line) of each frame, without this module's harness frames."""
    rows = [
        (f.filename, f.lineno or 0, f.name, (f.line or "").strip()) for f in traceback.extract_tb(exc.__traceback__)
    ]
    return [row for row in rows if row[2] not in ("run_remotely", "run_locally")]


def chain_of(exc: BaseException | None, depth: int = 0) -> Any:
    """What a traceback printout is made of: each exception's type, text, frames and links."""
    if exc is None or depth > 10:
        return None
    return {
        "type": type(exc),
        "text": str(exc),
        "frames": frames_of(exc),
        "cause": chain_of(exc.__cause__, depth + 1),
        "context": chain_of(exc.__context__, depth + 1) if not exc.__suppress_context__ else None,
        "suppress_context": exc.__suppress_context__,
        "members": [chain_of(sub, depth + 1) for sub in exc.exceptions]
        if isinstance(exc, BaseExceptionGroup)
        else None,
    }


@pytest.mark.parametrize(
    "fn", [checker, chained, implicit_context, context_suppressed, with_notes, grouped], ids=lambda f: f.__name__
)
def test_the_remote_traceback_is_the_local_one(fn: Callable[[Any], Any]) -> None:
    remote = run_remotely(fn, 3)
    local = run_locally(fn, 3)
    assert chain_of(remote) == chain_of(local)
    assert getattr(remote, "__notes__", [])[:-1] == getattr(local, "__notes__", [])
    assert "raised remotely by input #3" in remote.__notes__[-1]


def test_frames_name_the_users_file_and_show_its_source_line() -> None:
    remote = run_remotely(checker, 5)
    text = "".join(traceback.format_exception(remote))
    line = next(
        i for i, row in enumerate(Path(HERE).read_text().splitlines(), 1) if 'raise ValueError(f"too big' in row
    )
    assert f'File "{HERE}", line {line}, in checker\n    raise ValueError(f"too big: {{x}}")\n' in text
    assert "<dynamic-code>" not in text
    assert text.rstrip().endswith(f"(raised remotely by input #3 on node {socket.gethostname()}, in a Burla worker)")


def test_a_direct_cause_prints_as_python_prints_it() -> None:
    text = "".join(traceback.format_exception(run_remotely(chained, 1)))
    assert "KeyError: 'k'" in text
    assert "The above exception was the direct cause of the following exception:" in text
    assert text.index("KeyError: 'k'") < text.index("RuntimeError: outer")
    assert 'raise RuntimeError("outer") from e' in text
    assert '{}["k"]' in text


def test_an_implicit_context_prints_as_python_prints_it() -> None:
    remote = run_remotely(implicit_context, 0)
    assert type(remote) is LocalProblem and remote.code == 7
    assert type(remote.__context__) is IndexError
    text = "".join(traceback.format_exception(remote))
    assert "During handling of the above exception, another exception occurred:" in text


def test_from_none_hides_the_context() -> None:
    remote = run_remotely(context_suppressed, 0)
    assert remote.__suppress_context__ is True
    assert remote.__cause__ is None
    text = "".join(traceback.format_exception(remote))
    assert "ZeroDivisionError" not in text
    assert "During handling" not in text


def test_exception_group_members_keep_their_frames_and_causes() -> None:
    remote = run_remotely(grouped, 0)
    assert type(remote) is ExceptionGroup
    assert [type(e) for e in remote.exceptions] == [ValueError, KeyError, ValueError]
    middle = remote.exceptions[1]
    assert type(middle.__cause__) is OSError and str(middle.__cause__) == "inner cause"
    assert all(frames_of(member) for member in remote.exceptions)
    text = "".join(traceback.format_exception(remote))
    assert "ExceptionGroup: several failed (3 sub-exceptions)" in text
    assert "+---------------- 2 ----------------" in text
    assert "OSError: inner cause" in text
    assert 'raise ValueError(f"member {i}")' in text


def test_a_cause_whose_class_cannot_be_rebuilt_becomes_a_remote_error_in_the_chain() -> None:
    def fails(x: int) -> int:
        try:
            raise KeyError("k")
        except KeyError as e:
            raise RuntimeError("outer") from e

    loaded = cloudpickle.loads(pickle_function(fails))
    try:
        loaded(1)
    except BaseException as e:
        error, blob = describe_exception(e, index=0, skip_frames=0)
    import pickle

    tree = pickle.loads(blob)
    tree["nodes"][1]["exc"] = b"not a pickle"
    remote = rebuild(error.to_wire(), pickle.dumps(tree))
    assert type(remote) is RuntimeError
    assert type(remote.__cause__) is errors.RemoteError
    assert "builtins.KeyError" in str(remote.__cause__)
    assert frames_of(remote.__cause__)


def test_a_cycle_of_contexts_ends() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    error, blob = describe_exception(a, index=0, skip_frames=0)
    remote = rebuild(error.to_wire(), blob)
    assert str(remote) == "a" and str(remote.__context__) == "b"
    assert remote.__context__.__context__ is remote
    "".join(traceback.format_exception(remote))  # Python's printer stops at the cycle


def test_a_long_chain_is_cut_not_lost() -> None:
    e: BaseException = ValueError("0")
    for i in range(1, 200):
        nxt = ValueError(str(i))
        nxt.__context__ = e
        e = nxt
    error, blob = describe_exception(e, index=0, skip_frames=0)
    remote = rebuild(error.to_wire(), blob)
    depth = 0
    while remote.__context__ is not None:
        remote, depth = remote.__context__, depth + 1
    assert 10 < depth < 200


def test_an_older_workers_bare_exception_still_rebuilds() -> None:
    import pickle

    data = {"kind": "exception", "index": 1, "type_name": "builtins.ValueError", "message": "x",
            "frames": [["/remote/x.py", 3, "f", "raise ValueError('x')"]]}  # fmt: skip
    remote = rebuild(data, pickle.dumps(ValueError("x")))
    assert type(remote) is ValueError
    assert [row[:3] for row in frames_of(remote)] == [("/remote/x.py", 3, "f")]


# ---- code beside the script, and installed packages ----------------------------------------


@pytest.fixture
def module_beside_the_script(tmp_path: Path) -> Iterator[Any]:
    """A module in the script's folder, not installed: it travels by value with the function."""
    name = f"helpers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            def parse(text):
                value = int(text)
                return value


            def entry(text):
                return parse(text) * 2
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_a_module_beside_the_script_keeps_its_file_and_lines(module_beside_the_script: Any) -> None:
    remote = run_remotely(module_beside_the_script.entry, "nope")
    local = run_locally(module_beside_the_script.entry, "nope")
    assert chain_of(remote) == chain_of(local)
    text = "".join(traceback.format_exception(remote))
    assert f'File "{module_beside_the_script.__file__}", line 3, in parse\n    value = int(text)\n' in text


def test_an_installed_packages_frames_show_the_local_file() -> None:
    """The worker runs json from its own copy (the node's package cache): shown with the file it has here."""

    def loads_bad(text: str) -> Any:
        return json.loads(text)

    remote = run_remotely(loads_bad, "{")
    local = run_locally(loads_bad, "{")
    assert chain_of(remote) == chain_of(local)
    decoder = sys.modules["json.decoder"].__file__
    assert decoder is not None
    remote_copy = f"/var/lib/burla/envs/dists/py3.11/json-1.0/json/decoder.py-{id(remote)}"
    assert local_path(remote_copy, "json.decoder") == remote_copy  # not the same file below its root
    remote_copy = "/var/lib/burla/envs/dists/py3.11/somepkg-1.0/json/decoder.py"
    assert local_path(remote_copy, "json.decoder") == decoder
    assert local_path(remote_copy, "json.scanner") == remote_copy  # another module's name
    assert local_path(remote_copy, "") == remote_copy


def test_remote_frames_of_an_installed_package_in_the_rebuilt_traceback() -> None:
    import pickle

    decoder = sys.modules["json.decoder"].__file__
    assert decoder is not None
    line = linecache.getline(decoder, 10).rstrip("\n")
    data = {"kind": "exception", "index": 0, "type_name": "builtins.ValueError", "message": "x"}
    tree = {"version": 1, "nodes": [{
        "type_name": "builtins.ValueError", "message": "x", "exc": pickle.dumps(ValueError("x")),
        "frames": [["/nodes/cache/pkg-1.0/json/decoder.py", 10, "decode", "remote text", "json.decoder"]],
        "cause": None, "context": None, "suppress_context": False, "group": None,
    }]}  # fmt: skip
    remote = rebuild(data, pickle.dumps(tree))
    assert [row[:3] for row in frames_of(remote)] == [(decoder, 10, "decode")]
    assert line.strip() in "".join(traceback.format_exception(remote))

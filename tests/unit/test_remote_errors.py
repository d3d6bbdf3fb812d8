"""burla._remote_errors.rebuild: a remote failure raised here as if the call had been local."""

from __future__ import annotations

import linecache
import pickle
import re
import traceback
import uuid
from typing import Any

import pytest

from burla import errors
from burla._remote_errors import rebuild
from burla.schemas import messages as m

CARETS = re.compile(r"^\s*[\^~]+\s*$")


def remote_file() -> str:
    """A file name that exists on the 'worker' only, unique per test (linecache is global)."""
    return f"/remote-{uuid.uuid4().hex}/app/job.py"


def event(frames: list[list[Any]], index: int = 7, **extra: Any) -> dict[str, Any]:
    return {
        "kind": m.EXCEPTION,
        "index": index,
        "node": "node-1",
        "type_name": "builtins.ValueError",
        "message": "bad input",
        "traceback": "Traceback (most recent call last):\n  ...\nValueError: bad input\n",
        "frames": frames,
        **extra,
    }


def walk(tb: Any) -> list[tuple[str, str, int]]:
    out = []
    while tb is not None:
        out.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    return out


def formatted(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def test_same_type_message_and_frames() -> None:
    path = remote_file()
    frames = [
        [path, 30, "<module>", "main()"],
        [path, 12, "main", "    result = helper(x)"],
        [path, 4, "helper", "        raise ValueError('bad input')"],
    ]
    exc = rebuild(event(frames), pickle.dumps(ValueError("bad input")))
    assert type(exc) is ValueError
    assert exc.args == ("bad input",)
    assert walk(exc.__traceback__) == [(path, "<module>", 30), (path, "main", 12), (path, "helper", 4)]
    notes = getattr(exc, "__notes__", [])
    assert any("input #7" in note for note in notes)
    assert any("node-1" in note for note in notes)
    assert exc.burla_input_index == 7  # type: ignore[attr-defined]


def test_custom_exception_attributes_survive() -> None:
    exc = rebuild(event([]), pickle.dumps(KeyError("missing-key")))
    assert type(exc) is KeyError
    assert exc.args == ("missing-key",)
    assert exc.__traceback__ is None  # no frames sent: no synthetic traceback


def test_source_lines_of_remote_files_are_shown() -> None:
    path = remote_file()
    frames = [[path, 12, "main", "    result = helper(x)"], [path, 40, "helper", "    raise ValueError('bad input')"]]
    exc = rebuild(event(frames), pickle.dumps(ValueError("bad input")))
    assert linecache.getline(path, 12) == "    result = helper(x)\n"
    assert linecache.getline(path, 40) == "    raise ValueError('bad input')\n"
    text = formatted(exc)
    assert f'File "{path}", line 12, in main\n    result = helper(x)\n' in text
    assert f"File \"{path}\", line 40, in helper\n    raise ValueError('bad input')\n" in text
    assert "ValueError: bad input" in text
    assert "input #7" in text


def test_local_file_shows_the_local_line() -> None:
    here = __file__
    lineno = 1
    local_line = linecache.getline(here, lineno)
    assert local_line.strip()
    exc = rebuild(event([[here, lineno, "somewhere", "not the local text"]]), pickle.dumps(ValueError("x")))
    text = formatted(exc)
    assert local_line.strip() in text
    assert "not the local text" not in text
    assert walk(exc.__traceback__) == [(here, "somewhere", lineno)]


@pytest.mark.parametrize(
    ("lineno", "line"),
    [
        (1, "raise ValueError('x')"),
        (1, "    raise ValueError('x')"),
        (2, "    x = f(y)  # comment"),
        (9, "raise ValueError('x')"),
        (9, "        return compute(a, b) + other(c)"),
        (50, "\tresult = 1 / 0"),
        (77, "    value = data['key']['nested']"),
        (3, ""),
    ],
)
def test_no_caret_lines_under_remote_frames(lineno: int, line: str) -> None:
    path = remote_file()
    frames = [[path, 100, "<module>", "main()"], [path, lineno, "fn", line]]
    exc = rebuild(event(frames), pickle.dumps(ValueError("x")))
    text = formatted(exc)
    assert not [row for row in text.splitlines() if CARETS.match(row)], text
    if line:
        assert line.strip() in text


def test_no_caret_lines_when_raised_again_locally() -> None:
    path = remote_file()
    exc = rebuild(event([[path, 5, "fn", "    return a[0] + b[1]"]]), pickle.dumps(IndexError("i")))
    with pytest.raises(IndexError) as info:
        raise exc
    text = "".join(traceback.format_exception(info.value))
    assert f'File "{path}", line 5, in fn' in text
    assert "return a[0] + b[1]" in text
    remote_part = text[text.index(path) :]
    assert not [row for row in remote_part.splitlines() if CARETS.match(row)], text


def test_malformed_frames_are_skipped() -> None:
    path = remote_file()
    frames = [None, ["only-a-name"], [path, "not-a-number", "f", ""], [path, 3, "good", "x = 1"], 42]
    exc = rebuild(event(frames), pickle.dumps(ValueError("x")))  # type: ignore[arg-type]
    assert walk(exc.__traceback__) == [(path, "good", 3)]


def test_missing_line_number_becomes_1() -> None:
    path = remote_file()
    exc = rebuild(event([[path, None, "f", "pass"]]), pickle.dumps(ValueError("x")))
    assert walk(exc.__traceback__) == [(path, "f", 1)]


def test_job_level_error_note() -> None:
    exc = rebuild(event([], index=-1, node=""), pickle.dumps(ValueError("x")))
    assert getattr(exc, "__notes__", []) == ["(raised remotely by the job, in a Burla worker)"]


@pytest.mark.parametrize(
    "blob",
    [
        None,  # the exception did not pickle on the worker
        b"not a pickle",
        pickle.dumps(42),  # not an exception
        b"cno_such_module_for_burla_tests\nBoom\n(S'msg'\ntR.",  # class not importable here
    ],
    ids=["missing", "garbage", "not-an-exception", "unimportable-class"],
)
def test_unrebuildable_exception_gives_remote_error(blob: bytes | None) -> None:
    data = event([], type_name="mylib.errors.CustomError", message="it broke")
    exc = rebuild(data, blob)
    assert type(exc) is errors.RemoteError
    assert isinstance(exc, errors.CallError)
    assert exc.type_name == "mylib.errors.CustomError"
    assert exc.remote_traceback == data["traceback"]
    assert exc.input_index == 7
    assert exc.node == "node-1"
    text = str(exc)
    assert "input #7" in text
    assert "mylib.errors.CustomError: it broke" in text
    assert "Remote traceback:" in text
    assert "ValueError: bad input" in text  # the remote traceback text is in the message


@pytest.mark.parametrize(
    ("kind", "cls"),
    [(m.WORKER_DIED, errors.WorkerDiedError), (m.MEMORY, errors.MemoryLimitError), (m.SYSTEM, errors.CallError)],
)
def test_burla_failure_kinds(kind: str, cls: type[errors.CallError]) -> None:
    data = {"kind": kind, "index": 12, "node": "node-2", "type_name": "", "message": "worker exited with SIGKILL",
            "traceback": ""}  # fmt: skip
    exc = rebuild(data, None)
    assert type(exc) is cls
    assert isinstance(exc, errors.CallError)
    assert exc.input_index == 12
    assert exc.node == "node-2"
    assert str(exc) == "worker exited with SIGKILL"


def test_memory_error_is_a_worker_died_error() -> None:
    exc = rebuild({"kind": m.MEMORY, "index": 3, "message": "over 4 GB"}, None)
    assert isinstance(exc, errors.WorkerDiedError)
    assert isinstance(exc, errors.MemoryLimitError)
    assert exc.input_index == 3


@pytest.mark.parametrize(
    ("type_name", "cls"),
    [
        ("burla.errors.UnpicklingError", errors.UnpicklingError),
        ("burla.errors.UnpicklableResultError", errors.UnpicklableResultError),
        ("burla.errors.MemoryLimitError", errors.MemoryLimitError),
    ],
)
def test_system_errors_by_type_name(type_name: str, cls: type[errors.CallError]) -> None:
    exc = rebuild({"kind": m.SYSTEM, "index": 5, "type_name": type_name, "message": "m", "traceback": "tb"}, None)
    assert type(exc) is cls
    assert exc.input_index == 5
    assert exc.remote_traceback == "tb"


def test_no_nodes_error_by_type_name() -> None:
    exc = rebuild({"kind": m.SYSTEM, "type_name": "burla.errors.NoNodesError", "message": "no node joined"}, None)
    assert type(exc) is errors.NoNodesError
    assert str(exc) == "no node joined"


def test_every_error_type_maps_once_to_the_class_it_names() -> None:
    from burla._remote_errors import _BY_NAME

    assert set(_BY_NAME) == set(m.ErrorType)
    for error_type, cls in _BY_NAME.items():
        assert f"{cls.__module__}.{cls.__qualname__}" == error_type.value

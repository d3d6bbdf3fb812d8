"""The agent <-> worker frames: their dataclasses speak the same JSON as the dicts they replaced."""

from __future__ import annotations

import pickle
import socket
import sys
from pathlib import Path

import cloudpickle
import pytest

from burla.node_agent.worker_shim import Channel, Output, Progress, Worker
from burla.schemas import messages as m
from burla.schemas import wire
from burla.schemas import worker as proto

SHA = "ab" * 32


def test_each_frame_has_the_keys_of_the_protocol_in_order() -> None:
    hello = proto.Hello(slot="3", nonce="n", pid=7, python="3.11", executable="/usr/bin/python3")
    assert list(hello.to_wire()) == ["kind", "slot", "nonce", "pid", "python", "executable"]
    run = proto.Run(lease_id=1, job_id="j", function_hash=SHA, batch=("j", 0), batch_start=0, lo=0, hi=5)
    assert run.to_wire() == {
        "kind": "run", "lease_id": 1, "job_id": "j", "function_hash": SHA, "batch": ["j", 0], "batch_start": 0,
        "lo": 0, "hi": 5, "function_blob": None, "batch_blob": None, "batch_file": None, "max_result_bytes": 0,
        "paths": [],
    }  # fmt: skip
    assert proto.Logs(job_id="j", lines=2, nbytes=10).to_wire() == {
        "kind": "logs",
        "job_id": "j",
        "lines": 2,
        "nbytes": 10,
    }
    done = proto.Done(lease_id=1, lo=0, n_ok=5, elapsed=0.5)
    assert done.to_wire() == {"kind": "done", "lease_id": 1, "lo": 0, "n_ok": 5, "elapsed": 0.5, "error": None}


def test_a_done_frame_loads_with_its_error_checked() -> None:
    error = m.CallError(3, m.EXCEPTION, "builtins.ValueError", "boom", exc_blob=1)
    frame = proto.Done(lease_id=1, lo=0, n_ok=3, elapsed=0.1, error=error).to_wire()
    assert proto.Done.from_wire(frame).error == error
    with pytest.raises(wire.WireError, match="Done.error"):
        proto.Done.from_wire(frame | {"error": {**error.to_wire(), "index": "three"}})
    with pytest.raises(wire.WireError, match="Done.n_ok"):
        proto.Done.from_wire(frame | {"n_ok": -1})


def test_frames_cross_a_socket_whole() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proto.send(ours, proto.Logs(job_id="j", lines=1, nbytes=3), [b"abc"])
        message = proto.recv(theirs)
        assert message is not None
        header, blobs = message
        assert proto.Logs.from_wire(header) == proto.Logs(job_id="j", lines=1, nbytes=3)
        assert [bytes(b) for b in blobs] == [b"abc"]


def _uses_a_module_of_the_environment(x: int) -> int:
    import burla_adopted_module  # type: ignore[import-not-found]  # only on the path a Run gives

    return int(burla_adopted_module.VALUE) + x


def test_a_runs_paths_go_first_on_the_workers_import_path_before_its_function_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh worker adopts a lease's environment (`Run.paths`) as `PATHS_ENV` gives one at its start."""
    (tmp_path / "burla_adopted_module.py").write_text("VALUE = 40\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "burla_adopted_module", raising=False)
    run = proto.Run(
        lease_id=1, job_id="j", function_hash=SHA, batch=("j", 0), batch_start=0, lo=0, hi=2,
        function_blob=0, batch_blob=1, paths=(str(tmp_path),),
    )  # fmt: skip
    assert proto.Run.from_wire(run.to_wire()) == run
    ours, theirs = socket.socketpair()
    with ours, theirs:
        channel = Channel(ours)
        blobs = [memoryview(cloudpickle.dumps(_uses_a_module_of_the_environment)), memoryview(pickle.dumps([1, 2]))]
        Worker(channel, Output(channel), Progress(None)).run(run, blobs)
        message = proto.recv(theirs)
    assert message is not None
    header, out = message
    done = proto.Done.from_wire(header)
    assert done.error is None and pickle.loads(out[proto.Done.RESULTS_BLOB]) == [41, 42]
    assert sys.path[0] == str(tmp_path)
    sys.modules.pop("burla_adopted_module", None)

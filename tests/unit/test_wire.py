"""burla.schemas.wire + burla.schemas.messages: messages to and from JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from burla.schemas import messages as m
from burla.schemas.wire import Wire, WireError


def through_json(msg: Wire) -> dict[str, Any]:
    """What the peer gets: to_wire, then a real JSON encode/decode."""
    out = json.loads(json.dumps(msg.to_wire()))
    assert isinstance(out, dict)
    return out


NODE = m.NodeInfo(
    node_id="node-1",
    hostname="box",
    cpus=8,
    ram_bytes=32 * 10**9,
    python_version="3.11",
    workers=8,
    runtime="podman",
    gpus=("A100", "A100"),
    agent_version="0.1.0",
)
SPEC = m.JobSpec(
    job_id="job-1",
    function_name="square",
    function_hash="ab" * 32,
    python_version="3.12",
    func_cpu=2.5,
    func_ram=0.5,
    max_parallelism=7,
    client_version="0.1.0",
)
LEASE = m.Lease(
    lease_id=12, job_id="job-1", function_hash="ff" * 32, batch_seq=3, batch_start=3000, lo=3100, hi=3200, func_cpu=0.5,
    func_ram_bytes=123,
)  # fmt: skip
ERROR = m.CallError(
    index=3150,
    kind=m.EXCEPTION,
    type_name="builtins.ValueError",
    message="bad",
    traceback="Traceback ...",
    frames=(["/app/job.py", 10, "main", "    raise ValueError('bad')"], ["/app/x.py", 2, "f", ""]),
    node="node-1",
    exc_blob=1,
)
RESULT = m.LeaseResult(lease_id=12, job_id="job-1", lo=3100, n_ok=50, elapsed=0.25, results_blob=0, error=ERROR)


@pytest.mark.parametrize(
    "msg",
    [
        NODE,
        m.NodeInfo("n", "h", 1, 1, "3.11", 1),  # all defaults
        SPEC,
        m.JobSpec("j", "f", "0" * 64, "3.11"),
        LEASE,
        RESULT,
        m.LeaseResult(lease_id=1, job_id="j", lo=0, n_ok=3, elapsed=0.0, results_blob=2),  # no error
        m.AgentReport(
            boot_id="boot",
            ack_delivery=4,
            ready_workers=3,
            running=(12, 13),
            results=(RESULT, m.LeaseResult(13, "job-1", 0, 1, 0.1, 2)),
            logs=(m.LogChunk("job-1", lines=3, nbytes=40, blob=3), m.LogChunk("job-2", 1, 2, 4)),
            stats={"rss": 123, "load": [0.5, 0.25]},
        ),
        m.AgentReport(),
        m.Delivery(
            boot_id="boot",
            delivery=9,
            leases=(LEASE, m.Lease(13, "job-1", "ff" * 32, 3, 3000, 3200, 3300)),
            cancel_jobs=("job-0",),
            functions={"ff" * 32: 0},
            batches=(["job-1", 3, 1],),
        ),
        m.ClusterStatus(
            nodes=(m.NodeStatus("a1", "box", "ready", 8, 10**9, "3.11", 8, 2, stats={"x": 1}),),
            jobs=(m.JobStatus("job-1", m.RUNNING, "square", n_inputs=None, n_done=5, phase="running on 2 workers"),),
            daemon={"version": "0.1.0"},
        ),
        m.ClusterStatus(),
        m.Event(seq=5, kind=m.RESULTS, lo=0, hi=10, data={"k": "v"}, blob=0),
        m.Registered("agent-1", "boot", 2.0, 10.0),
        m.BatchMeta(seq=1, start=1024, count=4096),
    ],
    ids=lambda msg: type(msg).__name__,
)
def test_round_trip(msg: Wire) -> None:
    back = type(msg).from_wire(through_json(msg))
    assert back == msg
    assert type(back) is type(msg)


def test_nested_messages_come_back_as_their_classes() -> None:
    report = m.AgentReport(results=(RESULT,), logs=(m.LogChunk("j", 1, 1, 0),))
    back = m.AgentReport.from_wire(through_json(report))
    assert isinstance(back.results, tuple)
    assert isinstance(back.results[0], m.LeaseResult)
    assert isinstance(back.results[0].error, m.CallError)
    assert back.results[0].error.frames[0] == ["/app/job.py", 10, "main", "    raise ValueError('bad')"]
    assert isinstance(back.logs[0], m.LogChunk)
    delivery = m.Delivery.from_wire(through_json(m.Delivery("b", leases=(LEASE,))))
    assert isinstance(delivery.leases[0], m.Lease)
    status = m.ClusterStatus.from_wire(through_json(m.ClusterStatus(jobs=(m.JobStatus("j", m.RUNNING),))))
    assert isinstance(status.jobs[0], m.JobStatus)


def test_to_wire_is_plain_json_types() -> None:
    wire = RESULT.to_wire()
    assert isinstance(wire["error"], dict)
    assert wire["error"]["index"] == 3150
    report = m.AgentReport(running=(1, 2), results=(RESULT,)).to_wire()
    assert report["running"] == [1, 2]
    assert isinstance(report["results"], list)
    assert isinstance(report["results"][0], dict)
    assert NODE.to_wire()["gpus"] == ["A100", "A100"]


def test_lists_become_tuples() -> None:
    info = m.NodeInfo.from_wire({**NODE.to_wire(), "gpus": ["T4"]})
    assert info.gpus == ("T4",)
    report = m.AgentReport.from_wire({"running": [4, 5]})
    assert report.running == (4, 5)


def test_null_nested_value_stays_none() -> None:
    wire = through_json(RESULT)
    wire["error"] = None
    assert m.LeaseResult.from_wire(wire).error is None


def test_unknown_keys_are_ignored() -> None:
    wire = through_json(NODE)
    wire["from_the_future"] = {"anything": [1, 2]}
    assert m.NodeInfo.from_wire(wire) == NODE
    nested = through_json(m.AgentReport(results=(RESULT,)))
    nested["results"][0]["new_field"] = 1
    nested["results"][0]["error"]["another"] = "x"
    nested["protocol"] = 99
    assert m.AgentReport.from_wire(nested) == m.AgentReport(results=(RESULT,))


def test_missing_fields_with_defaults_are_filled() -> None:
    info = m.NodeInfo.from_wire(
        {"node_id": "n", "hostname": "h", "cpus": 4, "ram_bytes": 10, "python_version": "3.11", "workers": 4}
    )
    assert info.runtime == "process"
    assert info.gpus == ()
    assert info.agent_version == ""
    spec = m.JobSpec.from_wire(
        {"job_id": "j", "function_name": "f", "function_hash": "0" * 64, "python_version": "3.11"}
    )
    assert spec.func_cpu == 1.0
    assert spec.func_ram == 4.0
    assert spec.max_parallelism is None
    report = m.AgentReport.from_wire({})
    assert report == m.AgentReport()
    assert report.stats == {}
    delivery = m.Delivery.from_wire({"boot_id": "b"})
    assert delivery.leases == ()
    assert delivery.functions == {}
    error = m.CallError.from_wire({"index": 1, "kind": m.MEMORY, "type_name": "", "message": "m"})
    assert error.exc_blob is None
    assert error.frames == ()


def test_default_factories_are_not_shared() -> None:
    a = m.AgentReport.from_wire({})
    b = m.AgentReport.from_wire({})
    a.stats["x"] = 1
    assert b.stats == {}


@pytest.mark.parametrize(
    ("cls", "wire", "field"),
    [
        (m.NodeInfo, {"node_id": "n", "hostname": "h", "cpus": 1, "ram_bytes": 1, "python_version": "3.11"}, "workers"),
        (m.JobSpec, {"function_name": "f", "function_hash": "0" * 64, "python_version": "3.11"}, "job_id"),
        (m.Lease, {k: v for k, v in LEASE.to_wire().items() if k != "hi"}, "hi"),
        (m.LeaseResult, {k: v for k, v in RESULT.to_wire().items() if k != "results_blob"}, "results_blob"),
        (m.Delivery, {"leases": []}, "boot_id"),
        (m.BatchMeta, {"seq": 0, "start": 0}, "count"),
    ],
)  # fmt: skip
def test_missing_required_field_names_it(cls: type[Wire], wire: dict[str, Any], field: str) -> None:
    with pytest.raises(WireError, match=f"{cls.__name__}: missing field '{field}'"):
        cls.from_wire(wire)


def test_missing_required_field_in_nested_message() -> None:
    wire = through_json(m.AgentReport(results=(RESULT,)))
    del wire["results"][0]["error"]["kind"]
    with pytest.raises(WireError, match="CallError: missing field 'kind'"):
        m.AgentReport.from_wire(wire)


@pytest.mark.parametrize("data", [None, [1, 2], "text", 42, (("node_id", "n"),)])
def test_non_dict_raises(data: Any) -> None:
    with pytest.raises(WireError, match=f"NodeInfo: expected an object, got {type(data).__name__}"):
        m.NodeInfo.from_wire(data)


def test_nested_non_dict_raises() -> None:
    wire = through_json(RESULT)
    wire["error"] = "boom"
    with pytest.raises(WireError, match="CallError: expected an object, got str"):
        m.LeaseResult.from_wire(wire)
    with pytest.raises(WireError, match="Lease: expected an object"):
        m.Delivery.from_wire({"boot_id": "b", "leases": [1]})


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        setattr(NODE, "cpus", 3)  # noqa: B010


def test_two_versions_are_compatible_when_the_same_or_stating_the_same_protocol() -> None:
    assert m.compatible("0.2.0", 1, "0.2.0", 0)
    assert m.compatible("0.2.0", 1, "0.3.0", 1)
    assert not m.compatible("0.2.0", 1, "0.3.0", 2)
    assert not m.compatible("0.2.0", 0, "0.3.0", 0)  # neither states a protocol: no promise

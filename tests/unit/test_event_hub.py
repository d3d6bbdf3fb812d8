"""The events websocket's pure parts: a client's message, and a frame of events."""

from __future__ import annotations

import pytest

from burla.daemon.errors import BadRequest
from burla.daemon.event_hub import frame, parse_op
from burla.schemas import messages as m


def test_parse_op_takes_a_subscribe_or_an_ack_and_refuses_the_rest() -> None:
    assert parse_op('{"op": "subscribe", "job": "j1", "after": 7}') == ("subscribe", "j1", 7)
    assert parse_op(b'{"op": "ack", "job": "j1"}') == ("ack", "j1", 0)
    assert parse_op('{"op": "unsubscribe", "job": "j1"}') == ("unsubscribe", "j1", 0)
    for bad, says in [
        ('{"op": "forget", "job": "j1"}', "op: expected"),
        ('{"op": "ack", "job": "../etc"}', "job: expected an id"),
        ('{"op": "subscribe", "job": "j1", "after": -1}', "after: expected"),
        ('{"op": "subscribe", "job": "j1", "after": true}', "after: expected"),
        ("[1]", "expected {"),
        ("x" * 5000, "at most 4096 bytes"),
    ]:
        with pytest.raises(BadRequest, match=says):
            parse_op(bad)


def test_a_frame_numbers_its_payloads_and_says_when_the_job_ended() -> None:
    events = [
        (m.Event(3, m.RESULTS, 0, 2), b"ab"),
        (m.Event(4, m.RESULTS, 2, 3, size=9, ref="j1/x"), None),  # spilled: fetched, not pushed
        (m.Event(5, m.LOGS), b"c"),
    ]
    header, blobs, finished = frame("j1", events)
    assert [(e["seq"], e.get("blob")) for e in header["events"]] == [(3, 0), (4, None), (5, 1)]
    assert blobs == [b"ab", b"c"] and not finished and header["job_id"] == "j1"
    assert frame("j1", [(m.Event(6, m.DONE), None)])[2]
    assert frame("j1", []) == ({"job_id": "j1", "events": []}, [], False)

"""About 1,700 malformed requests over every route and the websocket of a real burlad: no 5xx, no hang, no escape.

The corpus is hypothesis's, derandomized so that CI sends the same requests every run; bench/fuzz_long.py
sends many more, at random. See tests/fuzz.py for what is sent.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_ws import WebSocketDisconnect, connect_ws
from hypothesis import HealthCheck, given, settings

import burla
from burla import remote_parallel_map
from burla.schemas import messages as m
from tests import fuzz
from tests.cluster import Cluster

pytestmark = pytest.mark.e2e

FUZZ = settings(
    max_examples=int(os.environ.get("BURLA_FUZZ_EXAMPLES", "1500")),
    deadline=None,
    derandomize=os.environ.get("BURLA_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("fuzz"), agents=1, workers=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tally() -> fuzz.Tally:
    return fuzz.Tally()


@pytest.fixture(scope="module")
def fuzz_agent(target: Cluster) -> dict[str, str]:
    """An agent of the run's own, so agent routes are reached with a real agent's token; its Python is one
    no job asks for, so it never takes a lease."""
    info = {"node_id": "fuzz-agent", "hostname": "fuzz", "cpus": 1, "ram_bytes": 10**9, "python_version": "3.99",
            "workers": 1, "agent_version": burla.__version__, "protocol": m.PROTOCOL_VERSION}  # fmt: skip
    headers = {"authorization": f"Bearer {target.node_token}"}
    agent = dict(httpx.post(f"{target.url}/v1/agents/register", json=info, headers=headers, timeout=10).json())
    admin = {"authorization": f"Bearer {target.admin_token}"}
    for name, role in (("fuzz-user", "user"), ("fuzz-admin", "admin")):  # the fuzzed names never take these
        r = httpx.post(f"{target.url}/v1/users", json={"name": name, "role": role}, headers=admin, timeout=10)
        agent[name] = r.json()["api_key"]
    return agent


def send(client: httpx.Client, cluster: Cluster, agent: dict[str, str], request: dict[str, Any]) -> httpx.Response:
    headers = {"content-type": request["type"]} if request["type"] else {}
    tokens = {"admin": cluster.admin_token, "node": cluster.node_token, "agent": agent["agent_token"],
              "user": agent["fuzz-user"], "admin-user": agent["fuzz-admin"], "wrong": "burla-wrong-token",
              "none": None}  # fmt: skip
    token = tokens[request["role"]]
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    path = request["path"].replace(fuzz.AGENT, agent["agent_id"])
    return client.request(request["method"], path, content=request["body"], headers=headers)


def test_malformed_requests_get_a_4xx_in_time(target: Cluster, tally: fuzz.Tally, fuzz_agent: dict[str, str]) -> None:
    with httpx.Client(base_url=target.url, timeout=fuzz.ANSWER_SECONDS) as client:

        @FUZZ
        @given(fuzz.requests())
        def one(request: dict[str, Any]) -> None:
            started = time.monotonic()
            r = send(client, target, fuzz_agent, request)
            tally.add(request["method"], request["template"], r.status_code, time.monotonic() - started)
            assert r.status_code < 500, f"{request['method']} {request['path']} -> {r.status_code}: {r.text[:300]}"
            if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
                text = r.text
                assert "Traceback" not in text and 'File "' not in text, text[:300]

        one()
    print("\n" + tally.table())
    assert tally.total() >= 1000


def test_malformed_websocket_messages_get_an_error_and_the_socket_lives(
    target: Cluster, tally: fuzz.Tally, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies are not matched to messages (a subscription to a job that never comes is answered after 10 s):
    every frame that comes back must parse, and the socket must still follow a real job at the end."""
    from burla.schemas import envelope

    headers = {"authorization": f"Bearer {target.admin_token}"}
    with httpx.Client(base_url=target.url, timeout=fuzz.ANSWER_SECONDS) as client:
        with connect_ws(f"{target.url}/v1/events", client, headers=headers) as ws:

            def drain(timeout: float) -> list[dict[str, Any]]:
                replies = []
                while True:
                    try:
                        replies.append(envelope.unpack(ws.receive_bytes(timeout=timeout))[0])
                    except (TimeoutError, queue.Empty):
                        return replies
                    except WebSocketDisconnect as e:
                        raise AssertionError("the daemon closed the websocket") from e
                    timeout = 0.01

            @settings(FUZZ, max_examples=max(50, FUZZ.max_examples // 8))
            @given(fuzz.websocket_messages)
            def one(text: str | bytes) -> None:
                started = time.monotonic()
                if isinstance(text, bytes):
                    ws.send_bytes(text)  # a create frame
                else:
                    ws.send_text(text)
                replies = drain(0.05)
                status = 400 if any("error" in r for r in replies) else 200
                tally.add("WS", "/v1/events", status, time.monotonic() - started)

            one()
            target.use(monkeypatch)
            results = remote_parallel_map(abs, [-1, -2], generator=True, spinner=False)
            assert sorted(results) == [1, 2]
            ws.send_text('{"op": "subscribe", "job": "' + "0" * 32 + '", "after": 0}')  # still answers
            assert any(r.get("error", {}).get("code") == "not_found" for r in drain(15)), "no answer"


def test_nothing_escaped_and_the_daemon_still_runs_a_job(target: Cluster, tally: fuzz.Tally,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Run last in this module: every path-like value carried the mark, so an escaped write is found by name."""
    state = target.root / "daemon"
    places = [Path("/tmp"), *state.parents]
    escaped = [p for place in places if place.is_dir() for p in place.iterdir() if fuzz.ESCAPE_MARK in p.name]
    escaped += [p for p in target.root.rglob(f"*{fuzz.ESCAPE_MARK}*")]
    assert not escaped
    target.use(monkeypatch)
    assert remote_parallel_map(abs, range(-500, 0), spinner=False) == list(range(500, 0, -1))
    print("\n" + tally.table())

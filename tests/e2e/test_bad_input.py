"""Bad input gets a clear error before work starts, naming what is wrong."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest

import burla
from burla import remote_parallel_map
from burla.errors import NotCallableError, NotIterableError, TooLargeError, UnpicklableError
from tests.cluster import Cluster, run_client, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def small_limits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(
        tmp_path_factory.mktemp("small"),
        agents=1,
        workers=2,
        env={
            "BURLA_DAEMON_MAX_INPUT_BYTES": "1MB",
            "BURLA_DAEMON_MAX_FUNCTION_BYTES": "2MB",
            "BURLA_DAEMON_MAX_RESULT_BYTES": "3MB",
        },  # fmt: skip
    )
    yield cluster
    cluster.stop()


@pytest.fixture
def limited(small_limits: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    small_limits.use(monkeypatch)
    return small_limits


def jobs_created(cluster: Cluster) -> int:
    return int(cluster.status()["daemon"].get("jobs", 0))


def test_a_non_callable_function_is_refused(limited: Cluster) -> None:
    with pytest.raises(NotCallableError, match="function_ must be callable, but got int 42") as info:
        remote_parallel_map(42, [1, 2])  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)


def test_inputs_that_are_not_an_iterable_are_refused(limited: Cluster) -> None:
    with pytest.raises(NotIterableError, match="not int"):
        remote_parallel_map(abs, 5)  # type: ignore[arg-type]
    with pytest.raises(NotIterableError, match="not a str"):
        remote_parallel_map(abs, "abc")


def test_an_unpicklable_function_is_named(limited: Cluster) -> None:
    lock = threading.Lock()

    def uses_a_lock(x: int) -> int:
        with lock:
            return x

    before = jobs_created(limited)
    with pytest.raises(UnpicklableError, match="uses_a_lock.*cannot be pickled"):
        remote_parallel_map(uses_a_lock, [1, 2])
    assert jobs_created(limited) == before


def test_an_unpicklable_input_is_named_by_index(limited: Cluster) -> None:
    before = jobs_created(limited)
    inputs: list[object] = [1, 2, 3, threading.Lock(), 5]
    with pytest.raises(UnpicklableError, match=r"input #3 \(lock") as info:
        remote_parallel_map(abs, inputs)
    assert info.value.input_index == 3
    assert jobs_created(limited) == before


def test_an_unpicklable_input_far_into_a_generator_cancels_the_job(limited: Cluster) -> None:
    def inputs() -> Iterator[object]:
        for i in range(300_000):
            yield threading.Lock() if i == 250_000 else i

    with pytest.raises(UnpicklableError, match="input #250000") as info:
        remote_parallel_map(abs, inputs(), spinner=False)
    assert info.value.input_index == 250_000
    wait_for(lambda: all(j["state"] != "running" for j in limited.status()["jobs"]), 5, "the job cancelled")


def test_an_input_over_the_size_limit_is_named(limited: Cluster) -> None:
    before = jobs_created(limited)
    with pytest.raises(TooLargeError, match=r"input #2 \(bytes\) pickles to 1\.5 MB.*limit of 1 MB") as info:
        remote_parallel_map(len, [b"a", b"b", b"x" * 1_500_000], spinner=False)
    assert info.value.input_index == 2
    assert jobs_created(limited) == before


def test_a_function_over_the_size_limit_is_refused(limited: Cluster) -> None:
    payload = b"y" * 3_000_000

    def captures_a_big_global(x: int) -> int:
        return len(payload) + x

    with pytest.raises(TooLargeError, match="captures_a_big_global.*pickles to 3.0 MB.*limit of 2 MB"):
        remote_parallel_map(captures_a_big_global, [1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"func_cpu": 0}, "func_cpu must be a positive number"),
        ({"func_ram": -1}, "func_ram must be a positive number"),
        ({"func_ram": "4GB"}, "func_ram must be a positive number"),
        ({"max_parallelism": 0}, "max_parallelism must be a positive integer"),
    ],
)
def test_bad_resource_arguments_are_refused(limited: Cluster, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(burla.InvalidArgumentError, match=match):
        remote_parallel_map(abs, [1], **kwargs)  # type: ignore[arg-type]


def test_a_wrong_api_key_is_refused(limited: Cluster) -> None:
    with pytest.raises(burla.ClusterError, match="refused the API key"):
        remote_parallel_map(abs, [1], api_key="not-the-key", spinner=False)


def test_every_api_route_needs_a_token(limited: Cluster) -> None:
    for method, path in [
        ("GET", "/v1/info"),
        ("GET", "/v1/cluster"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/jobs/x/inputs"),
        ("POST", "/v1/jobs/x/cancel"),
        ("POST", "/v1/agents/register"),
        ("POST", "/v1/agents/x/poll"),
    ]:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic abc"}):
            r = httpx.request(method, limited.url + path, headers=headers, timeout=5)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.post(
        limited.url + "/v1/jobs", headers={"authorization": f"Bearer {limited.node_token}"}, content=b"x", timeout=5
    )
    assert r.status_code == 401  # the node token cannot submit jobs
    assert httpx.get(limited.url + "/v1/health", timeout=5).status_code == 200


def test_an_agent_with_a_wrong_token_exits_with_a_clear_error(limited: Cluster, tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "burla.daemon", "agent", limited.url, "--state-dir", str(tmp_path)],
        env={**os.environ, "BURLA_AGENT_TOKEN": "wrong"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "refused this agent's token" in result.stderr


def test_a_token_on_the_command_line_is_refused(own_cluster: Cluster, tmp_path: Path) -> None:
    """Every user of the machine reads argv (ps): the node token goes by file or environment only."""
    import subprocess
    import sys

    agent = [sys.executable, "-m", "burla.daemon", "agent", own_cluster.url, "--state-dir", str(tmp_path)]
    result = subprocess.run([*agent, f"--token={own_cluster.node_token}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--token is refused" in result.stderr and "BURLA_AGENT_TOKEN" in result.stderr
    assert own_cluster.node_token not in result.stderr
    token_file = tmp_path / "node-token"
    token_file.write_text(own_cluster.node_token + "\n")
    token_file.chmod(0o600)
    with subprocess.Popen([*agent, "--token-file", str(token_file), "--workers", "1"], stderr=subprocess.PIPE) as proc:
        try:
            wait_for(lambda: len(own_cluster.status()["nodes"]) == 3, 30, "the agent to register")
            assert own_cluster.node_token not in " ".join(Path(f"/proc/{proc.pid}/cmdline").read_text().split("\0"))
        finally:
            proc.terminate()
            proc.wait(20)


def test_a_second_daemon_on_the_same_state_dir_is_refused(limited: Cluster) -> None:
    import subprocess
    import sys

    from tests.cluster import free_port

    state_dir = limited.root / "daemon"
    result = subprocess.run(
        [sys.executable, "-m", "burla.daemon", "serve", "--port", str(free_port()), "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"another burlad (pid {limited.daemon.pid}) is serving from {state_dir}" in result.stderr
    assert "Traceback" not in result.stderr
    assert remote_parallel_map(abs, [-1], spinner=False) == [1]  # the first one is untouched


def _exchange(sock: socket.socket, client: h11.Connection, request: h11.Request, body: bytes = b"") -> int:
    """Send a request on a kept-alive connection (its body after a pause); the response's status."""
    sock.sendall(client.send(request))
    if body:
        time.sleep(0.3)  # the daemon may decide before the body arrives
        sock.sendall(client.send(h11.Data(data=body)))
    sock.sendall(client.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(sock.recv(65536))  # a connection left hanging times out here
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            client.start_next_cycle()
            return status
        elif isinstance(event, h11.ConnectionClosed):
            raise AssertionError("the daemon closed a kept-alive connection")


@pytest.mark.parametrize("token", ["wrong", "admin"])
def test_an_answer_before_the_body_is_read_leaves_the_connection_usable(limited: Cluster, token: str) -> None:
    """A known blob or a bad token is answered without the body: the next request on the connection still is."""
    digest = hashlib.sha256(b"a blob").hexdigest()
    auth = ("Bearer " + (limited.admin_token if token == "admin" else "wrong")).encode()
    host, port = limited.url.removeprefix("http://").split(":")
    headers = [("host", host), ("authorization", auth)]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        client = h11.Connection(h11.CLIENT)
        put = h11.Request(method="PUT", target=f"/v1/blobs/{digest}", headers=[*headers, ("content-length", "6")])
        assert _exchange(sock, client, put, b"a blob") == (200 if token == "admin" else 401)
        if token == "admin":  # now the blob is known: the second upload is answered at once
            assert _exchange(sock, client, put, b"a blob") == 200
        health = h11.Request(method="GET", target="/v1/health", headers=headers)
        assert _exchange(sock, client, health) == 200


def test_malformed_requests_get_4xx_and_the_daemon_keeps_serving(limited: Cluster) -> None:
    auth = {"authorization": f"Bearer {limited.admin_token}"}
    envelope = {**auth, "content-type": "application/x-burla-envelope"}
    cases = [
        ("POST", "/v1/jobs", envelope, b"not an envelope"),
        ("POST", "/v1/jobs", {**auth, "content-type": "application/json"}, b"{}"),
        ("POST", "/v1/jobs", envelope, b"BRL1\x05\x00\x00\x00{}"),
        ("POST", "/v1/jobs/nope/inputs", envelope, b"BRL1\xff\xff\xff\xff"),
        ("POST", "/v1/jobs/nope/cancel", auth, b"not json"),
        ("GET", "/v1/jobs/nope", auth, b""),
        ("POST", "/v1/agents/register", {**auth, "content-type": "application/json"}, b'{"hostname": 5}'),
        ("POST", "/v1/agents/unknown/poll", envelope, b"garbage"),
    ]
    from burla.schemas import envelope as env

    cases.append(("POST", "/v1/jobs", envelope, env.pack({"spec": {"job_id": "x"}}, [b"fn"])))
    cases.append(("POST", "/v1/jobs", envelope, env.pack({"spec": None}, [])))
    for method, path, headers, body in cases:
        r = httpx.request(method, limited.url + path, headers=headers, content=body, timeout=5)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert "error" in r.json(), r.text
    assert remote_parallel_map(abs, [-1, -2], spinner=False) == [1, 2]


def test_an_events_socket_answers_garbage_with_an_error(limited: Cluster) -> None:
    from httpx_ws import connect_ws

    with httpx.Client(base_url=limited.url, headers={"authorization": f"Bearer {limited.admin_token}"}) as client:
        with connect_ws("/v1/events", client) as ws:
            ws.send_text("this is not json")
            from burla.schemas import envelope as env

            header, _ = env.unpack(ws.receive_bytes(timeout=5))
            assert header["error"]["code"] == "bad_request"
            ws.send_text('{"op": "subscribe", "job": "no-such-job"}')
            header, _ = env.unpack(ws.receive_bytes(timeout=15))
            assert header["job_id"] == "no-such-job" and header["error"]["code"] == "not_found"


def test_python_version_mismatch_fails_at_once(limited: Cluster, tmp_path: Path) -> None:
    """A node that runs another Python (here a stand-in speaking the real agent API) cannot take the job."""
    from burla.schemas import envelope as env
    from burla.schemas.messages import PROTOCOL_VERSION

    headers = {"authorization": f"Bearer {limited.node_token}"}
    r = httpx.post(
        limited.url + "/v1/agents/register",
        headers=headers,
        json={"node_id": "fake", "hostname": "other", "cpus": 4, "ram_bytes": 8 * 10**9, "python_version": "3.99",
              "workers": 4, "agent_version": burla.__version__, "protocol": PROTOCOL_VERSION},
        timeout=5,
    )  # fmt: skip
    assert r.status_code == 200
    agent_id = r.json()["agent_id"]
    own = {"authorization": f"Bearer {r.json()['agent_token']}"}  # an agent's routes take its own token
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            httpx.post(
                f"{limited.url}/v1/agents/{agent_id}/poll",
                headers={**own, "content-type": env.CONTENT_TYPE},
                content=env.pack({"ready_workers": 4}),
                timeout=10,
            )

    thread = threading.Thread(target=heartbeat)
    thread.start()
    try:
        limited.kill_agent(0)  # now the only live node runs Python 3.99
        wait_for(lambda: len(limited.status()["nodes"]) == 1, 15, "the real agent to expire")
        script = "from burla import remote_parallel_map\nremote_parallel_map(abs, [1], spinner=False)\n"
        started = time.monotonic()
        result = run_client(script, limited.client_env(), tmp_path)
        assert time.monotonic() - started < 10
        assert "UnsatisfiableError" in result.stderr
        assert "no node runs Python 3.11" in result.stderr and "Python 3.99 (1 node)" in result.stderr
    finally:
        stop.set()
        thread.join()
        limited.start_agent(0)
    wait_for(lambda: any(n["python_version"] != "3.99" for n in limited.status()["nodes"]), 30, "the agent back")


def returns_too_much(x: int) -> bytes:
    return b"x" * (4 * 10**6 if x == 2 else 10)


def test_a_result_over_the_limit_fails_naming_the_input(limited: Cluster) -> None:
    with pytest.raises(burla.ResultTooLargeError, match=r"input #2 \(bytes\) pickles to 4\.0 MB") as info:
        remote_parallel_map(returns_too_much, range(4), spinner=False)
    assert info.value.input_index == 2
    assert "daemon.max_result_bytes" in str(info.value) and "limit of 3 MB" in str(info.value)
    assert remote_parallel_map(returns_too_much, [0, 1], spinner=False) == [b"x" * 10] * 2

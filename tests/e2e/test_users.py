"""Many users on one cluster, end to end: a real burlad, two real agents, each user's client its own process.

Each user gets exactly their own results and output; no user can list, follow, fetch or cancel another's
job, nor find one by guessing its id; a removed user's caller is told why its job stopped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_ws import connect_ws

from burla.schemas import envelope
from tests.cluster import PYTHON, Cluster, run_client, wait_for

pytestmark = pytest.mark.e2e

JOBS = {"ann": 4, "ben": 3, "cat": 3}  # ten jobs at once, of three users
INPUTS = 30

USER_SCRIPT = """
import json, os, threading
from burla import Client

user, jobs, inputs = os.environ["T_USER"], int(os.environ["T_JOBS"]), int(os.environ["T_INPUTS"])
results, errors = {}, []

def run(j):
    tag = f"{user}-{j}"

    def call(x, tag=tag):
        import time
        print(f"out {tag} {x}")
        time.sleep(0.2)
        return f"{tag}:{x}"

    try:
        with Client() as client:
            results[tag] = client.map(call, range(inputs), spinner=False)
    except Exception as e:
        errors.append(repr(e))

threads = [threading.Thread(target=run, args=(j,)) for j in range(jobs)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("RESULTS " + json.dumps({"results": results, "errors": errors}))
"""


def admin_call(cluster: Cluster, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {cluster.admin_token}"}
    return httpx.request(method, f"{cluster.url}{path}", headers=headers, timeout=10, **kwargs)


def add_user(cluster: Cluster, name: str) -> str:
    r = admin_call(cluster, "POST", "/v1/users", json={"name": name})
    assert r.status_code == 200, r.text
    return str(r.json()["api_key"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cluster = Cluster(tmp_path_factory.mktemp("users"), agents=2, workers=2)
    yield cluster
    cluster.stop()


def test_three_users_ten_jobs_each_gets_exactly_their_own(cluster: Cluster, tmp_path: Path) -> None:
    keys = {user: add_user(cluster, user) for user in JOBS}
    procs = {}
    for user, jobs in JOBS.items():
        env = {**os.environ, "BURLA_CLUSTER_URL": cluster.url, "BURLA_API_KEY": keys[user], "T_USER": user,
               "T_JOBS": str(jobs), "T_INPUTS": str(INPUTS)}  # fmt: skip
        (tmp_path / user).mkdir()
        (tmp_path / user / "script.py").write_text(USER_SCRIPT)
        procs[user] = subprocess.Popen([PYTHON, "script.py"], cwd=tmp_path / user, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    owners: dict[str, str] = {}

    def all_jobs() -> dict[str, str] | None:
        for user, proc in procs.items():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"{user}'s client ended before all jobs were seen: {out[-1000:]} {err[-3000:]}")
        owners.update({j["job_id"]: j["owner"] for j in cluster.status()["jobs"]})
        return owners if len(owners) == sum(JOBS.values()) else None

    wait_for(all_jobs, 60, "all ten jobs")
    # ben probes everyone else's jobs while they run
    probes = 0
    ben = {"authorization": f"Bearer {keys['ben']}"}
    with httpx.Client(base_url=cluster.url, headers=ben, timeout=10) as c:
        listed = {j["job_id"] for j in c.get("/v1/cluster").json()["jobs"]}
        assert listed == {j for j, owner in owners.items() if owner == "ben"}
        others = [j for j, owner in owners.items() if owner != "ben"]
        guesses = [uuid.uuid4().hex for _ in range(20)] + [j[:-1] + ("0" if j[-1] != "0" else "1") for j in others]
        for job in others + guesses:
            for method, path, body in (("GET", f"/v1/jobs/{job}", None),
                                       ("POST", f"/v1/jobs/{job}/cancel", {"reason": "ben was here"}),
                                       ("GET", f"/v1/jobs/{job}/events/1/payload", None)):  # fmt: skip
                r = c.request(method, path, json=body)
                assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
                probes += 1
        with connect_ws(f"{cluster.url}/v1/events", c) as ws:
            for job in others:
                ws.send_text(json.dumps({"op": "subscribe", "job": job, "after": 0}))
            for _ in others:
                frame = envelope.unpack(ws.receive_bytes(timeout=15))[0]
                assert frame["error"]["code"] == "not_found" and "events" not in frame, frame
                probes += 1
            for job in others:  # an ack of another's job must not make the daemon forget it
                ws.send_text(json.dumps({"op": "ack", "job": job}))
    outputs = {user: proc.communicate(timeout=180) for user, proc in procs.items()}
    total = 0
    for user, (out, err) in outputs.items():
        assert procs[user].returncode == 0, err[-3000:]
        report = json.loads(out.rsplit("RESULTS ", 1)[1])
        assert report["errors"] == []
        expected = {f"{user}-{j}": [f"{user}-{j}:{x}" for x in range(INPUTS)] for j in range(JOBS[user])}
        assert report["results"] == expected  # exactly their own results, in order, none lost
        printed = re.findall(r"^out (\w+)-(\d+) (\d+)$", out, re.MULTILINE)
        assert {u for u, _, _ in printed} == {user}, "another user's output reached this caller"
        assert sorted(printed) == sorted((user, str(j), str(x)) for j in range(JOBS[user]) for x in range(INPUTS))
        total += sum(len(v) for v in report["results"].values())
    assert total == sum(JOBS.values()) * INPUTS
    print(f"\nisolation: {len(JOBS)} users, {sum(JOBS.values())} jobs at once, {total} results, {probes} probes "
          "of other users' jobs all refused, no result or line of output lost or leaked")  # fmt: skip


REMOVED_SCRIPT = """
import time
from burla import remote_parallel_map
from burla.errors import JobCancelledError

def slow(x):
    import time
    time.sleep(0.5)
    return x

try:
    remote_parallel_map(slow, range(400), spinner=False)
except JobCancelledError as e:
    print("CANCELLED", e)
"""


def test_a_removed_users_job_is_cancelled_and_the_caller_told_why(cluster: Cluster, tmp_path: Path) -> None:
    key = add_user(cluster, "dan")
    env = {**os.environ, "BURLA_CLUSTER_URL": cluster.url, "BURLA_API_KEY": key}
    (tmp_path / "script.py").write_text(REMOVED_SCRIPT)
    proc = subprocess.Popen([PYTHON, "script.py"], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    wait_for(lambda: any(j["owner"] == "dan" and j["n_done"] > 0 for j in cluster.status()["jobs"]), 60, "dan's job")
    r = admin_call(cluster, "DELETE", "/v1/users/dan")
    assert r.status_code == 200 and len(r.json()["cancelled_jobs"]) == 1
    out, err = proc.communicate(timeout=60)
    assert "CANCELLED" in out and "user dan was removed from the cluster by admin" in out, (out, err[-2000:])
    r = httpx.get(f"{cluster.url}/v1/me", headers={"authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 401 and "dan" in r.text


def test_the_users_commands(cluster: Cluster, tmp_path: Path) -> None:
    admin_env = {"BURLA_CLUSTER_URL": cluster.url, "BURLA_API_KEY": cluster.admin_token}

    def burla(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "burla.cli", *args], env={**os.environ, **(env or admin_env)},
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    added = burla("users", "add", "eve")
    assert added.returncode == 0, added.stderr
    key = re.search(r"burla_key_[\w-]+", added.stdout)
    assert key is not None and "shown only this once" in added.stdout
    listed = burla("users", "list")
    assert "eve  user" in listed.stdout and key.group(0) not in listed.stdout
    user_env = {"BURLA_CLUSTER_URL": cluster.url, "BURLA_API_KEY": key.group(0)}
    done = run_client("from burla import remote_parallel_map\nprint(remote_parallel_map(abs, [-4], spinner=False))",
                      user_env, tmp_path)  # fmt: skip
    assert done.stdout.strip() == "[4]", done.stderr
    refused = burla("users", "list", env=user_env)
    assert refused.returncode == 1 and "user eve is not an admin" in refused.stderr
    status = burla("status", env=user_env)
    assert status.returncode == 0 and "Nodes" in status.stdout
    rotated = burla("users", "rotate", "eve")
    assert rotated.returncode == 0 and key.group(0) not in rotated.stdout
    old = run_client("from burla import remote_parallel_map\nremote_parallel_map(abs, [-4], spinner=False)",
                     user_env, tmp_path)  # fmt: skip
    assert old.returncode != 0 and "AuthenticationError" in old.stderr and "user eve was rotated" in old.stderr
    assert burla("users", "revoke", "eve").returncode == 0
    assert "no key" in burla("users", "list").stdout
    assert burla("users", "remove", "eve").returncode == 0
    missing = burla("users", "remove", "eve")
    assert missing.returncode == 1 and "no user eve" in missing.stderr
    bad = burla("users", "add", "Eve!")
    assert bad.returncode == 1 and "name:" in bad.stderr


def test_fair_share_a_small_job_is_not_stuck_behind_a_huge_one(cluster: Cluster) -> None:
    """User A queues 1,000,000 calls of 10 ms on the two agents, then user B 20: B's results come back while
    A's job has barely begun, not after it (nodes go to users in turn)."""
    import threading
    import time

    from burla import Client
    from burla.errors import JobCancelledError

    keys = {user: add_user(cluster, user) for user in ("huge", "tiny")}

    def ten_ms(x: int) -> int:
        import time

        time.sleep(0.01)
        return x

    errors: list[BaseException] = []

    def run_huge() -> None:
        try:
            with Client(cluster.url, keys["huge"]) as client:
                client.map(ten_ms, range(1_000_000), spinner=False)
        except BaseException as e:  # noqa: BLE001 - cancelled at the end, as the test asserts
            errors.append(e)

    thread = threading.Thread(target=run_huge)
    thread.start()
    try:
        huge = wait_for(lambda: next((j for j in cluster.status()["jobs"] if j["owner"] == "huge"
                                      and j["n_done"] > 0 and j["n_uploaded"] == 1_000_000), None), 120,
                        "the huge job to run with all its inputs queued")  # fmt: skip
        started = time.monotonic()
        with Client(cluster.url, keys["tiny"]) as client:
            assert client.map(ten_ms, range(20), spinner=False) == list(range(20))
        seconds = time.monotonic() - started
        after = next(j for j in cluster.status()["jobs"] if j["job_id"] == huge["job_id"])
        assert after["state"] == "running" and after["n_done"] < 100_000, after
        print(f"\nfair share: B's 20 calls took {seconds:.2f} s with A's 1,000,000 queued "
              f"(A had {after['n_done']:,} done)")  # fmt: skip
    finally:
        admin_call(cluster, "POST", f"/v1/jobs/{huge['job_id']}/cancel", json={"reason": "the test is over"})
        thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], JobCancelledError)

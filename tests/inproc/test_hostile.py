"""What a hostile or buggy client or agent sends the daemon: refused with a 4xx that names the field, no state left.

Each test reproduces a finding of the probe of a real cluster (issue 8) against a real burlad on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import cloudpickle
import httpx
import pytest
import trio
from httpx_ws import aconnect_ws

import burla
from burla.daemon.server import Running
from burla.node_agent.agent import Agent
from burla.schemas import envelope
from burla.schemas import messages as m

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def node_info(node_id: str, hostname: str, cpus: int, ram: int, python: str, workers: int) -> m.NodeInfo:
    """What a real agent of this version registers with."""
    return m.NodeInfo(node_id, hostname, cpus, ram, python, workers, agent_version=burla.__version__,
                      protocol=m.PROTOCOL_VERSION)  # fmt: skip


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def job_header(job_id: str, fn: bytes, count: int, fn_hash: str | None = None, **spec: Any) -> dict[str, Any]:
    wire = m.JobSpec(job_id, "f", fn_hash or hashlib.sha256(fn).hexdigest(), PY).to_wire() | spec
    return {"spec": wire, "batches": [m.BatchMeta(0, 0, count).to_wire()], "final_count": count}


async def post_job(admin: httpx.AsyncClient, header: dict[str, Any], blobs: list[bytes]) -> httpx.Response:
    body = envelope.pack(header, blobs)
    return await admin.post("/v1/jobs", content=body, headers={"content-type": envelope.CONTENT_TYPE})


async def run_job(daemon: Running, admin: httpx.AsyncClient, job_id: str, fn: Any, values: list[Any]) -> list[Any]:
    """A normal job, start to end, over the API: the daemon still works."""
    blob = cloudpickle.dumps(fn)
    r = await post_job(admin, job_header(job_id, blob, len(values)), [blob, pickle.dumps(values)])
    assert r.status_code == 200, r.text
    with trio.fail_after(30):
        while daemon.plane.job_status(job_id).state == m.RUNNING:
            await trio.sleep(0.02)
    assert daemon.plane.job_status(job_id).state == m.JOB_DONE
    chunks = sorted(
        (e.lo, pickle.loads(p)) for e, p in daemon.plane.store.events_after(job_id, 0) if e.kind == m.RESULTS
    )
    return [v for _, values in chunks for v in values]


# ---- 1. ids that become paths ------------------------------------------------------------


async def test_an_ack_with_a_path_for_a_job_id_deletes_nothing(daemon: Running, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    relative = os.path.relpath(victim, daemon.plane.store.payloads.root)
    async with aconnect_ws(f"{daemon.url}/v1/events", headers={"authorization": f"Bearer {daemon.admin_token}"}) as ws:
        await ws.send_text(json.dumps({"op": "ack", "job": relative}))
        reply = envelope.unpack(await ws.receive_bytes())[0]
    assert reply["error"]["code"] == "bad_request" and "job" in reply["error"]["message"]
    assert (victim / "keep.txt").read_text() == "mine"


async def test_a_job_id_that_is_a_path_writes_nothing_outside_the_state_dir(
    daemon: Running, admin: httpx.AsyncClient, tmp_path: Path
) -> None:
    before = files_under(tmp_path)
    fn = cloudpickle.dumps(abs)
    big = pickle.dumps(list(range(100_000)))  # over the inline limit: it would go to a payload file
    r = await post_job(admin, job_header("../../../escaped", fn, 100_000), [fn, big])
    assert r.status_code == 400
    assert "job_id" in r.json()["error"]["message"]
    assert files_under(tmp_path) - before <= {p for p in files_under(tmp_path) if "daemon" in p.parts}
    assert not list(tmp_path.parent.glob("escaped*")) and not (tmp_path / "escaped").exists()
    assert daemon.plane.store.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/jobs/..%2F..%2Fx", 404),  # the router: no route has that many parts
        ("/v1/jobs/a.b", 400),
        ("/v1/jobs/" + "a" * 65, 400),
        ("/v1/jobs/a%00b", 400),
        ("/v1/agents/..%2Fa/functions/" + "0" * 64, 404),
        ("/v1/agents/AGENT/functions/..%2F..%2Fetc", 404),
        ("/v1/agents/AGENT/functions/" + "0" * 63 + "g", 400),
        ("/v1/agents/AGENT/blobs/" + "A" * 64, 400),
        ("/v1/agents/AGENT/batches/..%2Fx/0", 404),
        ("/v1/agents/AGENT/batches/a.b/0", 400),
        ("/v1/jobs/somejob/events/" + str(2**64) + "/payload", 400),
    ],
)
async def test_ids_in_paths_are_checked(daemon: Running, path: str, status: int) -> None:
    token = daemon.admin_token
    if "/agents/" in path:  # a registered agent, with its own token
        async with httpx.AsyncClient(
            base_url=daemon.url, headers={"authorization": f"Bearer {daemon.node_token}"}
        ) as c:
            reg = (await c.post("/v1/agents/register", json=node_info("n", "h", 1, 10**9, PY, 1).to_wire())).json()
        path, token = path.replace("AGENT", reg["agent_id"]), reg["agent_token"]
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {token}"}) as c:
        r = await c.get(path)
    assert r.status_code == status, r.text
    if status == 400:
        assert "expected" in r.json()["error"]["message"] or "at most" in r.json()["error"]["message"]


# ---- 2. content addressing is checked -----------------------------------------------------


async def test_a_function_hash_must_be_the_digest_of_the_function(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    theirs = cloudpickle.dumps(abs)  # a colleague's function: its pickle, so its hash, is predictable
    mine = cloudpickle.dumps(str)
    r = await post_job(admin, job_header("squatter", mine, 1, fn_hash=hashlib.sha256(theirs).hexdigest()),
                       [mine, pickle.dumps([1])])  # fmt: skip
    assert r.status_code == 400 and "function_hash" in r.json()["error"]["message"]
    assert await run_job(daemon, admin, "colleague", abs, [-1, -2, -3]) == [1, 2, 3]


async def test_a_blob_must_match_its_digest(admin: httpx.AsyncClient, daemon: Running) -> None:
    digest = hashlib.sha256(b"the real manifest").hexdigest()
    r = await admin.put(f"/v1/blobs/{digest}", content=b"something else")
    assert r.status_code == 400 and "digest" in r.json()["error"]["message"]
    assert not daemon.plane.has_blob(digest)


# ---- 3 and 7. numbers, types and shapes -------------------------------------------------


def raw_envelope(header_json: bytes, blobs: list[bytes]) -> bytes:
    """An envelope around JSON written by hand (Python's json would not write Infinity inside a string)."""
    head = envelope.pack({}, blobs)
    lengths_and_blobs = head[8 + 2 :]  # after MAGIC, the u32 length and "{}"
    return envelope.MAGIC + len(header_json).to_bytes(4, "little") + header_json + lengths_and_blobs


@pytest.mark.parametrize(
    ("count", "field"),
    [(b"Infinity", "Infinity"), (b"NaN", "NaN"), (b"1e400", "overflows"), (str(10**30).encode(), "count")],
)
async def test_an_absurd_count_is_refused_and_poisons_nothing(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient, count: bytes, field: str
) -> None:
    fn = cloudpickle.dumps(abs)
    spec = json.dumps(m.JobSpec("absurd", "f", hashlib.sha256(fn).hexdigest(), PY).to_wire()).encode()
    header = (
        b'{"spec": ' + spec + b', "batches": [{"seq": 0, "start": 0, "count": ' + count + b'}], "final_count": null}'
    )
    r = await admin.post("/v1/jobs", content=raw_envelope(header, [fn, pickle.dumps([1])]),
                         headers={"content-type": envelope.CONTENT_TYPE})  # fmt: skip
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert not daemon.plane.store.job_exists("absurd")
    assert await run_job(daemon, admin, "after", abs, [-1, -2]) == [1, 2]


BAD_SPECS = [
    ({"job_id": 12}, "JobSpec.job_id"),
    ({"job_id": ["a"]}, "JobSpec.job_id"),
    ({"func_cpu": "2"}, "JobSpec.func_cpu"),
    ({"func_cpu": [1]}, "JobSpec.func_cpu"),
    ({"func_ram": -1}, "JobSpec.func_ram"),
    ({"max_parallelism": 1.5}, "JobSpec.max_parallelism"),
    ({"max_parallelism": 10**30}, "JobSpec.max_parallelism"),
    ({"image": None}, "JobSpec.image"),
    ({"function_hash": None}, "JobSpec.function_hash"),
    ({"function_hash": True}, "JobSpec.function_hash"),
    ({"env": "../../etc"}, "JobSpec.env"),
    ({"python_version": "3.11; rm -rf /"}, "JobSpec.python_version"),
]


@pytest.mark.parametrize(("change", "field"), BAD_SPECS, ids=[str(c) for c, _ in BAD_SPECS])
async def test_a_malformed_job_spec_gets_a_400_naming_the_field(
    daemon: Running, admin: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    fn = cloudpickle.dumps(abs)
    header = job_header("malformed", fn, 1)
    header["spec"] |= change
    r = await post_job(admin, header, [fn, pickle.dumps([1])])
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]
    assert daemon.plane.store.conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("batch", "field"),
    [({"seq": "a", "start": 0, "count": 1}, "BatchMeta.seq"), ({"seq": 0, "start": -5, "count": 1}, "BatchMeta.start"),
     ({"seq": 0, "start": 0, "count": 0}, "BatchMeta.count"), ("x", "BatchMeta")],
)  # fmt: skip
async def test_a_malformed_batch_is_refused(daemon: Running, admin: httpx.AsyncClient, batch: Any, field: str) -> None:
    fn = cloudpickle.dumps(abs)
    header = job_header("badbatch", fn, 1) | {"batches": [batch]}
    r = await post_job(admin, header, [fn, pickle.dumps([1])])
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert not daemon.plane.store.job_exists("badbatch")


@pytest.mark.parametrize("body", [b"[]", b"null", b"42", b'"reason"', b'{"reason": 7}', b"[" * 100_000])
async def test_a_malformed_cancel_body_is_refused(daemon: Running, admin: httpx.AsyncClient, body: bytes) -> None:
    r = await admin.post("/v1/jobs/somejob/cancel", content=body)
    assert r.status_code == 400, r.text


async def test_deeply_nested_json_is_refused(admin: httpx.AsyncClient) -> None:
    r = await admin.post("/v1/blobs/missing", content=b'{"digests": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [({"cpus": "a"}, "NodeInfo.cpus"), ({"workers": 1e400}, "overflows"), ({"ram_bytes": 10**30}, "NodeInfo.ram_bytes"),
     ({"node_id": "../n"}, "NodeInfo.node_id"), ({"gpus": "A100"}, "NodeInfo.gpus")],
)  # fmt: skip
async def test_a_malformed_registration_is_refused(daemon: Running, change: dict[str, Any], field: str) -> None:
    info = node_info("n1", "h", 2, 10**9, PY, 2).to_wire() | change
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {daemon.node_token}"}) as c:
        body = json.dumps(info).replace("Infinity", "1e400").encode()
        r = await c.post("/v1/agents/register", content=body)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert not daemon.plane.scheduler.nodes


async def test_a_report_with_bad_types_stalls_nothing(daemon: Running, agent: Agent, admin: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, headers=agent.agent_auth) as c:
        for header in ({"ready_workers": "5"}, {"running": ["a"]}, {"ack_delivery": 1.5}, {"results": [{}]}):
            body = envelope.pack({"boot_id": daemon.plane.boot_id} | header)
            r = await c.post(f"/v1/agents/{agent.agent_id}/report", content=body,
                             headers={"content-type": envelope.CONTENT_TYPE})  # fmt: skip
            assert r.status_code == 400, r.text
    assert await run_job(daemon, admin, "still-runs", abs, [-3]) == [3]


@pytest.mark.parametrize(
    "message",
    [{"op": "subscribe", "job": "j", "after": 1e400}, {"op": "subscribe", "job": "j", "after": "a"},
     {"op": "subscribe", "job": "j", "after": -1}, {"op": "drop", "job": "j"}, {"op": "ack"}, ["op"], "x"],
)  # fmt: skip
async def test_a_malformed_websocket_message_gets_an_error_and_the_socket_lives(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient, message: Any
) -> None:
    text = json.dumps(message).replace("Infinity", "1e400")
    async with aconnect_ws(f"{daemon.url}/v1/events", headers={"authorization": f"Bearer {daemon.admin_token}"}) as ws:
        await ws.send_text(text)
        reply = envelope.unpack(await ws.receive_bytes())[0]
        assert reply["error"]["code"] == "bad_request"
        await ws.send_text("[" * 50_000)
        reply = envelope.unpack(await ws.receive_bytes())[0]
        assert reply["error"]["code"] == "bad_request"
        await run_job(daemon, admin, "followed", abs, [-1])
        await ws.send_text(json.dumps({"op": "subscribe", "job": "followed", "after": 0}))
        with trio.fail_after(10):
            reply = envelope.unpack(await ws.receive_bytes())[0]
    assert reply["job_id"] == "followed" and "error" not in reply


# ---- 4. results are never lost -----------------------------------------------------------


async def test_a_report_naming_a_missing_blob_changes_nothing(daemon: Running, admin: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {daemon.node_token}"}) as c:
        info = node_info("fake-node", "h", 2, 64 * 10**9, PY, 2)
        registered = (await c.post("/v1/agents/register", json=info.to_wire())).json()
        agent_id = registered["agent_id"]
        c.headers["authorization"] = f"Bearer {registered['agent_token']}"  # its own token from now on
        fn = cloudpickle.dumps(abs)
        r = await post_job(admin, job_header("lossy", fn, 4), [fn, pickle.dumps([1, 2, 3, 4])])
        assert r.status_code == 200, r.text
        report = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2)
        headers = {"content-type": envelope.CONTENT_TYPE}
        r = await c.post(f"/v1/agents/{agent_id}/report", content=envelope.pack(report.to_wire()), headers=headers)
        leases = m.Delivery.from_wire(envelope.unpack(r.content)[0]).leases
        assert leases
        lease = leases[0]
        result = m.LeaseResult(lease.lease_id, "lossy", lease.lo, lease.hi - lease.lo, 0.01, results_blob=3)
        bad = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2, running=(lease.lease_id,), results=(result,))
        r = await c.post(f"/v1/agents/{agent_id}/report", content=envelope.pack(bad.to_wire(), [b"x"]), headers=headers)
        assert r.status_code == 400 and "results_blob" in r.json()["error"]["message"], r.text
        assert daemon.plane.job_status("lossy").n_done == 0  # the range is still pending
        values = pickle.dumps(list(range(lease.lo, lease.hi)))
        good = dataclasses_replace(bad, results=(dataclasses_replace(result, results_blob=0),))
        r = await c.post(f"/v1/agents/{agent_id}/report", content=envelope.pack(good.to_wire(), [values]),
                         headers=headers)  # fmt: skip
        assert r.status_code == 200
        assert daemon.plane.job_status("lossy").n_done == lease.hi - lease.lo


def dataclasses_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ---- 6. a lease that cannot run fails its job, saying why -------------------------------


async def test_a_job_whose_function_cannot_be_fetched_fails_with_the_reason(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    fn = cloudpickle.dumps(abs)
    daemon.plane.store.function_blob = lambda function_hash: None  # type: ignore[method-assign]  # lost
    r = await post_job(admin, job_header("nofunction", fn, 3), [fn, pickle.dumps([-1, -2, -3])])
    assert r.status_code == 200, r.text
    with trio.fail_after(20):
        while daemon.plane.job_status("nofunction").state == m.RUNNING:
            await trio.sleep(0.02)
    assert daemon.plane.job_status("nofunction").state == m.JOB_FAILED
    failed = [e for e, _ in daemon.plane.store.events_after("nofunction", 0) if e.kind == m.FAILED]
    assert "cannot run inputs" in failed[0].data["message"] and "functions/" in failed[0].data["message"]
    assert daemon.plane.counters["leases_lost"] == 0  # reported, not dropped and requeued
    assert agent.workers.counters["leases_unrunnable"] >= 1


# ---- 8. secrets are for the daemon's user only --------------------------------------------


async def test_the_state_dir_and_every_file_in_it_are_private(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    await run_job(daemon, admin, "private", abs, [-1])  # the WAL has been written
    state = Path(daemon.state_dir)
    assert state.stat().st_mode & 0o777 == 0o700
    for name in ("burla.db", "burla.db-wal", "burla.db-shm", "tokens.json"):
        path = state / name
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o600, name


# ---- 5. an agent is itself, and no other ------------------------------------------------


async def register(daemon: Running, node_id: str, python: str = PY) -> httpx.AsyncClient:
    """A hand-driven agent: registered with the shared node token, speaking with its own from then on."""
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {daemon.node_token}"}) as c:
        info = node_info(node_id, node_id, 2, 64 * 10**9, python, 2)
        reg = (await c.post("/v1/agents/register", json=info.to_wire())).json()
    client = httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {reg['agent_token']}"})
    client.agent_id = reg["agent_id"]  # type: ignore[attr-defined]
    return client


async def agent_report(client: httpx.AsyncClient, daemon: Running, report: m.AgentReport, blobs: list[bytes] = (),
                       agent_id: str | None = None) -> httpx.Response:  # fmt: skip
    agent_id = agent_id or client.agent_id  # type: ignore[attr-defined]
    return await client.post(f"/v1/agents/{agent_id}/report", content=envelope.pack(report.to_wire(), list(blobs)),
                             headers={"content-type": envelope.CONTENT_TYPE})  # fmt: skip


async def test_an_agent_cannot_act_as_another(daemon: Running, admin: httpx.AsyncClient) -> None:
    # the impostor's workers run another Python: the scheduler never gives it a lease of the job
    owner, impostor = await register(daemon, "owner"), await register(daemon, "impostor", python="3.99")
    async with owner, impostor:
        fn = cloudpickle.dumps(abs)
        fn_hash = hashlib.sha256(fn).hexdigest()
        assert (
            await post_job(admin, job_header("owned", fn, 4), [fn, pickle.dumps([-1, -2, -3, -4])])
        ).status_code == 200
        idle = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2)
        # the impostor, with its own valid token, polls and fetches as the owner: refused
        assert (await agent_report(impostor, daemon, idle, agent_id=owner.agent_id)).status_code == 401  # type: ignore[attr-defined]
        delivered = m.Delivery.from_wire(envelope.unpack((await agent_report(owner, daemon, idle)).content)[0])
        owned = [lease for lease in delivered.leases if lease.job_id == "owned"]
        assert owned
        # results for the owner's lease, and for a lease never issued, with a forged pickled value
        forged = pickle.dumps(["forged"])
        for lease_id in (owned[0].lease_id, 10**6):
            result = m.LeaseResult(lease_id, "owned", owned[0].lo, 1, 0.01, 0)
            report = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2, results=(result,))
            assert (await agent_report(impostor, daemon, report, [forged])).status_code == 200
        assert daemon.plane.job_status("owned").n_done == 0
        # the owner's function and inputs are not the impostor's to read
        me = impostor.agent_id  # type: ignore[attr-defined]
        assert (await impostor.get(f"/v1/agents/{me}/functions/{fn_hash}")).status_code == 403
        assert (await impostor.get(f"/v1/agents/{me}/batches/owned/0")).status_code == 403
        assert (await owner.get(f"/v1/agents/{owner.agent_id}/functions/{fn_hash}")).content == fn  # type: ignore[attr-defined]
        # nor is the owner's job the impostor's to fail
        error = m.PoolError("owned", "", "forged install error", kind="install")
        report = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2, pool_errors=(error,))
        assert (await agent_report(impostor, daemon, report)).status_code == 200
        assert daemon.plane.job_status("owned").state == m.RUNNING
        assert daemon.plane.counters["reports_refused"] >= 1
        # the owner's own results are taken, and the job's values are the real ones
        results = [m.LeaseResult(x.lease_id, "owned", x.lo, x.hi - x.lo, 0.01, i) for i, x in enumerate(owned)]
        values = [pickle.dumps([abs(v) for v in [-1, -2, -3, -4][x.lo : x.hi]]) for x in owned]
        report = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2, running=(), results=tuple(results))
        assert (await agent_report(owner, daemon, report, values)).status_code == 200
        events = daemon.plane.store.events_after("owned", 0)
        assert all(pickle.loads(p) != ["forged"] for e, p in events if e.kind == m.RESULTS)
        assert daemon.plane.job_status("owned").n_done == sum(x.hi - x.lo for x in owned)


async def test_the_shared_node_token_only_registers(daemon: Running, agent: Agent) -> None:
    async with httpx.AsyncClient(base_url=daemon.url, headers={"authorization": f"Bearer {daemon.node_token}"}) as c:
        idle = envelope.pack(m.AgentReport(boot_id=daemon.plane.boot_id).to_wire())
        r = await c.post(
            f"/v1/agents/{agent.agent_id}/poll", content=idle, headers={"content-type": envelope.CONTENT_TYPE}
        )
        assert r.status_code == 401


async def test_sqlite_keeps_only_hashes_of_the_tokens(daemon: Running, admin: httpx.AsyncClient) -> None:
    rows = dict(daemon.plane.store.conn.execute("SELECT role, token FROM tokens WHERE role IN ('admin', 'node')"))
    assert set(rows) == {"admin", "node"}
    assert all(value.startswith("sha256:") for value in rows.values())
    raw = Path(daemon.state_dir, "burla.db").read_bytes() + Path(daemon.state_dir, "burla.db-wal").read_bytes()
    assert daemon.admin_token.encode() not in raw and daemon.node_token.encode() not in raw
    assert (await admin.get("/v1/info")).status_code == 200  # checked against the hash
    assert json.loads(Path(daemon.state_dir, "tokens.json").read_text())["admin"] == daemon.admin_token


def test_a_plaintext_token_of_an_older_daemon_is_hashed_and_still_works(tmp_path: Path) -> None:
    from burla.daemon.store import Store, hash_token

    store = Store(tmp_path / "burla.db")
    store.conn.execute("INSERT INTO tokens (role, token) VALUES ('admin', 'old-plain-token')")
    assert store.tokens()["admin"] == "old-plain-token"
    assert store.token_hashes()["admin"] == hash_token("old-plain-token")
    reopened = Store(tmp_path / "burla.db")
    assert "admin" not in reopened.tokens()  # the plaintext is gone from SQLite for good...
    assert reopened.tokens(known={"admin": "old-plain-token"})["admin"] == "old-plain-token"  # ...tokens.json has it
    assert "admin" not in reopened.tokens(known={"admin": "a forged one"})


async def test_an_agent_runs_no_function_whose_bytes_are_not_its_digest(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    """As if the daemon's copy were swapped: the agent checks what it is sent, in a delivery or fetched."""
    fn = cloudpickle.dumps(abs)
    daemon.plane.store.function_blob = lambda function_hash: cloudpickle.dumps(str)  # type: ignore[method-assign]
    r = await post_job(admin, job_header("swapped", fn, 2), [fn, pickle.dumps([-1, -2])])
    assert r.status_code == 200, r.text
    with trio.fail_after(20):
        while daemon.plane.job_status("swapped").state == m.RUNNING:
            await trio.sleep(0.02)
    failed = [e for e, _ in daemon.plane.store.events_after("swapped", 0) if e.kind == m.FAILED]
    assert failed and "not its sha256" in failed[0].data["message"]
    assert not [e for e, _ in daemon.plane.store.events_after("swapped", 0) if e.kind == m.RESULTS]


async def test_a_result_counts_only_for_its_own_leases_job_and_range(daemon: Running, admin: httpx.AsyncClient) -> None:
    """An agent that holds one lease cannot use it to complete another job, or more of its job than the lease."""
    agent = await register(daemon, "holder")
    async with agent:
        fn = cloudpickle.dumps(abs)
        for job in ("mine", "other"):
            r = await post_job(admin, job_header(job, fn, 10), [fn, pickle.dumps(list(range(-10, 0)))])
            assert r.status_code == 200, r.text
        idle = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2)
        delivered = m.Delivery.from_wire(envelope.unpack((await agent_report(agent, daemon, idle)).content)[0])
        lease = next(x for x in delivered.leases if x.job_id == "mine")
        forged = pickle.dumps(["forged"] * 10)
        for result in (
            m.LeaseResult(lease.lease_id, "other", 0, 10, 0.01, 0),  # another job's inputs
            m.LeaseResult(lease.lease_id, "mine", lease.lo, 10, 0.01, 0),  # past its lease's end
            m.LeaseResult(lease.lease_id, "mine", lease.lo, 0, 0.01, 0, m.CallError(9, m.EXCEPTION, "x", "y")),
        ):
            report = m.AgentReport(boot_id=daemon.plane.boot_id, ready_workers=2, running=(lease.lease_id,),
                                   results=(result,))  # fmt: skip
            assert (await agent_report(agent, daemon, report, [forged])).status_code == 200
        assert daemon.plane.job_status("other").n_done == 0 and daemon.plane.job_status("mine").n_done == 0
        assert daemon.plane.job_status("mine").state == m.RUNNING
        assert daemon.plane.counters["reports_refused"] >= 3


async def test_an_exception_with_a_huge_message_fails_its_job_and_hangs_nothing(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient
) -> None:
    def shout(x: int) -> None:
        raise ValueError("x" * (3 * 1024**2))  # over CallError.message's bound on the wire

    fn = cloudpickle.dumps(shout)
    r = await post_job(admin, job_header("loud", fn, 1), [fn, pickle.dumps([1])])
    assert r.status_code == 200, r.text
    with trio.fail_after(20):  # before: the report was refused (400) and sent again forever
        while daemon.plane.job_status("loud").state == m.RUNNING:
            await trio.sleep(0.02)
    failed = [e for e, _ in daemon.plane.store.events_after("loud", 0) if e.kind == m.FAILED]
    assert "characters left out" in failed[0].data["message"] and len(failed[0].data["message"]) <= m.MAX_ERROR_MESSAGE


async def test_a_report_the_daemon_refuses_is_not_sent_again_forever(
    daemon: Running, agent: Agent, admin: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the reason, a 400 for a report of results becomes a failure of those inputs, not a retry loop."""
    from burla.daemon.errors import BadRequest

    real = daemon.plane.report
    refused: list[int] = []

    def refusing(agent_id: str, report: m.AgentReport, blobs: Any) -> Any:
        if any(r.job_id == "refused" and r.error is None for r in report.results):
            refused.append(1)
            raise BadRequest("results[0]: refused by this test")
        return real(agent_id, report, blobs)

    monkeypatch.setattr(daemon.plane, "report", refusing)
    fn = cloudpickle.dumps(abs)
    assert (await post_job(admin, job_header("refused", fn, 2), [fn, pickle.dumps([-1, -2])])).status_code == 200
    with trio.fail_after(20):
        while daemon.plane.job_status("refused").state == m.RUNNING:
            await trio.sleep(0.02)
    failed = [e for e, _ in daemon.plane.store.events_after("refused", 0) if e.kind == m.FAILED]
    assert "the daemon refused this result" in failed[0].data["message"]
    assert len(refused) <= 2

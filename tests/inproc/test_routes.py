"""Every route of burlad, called with every kind of token, against the one table of who may call it.

A route added without an entry in `ROUTE_ROLES` fails `create_app` (so every test), and its entry is
checked here: a token its role does not admit is answered before the route runs, 401 (not a token of
that role) or 403 (a user's valid key on an admin's route).
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from httpx_ws import WebSocketUpgradeError, aconnect_ws

import burla
from burla.common.config import ClusterConfig
from burla.daemon.app import ADMIN, AGENT, INSTANCE, NODE, PUBLIC, ROUTE_ROLES, USER, create_app
from burla.daemon.node_keeper import MemoryBook, NodeKeeper, NodeRecord, NodeState
from burla.daemon.providers import LocalProvider
from burla.daemon.server import Running
from burla.daemon.store import hash_token
from burla.schemas import messages as m

# which token kinds each role admits: the admin token also registers agents (burlad's own local cluster)
# and a cluster node's instance token registers its agent and reports its failed boot, nothing else.
# "user" is a user's API key, "admin-user" an admin user's, "revoked" a user's key after revocation.
TOKENS = ("none", "wrong", "admin", "user", "admin-user", "revoked", "node", "agent", "other-agent", "instance")
ADMITS = {PUBLIC: set(TOKENS), USER: {"admin", "user", "admin-user"}, ADMIN: {"admin", "admin-user"},
          NODE: {"admin", "node", "instance"}, AGENT: {"agent"}, INSTANCE: {"instance"}}  # fmt: skip


def rules(daemon: Running) -> list[tuple[str, str, str]]:
    """(endpoint, method, path with its parameters filled) of every route of the app."""
    app = create_app(daemon.plane)
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda mo: "0" if mo.group(1) == "seq" else "0" * 64 if mo.group(1) in
                      ("digest", "function_hash") else "AGENT" if mo.group(1) == "agent_id" else "somejob", rule.rule)  # fmt: skip
        methods = sorted((rule.methods or {"GET"}) - {"HEAD", "OPTIONS"}) or ["GET"]
        out.extend((rule.endpoint, method, path) for method in methods)
    return out


def test_the_table_is_the_one_reviewed() -> None:
    """Who may call what is a security decision: changing it means changing this test too."""
    assert ROUTE_ROLES == {
        "health": PUBLIC,
        **dict.fromkeys(["info", "me", "create_job", "add_inputs", "cancel_job", "ack_job", "job_status",
                         "event_payload", "put_blob", "missing_blobs", "cluster", "events", "list_jobs", "job_logs"],
                        USER),
        **dict.fromkeys(["set_standby", "cluster_nodes", "cluster_action", "get_cluster_spec", "put_cluster_spec",
                         "list_users", "add_user", "remove_user", "rotate_key", "revoke_key"], ADMIN),
        **dict.fromkeys(["get_standby", "register"], NODE),
        **dict.fromkeys(["poll", "report", "function", "batch", "agent_blob"], AGENT),
        "boot_failed": INSTANCE,
        **dict.fromkeys(["dist_index", "dist_file"], PUBLIC),
    }  # fmt: skip


async def test_every_route_answers_each_token_as_the_table_says(daemon: Running, tmp_path: Path) -> None:
    plane = daemon.plane
    keeper = NodeKeeper(ClusterConfig(provider="local"), LocalProvider(tmp_path, "t"), MemoryBook(), daemon.url,
                        burla.__version__, hash_token)  # fmt: skip
    instance_token = "burla_instance_routes"
    keeper.records["somejob"] = NodeRecord("somejob", 0, NodeState.BOOTING, 0.0, token_hash=hash_token(instance_token))
    plane.keeper = keeper
    async with httpx.AsyncClient(base_url=daemon.url, timeout=10) as c:
        info = m.NodeInfo("routes", "h", 1, 10**9, "3.99", 1, agent_version=burla.__version__,
                          protocol=m.PROTOCOL_VERSION).to_wire()  # fmt: skip
        headers = {"authorization": f"Bearer {daemon.node_token}"}
        agent = (await c.post("/v1/agents/register", json=info, headers=headers)).json()
        other = (await c.post("/v1/agents/register", json=info | {"node_id": "other"}, headers=headers)).json()
        users = plane.users
        revoked = users.add("gone", "user")
        users.revoke("gone")
        tokens = {"none": None, "wrong": "not-a-token", "admin": daemon.admin_token, "node": daemon.node_token,
                  "user": users.add("alice", "user"), "admin-user": users.add("root2", "admin"), "revoked": revoked,
                  "agent": agent["agent_token"], "other-agent": other["agent_token"], "instance": instance_token}  # fmt: skip
        walked = set()
        for endpoint, method, path in rules(daemon):
            path = path.replace("AGENT", agent["agent_id"])
            role = ROUTE_ROLES[endpoint]
            walked.add(endpoint)
            for kind in TOKENS:
                token = tokens[kind]
                h = {"authorization": f"Bearer {token}"} if token else {}
                if endpoint == "events":
                    try:
                        async with aconnect_ws(f"{daemon.url}{path}", c, headers=h):
                            status, text = 101, ""
                    except WebSocketUpgradeError as e:
                        status, text = e.response.status_code, ""  # a user route: no admin's 403 to tell apart
                else:
                    r = await c.request(method, path.replace("somejob", "nobody") if "users" in path else path,
                                        headers=h, content=b"{}")  # fmt: skip
                    status, text = r.status_code, r.text
                refused = status == 401 or (status == 403 and "is not an admin of this cluster" in text)
                admitted = kind in ADMITS[role]
                assert refused != admitted, (
                    f"{method} {path} with the {kind} token: {status} {text[:200]} ({role} route)"
                )
        assert walked == set(ROUTE_ROLES)


@pytest.mark.parametrize("role", sorted(ADMITS))
def test_each_role_is_admitted_by_some_token(role: str) -> None:
    assert ADMITS[role]

"""Malformed requests for every route of burlad and its websocket, made by hypothesis.

Shared by the CI suite (tests/e2e/test_fuzz.py: a fixed, derandomized corpus of about 1,500 requests)
and the long run in the benchmarks (bench/fuzz_long.py). Each request goes to a real `burlad serve`
with the admin token, a user's API key, an admin user's, the node token, an agent's token, a wrong
token, or none. What must hold:
no 5xx, an answer within `ANSWER_SECONDS`, no file written outside the state dir (every path-like
value carries `ESCAPE_MARK`, so an escaped write is found by name), and afterwards the daemon still
runs a normal job to exactly-once results.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pickle
import struct
import sys
import urllib.parse
from typing import Any

from hypothesis import strategies as st

import burla
from burla.schemas import envelope
from burla.schemas import messages as m

ANSWER_SECONDS = 10.0
ESCAPE_MARK = "burla-fuzz-escape"
PY = f"{sys.version_info[0]}.{sys.version_info[1]}"

# ---- values -----------------------------------------------------------------------------------

HOSTILE_STRINGS = [
    "", " ", "a" * 65, "a" * 5000, "../" * 8 + ESCAPE_MARK, f"/tmp/{ESCAPE_MARK}", f"..\\..\\{ESCAPE_MARK}",
    f"{ESCAPE_MARK}/../../..", "%2e%2e%2f" + ESCAPE_MARK, "\x00", "ñ" * 10, "\ud7ff", "NaN", "Infinity", "-1",
    "0" * 64, "f" * 64, "F" * 64, "g" * 64, "0" * 63, "3.11", "99.99", "process", "podman",
]  # fmt: skip
HOSTILE_NUMBERS = [
    0, 1, -1, 2, 10**6, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 0.5, -0.0, 1e308, 1e-300,
    1.5, 3.0,
]  # fmt: skip
# JSON texts Python's json would not write: tokens only a hostile peer sends
RAW_NUMBERS = ["Infinity", "-Infinity", "NaN", "1e400", "-1e400", "1" + "0" * 5000, "1e-400"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(HOSTILE_NUMBERS),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(HOSTILE_STRINGS),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def valid_messages() -> dict[str, dict[str, Any]]:
    """One well-formed instance of each message a peer sends, for mutation."""
    fn = pickle.dumps(abs)
    return {
        "JobSpec": m.JobSpec(
            "fuzzjob",
            "abs",
            hashlib.sha256(fn).hexdigest(),
            PY,
            timeout=5.0,
            retries=2,
            retry_on=("builtins.ValueError",),
            retry_delay=0.5,
            return_exceptions=True,
            detach=True,
        ).to_wire(),  # fmt: skip
        "BatchMeta": m.BatchMeta(0, 0, 3).to_wire(),
        "NodeInfo": m.NodeInfo(
            "fuzznode", "h", 2, 10**9, PY, 2, agent_version=burla.__version__, protocol=m.PROTOCOL_VERSION
        ).to_wire(),  # fmt: skip
        "AgentReport": m.AgentReport(
            ready_workers=2,
            running=(1, 2),
            results=(
                m.LeaseResult(1, "fuzzjob", 0, 3, 0.01, 0),
                m.LeaseResult(
                    2,
                    "fuzzjob",
                    3,
                    0,
                    0.01,
                    0,
                    m.CallError(3, "exception", "builtins.ValueError", "x", bases=("builtins.ValueError",)),
                ),
            ),
            logs=(m.LogChunk("fuzzjob", 1, 4, 1),),
            pools=(m.PoolState("process"),),
            pool_errors=(m.PoolError("fuzzjob", "img", "broken"),),
        ).to_wire(),
        "StandbyImage": m.StandbyImage("localhost/x:1", PY, 1.0).to_wire(),
        "ClusterSpec": m.ClusterSpec(groups=(m.NodeGroup("e2-standard-2"),)).to_wire(),
    }


@st.composite
def mutated(draw: st.DrawFn, message: dict[str, Any]) -> Any:
    """A valid message with a few fields replaced, removed or added, at any depth."""
    value: Any = json.loads(json.dumps(message))
    for _ in range(draw(st.integers(1, 3))):
        value = _mutate(draw, value)
    return value


def _mutate(draw: st.DrawFn, value: Any) -> Any:
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        action = draw(st.sampled_from(["replace", "delete", "deeper"]))
        if action == "replace":
            value[key] = draw(json_values)
        elif action == "delete":
            del value[key]
        else:
            value[key] = _mutate(draw, value[key])
        return value
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        value[i] = _mutate(draw, value[i])
        return value
    if isinstance(value, dict) and draw(st.booleans()):
        value[draw(st.text(max_size=10))] = draw(json_values)
        return value
    return draw(json_values)


def raw_json(value: Any, draw: st.DrawFn) -> bytes:
    """`value` as JSON, sometimes with a number replaced by a token Python would never write."""
    text = json.dumps(value)
    if draw(st.booleans()):
        for token in ("0", "1", "2", "3"):
            if token in text:
                text = text.replace(token, draw(st.sampled_from(RAW_NUMBERS)), 1)
                break
    if draw(st.integers(0, 20)) == 0:
        depth = draw(st.sampled_from([40, 1000, 100_000]))
        text = "[" * depth + text + "]" * depth
    return text.encode()


@st.composite
def envelopes(draw: st.DrawFn, header: Any) -> bytes:
    """An envelope around `header`, or bytes that only look like one."""
    blobs = draw(st.lists(st.binary(max_size=64), max_size=3))
    head = raw_json(header, draw)
    kind = draw(st.sampled_from(["good", "good", "good", "truncated", "bad-magic", "long-count", "trailing"]))
    body = envelope.MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", len(blobs))
    body += struct.pack(f"<{len(blobs)}Q", *(len(b) for b in blobs)) + b"".join(blobs)
    if kind == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif kind == "bad-magic":
        body = b"XXXX" + body[4:]
    elif kind == "long-count":
        body = body[: 8 + len(head)] + struct.pack("<I", 2**31) + body[12 + len(head) :]
    elif kind == "trailing":
        body += b"\x00" * draw(st.integers(1, 16))
    return body


AGENT = "FUZZ-AGENT"  # stands for the id of an agent the run registered (see tests/e2e/test_fuzz.py)
ids = st.one_of(st.sampled_from(["fuzzjob", "fuzznode", "a", "0" * 64, "x" * 64, AGENT, AGENT, AGENT]), st.sampled_from(HOSTILE_STRINGS),
                st.text(alphabet=st.characters(codec="ascii"), max_size=70))  # fmt: skip


def quoted(value: str) -> str:
    """A path segment: every byte that is not plainly safe goes %-escaped (a "/" too, so ids stay one segment)."""
    return urllib.parse.quote(value, safe="") or "%20"


# ---- requests ---------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/health"),
    ("GET", "/v1/info"),
    ("POST", "/v1/jobs"),
    ("POST", "/v1/jobs/{job}/inputs"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("POST", "/v1/jobs/{job}/ack"),
    ("GET", "/v1/jobs/{job}"),
    ("GET", "/v1/jobs/{job}/events/{seq}/payload"),
    ("GET", "/v1/jobs{query}"),
    ("GET", "/v1/jobs/{job}/logs{query}"),
    ("PUT", "/v1/blobs/{digest}"),
    ("POST", "/v1/blobs/missing"),
    ("GET", "/v1/cluster"),
    ("GET", "/v1/standby"),
    ("PUT", "/v1/standby"),
    ("POST", "/v1/agents/register"),
    ("POST", "/v1/agents/{agent}/poll"),
    ("POST", "/v1/agents/{agent}/report"),
    ("GET", "/v1/agents/{agent}/functions/{digest}"),
    ("GET", "/v1/agents/{agent}/batches/{job}/{seq}"),
    ("GET", "/v1/agents/{agent}/blobs/{digest}"),
    ("GET", "/v1/me"),
    ("GET", "/v1/users"),
    ("POST", "/v1/users"),
    ("DELETE", "/v1/users/{name}"),
    ("POST", "/v1/users/{name}/key"),
    ("DELETE", "/v1/users/{name}/key"),
    ("GET", "/v1/cluster/nodes"),
    ("GET", "/v1/cluster/spec"),
    ("PUT", "/v1/cluster/spec"),
    ("POST", "/v1/cluster/{action}"),
    ("POST", "/v1/nodes/{name}/boot-failed"),
]
ADMIN_ROUTES = ("/v1/standby", "/v1/users", "/v1/cluster/")  # prefixes of the admin's routes (but GET /v1/standby)


NUMBERS_IN_QUERIES = ["0", "1", "0.2", "-1", "1e400", "nan", "inf", "-0", "9" * 30, "0x10", "", "a", "1_0", " 1"]


@st.composite
def queries(draw: st.DrawFn) -> str:
    """A query string of `after`, `wait` and `limit`, mostly malformed (never a wait long enough to stall a run)."""
    names = draw(st.lists(st.sampled_from(["after", "wait", "limit", "other", ""]), max_size=3))
    values = st.one_of(st.sampled_from(NUMBERS_IN_QUERIES), st.sampled_from(HOSTILE_STRINGS), st.text(max_size=20))
    pairs = [(name, draw(values)) for name in names]
    return "?" + urllib.parse.urlencode(pairs) if pairs else ""


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """One request: a route, a token role, path parameters and a body, most of them malformed."""
    method, template = draw(st.sampled_from(ROUTES))
    valid = valid_messages()
    params = {
        "job": quoted(draw(ids)),
        "agent": quoted(draw(ids)),
        "digest": quoted(draw(ids)),
        "seq": draw(st.sampled_from(["0", "1", "-1", "a", str(2**64), "9" * 30])),
        "name": quoted(draw(st.one_of(ids, st.sampled_from(["Alice", "a" * 41, "fuzz-victim", "admin"])))),
        "action": quoted(draw(st.one_of(ids, st.sampled_from(["start", "restart", "nope"])))),
        "query": draw(queries()),
    }
    path = template.format(**params)
    right = "user"
    if template == "/v1/agents/register" or template == "/v1/standby" and method == "GET":
        right = "node"
    elif "/agents/" in template:
        right = "agent"
    elif template.startswith(ADMIN_ROUTES):
        right = draw(st.sampled_from(["admin", "admin-user"]))
    # mostly the token the route takes, so most requests reach its checks; the others must be refused
    role = draw(st.sampled_from([right] * 6 + ["admin", "user", "admin-user", "node", "agent", "wrong", "none"]))
    body: bytes = b""
    content_type = "application/json"
    if template == "/v1/jobs":
        header = {"spec": valid["JobSpec"], "batches": [valid["BatchMeta"]], "final_count": 3}
        body = draw(envelopes(draw(mutated(header))))
        content_type = envelope.CONTENT_TYPE
    elif template.endswith("/inputs"):
        body = draw(envelopes(draw(mutated({"batches": [valid["BatchMeta"]], "final_count": None}))))
        content_type = envelope.CONTENT_TYPE
    elif template.endswith(("/poll", "/report")):
        body = draw(envelopes(draw(mutated(valid["AgentReport"]))))
        content_type = envelope.CONTENT_TYPE
    elif template.endswith("/register"):
        body = raw_json(draw(mutated(valid["NodeInfo"])), draw)
    elif template.endswith("/cancel"):
        body = raw_json(draw(st.one_of(json_values, mutated({"reason": "r"}))), draw)
    elif template == "/v1/blobs/missing":
        body = raw_json(draw(st.one_of(json_values, mutated({"digests": ["0" * 64]}))), draw)
    elif template == "/v1/standby" and method == "PUT":
        body = raw_json(draw(st.one_of(json_values, mutated({"images": [valid["StandbyImage"]]}))), draw)
    elif template == "/v1/users" and method == "POST":
        body = raw_json(draw(st.one_of(json_values, mutated({"name": "fuzzed", "role": "user"}))), draw)
    elif template == "/v1/cluster/spec" and method == "PUT":
        body = raw_json(draw(st.one_of(json_values, mutated(valid["ClusterSpec"]))), draw)
    elif template.endswith("/boot-failed"):
        body = raw_json(draw(st.one_of(json_values, mutated({"step": "s", "log": "l"}))), draw)
    elif method == "PUT":
        body = draw(st.binary(max_size=256))
        content_type = "application/octet-stream"
    if draw(st.integers(0, 10)) == 0:
        content_type = draw(st.sampled_from(["text/plain", "", envelope.CONTENT_TYPE, "application/json"]))
    return {"method": method, "template": template, "path": path, "role": role, "body": body, "type": content_type}


@st.composite
def websocket_creates(draw: st.DrawFn) -> bytes:
    """A create frame of the events websocket: the envelope of POST /v1/jobs, mostly malformed."""
    valid = valid_messages()
    header = {"spec": valid["JobSpec"], "batches": [valid["BatchMeta"]], "final_count": 3, "after": 0,
              "ack": ["fuzzjob", "x" * 65, 7]}  # fmt: skip
    return draw(envelopes(draw(mutated(header))))


websocket_messages = st.one_of(
    st.builds(lambda v: json.dumps(v), json_values),
    st.builds(lambda v: json.dumps(v), st.fixed_dictionaries(
        {"op": st.sampled_from(["subscribe", "ack", "unsubscribe", "other", ""]) | json_values,
         "job": ids | json_values},
        optional={"after": st.sampled_from(HOSTILE_NUMBERS) | json_values},
    )),
    st.sampled_from(['{"op": "subscribe", "job": "j", "after": 1e400}', "[" * 50_000, "{", "", "\x00" * 10]),
    st.text(max_size=200),
    websocket_creates(),
)  # fmt: skip


class Tally:
    """Requests by route and status, for the report."""

    def __init__(self) -> None:
        self.counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.slowest = 0.0

    def add(self, method: str, template: str, status: int, seconds: float) -> None:
        self.counts[(method, template, status)] += 1
        self.slowest = max(self.slowest, seconds)

    def total(self) -> int:
        return sum(self.counts.values())

    def table(self) -> str:
        by_route: dict[tuple[str, str], collections.Counter[int]] = collections.defaultdict(collections.Counter)
        for (method, template, status), n in self.counts.items():
            by_route[(method, template)][status] += n
        lines = [f"{'route':<48} {'requests':>8}  statuses"]
        for (method, template), statuses in sorted(by_route.items(), key=lambda kv: kv[0][1]):
            shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
            lines.append(f"{method + ' ' + template:<48} {sum(statuses.values()):>8}  {shown}")
        lines.append(f"{'total':<48} {self.total():>8}  slowest answer {self.slowest * 1000:.0f} ms")
        return "\n".join(lines)

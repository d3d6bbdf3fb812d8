"""burlad's HTTP and websocket API: thin quart-trio routes over `ControlPlane`.

Every route but ``/v1/health`` (and the wheels booting nodes install) needs a
bearer token, and `ROUTE_ROLES` says whose: a user's API key (or the admin
token) for client routes, where a user acts on their own jobs only; an admin's
for the cluster's settings and its users; the node token for registering, and
then each agent's own token. Bodies are envelopes (`burla.schemas.envelope`)
or JSON; malformed ones get a 400 that says what is wrong and never reach the
control plane.
"""

from __future__ import annotations

import hmac
import json
import logging
from pathlib import Path
from typing import Any

import trio
from quart import Response, g, request, websocket
from quart_trio import QuartTrio

from burla.schemas import envelope, wire
from burla.schemas import messages as m
from burla.schemas.wire import WireError

from . import bounds
from .cluster_link import ClusterAdmin
from .errors import ApiError, BadRequest, Forbidden, NotFound, Unauthorized
from .event_hub import EventHub, frame
from .ids import valid_digest, valid_id
from .scheduler import ATTEMPTS_KEPT
from .service import ControlPlane
from .store import hash_token
from .users import ADMIN as ADMIN_ROLE
from .users import BOOTSTRAP, KEY_PREFIX, BadTokens, Principal, UserAdmin, valid_name

log = logging.getLogger("burla.daemon")

PUBLIC = "public"  # anyone
USER = "user"  # any user's API key, or the admin token: a user acts on their own jobs only
ADMIN = "admin"  # an admin's API key, or the admin token: the cluster's settings, its users, every job
NODE = "node"  # the shared node token (or the admin token): agents register with it
AGENT = "agent"  # the agent named in the path, with its own token from registration
INSTANCE = "instance"  # a cluster node the daemon started, with the token made for that instance

# Who may call each route, by endpoint (the route function's name). One table, enforced in one hook
# (`authorize`); create_app refuses a route missing from it, and tests/inproc/test_routes.py
# walks every route with every kind of token against it.
ROUTE_ROLES: dict[str, str] = {
    "health": PUBLIC,
    "info": USER,
    "me": USER,
    "create_job": USER,
    "add_inputs": USER,
    "cancel_job": USER,
    "ack_job": USER,
    "job_status": USER,
    "event_payload": USER,
    "put_blob": USER,
    "missing_blobs": USER,
    "cluster": USER,
    "events": USER,
    "list_jobs": USER,  # a user's own jobs; an admin's, every job
    "job_logs": USER,
    "set_standby": ADMIN,
    "list_users": ADMIN,
    "add_user": ADMIN,
    "remove_user": ADMIN,
    "rotate_key": ADMIN,
    "revoke_key": ADMIN,
    "get_standby": NODE,
    "register": NODE,  # or a cluster node's instance token
    "boot_failed": INSTANCE,
    "dist_index": PUBLIC,  # Burla's own wheel (and the wheelhouse): nodes install it as they boot
    "dist_file": PUBLIC,
    "cluster_nodes": ADMIN,
    "get_cluster_spec": ADMIN,
    "put_cluster_spec": ADMIN,
    "cluster_action": ADMIN,
    "poll": AGENT,
    "report": AGENT,
    "function": AGENT,
    "batch": AGENT,
    "agent_blob": AGENT,
}


_DRAIN_BYTES = 16 * 1024**2  # an unread request body up to this size is read before answering


_CHUNK_BYTES = 1024**2  # of a streamed payload
_REASON_CHARS = 4096  # of a cancel's reason
_MAX_DIGESTS = 100_000  # in one POST /v1/blobs/missing
_MAX_LOGS_WAIT = 60.0  # seconds GET /v1/jobs/ID/logs may wait for new output
_MAX_LISTED = 1000  # jobs in one GET /v1/jobs


def query_number(args: Any, name: str, default: float, lo: float, hi: float, integer: bool = True) -> float:
    """A number of the query string, in [lo, hi]: a 400 naming it otherwise."""
    raw = args.get(name)
    if raw is None:
        return default
    what = "an integer" if integer else "a number"
    try:
        if len(raw) > 40:
            raise ValueError(raw)
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected {what} from {lo:g} to {hi:g}, got {raw[:40]!r}") from None
    if not lo <= value <= hi:  # NaN too
        raise BadRequest(f"{name}: expected {what} from {lo:g} to {hi:g}, got {raw[:40]!r}")
    return value


def bearer(headers: Any) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    return str(token)


def _stream(path: Path) -> Response:
    """A file as the body, read in chunks in a thread: never whole in memory, never blocking the loop."""
    size = path.stat().st_size

    async def chunks() -> Any:
        with open(path, "rb") as f:  # noqa: ASYNC230 - each read runs in a thread
            while chunk := await trio.to_thread.run_sync(f.read, _CHUNK_BYTES):
                yield chunk

    response = Response(chunks(), content_type="application/octet-stream")
    response.headers["content-length"] = str(size)
    return response


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def _envelope(header: dict[str, Any], blobs: list[bytes] | None = None) -> Response:
    return Response(envelope.pack(header, blobs or []), content_type=envelope.CONTENT_TYPE)


def create_app(plane: ControlPlane) -> QuartTrio:
    app = QuartTrio("burla.daemon")
    admin = ClusterAdmin(plane)
    user_admin = UserAdmin(plane)
    config = plane.config
    bad_tokens = BadTokens(config.bad_token_burst, config.bad_token_max_delay)
    bounds.install(app, config)  # each route's body limit; no stack trace in any answer
    app.config["RESPONSE_TIMEOUT"] = 600

    @app.before_request
    async def authorize_request() -> None:
        g.principal = await authorize(request.endpoint, request.headers, request.view_args or {}, request.remote_addr)

    @app.before_websocket
    async def authorize_websocket() -> None:
        g.principal = await authorize(
            websocket.endpoint, websocket.headers, websocket.view_args or {}, websocket.remote_addr
        )

    async def authorize(
        endpoint: str | None, headers: Any, view_args: dict[str, Any], address: str | None
    ) -> Principal | None:
        """The one place that says who may call a route: `ROUTE_ROLES`, by endpoint. Returns the user
        a client route acts for. An address that keeps sending bad tokens waits before each 401."""
        name = (endpoint or "").rpartition(".")[2]
        role = ROUTE_ROLES.get(name)
        if role is None or role == PUBLIC:
            return None  # PUBLIC, or no route matched: the router answers 404 or 405
        try:
            if role == AGENT:
                check_agent(headers, view_args.get("agent_id", ""))
            elif role == INSTANCE:
                check_instance(headers, view_args.get("name", ""))
            elif role == NODE:
                check_node(headers)
            else:
                return check_user(headers, role)
        except Unauthorized as e:
            delay = bad_tokens.failed(address or "")
            if delay:
                log.info("bad token from %s for %s: %s (answered after %.2f s)", address, name, e, delay)
                await trio.sleep(delay)
            raise
        return None

    def is_token(token: str, *roles: str) -> bool:
        """Is `token` the cluster's admin or node token (of one of `roles`)? Compared as hashes, in constant time."""
        presented = hash_token(token).encode()
        hashes = [plane.token_hashes.get(role, "") for role in roles]
        return any(hmac.compare_digest(presented, h.encode()) for h in hashes if h)

    def check_user(headers: Any, role: str) -> Principal:
        token = bearer(headers)
        if token.startswith(KEY_PREFIX):
            who = plane.users.authenticate(token)
        elif is_token(token, ADMIN):
            who = Principal(BOOTSTRAP, ADMIN_ROLE)
        else:
            raise Unauthorized(
                "this token is not an API key of this cluster: pass api_key=, set BURLA_API_KEY, or `burla login`"
            )
        if role == ADMIN and not who.admin:
            raise Forbidden(f"user {who.name} is not an admin of this cluster: this is the admin's to do")
        return who

    def check_node(headers: Any) -> None:
        token = bearer(headers)
        if is_token(token, ADMIN, NODE) or instance_of(token):
            return
        raise Unauthorized("this token is not valid for node routes of this cluster: give the agent the node token")

    def instance_of(token: str) -> str:
        """The cluster node this token was made for ("": none)."""
        keeper = plane.keeper
        return (keeper.instance_of(token) or "") if keeper is not None else ""

    def check_instance(headers: Any, name: str) -> None:
        if not name or instance_of(bearer(headers)) != name:
            raise Unauthorized(f"this token is not instance {name[:64]!r}'s")

    def check_agent(headers: Any, agent_id: str) -> None:
        """An agent's own routes take its own token (from its registration), and no other's."""
        valid_id(agent_id, "agent id")
        if not plane.is_agent(agent_id, bearer(headers)):
            raise Unauthorized(f"this token is not agent {agent_id}'s: register to get its own")

    def caller() -> Principal:
        """The user a client route acts for (`authorize` found them), checked again: a route calls this
        once it has read its body, which may take long enough for the key to end meanwhile."""
        who = g.get("principal")
        assert isinstance(who, Principal)
        return plane.users.current(who)

    async def body() -> bytes:
        g.body_read = True
        data = await request.get_data(cache=False, as_text=False)
        return data if isinstance(data, bytes) else data.encode()

    async def read_envelope() -> tuple[dict[str, Any], list[memoryview]]:
        if request.content_type != envelope.CONTENT_TYPE:
            raise BadRequest(f"expected a body of type {envelope.CONTENT_TYPE}")
        return envelope.unpack(await body())

    async def read_json() -> Any:
        data = await body()
        try:
            return wire.loads(data or b"{}")
        except WireError as e:
            raise BadRequest(f"body: {e}") from None

    async def read_object() -> dict[str, Any]:
        value = await read_json()
        if not isinstance(value, dict):
            raise BadRequest(f"body: expected a JSON object, got {type(value).__name__}")
        return value

    def blobs_at(blobs: list[memoryview], index: Any, what: str) -> memoryview:
        if not isinstance(index, int) or not 0 <= index < len(blobs):
            raise BadRequest(f"{what}: no blob {index!r} in the body")
        return blobs[index]

    def batches_of(
        header: dict[str, Any], blobs: list[memoryview], first_blob: int
    ) -> list[tuple[m.BatchMeta, memoryview | None]]:
        metas = header.get("batches", [])
        if not isinstance(metas, list):
            raise BadRequest("batches: expected a list")
        if len(metas) > 10_000:
            raise BadRequest("batches: more than 10000 in one request")
        out: list[tuple[m.BatchMeta, memoryview | None]] = []
        next_blob = first_blob
        for i, item in enumerate(metas):
            meta = m.BatchMeta.from_wire(item)
            if meta.payload_ref:  # written by the client into the payload dir (common.local)
                out.append((meta, None))
            else:
                out.append((meta, blobs_at(blobs, next_blob, f"batch {i}")))
                next_blob += 1
        return out

    def proof(header: dict[str, Any]) -> str:
        value = header.get("payload_proof", "")
        return value if isinstance(value, str) else ""

    def final_count(header: dict[str, Any]) -> int | None:
        value = header.get("final_count")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= m.MAX_INDEX
        ):
            raise BadRequest(f"final_count: expected an integer in [0, {m.MAX_INDEX}] or null, got {str(value)[:40]}")
        return value

    @app.after_request
    async def finish_reading(response: Response) -> Response:
        """Answer only requests whose body has been read, or close their connection.

        A route may answer before reading the body (a known blob, a bad token). Hypercorn
        (0.18) then leaves the keep-alive connection half-recycled, and the next request
        the client sends on it is never answered. Small bodies are read and dropped here;
        for large ones the client is told not to reuse the connection.
        """
        if g.get("body_read") or request.method not in ("POST", "PUT", "PATCH"):
            return response
        length = request.content_length
        if length is None and "transfer-encoding" not in request.headers:
            return response
        g.body_read = True
        if length is not None and length <= _DRAIN_BYTES:
            try:
                await request.get_data(cache=False, as_text=False)
                return response
            except Exception:  # noqa: BLE001 - over the size limit, or the client went away
                pass
        response.headers["Connection"] = "close"
        return response

    @app.errorhandler(ApiError)
    async def api_error(e: ApiError) -> Response:
        return _json(e.body(), e.status)

    @app.errorhandler(envelope.EnvelopeError)
    async def envelope_error(e: Exception) -> Response:
        return _json(BadRequest(str(e)).body(), 400)

    @app.errorhandler(WireError)
    async def wire_error(e: Exception) -> Response:
        return _json(BadRequest(str(e)).body(), 400)

    # ---- public -------------------------------------------------------------------

    @app.get("/v1/health")
    async def health() -> Response:
        return _json({"ok": True, "version": plane.version, "protocol": plane.protocol, "boot_id": plane.boot_id})

    # ---- client routes --------------------------------------------------------------

    @app.get("/v1/me")
    async def me() -> Response:
        who = caller()
        return _json({"name": who.name, "role": who.role})

    @app.get("/v1/info")
    async def info() -> Response:
        return _json(
            {
                "version": plane.version,
                "protocol": plane.protocol,
                "max_function_bytes": config.max_function_bytes,
                "max_input_bytes": config.max_input_bytes,
                "max_build_context_bytes": config.max_build_context_bytes,
                "python_versions": plane.python_versions(),
                "nodes": plane.node_count(),
                "payloads": plane.payload_info(),
            }
        )

    def create(header: dict[str, Any], blobs: list[memoryview], who: Principal) -> str:
        """A new job from a create envelope (POST /v1/jobs, or a create frame on the events websocket)."""
        spec = m.JobSpec.from_wire(header.get("spec"))
        fn = blobs_at(blobs, 0, "function")
        plane.create_job(spec, fn, batches_of(header, blobs, 1), final_count(header), proof(header), who)
        return spec.job_id

    @app.post("/v1/jobs")
    async def create_job() -> Response:
        header, blobs = await read_envelope()
        job_id = create(header, blobs, caller())
        await trio.sleep(0)  # the agents' poll answers go first: the client waits on events, not on this
        return _json({"job_id": job_id})

    @app.post("/v1/jobs/<job_id>/inputs")
    async def add_inputs(job_id: str) -> Response:
        valid_id(job_id, "job id")
        header, blobs = await read_envelope()
        plane.add_inputs(job_id, batches_of(header, blobs, 0), final_count(header), proof(header), caller())
        return _json({"ok": True})

    @app.post("/v1/jobs/<job_id>/cancel")
    async def cancel_job(job_id: str) -> Response:
        valid_id(job_id, "job id")
        body = await read_object()
        reason = body.get("reason", "cancelled by the client")
        if not isinstance(reason, str) or len(reason) > _REASON_CHARS:
            raise BadRequest(f"reason: expected a string of at most {_REASON_CHARS} characters")
        plane.cancel_job(job_id, reason, caller())
        return _json({"ok": True})

    @app.post("/v1/jobs/<job_id>/ack")
    async def ack_job(job_id: str) -> Response:
        """The caller has every event of a finished job (the events websocket's ack, for a client that is
        closing and must know it arrived): the daemon forgets the job. Idempotent; a running job or another
        user's is left as it is."""
        valid_id(job_id, "job id")
        plane.ack_job(job_id, caller())
        return _json({"ok": True})

    @app.put("/v1/blobs/<digest>")
    async def put_blob(digest: str) -> Response:
        valid_digest(digest, "blob digest")
        if plane.has_blob(digest):
            return _json({"ok": True, "known": True})
        plane.put_blob(digest, await body())
        return _json({"ok": True, "known": False})

    @app.post("/v1/blobs/missing")
    async def missing_blobs() -> Response:
        """Which of these digests the cluster lacks: the client uploads only those."""
        body = await read_json()
        digests = body.get("digests") if isinstance(body, dict) else None
        if not isinstance(digests, list) or len(digests) > _MAX_DIGESTS:
            raise BadRequest(f'expected {{"digests": [sha256 hex, ...]}} with at most {_MAX_DIGESTS} digests')
        for i, digest in enumerate(digests):
            valid_digest(digest, f"digests[{i}]")
        return _json({"missing": [d for d in digests if not plane.has_blob(d)]})

    @app.get("/v1/agents/<agent_id>/blobs/<digest>")
    async def agent_blob(agent_id: str, digest: str) -> Response:
        valid_digest(digest, "blob digest")
        return Response(plane.blob(digest, agent_id), content_type="application/octet-stream")

    @app.get("/v1/jobs")
    async def list_jobs() -> Response:
        """The caller's jobs that the daemon keeps (running, and finished ones until job_retention), newest first."""
        limit = int(query_number(request.args, "limit", _MAX_LISTED, 1, _MAX_LISTED))
        return _json({"jobs": [s.to_wire() for s in plane.list_jobs(caller(), limit)]})

    @app.get("/v1/jobs/<job_id>/logs")
    async def job_logs(job_id: str) -> Response:
        """What the job's calls printed after event `after` (with its notices and final event), as an envelope;
        waits up to `wait` seconds for new output while the job runs."""
        valid_id(job_id, "job id")
        after = int(query_number(request.args, "after", 0, 0, wire.INT64[1]))
        wait = query_number(request.args, "wait", 0.0, 0.0, _MAX_LOGS_WAIT, integer=False)
        events, cursor = await plane.job_logs(job_id, after, wait, caller())
        header, blobs, finished = frame(job_id, events)
        return _envelope({**header, "finished": finished, "after": cursor}, blobs)

    @app.get("/v1/jobs/<job_id>")
    async def job_status(job_id: str) -> Response:
        valid_id(job_id, "job id")
        return _json(plane.job_status(job_id, caller(), attempts=ATTEMPTS_KEPT).to_wire())

    @app.get("/v1/jobs/<job_id>/events/<int:seq>/payload")
    async def event_payload(job_id: str, seq: int) -> Response:
        """A payload too large to push on the websocket, streamed from its file in chunks."""
        valid_id(job_id, "job id")
        if seq > wire.INT64[1]:
            raise BadRequest(f"event seq: at most {wire.INT64[1]}")
        return _stream(plane.event_payload(job_id, seq, caller()))

    @app.get("/v1/cluster")
    async def cluster() -> Response:
        return _json(plane.cluster_status(caller()).to_wire())

    @app.get("/v1/standby")
    async def get_standby() -> Response:
        return _json({"images": [i.to_wire() for i in plane.standby()], "version": plane.standby_version})

    @app.put("/v1/standby")
    async def set_standby() -> Response:
        body = await read_json()
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list) or len(images) > 256:
            raise BadRequest('expected {"images": [{"image": NAME, "per_cpu": N, "python_version": "3.11"}, ...]}')
        spec = [m.StandbyImage.from_wire(i) for i in images]
        if len({i.image for i in spec}) != len(spec):
            raise BadRequest("images: an image is listed twice")
        for image in spec:
            if not image.image or image.per_cpu <= 0:
                raise BadRequest(f"standby image {image.image!r}: needs a name and a positive per_cpu")
        plane.set_standby(spec)
        return _json({"images": [i.to_wire() for i in spec], "version": plane.standby_version})

    # ---- users (admin) ----------------------------------------------------------------

    @app.get("/v1/users")
    async def list_users() -> Response:
        return _json({"users": user_admin.list()})

    @app.post("/v1/users")
    async def add_user() -> Response:
        data = await read_object()
        return _json(user_admin.add(data.get("name"), data.get("role", "user"), caller()))

    @app.delete("/v1/users/<name>")
    async def remove_user(name: str) -> Response:
        return _json(user_admin.remove(valid_name(name), caller()))

    @app.post("/v1/users/<name>/key")
    async def rotate_key(name: str) -> Response:
        return _json(user_admin.rotate(valid_name(name), caller()))

    @app.delete("/v1/users/<name>/key")
    async def revoke_key(name: str) -> Response:
        user_admin.revoke(valid_name(name), caller())
        return _json({"name": name, "revoked": True})

    @app.websocket("/v1/events")
    async def events() -> None:
        """One websocket per client, carrying the events of every job it follows (event_hub.py)."""
        await EventHub(plane, websocket, caller(), create).serve()

    # ---- agent routes -----------------------------------------------------------------

    @app.post("/v1/agents/register")
    async def register() -> Response:
        info = m.NodeInfo.from_wire(await read_object())
        return _json(plane.register(info, instance_of(bearer(request.headers))).to_wire())

    @app.post("/v1/nodes/<name>/boot-failed")
    async def boot_failed(name: str) -> Response:
        data = await read_object()
        step, tail = data.get("step", ""), data.get("log", "")
        if not isinstance(step, str) or not isinstance(tail, str) or len(step) > 1000 or len(tail) > 64_000:
            raise BadRequest('expected {"step": "what failed" (<= 1000 chars), "log": "its log tail" (<= 64000)}')
        if plane.keeper is not None:
            plane.keeper.boot_failed(name, step, tail)
        return _json({"ok": True})

    @app.get("/v1/dist/")
    async def dist_index() -> Response:
        if plane.dist is None:
            raise NotFound("this daemon serves no wheels: it starts no nodes ([cluster] provider)")
        page = await trio.to_thread.run_sync(plane.dist.index)
        return Response(page, content_type="text/html")

    @app.get("/v1/dist/<name>")
    async def dist_file(name: str) -> Response:
        path = plane.dist.file(name) if plane.dist is not None else None
        if path is None:
            raise NotFound(f"no file {name[:200]!r} here: see /v1/dist/")
        return _stream(path)  # a wheelhouse's big wheels, fetched by many nodes at once

    @app.get("/v1/cluster/nodes")
    async def cluster_nodes() -> Response:
        return _json(admin.cluster_nodes())

    @app.get("/v1/cluster/spec")
    async def get_cluster_spec() -> Response:
        return _json(admin.cluster_spec().to_wire())

    @app.put("/v1/cluster/spec")
    async def put_cluster_spec() -> Response:
        spec = m.ClusterSpec.from_wire(await read_object())
        return _json((await admin.set_cluster_spec(spec)).to_wire())

    @app.post("/v1/cluster/<action>")
    async def cluster_action(action: str) -> Response:
        if action not in ("start", "stop", "restart"):
            raise NotFound(f"no cluster action {action[:40]!r}: start, stop or restart")
        return _json({"message": await admin.cluster_action(action)})

    @app.post("/v1/agents/<agent_id>/poll")
    async def poll(agent_id: str) -> Response:
        header, blobs = await read_envelope()
        delivery, out = await plane.poll(agent_id, m.AgentReport.from_wire(header), blobs)
        return _envelope(delivery.to_wire(), out)

    @app.post("/v1/agents/<agent_id>/report")
    async def report(agent_id: str) -> Response:
        header, blobs = await read_envelope()
        delivery, out = plane.report(agent_id, m.AgentReport.from_wire(header), blobs)
        if not delivery.delivery:
            await trio.sleep(0)  # the results' websocket push goes first when nothing waits for the agent
        return _envelope(delivery.to_wire(), out)

    @app.get("/v1/agents/<agent_id>/functions/<function_hash>")
    async def function(agent_id: str, function_hash: str) -> Response:
        valid_digest(function_hash, "function hash")
        return Response(plane.function_blob(function_hash, agent_id), content_type="application/octet-stream")

    @app.get("/v1/agents/<agent_id>/batches/<job_id>/<int:seq>")
    async def batch(agent_id: str, job_id: str, seq: int) -> Response:
        valid_id(job_id, "job id")
        if seq > m.MAX_INDEX:
            raise BadRequest(f"batch seq: at most {m.MAX_INDEX}")
        return Response(plane.batch_payload(job_id, seq, agent_id), content_type="application/octet-stream")

    missing = {rule.endpoint for rule in app.url_map.iter_rules() if rule.endpoint != "static"} - set(ROUTE_ROLES)
    if missing:
        raise RuntimeError(f"routes without an entry in ROUTE_ROLES: {sorted(missing)}")
    return app

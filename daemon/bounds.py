"""The bounds of what a peer may send burlad, and answers that never carry a stack trace.

Everything arriving is bounded before it is trusted:

* headers: a request whose headers are over `MAX_HEADER_BYTES` gets 431 (hypercorn's bound, and
  `check_headers` for a head that arrives in one read), and a connection whose headers are not in
  after `daemon.header_timeout` is cut off (`hypercorn_limits`);
* bodies: each route takes at most its own size (`body_limits`): the envelope routes their
  inputs, the blob upload its blob, and every other route (JSON, or no body at all) `JSON_BODY_BYTES`,
  so a route added later is small unless it says otherwise. Over it: 413 naming the limit, before
  the body is read when its length is announced, else as soon as the bytes pass it;
* time: a connection silent for `daemon.read_timeout` mid-request is closed, and a body must
  arrive within `daemon.body_timeout` in all.

An exception a route did not expect answers 500 with an id, and its traceback goes to the log
under that id (`install`).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from hypercorn.config import Config as HypercornConfig
from quart import Response, g, has_request_context, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, RequestHeaderFieldsTooLarge, RequestTimeout

from burla.common.config import DaemonConfig

from .errors import ApiError, TooLarge

log = logging.getLogger("burla.daemon")

MiB = 1024**2
MAX_HEADER_BYTES = 16 * 1024  # a request's line and headers together (ours send well under 1 KiB)
JSON_BODY_BYTES = 1 * MiB  # the body of any route not in body_limits
MISSING_BLOBS_BYTES = 8 * MiB  # POST /v1/blobs/missing: up to 100,000 digests
H2_MAX_STREAMS = 32  # concurrent requests on one HTTP/2 connection (Burla's own peers speak HTTP/1.1)


def body_limits(config: DaemonConfig) -> dict[str, int]:
    """The routes (by endpoint) whose bodies may be larger than `JSON_BODY_BYTES`, and how large."""
    envelope = config.max_function_bytes + config.max_input_bytes + 64 * MiB
    agent = max(envelope, config.max_result_bytes + 64 * MiB, config.max_blob_bytes + MiB)  # results, logs
    return {
        "create_job": envelope,
        "add_inputs": envelope,
        "put_blob": config.max_blob_bytes + MiB,
        "missing_blobs": MISSING_BLOBS_BYTES,
        "poll": agent,
        "report": agent,
    }


def hypercorn_limits(hc: HypercornConfig, config: DaemonConfig) -> None:
    """Bound what one connection may send hypercorn, and for how long."""
    hc.h11_max_incomplete_size = MAX_HEADER_BYTES
    hc.h2_max_header_list_size = MAX_HEADER_BYTES
    hc.h2_max_concurrent_streams = H2_MAX_STREAMS
    # The idle timer runs from a connection's opening (or its previous request's end) until a
    # request's headers are complete: so it bounds slow headers, and idle keep-alive connections.
    hc.keep_alive_timeout = config.header_timeout
    hc.ssl_handshake_timeout = config.header_timeout
    # Each read of a connection in the middle of a request (a body, a websocket) waits this long
    # at most: an idle timeout, so a big upload on a slow link is fine while bytes keep coming.
    # (hypercorn does not read while a request waits for its answer: long polls are not cut.)
    hc.read_timeout = config.read_timeout  # type: ignore[assignment]  # hypercorn types it int


class BoundedBody(TrioBody):
    """A request body whose size limit is lowered once the route is known."""

    def limit(self, max_bytes: int) -> None:
        self._max_content_length = max_bytes
        if len(self._data) > max_bytes and self._must_raise is None:  # arrived before the route was known
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()


class BoundedRequest(TrioRequest):
    body_class = BoundedBody


def install(app: QuartTrio, config: DaemonConfig) -> None:
    """Body bounds per route, and JSON answers for HTTP errors and unexpected exceptions."""
    limits = body_limits(config)
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = max(limits.values())
    app.config["BODY_TIMEOUT"] = config.body_timeout

    @app.before_request
    async def bound_request() -> None:
        check_headers(request.headers)
        name = (request.endpoint or "").rpartition(".")[2]
        limit = limits.get(name, JSON_BODY_BYTES)
        g.body_limit = limit
        length = request.content_length
        if length is not None and length > limit:
            raise TooLarge(too_large(length, limit))
        body = request.body
        if isinstance(body, BoundedBody):
            body.limit(limit)

    @app.before_websocket
    async def bound_websocket() -> None:
        check_headers(websocket.headers)

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Response:
        status = e.code or 500
        if isinstance(e, RequestEntityTooLarge):
            limit = g.get("body_limit") if has_request_context() else None
            return _closing(_error(TooLarge(too_large(None, limit or app.config["MAX_CONTENT_LENGTH"])).body(), 413))
        if isinstance(e, RequestTimeout):  # the rest of the body is never read: the connection goes too
            where = f"{request.method} {request.path}" if has_request_context() else "this request"
            message = f"the body of {where} did not arrive within {config.body_timeout:g}s (daemon.body_timeout)"
            return _closing(_error({"error": {"code": "timeout", "message": message}}, 408))
        code = (e.name or "error").lower().replace(" ", "_")
        return _error({"error": {"code": code, "message": e.description or e.name}}, status)

    @app.errorhandler(Exception)
    async def unexpected(e: Exception) -> Response:
        if isinstance(e, ApiError):  # registered handlers come first; this is only a safety net
            return _error(e.body(), e.status)
        error_id = secrets.token_hex(6)
        where = (
            f"{request.method} {request.path}"
            if has_request_context()
            else f"websocket {websocket.path}"
            if has_websocket_context()
            else "?"
        )
        log.error("internal error %s in %s", error_id, where, exc_info=e)
        message = f"internal error, see the daemon's log (id {error_id})"
        return _error({"error": {"code": "internal", "message": message}}, 500)


def check_headers(headers: Any) -> None:
    """Refuse a request whose headers are over `MAX_HEADER_BYTES` in all (431).

    hypercorn's own bound (`h11_max_incomplete_size`) holds only for headers that arrive in
    pieces: a head that comes whole in one read (up to its read size, a MiB) passes it.
    """
    size = sum(len(name) + len(value) + 4 for name, value in headers.items())
    if size > MAX_HEADER_BYTES:
        raise RequestHeaderFieldsTooLarge(f"the request's headers are {size} bytes: at most {MAX_HEADER_BYTES}")


def too_large(length: int | None, limit: int) -> str:
    where = f"{request.method} {request.path}" if has_request_context() else "this request"
    size = f"{length} bytes" if length is not None else "over the limit"
    return f"the body of {where} is {size}: this route takes at most {limit} bytes"


def _closing(response: Response) -> Response:
    response.headers["Connection"] = "close"
    return response


def _error(body: dict[str, Any], status: int) -> Response:
    import json

    return Response(json.dumps(body), status=status, content_type="application/json")

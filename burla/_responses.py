"""The daemon's answers, as the client reads them: an HTTP error answer becomes the `BurlaError` it means.

Below `_client`, `_job`, `_events` and the CLI, which all send requests to the daemon and must
fail with the same errors for the same answers. Importing it is cheap (no httpx until a request).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    BurlaError,
    ClusterError,
    ClusterUnavailableError,
    InvalidArgumentError,
    PermissionDeniedError,
    TooLargeError,
    UnsatisfiableError,
    VersionMismatchError,
)

if TYPE_CHECKING:
    import httpx

RECONNECT_SECONDS = 120.0  # how long a job rides out an unreachable daemon (a restart) before failing


def error_from_response(status: int, text: str, what: str) -> BurlaError:
    """The Burla error for an HTTP error answer of the daemon."""
    try:
        body = json.loads(text)["error"]
        code, message = str(body.get("code", "")), str(body.get("message", text))[:2000]
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not the daemon's error shape
        code, message = "", text[:500]
    if status == 401:
        return AuthenticationError(
            f"the cluster refused the API key ({message}). Pass api_key=, set BURLA_API_KEY, or run `burla login URL`."
        )
    if status == 403:
        return PermissionDeniedError(f"the cluster refused to {what}: {message}")
    if code == "version_mismatch":
        return VersionMismatchError(message)
    if status == 413 or code == "too_large":
        return TooLargeError(message)
    if status == 422 or code == "unsatisfiable":
        return UnsatisfiableError(message)
    if status == 400:
        return InvalidArgumentError(f"the cluster rejected the request to {what}: {message}")
    return ClusterError(f"the cluster answered {status} to {what}: {message}")


def unreachable(url: str, error: Exception) -> ClusterUnavailableError:
    """The error for a request that never got an answer (connection refused, timed out, reset)."""
    from burla.common.tls import untrusted

    why = untrusted(error)
    if why:
        return ClusterUnavailableError(
            f"the Burla cluster at {url} presented a TLS certificate this client does not trust ({why}). If your "
            f"own CA signed it, set BURLA_CA_FILE to that CA's PEM file, or run `burla login {url} --ca-file CA.pem`."
        )
    return ClusterUnavailableError(f"cannot reach the Burla cluster at {url}: {error}")


async def request(
    http: httpx.AsyncClient, url: str, method: str, path: str, what: str, check: bool = True, **kwargs: Any
) -> httpx.Response:
    """Send one request to the daemon at `url` and return its answer; no answer raises ClusterUnavailableError.

    With `check`, an answer other than 200 raises its BurlaError, `what` completing "the cluster
    answered 500 to ...". No retries: the callers that ride out a restarting daemon
    (`JobRun._post`, the event stream) have their own loops.
    """
    import httpx

    try:
        r = await http.request(method, path, **kwargs)
    except httpx.TransportError as e:
        raise unreachable(url, e) from None
    if check and r.status_code != 200:
        raise error_from_response(r.status_code, r.text, what)
    return r

"""burla._responses: every answer of the daemon becomes the same BurlaError, in the library and the CLI."""

from __future__ import annotations

import json

import httpx
import pytest

from burla import cli
from burla._responses import error_from_response, request
from burla.errors import (
    AuthenticationError,
    ClusterError,
    ClusterUnavailableError,
    InvalidArgumentError,
    TooLargeError,
    UnsatisfiableError,
    VersionMismatchError,
)


def body(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


@pytest.mark.parametrize(
    ("status", "text", "kind", "message"),
    [
        (401, body("unauthorized", "bad token"), AuthenticationError, "refused the API key (bad token)"),
        (409, body("version_mismatch", "too old"), VersionMismatchError, "too old"),
        (413, "plain text", TooLargeError, "plain text"),
        (400, body("too_large", "big"), TooLargeError, "big"),
        (422, body("", "no node fits"), UnsatisfiableError, "no node fits"),
        (400, body("unsatisfiable", "no GPU"), UnsatisfiableError, "no GPU"),
        (400, body("bad", "nope"), InvalidArgumentError, "rejected the request to do it: nope"),
        (500, "x" * 600, ClusterError, "the cluster answered 500 to do it: " + "x" * 500),
        (502, '{"error": "a string, not the daemon\'s shape"}', ClusterError, "a string, not the daemon"),
        (502, '{"error": ["a list"]}', ClusterError, "a list"),
    ],
)
def test_error_from_response(status: int, text: str, kind: type, message: str) -> None:
    error = error_from_response(status, text, "do it")
    assert type(error) is kind
    assert message in str(error)
    if status == 500:
        assert str(error).endswith("x" * 500)  # an unparsable body is cut to 500 characters


async def test_request_returns_a_200_and_raises_the_rest() -> None:
    def answer(r: httpx.Request) -> httpx.Response:
        if r.url.path == "/ok":
            return httpx.Response(200, json={"fine": True})
        if r.url.path == "/down":
            raise httpx.ConnectError("refused")
        return httpx.Response(422, json={"error": {"code": "unsatisfiable", "message": "too big"}})

    async with httpx.AsyncClient(base_url="http://c", transport=httpx.MockTransport(answer)) as http:
        assert (await request(http, "http://c", "GET", "/ok", "read")).json() == {"fine": True}
        with pytest.raises(UnsatisfiableError, match="too big"):
            await request(http, "http://c", "POST", "/no", "create the job", json={})
        assert (await request(http, "http://c", "GET", "/no", "read", check=False)).status_code == 422
        with pytest.raises(ClusterUnavailableError, match="cannot reach the Burla cluster at http://c: refused"):
            await request(http, "http://c", "GET", "/down", "read")


def test_the_cli_fails_with_the_library_s_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BURLA_CLUSTER_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    monkeypatch.setenv("BURLA_API_KEY", "key")
    assert cli.main(["status"]) == 1
    assert "burla: cannot reach the Burla cluster at http://127.0.0.1:1: " in capsys.readouterr().err

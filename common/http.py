"""The HTTP client of Burla's own processes (the client library and node agents).

It is httpx's `AsyncClient`, with one change: a request body given as bytes
is sent by an iterator that is not an async generator. httpx's `ByteStream`
hands its bytes to httpcore from an async generator, and httpcore does not
close that generator when the write of the body is interrupted (the request
is cancelled, or the write fails): it is left suspended until the garbage
collector finds it, and trio then warns that it was never exhausted
(encode/httpx#3686). An agent stopping mid-report, or a job whose uploader is
cancelled mid-upload, did that.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx


class _Once:
    """Yields its bytes once; an abandoned iteration leaves nothing to finalize."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


class Chunks:
    """The pieces of a big body, sent in chunks of at most `size` bytes, never joined into one copy.

    A plain iterator too (not an async generator), for the reason above.
    """

    def __init__(self, parts: Sequence[bytes | bytearray | memoryview], size: int) -> None:
        self._parts = [memoryview(p) for p in parts]
        self._size = size
        self._part = 0
        self._offset = 0

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        while self._part < len(self._parts):
            view = self._parts[self._part]
            if self._offset < len(view):
                chunk = bytes(view[self._offset : self._offset + self._size])
                self._offset += len(chunk)
                return chunk
            self._part, self._offset = self._part + 1, 0
        raise StopAsyncIteration


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._data)


class _Transport(httpx.AsyncHTTPTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if isinstance(request.stream, httpx.ByteStream):  # read at once: .content is the whole body
            request.stream = _Body(request.content)
        return await super().handle_async_request(request)


def async_client(
    base_url: str,
    headers: dict[str, str],
    timeout: httpx.Timeout,
    limits: httpx.Limits | None = None,
    verify: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` whose request bodies are safe to cancel mid-send.

    `verify`: what an https daemon's certificate is checked against (`common.tls.client_context`);
    None: httpx's default trust (for an http:// `base_url`, none). Its websockets (httpx_ws on this client)
    use the same.
    """
    if verify is None and not base_url.startswith("https://"):
        # Plain HTTP: nothing to verify. httpx's default trust costs some 100 ms to load, in every process;
        # this context loads none, so a TLS connection it were asked to make would be refused, not trusted.
        verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    options: dict[str, Any] = {"verify": True if verify is None else verify}
    if limits is not None:
        options["limits"] = limits
    transport = _Transport(**options)
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

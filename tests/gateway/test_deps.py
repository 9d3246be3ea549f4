"""Request helpers of gateway/deps.py: bodies read with a size limit."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.requests import Request

from gateway.deps import read_body
from gateway.errors import PayloadTooLarge


def request_with(chunks: list[bytes], headers: dict[str, str]) -> tuple[Request, list[int]]:
    """A request whose body arrives in `chunks`; the list counts the chunks read."""
    read: list[int] = []

    async def receive() -> dict:
        read.append(1)
        n = len(read) - 1
        return {"type": "http.request", "body": chunks[n], "more_body": n + 1 < len(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive), read


def run(coroutine):  # type: ignore[no-untyped-def]
    """The coroutine's result, from an event loop of its own thread: in a full run, an earlier test's
    Playwright (sync API) leaves its loop marked running in the main thread, where asyncio.run refuses."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def test_a_body_whose_content_length_is_over_the_limit_is_refused_unread() -> None:
    request, read = request_with([b"x" * 10], {"Content-Length": str(10**12)})
    with pytest.raises(PayloadTooLarge, match="the upload is larger than 100 bytes"):
        run(read_body(request, limit=100, what="the upload"))
    assert read == []


def test_a_body_without_a_length_is_read_only_until_it_passes_the_limit() -> None:
    request, read = request_with([b"x" * 10] * 100, {})
    with pytest.raises(PayloadTooLarge):
        run(read_body(request, limit=25, what="the upload"))
    assert len(read) == 3


def test_a_body_within_the_limit_is_returned_whole() -> None:
    request, _ = request_with([b"abc", b"def"], {"Content-Length": "6"})
    assert run(read_body(request, limit=6, what="the upload")) == b"abcdef"

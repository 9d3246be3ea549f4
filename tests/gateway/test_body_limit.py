"""gateway.main.BodyLimit: request bodies are refused (413) before a route reads them past their limit."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from starlette.exceptions import HTTPException

from gateway.main import BodyLimit


def run(coroutine):  # type: ignore[no-untyped-def]
    """The coroutine's result, from an event loop of its own thread: in a full run, an earlier test's
    Playwright (sync API) leaves its loop marked running in the main thread, where asyncio.run refuses."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def send_through(path: str, chunks: list[bytes], headers: dict[str, str], json_limit: int = 100):
    """Send a request whose body arrives in `chunks` through BodyLimit to an app that reads the whole body ->
    (the body the app got, or the HTTPException that refused it; how many chunks were read)."""
    read: list[int] = []
    got: list[bytes] = []

    async def receive() -> dict:
        read.append(1)
        n = len(read) - 1
        return {"type": "http.request", "body": chunks[n], "more_body": n + 1 < len(chunks)}

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        body = b""
        while True:
            message = await receive()
            body += message["body"]
            if not message["more_body"]:
                got.append(body)
                return

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    try:
        run(BodyLimit(app, json_limit=json_limit)(scope, receive, None))
    except HTTPException as refused:
        return refused, len(read)
    return got[0], len(read)


def test_a_body_whose_content_length_is_over_the_limit_is_refused_unread() -> None:
    refused, read = send_through("/v1/generations", [b"x" * 10], {"Content-Length": str(10**12)})
    assert (refused.status_code, refused.detail, read) == (413, "the request body is larger than 100 bytes", 0)


def test_a_body_without_a_length_is_read_only_until_it_passes_the_limit() -> None:
    refused, read = send_through("/v1/generations", [b"x" * 10] * 100, {}, json_limit=25)
    assert (refused.status_code, read) == (413, 3)


def test_a_body_within_the_limit_reaches_the_route_whole() -> None:
    assert send_through("/v1/generations", [b"abc", b"def"], {"Content-Length": "6"}, json_limit=6) == (b"abcdef", 2)


def test_uploads_and_policies_have_their_own_limits_and_the_dashboard_none_here(monkeypatch) -> None:
    monkeypatch.setattr("gateway.routes.provenance.MAX_UPLOAD", 1000)
    monkeypatch.setattr("gateway.routes.policies.MAX_POLICY_BYTES", 300)
    assert send_through("/v1/provenance/verify", [b"x" * 500], {})[0] == b"x" * 500  # over the JSON routes' 100
    refused, _ = send_through("/v1/provenance/verify", [b"x" * 600] * 2, {})
    assert refused.detail == "the upload is larger than 1000 bytes"
    refused, _ = send_through("/v1/policies/dry-run", [b"x" * 400], {})
    assert refused.detail == "the policy body is larger than 300 bytes"
    assert send_through("/dashboard/provenance", [b"x" * 5000], {})[0] == b"x" * 5000

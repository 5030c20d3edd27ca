"""The upstream keep-alive pool against a real HTTP server on loopback (aiohttp): what one exchange
reads is its own response, whatever else the connection carries later."""

from __future__ import annotations

from aiohttp import web

from gateway.upstream import Upstream
from tests.conftest import serving


async def chunked(request: web.Request) -> web.StreamResponse:
    """The request's body back, one chunk per byte: llhttp hands over every chunk on its own."""
    body = await request.read()
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for i in range(len(body)):
        await response.write(body[i:i + 1])
    await response.write_eof()
    return response


def post(body: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\nhost: upstream\r\ncontent-length: %d\r\n\r\n" % len(body) + body


async def test_a_response_read_after_its_connection_went_to_the_next_request_is_still_its_own():
    app = web.Application()
    app.router.add_post("/", chunked)
    connects = []
    upstream = Upstream(2.0, 4, lambda: connects.append(1))
    async with serving(app) as port:
        try:
            first = await upstream.open("127.0.0.1", port, post(b"first"))
            await first.wait_done(5.0)
            # The relay may take a finished response only after the connection carried another request.
            second = upstream.reuse("127.0.0.1", port, post(b"second"))
            assert second is not None and second.conn is first.conn
            await second.wait_done(5.0)
            assert (first.status, first.take()) == (200, b"first")
            assert (second.status, second.take()) == (200, b"second")
            assert len(connects) == 1
        finally:
            upstream.close()

"""The fault proxy's own promises: each toxic does what its table row says, and nothing more."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.fault.faultproxy import NO_TOXICS, FaultProxy, ProxyThread, Toxics

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def sse_server(events: list[bytes], gap_s: float) -> Handler:
    """Sends ``events`` as separate writes ``gap_s`` apart, once the client has sent anything."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        for event in events:
            writer.write(event)
            await writer.drain()
            await asyncio.sleep(gap_s)
        await reader.read(65536)  # hold the connection until the client leaves

    return serve


class Stack:
    """An upstream server and a proxy in front of it, both on this test's loop."""

    def __init__(self, server: asyncio.Server, proxy: FaultProxy):
        self.server = server
        self.proxy = proxy

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.proxy.port)


@pytest.fixture
async def through() -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    stacks: list[Stack] = []
    handlers: set[asyncio.Task] = set()

    async def start(handler: Handler, toxics: Toxics = NO_TOXICS) -> Stack:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await handler(reader, writer)
            except ConnectionError:
                pass  # the proxy reset this side: what several tests cause on purpose
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        proxy = FaultProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), toxics=toxics)
        await proxy.listen()
        stack = Stack(server, proxy)
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        await stack.proxy.close()  # resets what is still open, which ends the handlers
        stack.server.close()
    if handlers:
        await asyncio.wait(handlers, timeout=2)


async def read_until_eof(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(-1), timeout_s)


async def test_bytes_pass_unchanged_both_ways_without_toxics(through):
    stack = await through(echo)
    reader, writer = await stack.connect()
    payload = bytes(range(256)) * 4096  # 1 MiB, many reads each way
    writer.write(payload)
    writer.write_eof()
    assert await read_until_eof(reader) == payload
    writer.close()


async def test_latency_delays_each_direction(through):
    stack = await through(echo, Toxics(latency_s=0.1))
    reader, writer = await stack.connect()
    start = time.monotonic()
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    assert 0.2 <= time.monotonic() - start < 1.0  # 0.1 s up, 0.1 s down
    writer.close()


async def test_slice_writes_downstream_in_small_pieces(through):
    body = b"x" * 1000
    stack = await through(sse_server([body], gap_s=0), Toxics(slice_bytes=100, slice_delay_s=0.02))
    reader, writer = await stack.connect()
    writer.write(b"go")
    start = time.monotonic()
    pieces = []
    while sum(map(len, pieces)) < len(body):
        pieces.append(await asyncio.wait_for(reader.read(65536), 5))
    assert b"".join(pieces) == body
    assert max(map(len, pieces)) <= 100
    assert time.monotonic() - start >= 9 * 0.02
    writer.close()


async def test_reset_peer_sends_rst_to_the_client(through):
    stack = await through(echo, Toxics(reset_after_s=0.1))
    reader, writer = await stack.connect()
    writer.write(b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        await read_until_eof(reader)
    assert time.monotonic() - start < 1.0
    writer.close()


async def test_reset_peer_set_later_resets_open_connections(through):
    stack = await through(echo)
    reader, writer = await stack.connect()
    writer.write(b"a")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
    await stack.proxy.set(Toxics(reset_after_s=0))
    with pytest.raises(ConnectionResetError):
        await read_until_eof(reader)
    writer.close()


async def test_timeout_blackholes_then_closes_after_its_time(through):
    stack = await through(echo, Toxics(timeout_s=0.3))
    reader, writer = await stack.connect()
    start = time.monotonic()
    writer.write(b"lost")
    assert await read_until_eof(reader) == b""
    assert 0.25 <= time.monotonic() - start < 1.5
    writer.close()


async def test_timeout_zero_blackholes_and_keeps_the_connection_open(through):
    stack = await through(echo, Toxics(timeout_s=0))
    reader, writer = await stack.connect()
    writer.write(b"lost")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.5)
    writer.close()


async def test_close_after_bytes_passes_exactly_that_many_then_fin(through):
    stack = await through(sse_server([b"y" * 500, b"z" * 500], gap_s=0.01), Toxics(close_after_bytes=700))
    reader, writer = await stack.connect()
    writer.write(b"go")
    assert await read_until_eof(reader) == b"y" * 500 + b"z" * 200
    writer.close()


async def test_stall_after_events_passes_n_events_then_holds_the_connection(through):
    # The second event's blank line is split across two writes: counting must span reads.
    events = [b"data: 1\n\n", b"data: 2\n", b"\n", b"data: 3\n\ndata: 4\n\n"]
    stack = await through(sse_server(events, gap_s=0.05), Toxics(stall_after_events=2))
    reader, writer = await stack.connect()
    writer.write(b"go")
    received = b""
    while received.count(b"\n\n") < 2:
        received += await asyncio.wait_for(reader.read(65536), 5)
    with pytest.raises(TimeoutError):
        received += await asyncio.wait_for(reader.read(65536), 0.5)
    assert received == b"data: 1\n\ndata: 2\n\n"
    writer.close()


async def test_refuse_closes_the_port_and_listen_reopens_it(through):
    stack = await through(echo)
    reader, writer = await stack.connect()
    await stack.proxy.refuse()
    with pytest.raises(ConnectionResetError):
        await read_until_eof(reader)
    with pytest.raises(ConnectionRefusedError):
        await stack.connect()
    await stack.proxy.listen()
    reader, writer = await stack.connect()
    writer.write(b"back")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"back"
    writer.close()


async def test_request_heads_are_recorded_by_their_framing(through):
    stack = await through(echo)
    reader, writer = await stack.connect()
    # The first body looks like a request head: only Content-Length framing tells it is not one.
    body = b"GET /fake HTTP/1.1\r\nx-request-id: no\r\n\r\n"
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nX-Request-Id: one\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    writer.write(b"GET /health HTTP/1.1\r\nHost: e\r\n\r\n")
    await asyncio.wait_for(reader.readexactly(len(body) + 100), 5)
    seen = [(r.method, r.path, r.request_id) for r in stack.proxy.requests]
    assert seen == [("POST", "/v1/chat/completions", "one"), ("GET", "/health", None)]
    writer.close()


async def test_tripwire_records_requests_and_resets_them():
    proxy = FaultProxy(None)
    await proxy.listen()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nx-request-id: r1\r\nContent-Length: 0\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await read_until_eof(reader)
        assert [(r.path, r.request_id) for r in proxy.requests] == [("/v1/completions", "r1")]
        writer.close()
    finally:
        await proxy.close()


def test_proxy_thread_serves_blocking_callers_and_stops_cleanly():
    with socket.create_server(("127.0.0.1", 0)) as upstream, ProxyThread(upstream.getsockname()) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        conn, _ = upstream.accept()
        client.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert conn.recv(100) == b"GET /health HTTP/1.1\r\n\r\n"
        conn.sendall(b"ok")
        assert client.recv(100) == b"ok"
        assert [r.path for r in proxy.requests] == ["/health"]
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.close()
        conn.close()

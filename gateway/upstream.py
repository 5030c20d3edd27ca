"""Upstream HTTP/1.1: a keep-alive connection pool of uvloop Protocols parsed by httptools.

This is the only module that opens sockets to engines. One :class:`Exchange` is one request/response
on one pooled connection. The caller (the relay) waits for the response's first bytes, then either
reads the rest or installs a *sink*: from then on every upstream read is handed to the sink
synchronously, from ``data_received``, as one bytes object. A streamed response therefore costs no
coroutine switch per event, and whatever one read brought leaves in one client write.

Timeouts: connect, first byte (per attempt), and idle between reads (no total: streams may be long).
A connection is reused only when the response was read to its end and both sides allow keep-alive;
``should_keep_alive`` is read inside the llhttp callback because llhttp resets its state afterwards.
A request written on a reused connection that the engine had already closed is resent once on a
fresh connection: nothing reached the engine, so this is not a retry and blames no one.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import httptools


class UpstreamError(Exception):
    """An attempt failed. ``reason`` is a metric label; ``received`` says whether any byte came back."""

    def __init__(self, reason: str, message: str, received: bool = False):
        super().__init__(message)
        self.reason = reason  # connect | reset | first_byte_timeout | idle_timeout | protocol
        self.received = received


class Upstream:
    """Keep-alive connections per (host, port), most recently used first."""

    def __init__(self, connect_timeout_s: float, max_idle_per_endpoint: int, on_connect: Callable[[], None]):
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle_per_endpoint
        self.on_connect = on_connect  # counts new connections: a pool that reconnects per request shows here
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    def reuse(self, host: str, port: int, request: bytes) -> Exchange | None:
        """Send ``request`` (head and body, already rendered) on an idle keep-alive connection and
        return its exchange; None when there is none, and then :meth:`open` connects. Apart, so that
        the usual request makes no coroutine here."""
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn.start(request, reused=True)
        return None

    async def open(self, host: str, port: int, request: bytes) -> Exchange:
        """Send ``request`` on a new connection and return its exchange."""
        conn = await self._connect((host, port))
        return conn.start(request, reused=False)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key), key[0], key[1]),
                self.connect_timeout_s)
        except asyncio.TimeoutError:
            raise UpstreamError("connect", f"connect to {key[0]}:{key[1]} timed out") from None
        except OSError as e:
            raise UpstreamError("connect", f"connect to {key[0]}:{key[1]} failed: {e.strerror or e}") from None
        self.on_connect()
        return conn

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def drop(self, host: str, port: int) -> None:
        """Close the idle connections to a replica that left its pool."""
        for conn in self._idle.pop((host, port), ()):
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _Connection(asyncio.Protocol):
    __slots__ = ("pool", "key", "transport", "body", "on_body", "parser", "exchange", "closed", "keep_alive")

    def __init__(self, pool: Upstream, key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        # The body pieces of the response being read. llhttp calls on_body once per chunk, 67 times
        # for a burst stream of 64 events: bound to the list's own append (the parser looks it up
        # once, here), that call runs no Python frame.
        self.body: list[bytes] = []
        self.on_body = self.body.append
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.keep_alive = False

    def start(self, request: bytes, reused: bool) -> Exchange:
        self.exchange = ex = Exchange(self, request, reused)
        self.transport.write(request)  # type: ignore[union-attr]
        return ex

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        ex.last_read = time.monotonic()
        ex.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.close()
            ex._fail(UpstreamError("protocol", f"invalid response from engine: {e}", received=True))
            return
        ex._flush()
        if ex.complete:
            # The connection goes back to the pool, and the next request on it reads into `body`.
            ex.chunks = self.body[:]
            self.body.clear()
            self.exchange = None
            if self.keep_alive and not ex.aborted:
                self.pool._release(self)
            else:
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        ex = self.exchange
        if ex is not None and not ex.complete:
            ex._lost()
        self.parser = None  # it holds this connection: the pair would wait for the cyclic GC

    def pause_writing(self) -> None:
        pass  # requests are small; nothing to throttle on this side

    def resume_writing(self) -> None:
        pass

    # llhttp callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.exchange.headers.append((name.lower(), value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        ex = self.exchange
        ex.status = self.parser.get_status_code()  # type: ignore[union-attr]
        self.keep_alive = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        self.exchange.complete = True  # type: ignore[union-attr]


class Exchange:
    """One request/response on one upstream connection."""

    __slots__ = ("conn", "request", "reused", "status", "headers", "chunks", "complete", "error",
                 "received", "aborted", "sink", "last_read", "_waiter")

    def __init__(self, conn: _Connection, request: bytes, reused: bool):
        self.conn = conn
        self.request = request
        self.reused = reused
        self.status = 0  # set when the response head is complete
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks = conn.body  # until the response is complete: then a list of its own
        self.complete = False
        self.error: UpstreamError | None = None
        self.received = False
        self.aborted = False
        self.sink: Callable[[bytes], None] | None = None
        self.last_read = time.monotonic()
        self._waiter: asyncio.Future | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    async def wait_first(self, timeout_s: float) -> None:
        """Until the head and the first body bytes (or the whole response) have arrived."""
        deadline = time.monotonic() + timeout_s
        while not (self.status and (self.chunks or self.complete)):
            if self.error is not None:
                if self.reused and not self.received and self.error.reason == "reset":
                    await self._resend()
                    continue
                raise self.error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.abort()
                raise UpstreamError("first_byte_timeout", f"no response within {timeout_s:g} s",
                                    received=self.received)
            await self._wait(remaining)

    async def wait_done(self, idle_s: float) -> None:
        """Until the response is complete; fails if no byte arrives for ``idle_s``."""
        while not self.complete:
            if self.error is not None:
                raise self.error
            remaining = idle_s - (time.monotonic() - self.last_read)
            if remaining <= 0:
                self.abort()
                raise UpstreamError("idle_timeout", f"engine sent nothing for {idle_s:g} s", received=True)
            await self._wait(remaining)

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        return data

    def pipe(self, sink: Callable[[bytes], None] | None) -> None:
        """From now on hand each upstream read to ``sink`` instead of buffering it (None: buffer
        again)."""
        self.sink = sink

    def pause(self) -> None:
        if not self.conn.closed:
            self.conn.transport.pause_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        if not self.conn.closed:
            self.conn.transport.resume_reading()  # type: ignore[union-attr]

    def fail(self, reason: str, message: str) -> None:
        """The caller found the response unusable: drop the connection and fail the waiter."""
        self.abort()
        self._fail(UpstreamError(reason, message, received=self.received))

    def abort(self) -> None:
        """Close the connection: the engine sees the disconnect and stops generating."""
        if not self.complete:
            self.aborted = True
            self.conn.exchange = None
            self.conn.close()

    # called by the connection

    def _flush(self) -> None:
        if self.sink is not None:
            if self.chunks:
                self.sink(self.take())
            if self.complete:
                self._wake()
        else:
            self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self.error = error
        self._wake()

    def _lost(self) -> None:
        self._fail(UpstreamError("reset", "engine closed the connection", received=self.received))

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        handle = loop.call_later(timeout_s, _expire, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._waiter = None

    async def _resend(self) -> None:
        pool = self.conn.pool
        conn = await pool._connect(self.conn.key)
        self.conn = conn
        self.chunks = conn.body
        self.error = None
        self.reused = False
        conn.exchange = self
        conn.transport.write(self.request)  # type: ignore[union-attr]


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)

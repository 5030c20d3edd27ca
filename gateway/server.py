"""Client-facing HTTP/1.1: a uvloop ``asyncio.Protocol`` per connection, parsed by httptools (llhttp).

This is the only module that sees raw client bytes. It hands each complete request to a handler as a
:class:`Request` and gives the handler a :class:`Connection` to answer on; the rest of the gateway
never touches sockets or framing.

Why not aiohttp's server: per request it builds request/response objects, multidicts, stream readers
and several futures, about 110 µs of CPU here; parsing in llhttp callbacks and writing pre-rendered
heads costs a fraction of that (``../shared/brief/performance.md``).

Limits enforced here, before any handler runs: header count and size (431), request body size (413,
answered from the Content-Length header without reading the body), a deadline for reading the whole
request (408, against slowloris), the idle keep-alive time, and a connection cap. One request per
connection is handled at a time; pipelined requests wait their turn, a few at most.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable

import httptools

from gateway import listeners
from gateway.errors import REASONS, GatewayError
from gateway.settings import Limits, Timeouts

log = logging.getLogger("gateway.server")

MAX_URL_BYTES = 8192
MAX_PIPELINED = 4
HIGH_WATER = 256 * 1024


class Request:
    __slots__ = ("method", "path", "headers", "header", "body", "keep_alive", "received_at", "peer")

    def __init__(self, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool, received_at: float, peer: str):
        self.method = method
        self.path = path
        self.headers = headers  # names lower-cased, in arrival order
        # header(name) -> value or None; a repeated header keeps its last value.
        self.header = dict(headers).get
        self.body = body
        self.keep_alive = keep_alive
        self.received_at = received_at  # monotonic time when the last byte arrived
        self.peer = peer


Handler = Callable[[Request, "Connection"], Awaitable[None]]
# path -> method -> handler; a path ending in "/" also serves every path below it (a resource id).
Routes = dict[bytes, dict[bytes, Handler]]


class _Reject(Exception):
    """Stops llhttp mid-feed; carries the error to answer with."""

    def __init__(self, error: GatewayError):
        self.error = error


class HttpServer:
    """Owns the listening socket, the live connections and the sweeper that enforces deadlines."""

    def __init__(self, routes: Routes, limits: Limits, timeouts: Timeouts,
                 not_found: Handler, on_crash: Callable[[BaseException], None] | None = None):
        self.routes = routes
        self.subtrees = [(path, methods) for path, methods in routes.items() if path.endswith(b"/")]
        self.limits = limits
        self.timeouts = timeouts
        self.not_found = not_found
        self.connections: set[Connection] = set()
        self.buffered = 0  # request body bytes held by requests still arriving
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    def subtree(self, path: bytes) -> dict[bytes, Handler] | None:
        """The methods of the route whose subtree holds ``path``, if any (only unknown paths ask)."""
        for prefix, methods in self.subtrees:
            if path.startswith(prefix) and len(path) > len(prefix):
                return methods
        return None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        sock = listeners.bind(host, port, socket.SOCK_STREAM, reuse_port)
        self._server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=4096)
        self._sweeper = loop.create_task(self._sweep())
        return self._server.sockets[0].getsockname()[1]

    def stop_accepting(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()

    def busy(self) -> int:
        return sum(1 for c in self.connections if c.task is not None)

    async def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        """Once a second: 408 for requests read too slowly, close idle keep-alive connections."""
        read_s, idle_s = self.timeouts.request_read_s, self.timeouts.keepalive_s
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.reading_since and now - conn.reading_since > read_s:
                    conn.reject(GatewayError("request_timeout", "request not received in time"))
                elif conn.task is None and not conn.reading_since and now - conn.idle_since > idle_s:
                    conn.abort()
                elif self.closing and conn.task is None:
                    conn.abort()


class Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one by one, writes responses."""

    __slots__ = (
        "server", "transport", "parser", "peer", "task", "queue", "reading_since", "idle_since",
        "_url", "_headers", "_in_head", "_head_bytes", "_body", "_body_len", "_keep_alive",
        "started", "keep_alive", "closed", "on_pause", "on_resume",
    )

    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.task: asyncio.Task | None = None
        self.queue: deque[Request] = deque()
        # The first request's deadline runs from accept: a connection that sends nothing is a
        # slowloris too. Between requests, keepalive_s applies instead.
        self.reading_since = time.monotonic()
        self.idle_since = time.monotonic()
        self._body_len = 0  # nothing buffered yet: _reset_message returns nothing to the budget
        self._reset_message()
        self.started = False  # response head written for the current request
        self.keep_alive = True
        self.closed = False
        # Back-pressure hooks set by the relay while a stream runs (pause/resume the upstream read).
        self.on_pause: Callable[[], None] | None = None
        self.on_resume: Callable[[], None] | None = None

    def _release_body(self) -> None:
        # Drop the chunks too: a closed connection can outlive its socket (a handler still
        # finishing), and must not hold a refused body meanwhile.
        self.server.buffered -= self._body_len
        self._body_len = 0
        self._body: list[bytes] = []

    def _reset_message(self) -> None:
        self._release_body()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False  # between the first byte of a request and the end of its head
        self._head_bytes = 0
        self._keep_alive = True

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        if server.closing or len(server.connections) >= server.limits.max_connections:
            transport.abort()  # type: ignore[attr-defined]
            self.closed = True
            return
        server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.reading_since:
            self.reading_since = time.monotonic()
        try:
            self.parser.feed_data(data)
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > self.server.limits.max_header_bytes:
                    raise _Reject(GatewayError("headers_too_large", "request headers too large"))
        except _Reject as r:
            self.reject(r.error)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            error = cause.error if isinstance(cause, _Reject) else GatewayError("bad_http", "malformed HTTP request")
            # The _Reject's traceback reaches back to this frame: holding it here would make a cycle
            # that keeps this read and the refused body alive until the cyclic GC runs.
            del cause
            self.reject(error)
        except httptools.HttpParserUpgrade as e:
            self._ignore_upgrade(data[e.args[0]:])
        except httptools.HttpParserError as e:
            self.reject(GatewayError("bad_http", f"malformed HTTP request: {e}"))

    def _ignore_upgrade(self, rest: bytes) -> None:
        """Serve a request that asked for another protocol as the HTTP/1.1 request it also is.

        A server may ignore Upgrade (RFC 9110 7.8), and must here: Java's HttpClient asks every plain
        ``http://`` server for h2c, and so does ``curl --http2``; refusing them refused those clients.
        llhttp cannot ignore it: it ends the message at the head, body unread, and hands over the
        connection. So the head is fed again, without the upgrade, to a fresh parser, then what
        followed it. CONNECT is an upgrade by its method alone, and is refused.
        """
        if self.parser.get_method() == b"CONNECT":
            self.reject(GatewayError("bad_http", "CONNECT is not supported"))
            return
        version = self.parser.get_http_version().encode()
        head = [self.parser.get_method(), b" ", self._url, b" HTTP/", version, b"\r\n"]
        for name, value in self._headers:
            if name in (b"upgrade", b"http2-settings"):
                continue
            if name == b"connection":
                value = b",".join(token for token in value.split(b",")
                                  if token.strip().lower() not in (b"upgrade", b"http2-settings"))
                if not value:
                    continue
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.parser = httptools.HttpRequestParser(self)
        self.data_received(b"".join(head) + rest)

    def eof_received(self) -> bool:
        return False  # half-closed clients are gone clients: close and cancel their work

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._release_body()
        self.server.connections.discard(self)
        if self.task is not None:
            self.task.cancel()
        self.queue.clear()
        self.parser = None  # it holds this connection: the pair would wait for the cyclic GC

    def pause_writing(self) -> None:
        if self.on_pause is not None:
            self.on_pause()

    def resume_writing(self) -> None:
        if self.on_resume is not None:
            self.on_resume()

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_message()
        self._in_head = True
        self.reading_since = time.monotonic()  # the deadline covers this request, even a pipelined one

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL_BYTES:
            raise _Reject(GatewayError("headers_too_large", "request line too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self.server.limits.max_headers:
            raise _Reject(GatewayError("headers_too_large", "too many request headers"))
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        # The byte size of the head is checked here, once; data_received bounds a head that is
        # still arriving, so llhttp never buffers more than the limit.
        limit = self.server.limits.max_header_bytes
        if len(self._url) + sum([len(n) + len(v) for n, v in self._headers]) > limit:
            raise _Reject(GatewayError("headers_too_large", "request headers too large"))
        self._in_head = False
        self._keep_alive = self.parser.should_keep_alive()
        hosts = 0
        expect = None
        for name, value in self._headers:
            if name == b"host":
                hosts += 1
            elif name == b"content-length" and value.isdigit() and int(value) > self.server.limits.max_body_bytes:
                raise _Reject(GatewayError(
                    "request_too_large", f"request body exceeds {self.server.limits.max_body_bytes} bytes"))
            elif name == b"expect":
                expect = value
            # Neither the engines nor the routing read a compressed body: refused before it is read,
            # instead of failing as invalid JSON.
            elif name == b"content-encoding" and value.strip().lower() != b"identity":
                raise _Reject(GatewayError("unsupported_encoding", "request bodies are accepted uncompressed "
                                           f"only; got Content-Encoding {value.decode('latin-1')!r}"))
        # RFC 9112 3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0; anything else is how
        # requests get routed by one hop and read differently by the next.
        if hosts > 1 or (hosts == 0 and self.parser.get_http_version() != "1.0"):
            raise _Reject(GatewayError("bad_http", "a request needs exactly one Host header"))
        # A client that asks first waits before sending the body: curl for bodies over 1 MB, for 1 s;
        # .NET Framework for every POST, for 350 ms. Answered only while no earlier request's
        # response is under way, which the interim answer would cut into; otherwise the client
        # sends the body when its wait runs out (RFC 9110 10.1.1).
        if (expect is not None and expect.lower() == b"100-continue" and self.task is None
                and self.transport is not None and self.parser.get_http_version() != "1.0"):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        size = len(body)
        server = self.server
        if self._body_len + size > server.limits.max_body_bytes:
            raise _Reject(GatewayError(
                "request_too_large", f"request body exceeds {server.limits.max_body_bytes} bytes"))
        # Bodies still arriving share one budget, so many slow or chunked uploads cannot take the
        # process's memory to max_connections x max_body_bytes.
        if server.buffered + size > server.limits.max_buffered_body_bytes:
            raise _Reject(GatewayError("server_busy", "too many request bodies arriving at once; retry"))
        self._body_len += size
        server.buffered += size
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return  # llhttp stopped at the head, leaving the body unread: _ignore_upgrade reads it
        path = self._url.split(b"?", 1)[0]
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._release_body()
        request = Request(self.parser.get_method(), path, self._headers, body, self._keep_alive,
                          time.monotonic(), self.peer)
        self.reading_since = 0.0
        if self.task is None:
            self._dispatch(request)
        else:
            self.queue.append(request)
            if len(self.queue) >= MAX_PIPELINED and self.transport is not None:
                self.transport.pause_reading()

    # -- running handlers ----------------------------------------------------------------------

    def _dispatch(self, request: Request) -> None:
        self.started = False
        self.keep_alive = request.keep_alive and not self.server.closing
        methods = self.server.routes.get(request.path) or self.server.subtree(request.path)
        if methods is None:
            handler = self.server.not_found
        else:
            handler = methods.get(request.method) or _method_not_allowed
        self.task = asyncio.get_running_loop().create_task(self._run(handler, request))

    async def _run(self, handler: Handler, request: Request) -> None:
        try:
            await handler(request, self)
        except asyncio.CancelledError:
            return  # client went away; the handler has cleaned up its upstream work
        except GatewayError as e:
            self.fail(e)
        except Exception as e:  # a gateway bug: answer 500 rather than drop the connection silently
            log.exception("handler crashed: %s", e)
            self.fail(GatewayError("internal_error", "internal gateway error"))
        finally:
            self.task = None
        self._finish_request()

    def _finish_request(self) -> None:
        self.started = False
        if self.closed:
            return
        if not self.keep_alive:
            self.transport.close()  # type: ignore[union-attr]
            return
        self.idle_since = time.monotonic()
        if self.queue:
            request = self.queue.popleft()
            self.transport.resume_reading()  # type: ignore[union-attr]
            self._dispatch(request)

    # -- responses (called by handlers) ----------------------------------------------------------

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
                content_type: bytes = b"application/json") -> None:
        """Write a whole response in one write."""
        if self.closed:
            return
        self.started = True
        self.transport.write(  # type: ignore[union-attr]
            self._head(status, headers, content_type) + b"content-length: %d\r\n\r\n" % len(body) + body)

    def start_stream(self, status: int, headers: list[tuple[bytes, bytes]], first: bytes,
                     content_type: bytes = b"text/event-stream") -> None:
        """Commit a chunked response: head and first data leave in one write."""
        if self.closed:
            return
        self.started = True
        head = self._head(status, headers, content_type)
        if first:
            self.transport.write(  # type: ignore[union-attr]
                head + b"transfer-encoding: chunked\r\n\r\n%x\r\n" % len(first) + first + b"\r\n")
        else:
            self.transport.write(head + b"transfer-encoding: chunked\r\n\r\n")  # type: ignore[union-attr]

    def send_chunk(self, data: bytes) -> None:
        if data and not self.closed:
            self.transport.write(b"%x\r\n" % len(data) + data + b"\r\n")  # type: ignore[union-attr]

    def end_stream(self, last: bytes = b"") -> None:
        if self.closed:
            return
        if last:
            self.transport.write(b"%x\r\n" % len(last) + last + b"\r\n0\r\n\r\n")  # type: ignore[union-attr]
        else:
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    def fail(self, error: GatewayError) -> None:
        """Answer with an error; after a committed stream, end it with an SSE error event instead."""
        if error.kind.close:
            self.keep_alive = False
        if not self.started:
            self.respond(error.kind.status, error.headers(), error.body())
        else:
            self.end_stream(error.sse_event())

    def reject(self, error: GatewayError) -> None:
        """A request that cannot be parsed or is over a limit: answer if possible and close."""
        self.reading_since = 0.0
        if self.transport is None or self.closed:
            return
        if self.task is None and not self.started:
            self.keep_alive = False
            self.respond(error.kind.status, error.headers(), error.body())
            self.transport.close()
        else:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]], content_type: bytes) -> bytes:
        parts = [b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n" % (status, REASONS.get(status, b"Unknown"),
                                                              content_type)]
        for name, value in headers:
            parts.append(name + b": " + value + b"\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        return b"".join(parts)


async def _method_not_allowed(request: Request, conn: Connection) -> None:
    raise GatewayError("method_not_allowed", f"method {request.method.decode()} is not allowed on this path")

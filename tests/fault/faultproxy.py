"""A TCP fault proxy on loopback: Toxiproxy's toxics rebuilt small, for the reliability scenarios.

Toxiproxy (a Go server) is not packaged for this machine, so this is the part of it the tests need.
A :class:`FaultProxy` listens on 127.0.0.1 and relays each accepted connection to one upstream
address with two byte pumps, one per direction: *upstream* (client to server: the gateway's
requests) and *downstream* (server to client: the engine's responses). Toxics act on the bytes as
they pass. They live in one frozen :class:`Toxics`, swapped whole by :meth:`FaultProxy.set`, so each
read sees one consistent set, and a change reaches open connections from their next read on.

Each toxic, with Toxiproxy's name for it:

``latency_s``, ``jitter_s`` (latency)
    each read waits latency +- jitter before it is passed on, in both directions; order is kept.
``slice_bytes``, ``slice_delay_s`` (slicer)
    downstream bytes are written in pieces of at most N bytes, with a pause after each.
``reset_after_s`` (reset_peer)
    each connection is reset (RST to both peers) this long after it opened or the toxic was set,
    whichever is later; 0 resets at once.
``timeout_s`` (timeout)
    nothing passes either way; after that long the connection is closed (0: it stays open).
``close_after_bytes`` (limit_data)
    after N downstream bytes both sides are closed (FIN).
``stall_after_events`` (no Toxiproxy equivalent)
    after N SSE events downstream (counted by their blank-line ends, per connection) nothing more
    passes and the connection stays open: a hung engine.

Besides the toxics, :meth:`FaultProxy.refuse` closes the listening socket and resets every open
connection, so that connects are refused, as when an engine's port closes; :meth:`FaultProxy.listen`
opens the same port again. Every request head the proxy receives is recorded as a
:class:`SeenRequest` (time, method, path, ``x-request-id``): a test can tell which attempts reached
the proxy and when, including those the gateway then retried elsewhere. With ``upstream=None`` the
proxy is a *tripwire*: it records the requests it receives and resets their connections.

A proxy runs on the event loop that starts it. :class:`ProxyThread` runs one on a loop of its own in
a daemon thread, so that synchronous tests, and the processes they stop, cannot stall it.

Cost: two tasks and two sockets per connection and one ``await`` per read: plenty for a few hundred
connections on loopback, not a benchmarking tool. Request heads are followed by their
``Content-Length`` framing; a chunked request body ends the recording for that connection.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Self, TypeVar

HOST = "127.0.0.1"
READ_BYTES = 65536
MAX_HEAD_BYTES = 65536

Address = tuple[str, int]
T = TypeVar("T")


@dataclass(frozen=True)
class Toxics:
    """The faults applied to the bytes passing through; the defaults pass everything unchanged."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    slice_bytes: int | None = None
    slice_delay_s: float = 0.0
    reset_after_s: float | None = None
    timeout_s: float | None = None
    close_after_bytes: int | None = None
    stall_after_events: int | None = None

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.slice_bytes == 0:
            raise ValueError("slice_bytes must be at least 1")


NO_TOXICS = Toxics()


@dataclass(frozen=True)
class SeenRequest:
    """A request head the proxy received, stamped with ``time.monotonic()`` when it was complete."""

    at: float
    method: str
    path: str
    request_id: str | None


class _RequestHeads:
    """Follows HTTP/1.1 request framing over one connection's upstream bytes: head, then
    ``Content-Length`` bytes of body, then the next head."""

    __slots__ = ("body_left", "buffer", "lost")

    def __init__(self) -> None:
        self.buffer = b""
        self.body_left = 0
        self.lost = False  # framing this class cannot follow (chunked body, huge head): stop recording

    def feed(self, data: bytes, now: float) -> list[SeenRequest]:
        seen: list[SeenRequest] = []
        while data and not self.lost:
            if self.body_left:
                skipped = min(self.body_left, len(data))
                self.body_left -= skipped
                data = data[skipped:]
                continue
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                self.lost = len(self.buffer) > MAX_HEAD_BYTES
                break
            head, data, self.buffer = self.buffer[:end], self.buffer[end + 4:], b""
            request_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            method, _, target = request_line.partition(" ")
            seen.append(SeenRequest(now, method, target.rpartition(" ")[0], headers.get("x-request-id")))
            length = headers.get("content-length", "0")
            if "chunked" in headers.get("transfer-encoding", "").lower() or not length.isdigit():
                self.lost = True
            else:
                self.body_left = int(length)
        return seen


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One relayed connection: both sockets, and the per-connection state the toxics read."""

    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter):
        self.proxy = proxy
        self.writers = [client]
        self.opened_at = time.monotonic()
        self.heads = _RequestHeads()
        self.down_bytes = 0
        self.down_events = 0
        self.open_newline = False  # the last downstream read ended in a newline that may start an event end
        self.stalled = False
        self.closed = False
        self._timers: list[asyncio.TimerHandle] = []

    def arm(self, toxics: Toxics, since: float) -> None:
        """(Re)schedule the timed toxics, counted from ``since`` or the connection's opening."""
        for timer in self._timers:
            timer.cancel()
        loop = asyncio.get_running_loop()
        start = max(self.opened_at, since)
        now = time.monotonic()
        self._timers = []
        if toxics.reset_after_s is not None:
            self._timers.append(loop.call_later(max(0.0, start + toxics.reset_after_s - now), self.reset))
        if toxics.timeout_s:
            self._timers.append(loop.call_later(max(0.0, start + toxics.timeout_s - now), self.close))

    def downstream(self, data: bytes, toxics: Toxics) -> tuple[bytes, str | None]:
        """The part of ``data`` that may pass to the client, and what follows: None, "stall" or "close"."""
        cuts: list[tuple[int, str]] = []
        if toxics.stall_after_events is not None:
            cut = self._event_cut(data, toxics.stall_after_events)
            if cut is not None:
                cuts.append((cut, "stall"))
        if toxics.close_after_bytes is not None and self.down_bytes + len(data) >= toxics.close_after_bytes:
            cuts.append((max(0, toxics.close_after_bytes - self.down_bytes), "close"))
        if not cuts:
            self.down_bytes += len(data)
            return data, None
        cut, after = min(cuts)
        self.down_bytes += cut
        return data[:cut], after

    def _event_cut(self, data: bytes, limit: int) -> int | None:
        """Count SSE event ends in ``data``; the index just past the end of event ``limit``, if there."""
        if self.down_events >= limit:
            return 0
        prefix = 1 if self.open_newline else 0
        scan = b"\n" * prefix + data
        start = 0
        last_end = -1
        while (i := scan.find(b"\n\n", start)) >= 0:
            self.down_events += 1
            last_end = start = i + 2
            if self.down_events >= limit:
                return max(0, last_end - prefix)
        self.open_newline = scan.endswith(b"\n") and last_end != len(scan)
        return None

    def close(self) -> None:
        if not self.closed:
            self._end()
            for writer in self.writers:
                writer.close()

    def reset(self) -> None:
        if not self.closed:
            self._end()
            for writer in self.writers:
                _reset(writer)

    def _end(self) -> None:
        self.closed = True
        for timer in self._timers:
            timer.cancel()
        self.proxy.links.discard(self)


class FaultProxy:
    """Listens on 127.0.0.1:``port`` (0: any free port) and relays to ``upstream`` through the toxics."""

    def __init__(self, upstream: Address | None, port: int = 0, toxics: Toxics = NO_TOXICS):
        self.upstream = upstream
        self.port = port
        self.toxics = toxics
        self.toxics_set_at = 0.0
        self.requests: list[SeenRequest] = []
        self.accepted = 0
        self.links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def listen(self) -> None:
        """Open the listening socket (again: on the same port)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, HOST, self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

    async def set(self, toxics: Toxics) -> None:
        """Replace the toxics; timed ones restart from now on open connections."""
        self.toxics = toxics
        self.toxics_set_at = time.monotonic()
        for link in list(self.links):
            link.arm(toxics, self.toxics_set_at)

    async def refuse(self) -> None:
        """Close the listening socket and reset every connection: new connects are refused."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self.links):
            link.reset()

    async def close(self) -> None:
        """Refuse, then let every connection's task end (reset sockets end their pumps)."""
        await self.refuse()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=2.0)
            for task in stuck:
                task.cancel()
        await asyncio.sleep(0)  # one turn of the loop: the aborted transports close their sockets

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        link = _Link(self, writer)
        self.links.add(link)
        link.arm(self.toxics, self.toxics_set_at)
        try:
            if self.upstream is None:
                await self._trip(link, reader)
                return
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                link.reset()
                return
            link.writers.append(server_writer)
            if link.closed:  # reset by a toxic while connecting
                _reset(server_writer)
                return
            await asyncio.gather(self._pump(link, reader, server_writer, downstream=False),
                                 self._pump(link, server_reader, writer, downstream=True))
            link.close()
        finally:
            self._tasks.discard(task)

    async def _trip(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while data := await reader.read(READ_BYTES):
                seen = link.heads.feed(data, time.monotonic())
                self.requests.extend(seen)
                if seen:
                    break
        except OSError:
            pass
        link.reset()

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    downstream: bool) -> None:
        try:
            while not link.closed and (data := await reader.read(READ_BYTES)):
                toxics = self.toxics
                if not downstream:
                    self.requests.extend(link.heads.feed(data, time.monotonic()))
                if toxics.timeout_s is not None or (downstream and link.stalled):
                    continue  # read and dropped: the peer sees silence, not back-pressure
                if toxics.latency_s or toxics.jitter_s:
                    jitter = random.uniform(-toxics.jitter_s, toxics.jitter_s)
                    await asyncio.sleep(max(0.0, toxics.latency_s + jitter))
                after = None
                if downstream:
                    data, after = link.downstream(data, toxics)
                if downstream and toxics.slice_bytes:
                    for i in range(0, len(data), toxics.slice_bytes):
                        writer.write(data[i:i + toxics.slice_bytes])
                        await writer.drain()
                        await asyncio.sleep(toxics.slice_delay_s)
                elif data:
                    writer.write(data)
                    await writer.drain()
                if after == "close":
                    link.close()
                    return
                link.stalled = after == "stall"
            if writer.can_write_eof():
                writer.write_eof()  # a half close passes on as one: the other direction keeps flowing
        except OSError:  # a peer reset its side: pass the reset on to the other
            link.reset()


class ProxyThread:
    """A :class:`FaultProxy` on its own event loop in a daemon thread; call it from any thread.

    Use as a context manager, or call :meth:`close`. The recorded requests are read without locking:
    the proxy's thread only appends to its list.
    """

    def __init__(self, upstream: Address | None, port: int = 0, toxics: Toxics = NO_TOXICS):
        self.proxy = FaultProxy(upstream, port, toxics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        try:
            self._run(self.proxy.listen())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def requests(self) -> list[SeenRequest]:
        return list(self.proxy.requests)

    def set(self, toxics: Toxics) -> None:
        self._run(self.proxy.set(toxics))

    def refuse(self) -> None:
        self._run(self.proxy.refuse())

    def listen(self) -> None:
        self._run(self.proxy.listen())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.proxy.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

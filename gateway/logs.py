"""Structured logs: one JSON access-log line per request, and JSON lines for everything else.

The access log is buffered; the ledger (``ledger.py``) writes its lines in batches, off the request
path, and flushes it a few times a second. It never holds prompt text or keys: request id, key id,
model, pool, endpoint, status, timings and token counts only.

Neither log is written by the event loop: both go through :class:`Output`, one thread per process
that does the writes, so that a reader who stops reading cannot stop the requests (its docstring).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import msgspec
import orjson

from gateway.settings import Logging

FLUSH_BYTES = 64 * 1024
STDOUT, STDERR = 1, 2


class Output:
    """Writes the process's log lines, the access log to stdout and the rest to stderr, from one
    thread, in the order they were handed over.

    Why a thread. A write to a pipe blocks once the reader is 64 KB behind: a container runtime's log
    shim slowed by its disk, a stuck collector, a terminal paused with Ctrl-S. Written from the event
    loop, that stopped every request of the process: a gateway whose stdout nobody read stopped
    answering after 173 requests. Here the loop only appends to a buffer, and this thread does the
    writes that may block. The buffer is bounded (``logging.max_pending_bytes``): while the reader
    is stalled and the buffer is full, new lines are dropped and counted
    (``gateway_log_lines_dropped_total{log}``), as Docker's non-blocking log mode does. A lost log
    line is cheaper than a lost request. Lines that cannot be written at all (nobody reads the pipe
    any more) are dropped and counted the same way.

    Why ``os.write``: the thread holds no Python file object's lock while it waits, so an exit with
    the reader stalled does not deadlock on the interpreter's final flush of ``sys.stdout``.

    Cost: one lock and one notify per batch handed over (the access log's, about every 64 requests
    or 50 ms), against a ``write`` system call on the loop before.
    """

    def __init__(self, max_pending_bytes: int):
        self.max_pending_bytes = max_pending_bytes
        self._batches: collections.deque[tuple[int, bytes, int, str]] = collections.deque()
        self._pending = 0  # bytes handed over and not yet written
        self._dropped: collections.Counter[str] = collections.Counter()  # lines, by log
        self._ready = threading.Condition()
        threading.Thread(target=self._run, name="log-output", daemon=True).start()

    def put(self, fd: int, data: bytes, lines: int, log: str) -> None:
        """Hand ``data`` (``lines`` whole lines of ``log``) over for writing to ``fd``; never blocks
        on the reader."""
        with self._ready:
            if self._pending + len(data) > self.max_pending_bytes:
                self._dropped[log] += lines
                return
            self._batches.append((fd, data, lines, log))
            self._pending += len(data)
            self._ready.notify()

    def take_dropped(self) -> dict[str, int]:
        """Lines dropped since the last call, by log."""
        with self._ready:
            dropped, self._dropped = dict(self._dropped), collections.Counter()
        return dropped

    def close(self, timeout_s: float) -> None:
        """Wait until everything handed over is written, or ``timeout_s`` (the reader may be gone)."""
        with self._ready:
            self._ready.wait_for(lambda: not self._pending, timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._batches)
                fd, data, lines, log = self._batches.popleft()
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                with self._ready:
                    self._dropped[log] += lines
            with self._ready:
                self._pending -= len(data)
                self._ready.notify_all()


class AccessLine(msgspec.Struct):
    """One access-log line; field order is the JSON key order. Never prompt text, never keys."""

    ts: float
    request_id: str
    key_id: str
    route: str
    model: str
    pool: str
    endpoint: str
    branch: str
    status: int
    outcome: str
    stream: bool
    attempts: int
    ttft_ms: float | None
    itl_ms: float | None
    total_ms: float
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None


class AccessLog:
    def __init__(self, enabled: bool, output: Output, fd: int = STDOUT):
        self.enabled = enabled
        self.output = output
        self.fd = fd
        self._buf: list[bytes] = []
        self._size = 0
        self._encode = msgspec.json.Encoder().encode

    def write(self, record: AccessLine) -> None:
        line = self._encode(record) + b"\n"
        self._buf.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self.output.put(self.fd, b"".join(self._buf), len(self._buf), "access")
            self._buf.clear()
            self._size = 0


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class _OutputHandler(logging.Handler):
    """Hands each formatted record to the process's :class:`Output`, for stderr."""

    def __init__(self, output: Output, fd: int = STDERR):
        super().__init__()
        self.output = output
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode() + b"\n"
        except Exception:
            self.handleError(record)
            return
        self.output.put(self.fd, line, 1, "app")


def setup(config: Logging) -> Output:
    """Route every log record through a new :class:`Output`, returned for the access log to share."""
    output = Output(config.max_pending_bytes)
    handler = _OutputHandler(output)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return output


def now_s() -> float:
    return round(time.time(), 3)

"""Structured logs: one JSON access-log line per request, and JSON lines for everything else.

The access log is buffered; the ledger (``ledger.py``) writes its lines in batches, off the request
path, and flushes it a few times a second. It never holds prompt text or keys: request id, key id,
model, pool, endpoint, status, timings and token counts only.
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec
import orjson

FLUSH_BYTES = 64 * 1024


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
    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout.buffer
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
            data = b"".join(self._buf)
            self._buf.clear()
            self._size = 0
            try:
                self.stream.write(data)
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                pass  # nobody reads our stdout any more; requests must not fail for it



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


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def now_s() -> float:
    return round(time.time(), 3)

"""Every error the gateway answers with, and the one table that maps it to an HTTP status.

No other module picks a status code for an error of its own. Bodies follow OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` so that the official SDKs raise the right
exception class; ``x-should-retry`` tells those SDKs whether a retry can help.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import orjson


class Kind(NamedTuple):
    status: int
    type: str
    code: str
    should_retry: bool | None  # None: leave the client's own rule in charge
    retry_after_s: int | None = None
    close: bool = False  # the connection cannot carry another request


KINDS: dict[str, Kind] = {
    "invalid_json": Kind(400, "invalid_request_error", "invalid_json", False),
    "invalid_request": Kind(400, "invalid_request_error", "invalid_value", False),
    "bad_http": Kind(400, "invalid_request_error", "bad_request", False, close=True),
    "invalid_api_key": Kind(401, "authentication_error", "invalid_api_key", False),
    "permission_denied": Kind(403, "permission_error", "permission_denied", False),
    "not_found": Kind(404, "invalid_request_error", "not_found", False),
    "model_not_found": Kind(404, "invalid_request_error", "model_not_found", False),
    "method_not_allowed": Kind(405, "invalid_request_error", "method_not_allowed", False),
    "request_timeout": Kind(408, "invalid_request_error", "request_timeout", False, close=True),
    "request_too_large": Kind(413, "invalid_request_error", "request_too_large", False, close=True),
    "unsupported_encoding": Kind(415, "invalid_request_error", "unsupported_content_encoding", False, close=True),
    "headers_too_large": Kind(431, "invalid_request_error", "request_header_fields_too_large", False, close=True),
    "rate_limited": Kind(429, "rate_limit_error", "rate_limit_exceeded", True, 1),
    "overloaded": Kind(429, "rate_limit_error", "overloaded", True, 1),
    "internal_error": Kind(500, "server_error", "internal_error", True),
    "upstream_error": Kind(502, "server_error", "upstream_error", True),
    "worker_unavailable": Kind(502, "server_error", "worker_unavailable", True),
    "no_healthy_upstream": Kind(503, "service_unavailable_error", "no_healthy_upstream", True, 1),
    "server_busy": Kind(503, "service_unavailable_error", "server_busy", True, 1, close=True),
    "draining": Kind(503, "service_unavailable_error", "draining", True, 1, close=True),
    "upstream_timeout": Kind(504, "server_error", "upstream_timeout", True),
}

# Status line reason phrases for every status the gateway can send, its own or relayed.
REASONS: dict[int, bytes] = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict", 413: b"Payload Too Large",
    415: b"Unsupported Media Type", 422: b"Unprocessable Entity", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


class GatewayError(Exception):
    """An error answered by the gateway itself. ``kind`` is a key of :data:`KINDS`."""

    def __init__(self, kind: str, message: str, param: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.kind = KINDS[kind]
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s  # overrides the kind's, e.g. a token bucket's real refill time

    def body(self) -> bytes:
        return error_body(self.message, self.kind.type, self.kind.code, self.param)

    def headers(self) -> list[tuple[bytes, bytes]]:
        k = self.kind
        out: list[tuple[bytes, bytes]] = []
        if k.should_retry is not None:
            out.append((b"x-should-retry", b"true" if k.should_retry else b"false"))
        if self.retry_after_s is not None:
            out.append((b"retry-after", b"%d" % math.ceil(self.retry_after_s)))
            out.append((b"retry-after-ms", b"%d" % math.ceil(self.retry_after_s * 1000)))
        elif k.retry_after_s is not None:
            out.append((b"retry-after", b"%d" % k.retry_after_s))
        if k.status == 401:
            out.append((b"www-authenticate", b"Bearer"))
        elif k.status == 415:
            out.append((b"accept-encoding", b"identity"))  # RFC 9110 15.5.16
        return out

    def sse_event(self) -> bytes:
        """The terminal SSE event for a failure after the stream was committed (no [DONE] follows)."""
        return b"data: " + self.body() + b"\n\n"


class EngineError(GatewayError):
    """An engine's own error answer, relayed with its status once retries are exhausted.

    A relayed 5xx or 429 says the replicas are out of capacity now, so the client is told a retry
    can help, after a second; other statuses leave the client's own rule in charge."""

    def __init__(self, status: int, body: bytes):
        Exception.__init__(self, f"engine answered {status}")
        busy = status >= 500 or status == 429
        self.kind = Kind(status, "", "", True if busy else None, 1 if busy else None)
        self.message = str(self)
        self.param = None
        self.retry_after_s = None
        self._body = engine_error_body(status, body)

    def body(self) -> bytes:
        return self._body


def model_not_found(model: str) -> GatewayError:
    """One answer for a model no pool serves, a model a key may not use, and a model looked up by id,
    so that a key cannot tell them apart (the name is cut at 200 characters: the client wrote it)."""
    return GatewayError("model_not_found", f"The model `{model[:200]}` does not exist.", "model")


def upstream_failure(reason: str, detail: str) -> GatewayError:
    """Every attempt failed before the commit point, the last one for ``reason``."""
    if reason == "first_byte_timeout":
        return GatewayError("upstream_timeout", f"engine did not answer in time: {detail}")
    return GatewayError("upstream_error", f"engine unavailable: {detail}")


def engine_error_body(status: int, body: bytes) -> bytes:
    """An engine's error in OpenAI's shape: its message and param kept, ``type`` from OpenAI's
    vocabulary by status, ``code`` a string or null. vLLM puts the numeric status in ``code`` and an
    exception name in ``type``; SGLang and older vLLM answer flat ``{"object": "error", ...}``."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict):
        error = doc if isinstance(doc, dict) else {}
    message, param, code = error.get("message"), error.get("param"), error.get("code")
    type_ = "invalid_request_error" if status < 500 else "server_error"
    if not isinstance(code, str):
        code = "upstream_error" if status >= 500 else None
    return error_body(str(message or f"engine answered {status}"), type_, code,
                      param if isinstance(param, str) else None)


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})

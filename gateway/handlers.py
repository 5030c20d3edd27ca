"""Thin HTTP handlers. Both generation endpoints run one straight line of named steps (``_generate``):

    begin -> auth -> decode -> admit -> route -> relay -> settle

``begin`` names the request (x-request-id), ``auth`` finds the API key's record, ``decode`` reads
only the fields routing needs (and refuses media URLs engines must not fetch), ``admit`` refuses work
the process or the key must not take (draining, model not allowed, per-key rate limits), ``route``
picks the pool and an ordered list of endpoints (waiting in the pool's queue if all are full),
``relay`` runs the attempts and streams the answer, and ``settle`` returns the key's slot, reconciles
its tokens with the real usage, and records metrics and the access-log line exactly once, whatever
happened.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes

import orjson

from gateway import affinity, limits, protocol
from gateway.admission import Admission
from gateway.auth import KeyRecord, KeyStore
from gateway.errors import GatewayError, model_not_found
from gateway.ledger import Ledger
from gateway.metrics import EXPOSITION_CONTENT_TYPE
from gateway.relay import Call, Relay, forward_headers
from gateway.router import BATCH, INTERACTIVE, Router
from gateway.server import Connection, Request

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
JSON = b"application/json"


class Lifecycle:
    """Process state the handlers read: readiness and draining."""

    def __init__(self) -> None:
        self.draining = False


class Handlers:
    def __init__(self, keys: KeyStore, limiter: limits.Limiter, router: Router, admission: Admission,
                 relay: Relay, ledger: Ledger, lifecycle: Lifecycle, models: list[str],
                 public_metrics: bool, media_hosts: frozenset[str]):
        self.keys = keys
        self.limiter = limiter
        self.media_hosts = media_hosts
        self.router = router
        self.max_prefix_chars = router.routing.max_prefix_chars
        self.admission = admission
        self.relay = relay
        self.ledger = ledger
        self.lifecycle = lifecycle
        self.public_metrics = public_metrics
        self._request_ids = _request_ids()
        self._model_bodies = {m: orjson.dumps({"id": m, "object": "model", "created": 0, "owned_by": "edge-gateway"})
                              for m in models}
        self._models_body = b'{"object":"list","data":[' + b",".join(self._model_bodies.values()) + b"]}"

    # -- generation ---------------------------------------------------------------------------

    async def chat_completions(self, request: Request, conn: Connection) -> None:
        await self._generate(request, conn, "chat", self._decode_chat)

    async def completions(self, request: Request, conn: Connection) -> None:
        await self._generate(request, conn, "completions", _decode_completion)

    async def _generate(self, request: Request, conn: Connection, route: str, decode) -> None:
        call = self._begin(request, route)
        try:
            key = self.keys.authenticate(request.header(b"authorization"))
            decoded, text = decode(request.body)
            self._admit(call, key, decoded)
            await self._route(call, request, key, decoded, text)
            await self.relay.serve(call, conn)
        except GatewayError as e:
            call.status = e.kind.status
            raise
        finally:
            self._settle(call)

    def _decode_chat(self, body: bytes):
        """The routing fields and the canonical prompt text of a chat request."""
        decoded = protocol.decode_chat(body)
        protocol.check_media(decoded, self.media_hosts)
        return decoded, affinity.chat_text(decoded.messages, self.max_prefix_chars)

    def _begin(self, request: Request, route: str) -> Call:
        rid = request.header(b"x-request-id")
        if rid is None or not _REQUEST_ID.match(rid):
            rid = next(self._request_ids)
        call = Call(route, request.path, rid, request.received_at)
        call.body = request.body
        return call

    def _admit(self, call: Call, key: KeyRecord, decoded) -> None:
        if self.lifecycle.draining:
            raise GatewayError("draining", "the gateway is shutting down; retry on another replica")
        call.key_id = key.key_id
        if decoded.model in self._model_bodies:
            call.model = decoded.model
        call.stream = decoded.stream is True
        key.check_model(decoded.model)
        if key.limited:
            budget = decoded.max_completion_tokens or decoded.max_tokens
            estimate = limits.estimate_tokens(len(call.body), budget, protocol.choice_count(decoded))
            call.quota = self.limiter.admit(key, estimate, time.monotonic())

    async def _route(self, call: Call, request: Request, key: KeyRecord, decoded, text: str) -> None:
        """Pool and ordered candidates; waits in the pool's queue when every candidate is full."""
        header = request.header(b"x-workload-class")
        if header is not None:
            workload = BATCH if header == b"batch" else INTERACTIVE
        else:
            workload = BATCH if decoded.service_tier == "flex" else key.default_class
        def route() -> None:
            self.router.route(call, request.header, decoded, text, workload)

        if not self.admission.place(call, route):
            await self.admission.wait(call, route)
        call.forward_headers = forward_headers(request.headers)

    def _settle(self, call: Call) -> None:
        """Exactly once per request: return the key's slot and reconcile its tokens with the real
        usage, then hand the call to the ledger (metrics and the access-log line, in batches)."""
        if call.quota is not None:
            usage = call.usage()
            used = usage.get(b"prompt_tokens", 0) + usage.get(b"completion_tokens", 0) if usage else None
            self.limiter.settle(call.quota, used, time.monotonic())
        if not call.done_at:
            call.done_at = time.monotonic()
        self.ledger.add(call)

    # -- the rest of the API ------------------------------------------------------------------

    async def models_list(self, request: Request, conn: Connection) -> None:
        conn.respond(200, [], self._models_body)

    async def models_retrieve(self, request: Request, conn: Connection) -> None:
        # The SDKs percent-encode the id (a "/" in "org/model" arrives as %2F); curl may not.
        model = unquote_to_bytes(request.path[len(b"/v1/models/"):]).decode("utf-8", "replace")
        body = self._model_bodies.get(model)
        if body is None:
            raise model_not_found(model)
        conn.respond(200, [], body)

    async def healthz(self, request: Request, conn: Connection) -> None:
        conn.respond(200, [], b'{"status":"ok"}')

    async def readyz(self, request: Request, conn: Connection) -> None:
        ready, body = readiness(self.router, self.lifecycle)
        conn.respond(200 if ready else 503, [], body)

    async def metrics_text(self, request: Request, conn: Connection) -> None:
        if not self.public_metrics:
            raise GatewayError("not_found", "no such path")
        conn.respond(200, [], self.ledger.exposition(), EXPOSITION_CONTENT_TYPE.encode())

    async def not_found(self, request: Request, conn: Connection) -> None:
        raise GatewayError("not_found", f"no such path: {request.path.decode('latin-1')[:200]}")


def _request_ids() -> Iterator[bytes]:
    """Ids for requests that bring none: 64 random bits per process, then a counter (24 hex digits).

    Unique across processes and restarts like a random id, without a getrandom call per request
    (profiled at about 3 % of the gateway's CPU). Ids only name requests; nothing trusts them.
    """
    prefix = secrets.token_hex(8)
    return (f"{prefix}{n:08x}".encode() for n in itertools.count())


def _decode_completion(body: bytes):
    decoded = protocol.decode_completion(body)
    return decoded, protocol.completion_text(decoded.prompt)


def readiness(router: Router, lifecycle: Lifecycle) -> tuple[bool, bytes]:
    """Ready when not draining and every configured model has at least one healthy endpoint."""
    missing = [model for model, pools in router.by_model.items()
               if not any(p.has_healthy() for group in pools.values() for p in group)]
    ready = not lifecycle.draining and not missing
    return ready, orjson.dumps({"ready": ready, "draining": lifecycle.draining, "models_without_endpoint": missing})

"""The admin listener: an aiohttp app on its own port, bound to loopback unless configured otherwise.

It serves what operators and Prometheus need (``/metrics``, ``/healthz``, ``/readyz``) and the
control plane: list endpoints with health and load, eject or restore an endpoint, drain the process,
reload API keys. None of it exists on the public listener. When API keys are configured, every
``/admin/*`` call needs an admin-role key (401 without a valid key, 403 with a user key); every
action writes one audit log line naming the key id, never the key.

In the endpoint list, ``kv_usage`` is the engine's last reported value: while ``signal_stale`` is
true it is out of date, and routing ignores it (and the engine's foreign load); ``signal_stale`` is
null until the first round of scrapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway.auth import KeyFileError, KeyStore
from gateway.errors import GatewayError
from gateway.handlers import Lifecycle, readiness
from gateway.ledger import Ledger
from gateway.outlier import OutlierDetector
from gateway.pool import Pool
from gateway.router import Router
from gateway.settings import Settings

audit = logging.getLogger("gateway.audit")


def admin_app(*, pools: list[Pool], router: Router, lifecycle: Lifecycle, ledger: Ledger,
              outlier: OutlierDetector, keys: KeyStore, request_drain: Callable[[], None]) -> web.Application:
    def admin_action(handler: Callable[[web.Request, str], Awaitable[web.Response]]):
        async def wrapped(request: web.Request) -> web.Response:
            try:
                key_id = _authorize(keys, request)
            except GatewayError as e:
                audit.warning("admin request refused", extra={"fields": {
                    "path": request.path, "status": e.kind.status, "peer": request.remote}})
                return web.Response(status=e.kind.status, body=e.body(), content_type="application/json",
                                    headers={k.decode(): v.decode() for k, v in e.headers()})
            return await handler(request, key_id)
        return wrapped

    def log_action(action: str, key_id: str, request: web.Request, **fields) -> None:
        audit.info("admin action", extra={"fields": {
            "action": action, "key_id": key_id, "peer": request.remote, **fields}})

    def find(request: web.Request):
        # Looked up per request: a pool with an `srv` name changes its replicas as DNS changes.
        name, endpoint = request.match_info["pool"], request.match_info["endpoint"]
        for ep in (e for p in pools if p.name == name for e in p.endpoints):
            if ep.id == endpoint:
                return ep
        raise web.HTTPNotFound(text="no such pool/endpoint")

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=ledger.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        ready, body = readiness(router, lifecycle)
        return web.Response(status=200 if ready else 503, body=body, content_type="application/json")

    async def list_endpoints(request: web.Request, key_id: str) -> web.Response:
        now = time.monotonic()
        return web.Response(body=orjson.dumps([
            {"pool": p.name, "engine": p.engine, "role": p.role, "endpoint": e.id, "healthy": e.healthy,
             "available": e.available, "ejected_for_s": round(max(0.0, e.ejected_until - now), 3),
             "panic": p.panic, "in_flight": e.in_flight, "peer_in_flight": e.peer_in_flight, "load": e.load,
             "weight": round(e.weight, 3),
             "kv_usage": e.engine_kv_usage, "saturated": e.saturated, "signal_stale": e.signal_stale}
            for p in pools for e in p.endpoints]), content_type="application/json")

    async def eject(request: web.Request, key_id: str) -> web.Response:
        ep = find(request)
        seconds = float(request.query.get("seconds", "300"))
        outlier.eject(ep, time.monotonic(), seconds)
        log_action("eject", key_id, request, endpoint=ep.id, pool=ep.pool, seconds=seconds)
        return web.json_response({"endpoint": ep.id, "ejected_for_s": seconds})

    async def restore(request: web.Request, key_id: str) -> web.Response:
        ep = find(request)
        outlier.restore(ep, time.monotonic())
        log_action("restore", key_id, request, endpoint=ep.id, pool=ep.pool)
        return web.json_response({"endpoint": ep.id, "restored": True})

    async def drain(request: web.Request, key_id: str) -> web.Response:
        log_action("drain", key_id, request)
        request_drain()
        return web.json_response({"draining": True})

    async def reload_keys(request: web.Request, key_id: str) -> web.Response:
        try:
            changes = keys.reload()
        except KeyFileError as e:
            log_action("reload_keys_failed", key_id, request, error=str(e))
            return web.json_response({"error": {"message": str(e), "type": "invalid_request_error",
                                                "param": None, "code": "keys_reload_failed"}}, status=400)
        log_action("reload_keys", key_id, request, added=len(changes.added), removed=len(changes.removed),
                   changed=len(changes.changed))
        return web.json_response({"keys": len(keys), "added": len(changes.added),
                                  "removed": len(changes.removed), "changed": len(changes.changed)})

    app = web.Application()
    app.router.add_get("/metrics", metrics_text)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/endpoints", admin_action(list_endpoints))
    app.router.add_post("/admin/endpoints/{pool}/{endpoint}/eject", admin_action(eject))
    app.router.add_post("/admin/endpoints/{pool}/{endpoint}/restore", admin_action(restore))
    app.router.add_post("/admin/drain", admin_action(drain))
    app.router.add_post("/admin/keys/reload", admin_action(reload_keys))
    return app


def _authorize(keys: KeyStore, request: web.Request) -> str:
    """The admin key's id; without configured keys the admin port is open (it binds loopback)."""
    if not keys.enabled:
        return "-"
    header = request.headers.get("Authorization")
    record = keys.authenticate(header.encode("latin-1") if header is not None else None)
    record.check_admin()
    return record.key_id


async def start_admin(app: web.Application, settings: Settings) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.admin.host, settings.admin.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port

"""The admin listener: an aiohttp app on its own port, bound to loopback unless configured otherwise.

It serves what operators and Prometheus need (``/metrics``, ``/healthz``, ``/readyz``) and the
control plane: list endpoints with health and load, eject or restore an endpoint, drain the process,
reload API keys. None of it exists on the public listener. When API keys are configured, every
``/admin/*`` call needs an admin-role key (401 without a valid key, 403 with a user key); every
action writes one audit log line naming the key id, never the key.

In the endpoint list, ``kv_usage`` is the engine's last reported value: while ``signal_stale`` is
true it is out of date, and routing ignores it (and the engine's foreign load); ``signal_stale`` is
null until the first round of scrapes.

With ``--workers N`` the supervisor serves the admin port (:func:`supervisor_app`) and each worker
serves this app on a loopback socket the supervisor bound for it; the supervisor asks every worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import aiohttp
import orjson
from aiohttp import web

from gateway import listeners
from gateway.auth import KeyFileError, KeyStore
from gateway.errors import GatewayError
from gateway.handlers import Lifecycle, readiness
from gateway.ledger import Ledger
from gateway.metrics import EXPOSITION_CONTENT_TYPE
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
                return _error_response(e)
            try:
                return await handler(request, key_id)
            except GatewayError as e:
                return _error_response(e)
        return wrapped

    def log_action(action: str, key_id: str, request: web.Request, **fields) -> None:
        if "X-Forwarded-For" in request.headers:  # the supervisor's, naming its own client
            fields["forwarded_for"] = request.headers["X-Forwarded-For"]
        audit.info("admin action", extra={"fields": {
            "action": action, "key_id": key_id, "peer": request.remote, **fields}})

    def find(request: web.Request):
        # Looked up per request: a pool with an `srv` name changes its replicas as DNS changes.
        name, endpoint = request.match_info["pool"], request.match_info["endpoint"]
        for ep in (e for p in pools if p.name == name for e in p.endpoints):
            if ep.id == endpoint:
                return ep
        raise GatewayError("not_found", f"no endpoint {endpoint!r} in a pool {name!r}")

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=ledger.exposition(), headers={"Content-Type": EXPOSITION_CONTENT_TYPE})

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
        try:
            seconds = float(request.query.get("seconds", "300"))
        except ValueError:
            seconds = math.nan
        if not 0 < seconds < math.inf:
            raise GatewayError("invalid_request", "seconds must be a positive number", param="seconds")
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


def _error_response(e: GatewayError) -> web.Response:
    return web.Response(status=e.kind.status, body=e.body(), content_type="application/json",
                        headers={k.decode(): v.decode() for k, v in e.headers()})


def _authorize(keys: KeyStore, request: web.Request) -> str:
    """The admin key's id; without configured keys the admin port is open (it binds loopback)."""
    if not keys.enabled:
        return "-"
    header = request.headers.get("Authorization")
    record = keys.authenticate(header.encode("latin-1") if header is not None else None)
    record.check_admin()
    return record.key_id


async def start_admin(app: web.Application, settings: Settings,
                      sock: socket.socket | None = None) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``sock`` if given (a worker's, from its supervisor), else on ``admin``'s
    host and port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    if sock is None:
        sock = listeners.bind(settings.admin.host, settings.admin.port, socket.SOCK_STREAM)
    site = web.SockSite(runner, sock)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


# What the supervisor passes on of a worker's answer.
_PASSED_HEADERS = frozenset(("content-type", "www-authenticate", "x-should-retry", "retry-after"))


def bind_worker_admin() -> socket.socket:
    """A loopback listening socket for one worker's admin app, bound by the supervisor so that its
    port is known before the worker starts and stays the same when the worker is restarted."""
    sock = listeners.bind("127.0.0.1", 0, socket.SOCK_STREAM)
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def supervisor_app(*, worker_ports: Sequence[int], metrics_text: Callable[[], bytes],
                   alive: Callable[[], int], hold_restarts: Callable[[bool], None],
                   stop: Callable[[], None]) -> web.Application:
    """The admin app of ``--workers N``. Metrics (summed over the workers through prometheus-client's
    multiprocess directory) and liveness come from the supervisor itself; everything else is asked
    of every worker's own admin app, on the loopback ports ``worker_ports``.

    Each worker keeps its own routing state, so an eject, a restore or a keys reload is applied by
    every worker, ``/admin/endpoints`` lists every worker's rows with a ``worker`` field, and
    ``/readyz`` is ready when every worker is. The answer is 200 only if every worker answered 200;
    otherwise the first other answer is passed on as it is (401 and 403 come from the workers, which
    hold the keys), or a 502 ``worker_unavailable`` when a worker did not answer (one being
    restarted). A drain ends the supervisor too: restarts are held while the workers are asked, and
    once any worker has accepted, the supervisor exits after them (as on SIGTERM); the answer is then
    200, with each worker's own answer (an error object for one that did not accept)."""
    timeout = aiohttp.ClientTimeout(total=5.0)

    async def ask(request: web.Request, worker: int, port: int) -> web.Response:
        headers = {"X-Forwarded-For": request.remote or ""}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.request(request.method, f"http://127.0.0.1:{port}{request.rel_url}",
                                           headers=headers) as resp:
                    passed = {k: v for k, v in resp.headers.items() if k.lower() in _PASSED_HEADERS}
                    return web.Response(status=resp.status, body=await resp.read(), headers=passed)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return _error_response(GatewayError("worker_unavailable",
                                                f"worker {worker} did not answer ({type(e).__name__})"))

    async def ask_each(request: web.Request) -> list[web.Response]:
        return await asyncio.gather(*(ask(request, i, port) for i, port in enumerate(worker_ports)))

    async def ask_every_worker(request: web.Request) -> list[bytes] | web.Response:
        """Every worker's 200 body, in worker order, or the first answer that was not a 200."""
        answers = await ask_each(request)
        for answer in answers:
            if answer.status != 200:
                return answer
        return [answer.body for answer in answers]  # type: ignore[misc]

    async def every_worker(request: web.Request) -> web.Response:
        bodies = await ask_every_worker(request)
        if isinstance(bodies, web.Response):
            return bodies
        return web.Response(body=orjson.dumps({"workers": [orjson.loads(b) for b in bodies]}),
                            content_type="application/json")

    async def list_endpoints(request: web.Request) -> web.Response:
        bodies = await ask_every_worker(request)
        if isinstance(bodies, web.Response):
            return bodies
        rows = [{**row, "worker": i} for i, body in enumerate(bodies) for row in orjson.loads(body)]
        return web.Response(body=orjson.dumps(rows), content_type="application/json")

    async def drain(request: web.Request) -> web.Response:
        hold_restarts(True)  # a worker with nothing in flight exits as soon as it has answered
        answers = await ask_each(request)
        if all(answer.status != 200 for answer in answers):
            hold_restarts(False)
            return answers[0]
        # A worker that has begun to drain cannot take it back, so the process drains: the supervisor
        # stops, and its SIGTERM drains the workers that did not answer (one stalled, or restarting).
        # Restarting the drained workers instead would leave the drain half done.
        stop()
        bodies = [orjson.loads(answer.body) for answer in answers]  # type: ignore[arg-type]
        return web.Response(body=orjson.dumps({"workers": bodies}), content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=metrics_text(), headers={"Content-Type": EXPOSITION_CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        workers = alive()
        return web.json_response({"status": "ok" if workers else "down", "workers": workers},
                                 status=200 if workers else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", every_worker)
    app.router.add_get("/admin/endpoints", list_endpoints)
    app.router.add_post("/admin/endpoints/{pool}/{endpoint}/eject", every_worker)
    app.router.add_post("/admin/endpoints/{pool}/{endpoint}/restore", every_worker)
    app.router.add_post("/admin/drain", drain)
    app.router.add_post("/admin/keys/reload", every_worker)
    return app

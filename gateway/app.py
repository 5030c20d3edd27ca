"""Builds the gateway: every shared object is created once here and passed to whoever needs it.

Nothing else in the package reaches for module-level state; a test can build two gateways in one
process. :class:`Gateway` owns the public listener (uvloop Protocols, ``server.py``), the admin
listener (aiohttp, ``admin.py``), the upstream pool, the health checker, replica discovery, and the
drain sequence.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from aiohttp import web

from gateway.admin import admin_app, start_admin
from gateway.admission import Admission
from gateway.auth import KeyFileError, KeyStore, pepper_from_env
from gateway.discovery import Discovery
from gateway.errors import GatewayError
from gateway.gossip import Gossip, Siblings, secrets_from_env
from gateway.handlers import Handlers, Lifecycle
from gateway.health import HealthChecker
from gateway.ledger import Ledger
from gateway.limits import Limiter
from gateway.logs import AccessLog, Output
from gateway.metrics import Metrics
from gateway.outlier import OutlierDetector
from gateway.picker import Policy, make_policy
from gateway.pool import Pool
from gateway.relay import Relay, RetryBudget
from gateway.router import Router
from gateway.server import HttpServer
from gateway.settings import Routing, Settings
from gateway.upstream import Upstream

log = logging.getLogger("gateway")


class Gateway:
    def __init__(self, settings: Settings, worker: int = 0, siblings: Siblings | None = None,
                 admin_sock: socket.socket | None = None, output: Output | None = None):
        """``output``: the process's log output (``logs.setup``), which the access log shares."""
        s = settings
        self.settings = s
        self.admin_sock = admin_sock
        self.metrics = Metrics()
        self.access_log = AccessLog(s.logging.access_log, output or Output(s.logging.max_pending_bytes))
        self.lifecycle = Lifecycle()
        r = s.routing
        self.pools = [Pool(p, build_policy(p.effective_policy, r)) for p in s.pools]
        self.upstream = Upstream(s.timeouts.connect_s, s.limits.upstream_idle_per_endpoint,
                                 self.metrics.upstream_connects.inc)
        # Before anything keeps a pool's policy: sharing wraps the affinity policies.
        self.gossip = (Gossip(s.gossip, self.pools, self.metrics, secrets_from_env(s.gossip),
                              s.discovery.interval_s, worker, s.workers, siblings)
                       if s.gossip.peers or siblings else None)
        self.router = Router(self.pools, r)
        self.ledger = Ledger(self.metrics, self.access_log, self.pools)
        self.outlier = OutlierDetector(self.pools, s.outlier)
        self.outlier.on_eject = lambda ep, seconds: self.metrics.child(self.metrics.ejections, ep.pool, ep.id).inc()
        self.admission = Admission(self.pools, s.admission, self.metrics)
        b = s.retry_budget
        self.relay = Relay(self.upstream, s.timeouts, s.limits, self.metrics, RetryBudget(b.ratio, b.min_per_s, b.cap),
                           self.outlier, r.endpoint_header)
        self.relay.on_release = self.admission.release
        self.keys = (KeyStore.load(s.auth.keys_file, pepper_from_env(s.auth.pepper_env))
                     if s.auth.keys_file else KeyStore.disabled())
        self.limiter = Limiter()
        self.handlers = h = Handlers(self.keys, self.limiter, self.router, self.admission, self.relay, self.ledger,
                                     self.lifecycle, s.models(), s.listen.public_metrics,
                                     frozenset(h.lower() for h in s.limits.media_url_allowlist))
        self.health = HealthChecker(self.pools, s.health, self.metrics, self.outlier, self.admission)
        self.discovery = Discovery(self.pools, s.discovery, self.health, self.upstream, self.metrics)
        self.server = HttpServer(
            {
                b"/v1/chat/completions": {b"POST": h.chat_completions},
                b"/v1/completions": {b"POST": h.completions},
                b"/v1/models": {b"GET": h.models_list},
                b"/v1/models/": {b"GET": h.models_retrieve},
                b"/healthz": {b"GET": h.healthz},
                b"/readyz": {b"GET": h.readyz},
                b"/metrics": {b"GET": h.metrics_text},
            },
            s.limits, s.timeouts, not_found=h.not_found)
        self._admin_runner: web.AppRunner | None = None
        # Set by SIGTERM / SIGINT (in __main__) or the admin API's drain: the process drains and exits.
        self.stop_requested = asyncio.Event()
        self.port = 0
        self.admin_port = 0

    async def start(self, reuse_port: bool = False) -> None:
        self.ledger.start()
        await self.health.start()
        await self.discovery.start()
        if self.gossip is not None:
            await self.gossip.start()
        # Admin first: once the public port answers (and /readyz says ready), metrics, endpoint
        # state and drain must be reachable too.
        app = admin_app(pools=self.pools, router=self.router, lifecycle=self.lifecycle, ledger=self.ledger,
                        outlier=self.outlier, keys=self.keys, request_drain=self.stop_requested.set)
        self._admin_runner, self.admin_port = await start_admin(app, self.settings, self.admin_sock)
        self.port = await self.server.start(self.settings.listen.host, self.settings.listen.port, reuse_port)
        log.info("gateway listening", extra={"fields": {
            "port": self.port, "admin_port": self.admin_port, "region": self.settings.region,
            "pools": [p.name for p in self.pools]}})

    def reload_keys(self) -> None:
        """SIGHUP: re-read the keys file; a broken file keeps the old table."""
        if not self.keys.enabled:
            return
        try:
            changes = self.keys.reload()
        except KeyFileError as e:
            log.error("keys reload failed; keeping the old table", extra={"fields": {"error": str(e)}})
            return
        logging.getLogger("gateway.audit").info("admin action", extra={"fields": {
            "action": "reload_keys", "key_id": "-", "via": "SIGHUP", "added": len(changes.added),
            "removed": len(changes.removed), "changed": len(changes.changed)}})

    async def drain(self) -> None:
        """Fail readiness, stop accepting, let running requests finish within the drain window, then
        end what is left: a committed stream gets the error event, anything else a 503."""
        self.lifecycle.draining = True
        self.server.stop_accepting()
        deadline = time.monotonic() + self.settings.timeouts.drain_s
        while self.server.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [c for c in self.server.connections if c.task is not None]
        if left:
            log.warning("drain window over; ending requests", extra={"fields": {"requests": len(left)}})
        for conn in left:
            if conn.started:
                self.metrics.child(self.metrics.stream_aborts, "draining").inc()
            conn.fail(GatewayError("draining", "the gateway shut down before the response finished"))
            conn.task.cancel()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.server.close()
        await self.discovery.stop()
        if self.gossip is not None:
            await self.gossip.stop()
        await self.health.stop()
        self.upstream.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await self.ledger.stop()


def build_policy(name: str, r: Routing) -> Policy:
    """A pool's routing policy called ``name``, with the routing settings (one per pool: each learns
    only where its own requests went)."""
    return make_policy(
        name, c=r.load_factor, ring_c=r.ring_load_factor, session_slack=r.session_slack, vnodes=r.vnodes,
        ring_key_blocks=r.ring_key_blocks, ring_choices=r.ring_choices,
        index_capacity_blocks=r.index_capacity_blocks, index_ttl_s=r.index_ttl_s,
        session_capacity=r.session_capacity, session_ttl_s=r.session_ttl_s, max_candidates=r.max_candidates)

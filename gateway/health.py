"""Active health checks and engine load signals, both polled off the request path on aiohttp's client.

Health: an endpoint starts unhealthy and becomes healthy after ``health.healthy_threshold`` passing
checks of its health path in a row; ``health.unhealthy_threshold`` failures in a row take it out of
rotation.

Load signals: every ``health.scrape_interval_s`` each engine's ``/metrics`` is read for its running
and queued requests and KV usage (SGLang ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
``sglang:token_usage``; vLLM ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, or ``vllm:gpu_cache_usage_perc`` from older vLLM). The engine's
count includes this process's own requests, which the gateway already counts exactly and without
delay, so what is kept is the *foreign* part: engine running + queued minus this process's
in-flight at scrape time, i.e. the load other workers and gateway replicas put there. A scrape
older than ``health.scrape_stale_s`` is ignored (foreign load taken as 0), and the switch is
visible: ``Endpoint.signal_stale`` (in ``/admin/endpoints``), ``gateway_engine_signal_stale``, and a
log line (also at start-up for an engine that has not answered a scrape yet).

KV usage at or above ``health.kv_saturation`` marks the endpoint ``saturated``: the picker places no
new work there while its pool has an endpoint that is not (``picker``, "KV saturation"). A stale
scrape clears the mark, as it clears the foreign load: routing falls back on this process's counts.
Entering and leaving saturation is logged, and ``gateway_engine_kv_usage`` exports the usage.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from gateway.admission import Admission
from gateway.engine_signals import engine_signals
from gateway.metrics import Metrics
from gateway.outlier import OutlierDetector
from gateway.pool import Endpoint, Pool
from gateway.settings import Health

log = logging.getLogger("gateway.health")


class HealthChecker:
    TICK_S = 0.25

    def __init__(self, pools: list[Pool], config: Health, metrics: Metrics, outlier: OutlierDetector,
                 admission: Admission):
        self.pools = pools
        self.config = config
        self.metrics = metrics
        self.outlier = outlier
        self.admission = admission
        self._passes: dict[str, int] = {}
        self._fails: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        # Endpoints that slow-start when they next pass: those that were healthy before, and replicas
        # that joined the pool after start-up (their caches are cold).
        self._ramp_up: set[str] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            connector=aiohttp.TCPConnector(limit=0))
        await self.check_all()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop()), loop.create_task(self._scrape_loop()),
                       loop.create_task(self._tick_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(pool, ep) for pool in self.pools for ep in pool.endpoints))

    async def welcome(self, pool: Pool, endpoints: list[Endpoint], slow_start: bool) -> None:
        """Check replicas before they join ``pool``, so that they join healthy rather than wait for the
        next round (and do not count as down in the meantime)."""
        if slow_start:
            self._ramp_up.update(ep.id for ep in endpoints)
        await asyncio.gather(*(self._check(pool, ep) for ep in endpoints))

    def forget(self, ep: Endpoint) -> None:
        """``ep`` left its pool: a replica that comes back under its name starts over."""
        self._passes.pop(ep.id, None)
        self._fails.pop(ep.id, None)
        self._ramp_up.discard(ep.id)

    async def _check(self, pool: Pool, ep: Endpoint) -> None:
        url = f"http://{ep.id}{pool.config.health_path}"
        try:
            async with self._session.get(url) as resp:  # type: ignore[union-attr]
                ok = resp.status == 200
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        self.record(ep, ok)

    def record(self, ep: Endpoint, ok: bool) -> None:
        if ok:
            self._fails[ep.id] = 0
            self._passes[ep.id] = self._passes.get(ep.id, 0) + 1
            if not ep.healthy and self._passes[ep.id] >= self.config.healthy_threshold:
                ep.healthy = True
                ep.refresh()
                log.info("endpoint healthy", extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})
                if ep.id in self._ramp_up:
                    self.outlier.returned(ep, time.monotonic())
                self._ramp_up.add(ep.id)
        else:
            self._passes[ep.id] = 0
            self._fails[ep.id] = self._fails.get(ep.id, 0) + 1
            if ep.healthy and self._fails[ep.id] >= self.config.unhealthy_threshold:
                ep.healthy = False
                ep.refresh()
                log.warning("endpoint unhealthy", extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})
        self.metrics.child(self.metrics.endpoint_healthy, ep.pool, ep.id).set(1 if ep.healthy else 0)

    async def _tick_loop(self) -> None:
        """Slow-start ramps, ejection expiry, panic, autoscaling signals: a few times a second."""
        while True:
            await asyncio.sleep(self.TICK_S)
            self.outlier.tick(time.monotonic())
            self.admission.export()

    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.scrape_interval_s)
            await asyncio.gather(*(self._scrape(pool, ep) for pool in self.pools for ep in pool.endpoints))
            self._expire_stale()

    async def _scrape(self, pool: Pool, ep: Endpoint) -> None:
        if not ep.healthy:
            return
        url = f"http://{ep.id}{pool.config.metrics_path}"
        try:
            async with self._session.get(url) as resp:  # type: ignore[union-attr]
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError):
            return
        signals = engine_signals(text)
        if signals is None:
            return
        running, waiting, kv = signals
        ep.engine_foreign = max(0.0, running + waiting - ep.in_flight - ep.peer_in_flight)
        ep.engine_kv_usage = kv
        ep.engine_seen_at = time.monotonic()
        self.metrics.child(self.metrics.engine_kv_usage, ep.pool, ep.id).set(kv)
        self._mark_saturated(ep, kv >= self.config.kv_saturation)

    def _mark_saturated(self, ep: Endpoint, saturated: bool) -> None:
        if saturated == ep.saturated:
            return
        ep.saturated = saturated
        if saturated:
            log.warning("engine KV cache saturated; new work goes to other endpoints",
                        extra={"fields": {"endpoint": ep.id, "pool": ep.pool, "kv_usage": ep.engine_kv_usage}})
        else:
            log.info("engine KV cache has room again", extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})

    def _expire_stale(self) -> None:
        now = time.monotonic()
        for pool in self.pools:
            for ep in pool.endpoints:
                stale = now - ep.engine_seen_at > self.config.scrape_stale_s
                if stale:
                    ep.engine_foreign = 0.0
                    self._mark_saturated(ep, False)
                if stale != ep.signal_stale:
                    ep.signal_stale = stale
                    self.metrics.child(self.metrics.engine_signal_stale, ep.pool, ep.id).set(1 if stale else 0)
                    if stale:
                        log.warning("engine load signal stale; routing on this process's own counts",
                                    extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})

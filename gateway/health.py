"""Active health checks: each endpoint's own health path, polled on an interval.

An endpoint starts unhealthy and becomes healthy after ``health.healthy_threshold`` passing checks
in a row; ``health.unhealthy_threshold`` failures in a row take it out of rotation. Checks run on
aiohttp's client: they are few and off the request path.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from gateway.metrics import Metrics
from gateway.pool import Endpoint, Pool
from gateway.settings import Health

log = logging.getLogger("gateway.health")


class HealthChecker:
    def __init__(self, pools: list[Pool], config: Health, metrics: Metrics):
        self.pools = pools
        self.config = config
        self.metrics = metrics
        self._passes: dict[str, int] = {}
        self._fails: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            connector=aiohttp.TCPConnector(limit=0))
        await self.check_all()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(pool, ep) for pool in self.pools for ep in pool.endpoints))

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
                log.info("endpoint healthy", extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})
        else:
            self._passes[ep.id] = 0
            self._fails[ep.id] = self._fails.get(ep.id, 0) + 1
            if ep.healthy and self._fails[ep.id] >= self.config.unhealthy_threshold:
                ep.healthy = False
                log.warning("endpoint unhealthy", extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})
        self.metrics.child(self.metrics.endpoint_healthy, ep.pool, ep.id).set(1 if ep.healthy else 0)

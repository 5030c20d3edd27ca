"""Passive health: outlier ejection, ejection cap and panic, slow start. Pure; time is passed in.

Active checks (``health.py``) ask each replica's health path every few seconds; live traffic finds a
failing replica sooner. :class:`OutlierDetector` watches the outcome of every attempt:

* **Ejection.** ``consecutive_failures`` failed attempts in a row (connect refused, reset, timeout,
  5xx, a stream that broke) eject the replica for ``base_ejection_s x n``, where n counts its
  ejections, capped at ``max_ejection_s`` (Envoy's outlier detection). n decays by one for every
  ``base_ejection_s`` the replica then stays in rotation without being ejected again.
* **Ejection cap.** At most ``max_ejected_percent`` of a pool is ejected at once (at least one
  replica may always be), so a brownout of the whole pool cannot eject the whole pool.
* **Panic.** When fewer than ``panic_threshold_percent`` of a pool's replicas are available
  (healthy and not ejected), the pool routes over *all* its replicas: concentrating every request on
  the last survivor would bury it, and the retry before commit absorbs the failures.
* **Slow start.** A replica that comes back (passes health after failing, or its ejection ends)
  starts at ``min_weight`` and ramps linearly to full weight over ``slow_start_s``; its share of new
  requests and, with it, its prefix ownership on the bounded-load ring grow gradually, so a cold KV
  cache is not handed a full share at once. Replicas present at start-up begin at full weight.

Cost: O(1) per outcome; ``tick`` is O(replicas) and runs a few times a second off the request path.
"""

from __future__ import annotations

import logging
import math

from gateway.pool import Endpoint, Pool
from gateway.settings import Outlier

log = logging.getLogger("gateway.outlier")


class OutlierDetector:
    def __init__(self, pools: list[Pool], config: Outlier):
        self.pools = {p.name: p for p in pools}
        self.config = config
        self._failures: dict[str, int] = {}
        self._ejections: dict[str, int] = {}
        self._last_decay: dict[str, float] = {}
        self._recovering: dict[str, float] = {}  # endpoint id -> when its slow start began
        self.on_eject = lambda ep, seconds: None  # set by the wiring code (metrics)

    def success(self, ep: Endpoint) -> None:
        if self._failures.get(ep.id):
            self._failures[ep.id] = 0

    def failure(self, ep: Endpoint, now: float) -> None:
        n = self._failures.get(ep.id, 0) + 1
        self._failures[ep.id] = n
        if n < self.config.consecutive_failures or ep.ejected_until:
            return
        pool = self.pools[ep.pool]
        ejected = sum(1 for e in pool.endpoints if e.ejected_until)
        cap = max(1, math.floor(len(pool.endpoints) * self.config.max_ejected_percent / 100))
        if ejected >= cap:
            return
        count = self._ejections.get(ep.id, 0) + 1
        self._ejections[ep.id] = count
        self._last_decay[ep.id] = now
        seconds = min(self.config.base_ejection_s * count, self.config.max_ejection_s)
        ep.ejected_until = now + seconds
        ep.refresh()
        self._failures[ep.id] = 0
        log.warning("endpoint ejected", extra={"fields": {
            "endpoint": ep.id, "pool": ep.pool, "seconds": seconds, "ejections": count}})
        self.on_eject(ep, seconds)
        self._update_panic(pool, now)

    def eject(self, ep: Endpoint, now: float, seconds: float) -> None:
        """An operator's ejection (admin API): not capped, not counted towards the multiplier."""
        ep.ejected_until = now + seconds
        ep.refresh()
        self._update_panic(self.pools[ep.pool], now)

    def restore(self, ep: Endpoint, now: float) -> None:
        """An operator ends an ejection: the replica rejoins through slow start."""
        if ep.ejected_until:
            ep.ejected_until = 0.0
            ep.refresh()
            self._failures[ep.id] = 0
            self.returned(ep, now)
        self._update_panic(self.pools[ep.pool], now)

    def returned(self, ep: Endpoint, now: float) -> None:
        """The replica is back in rotation (health passed after failing, or ejection ended)."""
        if self.config.slow_start_s > 0:
            self._recovering[ep.id] = now
            ep.weight = self.config.min_weight

    def tick(self, now: float) -> None:
        """Ramp slow-start weights, end ejections, decay ejection counts, recompute panic."""
        for pool in self.pools.values():
            for ep in pool.endpoints:
                if ep.ejected_until and ep.ejected_until <= now:
                    ep.ejected_until = 0.0
                    ep.refresh()
                    self._last_decay[ep.id] = now  # the count decays only while it stays in rotation
                    log.info("endpoint ejection ended", extra={"fields": {"endpoint": ep.id, "pool": ep.pool}})
                    self.returned(ep, now)
                started = self._recovering.get(ep.id)
                if started is not None:
                    share = (now - started) / self.config.slow_start_s
                    if share >= 1.0:
                        ep.weight = 1.0
                        del self._recovering[ep.id]
                    else:
                        ep.weight = max(self.config.min_weight, share)
                count = self._ejections.get(ep.id)
                if count and not ep.ejected_until and now - self._last_decay[ep.id] >= self.config.base_ejection_s:
                    self._ejections[ep.id] = count - 1
                    self._last_decay[ep.id] = now
            self._update_panic(pool, now)

    def _update_panic(self, pool: Pool, now: float) -> None:
        n = len(pool.endpoints)
        up = sum(1 for e in pool.endpoints if e.healthy and not e.ejected_until)
        panic = up < math.ceil(n * self.config.panic_threshold_percent / 100)
        if panic != pool.panic:
            pool.set_panic(panic)
            (log.warning if panic else log.info)(
                "pool panic mode " + ("on: routing over every replica" if panic else "off"),
                extra={"fields": {"pool": pool.name, "available": up, "replicas": n}})

"""Endpoint capacity and the bounded wait queues that absorb bursts (semi-online traffic).

Each replica has a *target* and a *max* number of requests in flight from this process
(``pools[].target_in_flight`` / ``max_in_flight``). Routing aims below target (the bounded-load
policies spread work well before it is reached); during a burst a replica may take up to max; beyond
max on every candidate the request waits in its pool's queue for its class, bounded in length and in
time (short for interactive, long for batch). When a slot frees, a waiting *interactive* request goes
first, so batch yields. A full queue or an expired wait is answered 429 ``overloaded`` with
``Retry-After`` and ``x-should-retry: true``: the client should come back, the capacity exists.

What an autoscaler reads: ``gateway_pool_queue_depth{pool,class}`` and
``gateway_pool_demand_ratio{pool}`` = (in flight + queued) / (target x available replicas), above 1
when the pool runs past its target.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.pool import Endpoint, Pool
from gateway.relay import Call
from gateway.settings import Admission as AdmissionConfig

CLASSES = ("interactive", "batch")


class Admission:
    def __init__(self, pools: list[Pool], config: AdmissionConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.pools = pools
        self._queues: dict[tuple[str, str], deque[asyncio.Future]] = {
            (p.name, c): deque() for p in pools for c in CLASSES}
        self._waiting = 0  # waiters in all queues: release() has nothing to do while it is 0
        self._wait_s = {"interactive": config.interactive_wait_s, "batch": config.batch_wait_s}
        self._size = {"interactive": config.interactive_queue, "batch": config.batch_queue}

    def place(self, call: Call, route: Callable[[], None]) -> bool:
        """Route the call, then keep only candidates with room. False when none has any: the caller
        then waits for room with :meth:`wait` (kept apart, so the usual request costs no coroutine)."""
        route()
        return self._fits(call)

    async def wait(self, call: Call, route: Callable[[], None]) -> None:
        """Wait in the pool's queue for the call's class until a slot frees, routing again each time."""
        pool = call.pool
        queue = self._queues[(pool.name, call.workload)]  # type: ignore[union-attr]
        if len(queue) >= self._size[call.workload]:
            raise GatewayError("overloaded", f"pool {pool.name} is at capacity and its queue is full",  # type: ignore[union-attr]
                               retry_after_s=1.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s[call.workload]
        depth = self.metrics.child(self.metrics.queue_depth, pool.name, call.workload)  # type: ignore[union-attr]
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise GatewayError("overloaded", f"no capacity in pool {pool.name} within "  # type: ignore[union-attr]
                                   f"{self._wait_s[call.workload]:g} s", retry_after_s=1.0)
            waiter = loop.create_future()
            queue.append(waiter)
            self._waiting += 1
            depth.inc()
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiting -= 1
                depth.dec()
                if waiter in queue:
                    queue.remove(waiter)
            route()
            if self._fits(call):
                return

    def _fits(self, call: Call) -> bool:
        cap = call.pool.config.max_in_flight  # type: ignore[union-attr]
        candidates = call.candidates
        if candidates and candidates[0].in_flight < cap:
            return True  # the common case; a full fallback is skipped when a retry reaches it
        fitting = [e for e in candidates if e.in_flight < cap]
        if not fitting:
            return False
        call.candidates = fitting
        return True

    def release(self, endpoint: Endpoint) -> None:
        """A slot freed on ``endpoint``: wake the first waiter of its pool, interactive first."""
        if not self._waiting:
            return
        for cls in CLASSES:
            queue = self._queues.get((endpoint.pool, cls))
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return

    def export(self) -> None:
        """Autoscaling signals, refreshed a few times a second."""
        m = self.metrics
        for pool in self.pools:
            available = [e for e in pool.endpoints if e.available]
            queued = sum(len(self._queues[(pool.name, c)]) for c in CLASSES)
            capacity = pool.config.target_in_flight * len(available)
            demand = (sum(e.in_flight for e in available) + queued) / capacity if capacity else float(queued > 0)
            m.child(m.demand_ratio, pool.name).set(demand)

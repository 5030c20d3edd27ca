"""The ledger: settled requests, turned into metrics and access-log lines in batches.

Settling a request appends its :class:`~gateway.relay.Call` to a list; that is all the request path
pays. A few times a second (and right before ``/metrics`` is rendered) :meth:`Ledger.flush` turns the
batch into Prometheus updates and JSON access-log lines. Batching is what makes this cheap, not just
off the latency path: each label set is looked up once per batch, a histogram's bucket counts for the
whole batch are found with ``bisect`` and added in one step per bucket, and counters are incremented
once per label set. Per request that is a small fraction of what one ``observe()`` and one ``inc()``
per metric cost (prometheus-client validates, locks and loops over buckets on every call).

In-flight gauges are not counted per request either: each flush sets them from the endpoints' own
counts. A scrape therefore sees values at most one flush interval old.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import defaultdict

from gateway.logs import AccessLog
from gateway.metrics import Metrics
from gateway.pool import Pool
from gateway.relay import Call

FLUSH_INTERVAL_S = 0.25
MAX_PENDING = 20000  # flush early under very high rates, so memory stays bounded


class Ledger:
    def __init__(self, metrics: Metrics, access_log: AccessLog, pools: list[Pool]):
        self.metrics = metrics
        self.access_log = access_log
        self.pools = pools
        self._pending: list[Call] = []
        self._task: asyncio.Task | None = None

    def add(self, call: Call) -> None:
        call.body = b""  # the request body is not needed any more; do not hold it until the flush
        self._pending.append(call)
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flusher())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.flush()

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    def exposition(self) -> bytes:
        """The metrics text, with everything settled so far counted in."""
        self.flush()
        return self.metrics.exposition()

    def flush(self) -> None:
        calls, self._pending = self._pending, []
        m = self.metrics
        counts: dict[tuple, float] = defaultdict(float)
        samples: dict[tuple, list[float]] = defaultdict(list)
        log = self.access_log.enabled
        wall_offset = time.time() - time.monotonic()
        for call in calls:
            pool = call.pool.name if call.pool is not None else ""
            endpoint = call.endpoint.id if call.endpoint is not None else ""
            status = str(call.status or (499 if call.outcome == "client_gone" else 500))
            end = call.done_at
            counts[(m.requests, call.route, call.model, pool, endpoint, status)] += 1
            samples[(m.duration, call.route, call.model, pool)].append(end - call.received_at)
            ttft = call.first_byte_at - call.received_at if call.first_byte_at else None
            if ttft is not None:
                samples[(m.ttft, call.route, call.model, pool)].append(ttft)
            if call.written_at:
                samples[(m.overhead, "pre_upstream")].append(max(0.0, call.written_at - call.received_at))
            if call.upstream_first_at and call.stream and call.first_byte_at:
                samples[(m.overhead, "first_byte")].append(call.first_byte_at - call.upstream_first_at)
            itl = None
            if call.stream and call.events > 1:
                itl = (call.last_event_at - call.first_byte_at) / (call.events - 1)
                samples[(m.itl, call.model, pool)].append(itl)
            if call.branch:
                counts[(m.decisions, pool, call.policy, call.branch)] += 1
                samples[(m.prefix_match, pool)].append(call.matched_blocks)
            if call.outcome == "client_gone":
                counts[(m.client_disconnects, call.route)] += 1
            usage = call.usage()
            for kind, key in (("prompt", "prompt_tokens"), ("cached", "cached_tokens"),
                              ("completion", "completion_tokens")):
                if key in usage:
                    counts[(m.tokens, call.model, pool, kind)] += usage[key]
            if log:
                self.access_log.write({
                    "ts": round(wall_offset + end, 3), "request_id": call.request_id.decode(),
                    "key_id": call.key_id, "route": call.route, "model": call.model, "pool": pool,
                    "endpoint": endpoint, "branch": call.branch, "status": int(status), "outcome": call.outcome,
                    "stream": call.stream, "attempts": call.attempts,
                    "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
                    "itl_ms": round(itl * 1000, 2) if itl is not None else None,
                    "total_ms": round((end - call.received_at) * 1000, 2),
                    "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": usage.get("cached_tokens"),
                    "completion_tokens": usage.get("completion_tokens"),
                })
        for (metric, *labels), n in counts.items():
            m.child(metric, *labels).inc(n)
        for (metric, *labels), values in samples.items():
            observe_many(m.child(metric, *labels), values)
        for pool in self.pools:
            for ep in pool.endpoints:
                m.child(m.in_flight, pool.name, ep.id).set(ep.in_flight)
        if log:
            self.access_log.flush()


def observe_many(histogram_child, values: list[float]) -> None:
    """``observe`` for a batch: one bucket search per value, one increment per touched bucket.

    Relies on prometheus-client's Histogram keeping per-bucket (non-cumulative) values in
    ``_buckets`` and the sum in ``_sum``, which is how ``observe`` itself updates them;
    tests/unit/test_ledger.py checks the exposition equals that of plain ``observe`` calls.
    """
    bounds = histogram_child._upper_bounds
    per_bucket: dict[int, int] = defaultdict(int)
    for v in values:
        per_bucket[bisect_left(bounds, v)] += 1
    histogram_child._sum.inc(sum(values))
    buckets = histogram_child._buckets
    for i, n in per_bucket.items():
        buckets[i].inc(n)

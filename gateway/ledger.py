"""The ledger: settled requests, turned into metrics and access-log lines in batches.

Settling a request appends its :class:`~gateway.relay.Call` to a list; that is all the request path
pays. Every 64 calls or 50 ms (and right before ``/metrics`` is rendered) :meth:`Ledger.flush` turns
the batch into Prometheus updates and JSON access-log lines. Batching is what makes this cheap, not just
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
from collections import Counter, defaultdict
from itertools import repeat

from gateway.logs import AccessLine, AccessLog
from gateway.metrics import Metrics
from gateway.pool import Pool
from gateway.relay import Call

# Small, frequent batches: a flush runs on the event loop, so its length is a pause every request
# in flight feels. 64 calls take a millisecond or two; thousands would show in p99 latency.
FLUSH_INTERVAL_S = 0.05
FLUSH_BATCH = 64


class Ledger:
    def __init__(self, metrics: Metrics, access_log: AccessLog, pools: list[Pool]):
        self.metrics = metrics
        self.access_log = access_log
        self.pools = pools
        self._pending: list[Call] = []
        self._task: asyncio.Task | None = None

    def add(self, call: Call) -> None:
        call.body = b""  # the request body is not needed any more; do not hold it until the flush
        pending = self._pending
        pending.append(call)
        if len(pending) == FLUSH_BATCH:
            asyncio.get_running_loop().call_soon(self.flush)  # after this request's own work

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
        if calls:
            self._count(calls)
            if self.access_log.enabled:
                self._log(calls)
        m = self.metrics
        for pool in self.pools:
            for ep in pool.endpoints:
                m.child(m.in_flight, pool.name, ep.id).set(ep.in_flight)
        for log, lines in self.access_log.output.take_dropped().items():
            m.child(m.log_lines_dropped, log).inc(lines)

    def _count(self, calls: list[Call]) -> None:
        m = self.metrics
        groups: dict[tuple[str, str, str], _Group] = {}
        pre_upstream: list[float] = []
        first_byte: list[float] = []
        for call in calls:
            key = (call.route, call.model, call.pool.name if call.pool is not None else "")
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Group()
            start = call.received_at
            group.durations.append(call.done_at - start)
            group.statuses[(call.endpoint.id if call.endpoint is not None else "", _status(call))] += 1
            if call.first_byte_at:
                group.ttfts.append(call.first_byte_at - start)
                if call.stream:
                    if call.upstream_first_at:
                        first_byte.append(call.first_byte_at - call.upstream_first_at)
                    if call.events > 1:
                        group.itls.append((call.last_event_at - call.first_byte_at) / (call.events - 1))
            if call.written_at:
                pre_upstream.append(call.written_at - start)
            if call.branch:
                group.decisions[(call.policy, call.branch)] += 1
                group.blocks.append(call.matched_blocks)
            if call.outcome == "client_gone":
                group.disconnects += 1
            if call.usage_tail:
                for name, n in call.usage().items():
                    group.tokens[name] += n
        for (route, model, pool), g in groups.items():
            for (endpoint, status), n in g.statuses.items():
                m.child(m.requests, route, model, pool, endpoint, str(status)).inc(n)
            observe_many(m.child(m.duration, route, model, pool), g.durations)
            if g.ttfts:
                observe_many(m.child(m.ttft, route, model, pool), g.ttfts)
            if g.itls:
                observe_many(m.child(m.itl, model, pool), g.itls)
            for (policy, branch), n in g.decisions.items():
                m.child(m.decisions, pool, policy, branch).inc(n)
            if g.blocks:
                observe_many(m.child(m.prefix_match, pool), g.blocks)
            if g.disconnects:
                m.child(m.client_disconnects, route).inc(g.disconnects)
            for name, n in g.tokens.items():
                m.child(m.tokens, model, pool, _TOKEN_KINDS[name]).inc(n)
        if pre_upstream:
            observe_many(m.child(m.overhead, "pre_upstream"), pre_upstream)
        if first_byte:
            observe_many(m.child(m.overhead, "first_byte"), first_byte)

    def _log(self, calls: list[Call]) -> None:
        wall_offset = time.time() - time.monotonic()
        write = self.access_log.write
        for call in calls:
            start, ttft, itl = call.received_at, None, None
            if call.first_byte_at:
                ttft = round((call.first_byte_at - start) * 1000, 2)
                if call.stream and call.events > 1:
                    itl = round((call.last_event_at - call.first_byte_at) / (call.events - 1) * 1000, 2)
            usage = call.usage()
            write(AccessLine(
                round(wall_offset + call.done_at, 3), call.request_id.decode(), call.key_id, call.route, call.model,
                call.pool.name if call.pool is not None else "",
                call.endpoint.id if call.endpoint is not None else "", call.branch, _status(call), call.outcome,
                call.stream, call.attempts, ttft, itl, round((call.done_at - start) * 1000, 2),
                usage.get(b"prompt_tokens"), usage.get(b"cached_tokens"), usage.get(b"completion_tokens")))
        self.access_log.flush()


_TOKEN_KINDS = {b"prompt_tokens": "prompt", b"cached_tokens": "cached", b"completion_tokens": "completion"}


def _status(call: Call) -> int:
    return call.status or (499 if call.outcome == "client_gone" else 500)


class _Group:
    """One flush's calls of one (route, model, pool)."""

    __slots__ = ("blocks", "decisions", "disconnects", "durations", "itls", "statuses", "tokens", "ttfts")

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.ttfts: list[float] = []
        self.itls: list[float] = []
        self.blocks: list[float] = []
        self.statuses: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.decisions: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.tokens: defaultdict[bytes, int] = defaultdict(int)
        self.disconnects = 0


def observe_many(histogram_child, values: list[float]) -> None:
    """``observe`` for a batch: one bucket search per value, one increment per touched bucket.

    Relies on prometheus-client's Histogram keeping per-bucket (non-cumulative) values in
    ``_buckets`` and the sum in ``_sum``, which is how ``observe`` itself updates them;
    tests/unit/test_ledger.py checks the exposition equals that of plain ``observe`` calls.
    """
    bounds = histogram_child._upper_bounds
    per_bucket = Counter(map(bisect_left, repeat(bounds, len(values)), values))
    histogram_child._sum.inc(sum(values))
    buckets = histogram_child._buckets
    for i, n in per_bucket.items():
        buckets[i].inc(n)

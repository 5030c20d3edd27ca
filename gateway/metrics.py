"""Every Prometheus metric the gateway exports, defined once: names, labels, buckets.

With ``--workers N`` the processes write their values to a shared ``PROMETHEUS_MULTIPROC_DIR``
(prometheus-client's multiprocess mode, chosen by ``__main__`` before this module is imported), and
``/metrics`` on any worker or on the supervisor's admin port reports the sum over all of them.

Label children are looked up once per label tuple and kept: ``.labels()`` validates and locks on
every call, which would be a measurable share of the per-request budget.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# The text format that `exposition` returns (prometheus-client's generate_latest).
EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.25, 0.5, 1.0)
OVERHEAD_BUCKETS = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total", "Requests answered, by route, model, pool, endpoint and status.",
            ["route", "model", "pool", "endpoint", "status"], registry=r)
        self.ttft = Histogram(
            "gateway_ttft_seconds", "Time from the request's last byte to the first response byte sent.",
            ["route", "model", "pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "gateway_inter_token_latency_seconds",
            "Mean gap between relayed SSE events of one stream (one observation per stream).",
            ["model", "pool"], buckets=ITL_BUCKETS, registry=r)
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Time from the request's last byte to the response's end.",
            ["route", "model", "pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "Time spent in the gateway: before the upstream request is written (phase=pre_upstream), "
            "and from the upstream's first byte to the client's first byte (phase=first_byte).",
            ["phase"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "gateway_endpoint_in_flight", "Requests in flight per endpoint.",
            ["pool", "endpoint"], multiprocess_mode="livesum", registry=r)
        self.endpoint_healthy = Gauge(
            "gateway_endpoint_healthy", "1 when the endpoint passes its health checks.",
            ["pool", "endpoint"], multiprocess_mode="livemax", registry=r)
        self.engine_signal_stale = Gauge(
            "gateway_engine_signal_stale", "1 while the engine's scraped load signal is missing or stale.",
            ["pool", "endpoint"], multiprocess_mode="livemax", registry=r)
        self.engine_kv_usage = Gauge(
            "gateway_engine_kv_usage", "KV cache usage (0-1) the engine last reported.",
            ["pool", "endpoint"], multiprocess_mode="livemax", registry=r)
        self.decisions = Counter(
            "gateway_routing_decisions_total", "Routing decisions by pool, policy and branch.",
            ["pool", "policy", "branch"], registry=r)
        self.prefix_match = Histogram(
            "gateway_prefix_match_blocks", "Prefix blocks matched in the routing index per request.",
            ["pool"], buckets=BLOCK_BUCKETS, registry=r)
        self.retries = Counter(
            "gateway_upstream_retries_total", "Attempts retried on another endpoint, by the failure reason.",
            ["reason"], registry=r)
        self.hedges = Counter(
            "gateway_hedges_total",
            "Requests still without a first byte after the pool's hedge_after_s, by what followed: "
            "first_won, hedge_won, failed (both legs), skipped (no candidate with room, or no retry budget).",
            ["pool", "outcome"], registry=r)
        self.stream_aborts = Counter(
            "gateway_stream_aborted_total", "Committed streams ended with an error event, by reason.",
            ["reason"], registry=r)
        self.client_disconnects = Counter(
            "gateway_client_disconnects_total", "Requests whose client went away before the end.",
            ["route"], registry=r)
        self.retry_budget_exhausted = Counter(
            "gateway_retry_budget_exhausted_total", "Retries not made because the retry budget was spent.",
            registry=r)
        self.ejections = Counter(
            "gateway_endpoint_ejections_total", "Replicas ejected by outlier detection.",
            ["pool", "endpoint"], registry=r)
        self.queue_depth = Gauge(
            "gateway_pool_queue_depth", "Requests waiting for capacity, by pool and traffic class.",
            ["pool", "class"], multiprocess_mode="livesum", registry=r)
        self.demand_ratio = Gauge(
            "gateway_pool_demand_ratio",
            "(in flight + queued) / (target x available replicas): above 1, the pool runs past its target.",
            ["pool"], multiprocess_mode="livesum", registry=r)
        self.tokens = Counter(
            "gateway_tokens_total", "Tokens reported by engines in usage, by kind (prompt, cached, completion).",
            ["model", "pool", "kind"], registry=r)
        self.discovered = Gauge(
            "gateway_discovery_endpoints", "Replicas the pool's DNS SRV name last resolved to.",
            ["pool"], multiprocess_mode="livemax", registry=r)
        self.discovery_failures = Counter(
            "gateway_discovery_failures_total",
            "DNS lookups of a pool's SRV name that failed (the pool keeps its last replicas), by reason.",
            ["pool", "reason"], registry=r)
        self.gossip_placements = Counter(
            "gateway_gossip_placements_total",
            "Placements shared with peer gateway processes: sent, received (recorded) and ignored "
            "(a pool or endpoint this process does not have).",
            ["direction"], registry=r)
        self.gossip_load_reports = Counter(
            "gateway_gossip_load_reports_total",
            "Reports of requests in flight per endpoint, sent to and received from peer gateway processes.",
            ["direction"], registry=r)
        self.gossip_dropped = Counter(
            "gateway_gossip_datagrams_dropped_total",
            "Gossip datagrams refused (signature, malformed) or not delivered (send_error).",
            ["reason"], registry=r)
        self.gossip_lookup_failures = Counter(
            "gateway_gossip_peer_lookup_failures_total",
            "Lookups of a gossip peer name that failed (its last addresses are kept).", registry=r)
        self.gossip_peers = Gauge(
            "gateway_gossip_peers",
            "Addresses placements and loads are sent to, this process's own included.",
            multiprocess_mode="livemax", registry=r)
        self.upstream_connects = Counter(
            "gateway_upstream_connects_total", "New upstream TCP connections opened.", registry=r)
        self.log_lines_dropped = Counter(
            "gateway_log_lines_dropped_total",
            "Log lines dropped while stdout or stderr was not read fast enough (logging.max_pending_bytes).",
            ["log"], registry=r)
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def forget_endpoint(self, pool: str, endpoint: str) -> None:
        """Drop a departed replica's gauges, which would otherwise report its last values for good.
        prometheus-client cannot remove series in multiprocess mode: there they stay until restart."""
        for metric in (self.in_flight, self.endpoint_healthy, self.engine_signal_stale, self.engine_kv_usage):
            if self._children.pop((id(metric), (pool, endpoint)), None) is not None and not self.multiprocess:
                metric.remove(pool, endpoint)

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

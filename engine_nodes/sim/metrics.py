"""``/metrics`` in each engine's own Prometheus names, types and labels.

Routers scrape these to balance load and steer cache hits, so the names must be the engines' own:

SGLang (``python/sglang/srt/metrics/collector.py``). Scheduler gauges carry the labels
``model_name``, ``engine_type="unified"``, ``tp_rank`` and ``pp_rank``; the tokenizer's counters and
histograms carry ``model_name`` and ``engine_type``:

| metric | type | simulator source |
| --- | --- | --- |
| ``sglang:num_running_reqs`` | gauge | requests in the batch |
| ``sglang:num_queue_reqs`` | gauge | requests waiting for admission |
| ``sglang:num_used_tokens`` | gauge | KV tokens held by running requests |
| ``sglang:token_usage`` | gauge | the same over the pool size (evictable cache counts as free) |
| ``sglang:cache_hit_rate`` | gauge | cached prompt tokens over prompt tokens, since start |
| ``sglang:gen_throughput`` | gauge | output tokens per simulated second over the last 40 decode steps |
| ``sglang:max_total_num_tokens`` | gauge | KV pool size in tokens |
| ``sglang:spec_accept_length`` | gauge | mean tokens per EAGLE-3 verify over the last 40 decode steps |
| ``sglang:spec_accept_rate`` | gauge | the same minus the bonus token, over the draft tokens |
| ``sglang:prompt_tokens_total``, ``sglang:generation_tokens_total``, ``sglang:cached_tokens_total``, ``sglang:num_requests_total``, ``sglang:num_aborted_requests_total`` | counter | |
| ``sglang:time_to_first_token_seconds``, ``sglang:inter_token_latency_seconds``, ``sglang:e2e_request_latency_seconds`` | histogram | simulated seconds |

vLLM V1 (``vllm/v1/metrics/loggers.py``), labels ``model_name`` and ``engine`` (the engine index):

| metric | type | simulator source |
| --- | --- | --- |
| ``vllm:num_requests_running`` | gauge | requests in the batch |
| ``vllm:num_requests_waiting`` | gauge | requests waiting for admission |
| ``vllm:kv_cache_usage_perc`` | gauge | used KV share, 0..1 (evictable cache counts as free) |
| ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` | counter (``_total``) | prompt tokens looked up / served from cache |
| ``vllm:prompt_tokens``, ``vllm:generation_tokens`` | counter (``_total``) | |
| ``vllm:request_success`` | counter (``_total``), label ``finished_reason`` | |
| ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``, ``vllm:e2e_request_latency_seconds`` | histogram | simulated seconds |

Histogram buckets are the engines' defaults. The exposition is written by ``prometheus_client`` (which
both engines use), from a collector that reads the replica's state at scrape time, one registry per
replica so the replicas of a process stay independent.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from engine_nodes.sim.engine import Engine

SGLANG_TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
SGLANG_ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
                      0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
SGLANG_E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200,
                      1800, 2400)
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
VLLM_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Bucket counts of one latency, rendered as a Prometheus histogram at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, help_text: str, labels: dict[str, str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, help_text, labels=list(labels))
        buckets, cumulative = [], 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            buckets.append((str(float(bound)), cumulative))
        buckets.append(("+Inf", cumulative + self.counts[-1]))
        family.add_metric(list(labels.values()), buckets, self.total)
        return family


class RequestMetrics:
    """Per-request observations in simulated seconds, made by the HTTP layer when a request ends."""

    def __init__(self, flavor: str) -> None:
        sglang = flavor == "sglang"
        self.ttft = Histogram(SGLANG_TTFT_BUCKETS if sglang else VLLM_TTFT_BUCKETS)
        self.itl = Histogram(SGLANG_ITL_BUCKETS if sglang else VLLM_ITL_BUCKETS)
        self.e2e = Histogram(SGLANG_E2E_BUCKETS if sglang else VLLM_E2E_BUCKETS)
        self.finished = 0
        self.aborted = 0
        self.cached_tokens = 0


class _ReplicaCollector(Collector):
    def __init__(self, flavor: str, model: str, engine: Engine, requests: RequestMetrics) -> None:
        self.flavor = flavor
        self.model = model
        self.engine = engine
        self.requests = requests

    def collect(self) -> Iterator[Metric]:
        return self._sglang() if self.flavor == "sglang" else self._vllm()

    def _sglang(self) -> Iterator[Metric]:
        engine, cache, req = self.engine, self.engine.cache, self.requests
        scheduler = {"model_name": self.model, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}
        tokenizer = {"model_name": self.model, "engine_type": "unified"}
        used_tokens = cache.used_pages * cache.page_size
        stats = cache.stats
        accept_length = engine.accept_length.ratio()
        spec = engine.spec
        accept_rate = (accept_length - 1) / (spec.num_draft_tokens - 1) if spec and accept_length else 0.0
        for name, help_text, value in (
            ("sglang:num_running_reqs", "The number of running requests.", len(engine.running)),
            ("sglang:num_used_tokens", "The number of used tokens.", used_tokens),
            ("sglang:token_usage", "The token usage.", used_tokens / cache.capacity_tokens),
            ("sglang:gen_throughput", "The generation throughput (token/s).", engine.gen_throughput.ratio()),
            ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", len(engine.waiting)),
            ("sglang:cache_hit_rate", "The prefix cache hit rate.",
             stats.hit_tokens / stats.query_tokens if stats.query_tokens else 0.0),
            ("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.",
             cache.capacity_tokens),
            ("sglang:spec_accept_length", "The average acceptance length of speculative decoding.", accept_length),
            ("sglang:spec_accept_rate", "The average acceptance rate of speculative decoding "
             "(`accepted tokens / total draft tokens` in batch).", accept_rate),
        ):
            yield _gauge(name, help_text, scheduler, value)
        counters = engine.counters
        for name, help_text, value in (
            ("sglang:prompt_tokens", "Number of prefill tokens processed.", counters.prompt_tokens),
            ("sglang:generation_tokens", "Number of generation tokens processed.", counters.generation_tokens),
            ("sglang:cached_tokens", "Number of cached prompt tokens.", req.cached_tokens),
            ("sglang:num_requests", "Number of requests processed.", req.finished),
            ("sglang:num_aborted_requests", "Number of requests aborted.", req.aborted),
        ):
            yield _counter(name, help_text, tokenizer, value)
        yield req.ttft.family("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              tokenizer)
        yield req.itl.family("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             tokenizer)
        yield req.e2e.family("sglang:e2e_request_latency_seconds",
                             "Histogram of End-to-end request latency in seconds", tokenizer)

    def _vllm(self) -> Iterator[Metric]:
        engine, cache, req = self.engine, self.engine.cache, self.requests
        labels = {"model_name": self.model, "engine": "0"}
        for name, help_text, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", len(engine.running)),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", len(engine.waiting)),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             cache.used_pages / cache.capacity_pages),
        ):
            yield _gauge(name, help_text, labels, value)
        counters = engine.counters
        for name, help_text, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             cache.stats.query_tokens),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             cache.stats.hit_tokens),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", counters.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", counters.generation_tokens),
        ):
            yield _counter(name, help_text, labels, value)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[*labels, "finished_reason"])
        for reason, value in (("stop", 0), ("length", req.finished), ("abort", req.aborted)):
            success.add_metric([*labels.values(), reason], value)
        yield success
        yield req.ttft.family("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels)
        yield req.itl.family("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             labels)
        yield req.e2e.family("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels)


def _gauge(name: str, help_text: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


def _counter(name: str, help_text: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


class ReplicaMetrics:
    """The ``/metrics`` body of one replica."""

    def __init__(self, flavor: str, model: str, engine: Engine) -> None:
        self.requests = RequestMetrics(flavor)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_ReplicaCollector(flavor, model, engine, self.requests))

    def exposition(self) -> bytes:
        return generate_latest(self._registry)

"""``/metrics`` carries the engines' own metric names and types, and follows the scheduler's state."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_nodes.conftest import SimProcess

REQUIRED = {
    "sglang": {
        "sglang:num_running_reqs": "gauge",
        "sglang:num_queue_reqs": "gauge",
        "sglang:token_usage": "gauge",
        "sglang:cache_hit_rate": "gauge",
        "sglang:gen_throughput": "gauge",
        "sglang:spec_accept_length": "gauge",
        "sglang:prompt_tokens": "counter",
        "sglang:time_to_first_token_seconds": "histogram",
    },
    "vllm": {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
    },
}


def scrape(sim: SimProcess) -> dict[str, tuple[str, dict[str, float]]]:
    """name -> (type, {sample name with labels: value})."""
    with urllib.request.urlopen(sim.url("/metrics"), timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {s.name + json.dumps(s.labels, sort_keys=True): s.value for s in family.samples}
        families[family.name] = (family.type, samples)
    return families


def value(families: dict, name: str) -> float:
    _, samples = families[name]
    (sample,) = [v for k, v in samples.items() if k.startswith(name + "{") or k.startswith(name + "_total{")]
    return sample


def chat(sim: SimProcess, content: str, max_tokens: int = 8) -> None:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    request = urllib.request.Request(sim.url("/v1/chat/completions"), data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
def test_metrics_expose_the_engines_names_types_and_model_label(request, flavor):
    sim = request.getfixturevalue(f"{flavor}_sim")
    chat(sim, "hello")
    families = scrape(sim)
    for name, kind in REQUIRED[flavor].items():
        assert name in families, name
        assert families[name][0] == kind, name
        assert all('"model_name": "sim-model"' in key for key in families[name][1])


def test_vllm_prefix_cache_counters_count_queried_and_hit_tokens(vllm_sim):
    prompt = "A long shared document. " * 100
    before = scrape(vllm_sim)
    chat(vllm_sim, prompt)
    chat(vllm_sim, prompt)
    after = scrape(vllm_sim)
    queries = value(after, "vllm:prefix_cache_queries") - value(before, "vllm:prefix_cache_queries")
    hits = value(after, "vllm:prefix_cache_hits") - value(before, "vllm:prefix_cache_hits")
    assert queries >= 2 * 600 and 0 < hits < queries / 2 + 1


def test_sglang_reports_cache_hit_rate_and_eagle3_acceptance_length(sglang_sim):
    for _ in range(3):
        chat(sglang_sim, "Repeated question about rivers. " * 20, max_tokens=64)
    families = scrape(sglang_sim)
    assert 0 < value(families, "sglang:cache_hit_rate") < 1
    assert 2.3 < value(families, "sglang:spec_accept_length") < 2.9  # the profile's mean is 2.6
    assert value(families, "sglang:gen_throughput") > 0


async def test_running_and_waiting_gauges_follow_kv_admission(sim_factory):
    # 256 KV tokens hold one request of ~150 prompt + 60 output tokens: the others must wait.
    sim = sim_factory("--flavor", "vllm", "--model", "sim-model", "--speed", "0.5", "--cache-tokens", "256")
    body = {"model": "sim-model", "max_tokens": 60, "stream": True,
            "messages": [{"role": "user", "content": "Explain the tides in detail. " * 20}]}
    async with aiohttp.ClientSession() as session:
        responses = [await session.post(sim.url("/v1/chat/completions"), json=body) for _ in range(4)]
        try:
            await asyncio.sleep(0.05)
            families = scrape(sim)
            assert value(families, "vllm:num_requests_running") == 1
            assert value(families, "vllm:num_requests_waiting") == 3
            assert value(families, "vllm:kv_cache_usage_perc") > 0.5
        finally:
            for response in responses:
                response.close()

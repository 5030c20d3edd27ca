"""The prefix cache over HTTP: hits, their effect on TTFT, eviction, and per-replica independence."""

from __future__ import annotations

import json
import time
import urllib.request

import openai

from tests.engine_nodes.conftest import SimProcess

PAGE = 16  # page_size of every profile
SYSTEM = "You are a meticulous assistant. " * 1000  # ~32 KB: about 8000 tokens


def client(sim: SimProcess, replica: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url("/v1", replica), api_key="unused", max_retries=0, timeout=30)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def ask(c: openai.OpenAI, system: str, question: str, max_tokens: int = 4):
    return c.chat.completions.create(
        model="m", max_tokens=max_tokens,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])


def timed_first_token(c: openai.OpenAI, system: str, question: str) -> float:
    started = time.monotonic()
    stream = c.chat.completions.create(
        model="m", max_tokens=2, stream=True,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            elapsed = time.monotonic() - started
            stream.close()
            return elapsed
    raise AssertionError("no content chunk")


def test_repeated_prompt_hits_the_cache_and_skips_its_prefill(sim_factory):
    # Real time (--speed 1): a cold 8000-token prefill of Llama-3.1-8B BF16 on one H100 is about a
    # quarter of a second in the timing model; a warm one is a single decode-sized step.
    sim = sim_factory("--flavor", "vllm", "--model", "m", "--speed", "1")
    c = client(sim)
    cold_wall = timed_first_token(c, SYSTEM, "Question one?")
    cold = get_json(sim.url("/sim/requests?limit=1"))[-1]
    warm_wall = timed_first_token(c, SYSTEM, "Question one?")
    warm = get_json(sim.url("/sim/requests?limit=1"))[-1]
    assert cold["cached_tokens"] == 0
    assert warm["cached_tokens"] >= cold["prompt_tokens"] - PAGE
    assert warm["sim_ttft_s"] < cold["sim_ttft_s"] / 10  # the engine's own timings
    assert cold["sim_ttft_s"] > 0.1
    assert warm_wall < cold_wall / 3  # and what a client measures


def test_usage_reports_cached_tokens_of_the_shared_prefix_in_whole_pages(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "m", "--speed", "500")
    c = client(sim)
    first = ask(c, SYSTEM, "What is the first question?")
    second = ask(c, SYSTEM, "Something else entirely.")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    shared_tokens = len(f"<|system|>\n{SYSTEM}\n<|user|>\n".encode()) // 4
    assert cached % PAGE == 0
    assert shared_tokens - PAGE < cached <= shared_tokens


def test_tiny_cache_evicts_least_recently_used_prefixes(sim_factory):
    # 512 tokens = 32 pages; each prompt below needs about 13 pages of prompt plus one of output.
    sim = sim_factory("--flavor", "vllm", "--model", "m", "--speed", "500", "--cache-tokens", "512")
    c = client(sim)
    prompts = [f"Document {i}: " + ("lorem ipsum dolor sit amet " * 30) for i in range(4)]
    ask(c, prompts[0], "q")
    assert ask(c, prompts[0], "q").usage.prompt_tokens_details.cached_tokens > 0
    for p in prompts[1:]:
        ask(c, p, "q")
    stats = get_json(sim.url("/sim/stats"))
    assert stats["evicted_pages"] > 0
    assert stats["cached_pages"] <= 32
    assert ask(c, prompts[0], "q").usage.prompt_tokens_details.cached_tokens == 0


def test_request_larger_than_the_kv_pool_is_rejected(sim_factory):
    sim = sim_factory("--flavor", "vllm", "--model", "m", "--speed", "500", "--cache-tokens", "64")
    c = client(sim)
    try:
        ask(c, "x" * 1000, "q")
    except openai.BadRequestError as error:
        assert error.status_code == 400
    else:
        raise AssertionError("a request larger than the KV pool must be rejected")


def test_replicas_listen_on_consecutive_ports_with_independent_caches(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "m", "--speed", "500", replicas=3)
    assert sim.ports == [sim.port, sim.port + 1, sim.port + 2]
    ask(client(sim, 0), SYSTEM, "q")
    assert ask(client(sim, 0), SYSTEM, "q").usage.prompt_tokens_details.cached_tokens > 0
    for replica in (1, 2):
        assert ask(client(sim, replica), SYSTEM, "q").usage.prompt_tokens_details.cached_tokens == 0


def test_flush_cache_drops_cached_prefixes(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "m", "--speed", "500")
    c = client(sim)
    ask(c, SYSTEM, "q")
    request = urllib.request.Request(sim.url("/flush_cache"), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert ask(c, SYSTEM, "q").usage.prompt_tokens_details.cached_tokens == 0

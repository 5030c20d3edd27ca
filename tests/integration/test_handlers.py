"""The OpenAI API through the gateway, as a user sees it: the official client against real processes."""

from __future__ import annotations

import json
import socket

import openai
import pytest

from tests.conftest import FAST_HEALTH, MODEL, http_get, http_post_json, pool_toml

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers."}]


@pytest.fixture
def stack(simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + pool_toml("sglang", "sglang", "interactive", sim.urls,
                                         extra='api_key = "engine-secret"\n'))
    return sim, gw


def direct_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_non_streaming_answer_equals_the_engines_own(stack):
    sim, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="client-key", max_retries=0)
    via_gateway = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    direct = direct_client(sim.url(0)).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert via_gateway.choices[0].message.content == direct.choices[0].message.content
    assert via_gateway.usage.completion_tokens == 12


def test_streamed_deltas_concatenate_to_exactly_the_engines_output(stack):
    sim, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="client-key", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    direct = direct_client(sim.url(1)).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert streamed == direct.choices[0].message.content
    assert len(streamed.split()) == 20


def test_usage_chunk_passes_through_when_include_usage_is_set(stack):
    _, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="client-key", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens_details.cached_tokens is not None


async def test_async_client_streams_completions_endpoint(stack):
    _, gw = stack
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="client-key", max_retries=0)
    stream = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert len(text.split()) == 8
    await client.close()


def test_request_bytes_reach_the_engine_unchanged(stack):
    sim, gw = stack
    body = (b'{"model": "%s",  "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x98\x95"}],\n'
            b' "max_tokens": 3, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],'
            b' "response_format": {"type": "text"}, "logprobs": false, "x_unknown": [1, 2.50, null]}') % MODEL.encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer client-key\r\nX-Request-Id: req-123\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        response = b""
        while chunk := s.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200")
    assert b"x-request-id: req-123" in response
    seen = [r for i in range(2) for r in sim.requests(i) if r["headers"].get("x-request-id") == "req-123"]
    assert len(seen) == 1
    assert seen[0]["body"].encode("latin-1") == body
    # The engine gets the pool's credential, never the client's key.
    assert seen[0]["headers"]["authorization"] == "Bearer engine-secret"


def test_a_distinct_request_id_is_generated_when_the_client_sends_none(stack):
    sim, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    rids = [client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=2)
            .headers["x-request-id"] for _ in range(2)]
    assert all(len(rid) >= 16 for rid in rids)
    assert rids[0] != rids[1]
    assert any(r["headers"].get("x-request-id") == rids[0] for i in range(2) for r in sim.requests(i))


def test_models_lists_every_configured_model_in_openai_shape(stack):
    _, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_a_model_is_retrieved_by_its_id_with_or_without_a_slash_and_an_unknown_one_is_model_not_found(
        simulator, gateway):
    sim = simulator("sglang", replicas=1)
    org_model = "meta-llama/Llama-3.1-8B-Instruct"
    gw = gateway(FAST_HEALTH + pool_toml("sglang", "sglang", "interactive", sim.urls).replace(
        f'models = ["{MODEL}"]', f'models = ["{MODEL}", "{org_model}"]'))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    for model in (MODEL, org_model):  # the SDK sends the slash percent-encoded
        found = client.models.retrieve(model)
        assert (found.id, found.object) == (model, "model")
    status, body = http_get(f"{gw.url}/v1/models/{org_model}")  # as curl sends it
    assert status == 200 and json.loads(body)["id"] == org_model
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("llama-3.1-8b-typo")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    status, body = http_post_json(f"{gw.url}/v1/models/{MODEL}", {})
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_an_engine_at_an_ipv6_address_is_health_checked_and_served(simulator, gateway):
    sim = simulator("sglang", replicas=1, extra=["--host", "::1"])
    endpoint = f"[::1]:{sim.ports[0]}"
    gw = gateway(FAST_HEALTH + "[routing]\nendpoint_header = true\n"
                 + pool_toml("sglang", "sglang", "interactive", [f"http://{endpoint}"]))  # ready: health passed
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert raw.headers["x-gateway-endpoint"] == endpoint
    assert raw.parse().usage.completion_tokens == 4


def test_healthz_and_readyz_answer_on_public_and_admin_listeners(stack):
    _, gw = stack
    for base in (gw.url, gw.admin_url):
        assert http_get(f"{base}/healthz")[0] == 200
        status, body = http_get(f"{base}/readyz")
        assert status == 200 and json.loads(body)["ready"] is True


def test_access_log_has_one_line_per_request_and_no_prompt_text(stack):
    _, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    secret = "the-prompt-text-must-not-be-logged"
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": secret}], max_tokens=2,
                                   extra_headers={"x-request-id": "log-check-1"})
    gw.stop()
    lines = [line for line in gw.access_log() if line["request_id"] == "log-check-1"]
    assert len(lines) == 1
    line = lines[0]
    assert line["model"] == MODEL and line["status"] == 200 and line["completion_tokens"] == 2
    assert line["endpoint"] and line["pool"] == "sglang" and line["ttft_ms"] is not None
    assert secret not in gw.log()


def test_null_in_optional_fields_is_served_as_the_engines_serve_it(stack):
    # Clients generated from the OpenAPI spec send every optional field, unset ones as null.
    _, gw = stack
    status, body = http_post_json(f"{gw.url}/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": None, "stream_options": None,
        "n": None, "user": None, "service_tier": None})
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 3


@pytest.fixture
def batch_stack(simulator, gateway):
    """An SGLang interactive pool, a vLLM batch pool, and a client whose requests are batch."""
    interactive, batch = simulator("sglang"), simulator("vllm")
    gw = gateway(FAST_HEALTH + pool_toml("sglang", "sglang", "interactive", interactive.urls)
                 + pool_toml("vllm", "vllm", "batch", batch.urls))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0,
                           default_headers={"X-Workload-Class": "batch"})
    return interactive, batch, gw, client


def test_a_batch_of_prompts_with_n_samples_reaches_the_batch_pool_and_every_choice_comes_back(
        batch_stack):
    # Offline clients of vLLM send many prompts and n > 1 in one request; the gateway relays it whole.
    _, batch, gw, client = batch_stack
    prompts = ["Summarise the archive.", "List the rivers."]
    whole = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5,
                                      extra_headers={"x-request-id": "batch-whole"})
    direct = direct_client(batch.url(0)).completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5)
    assert [c.text for c in whole.choices] == [c.text for c in direct.choices]
    assert len({c.text for c in whole.choices}) == 4
    streamed = [""] * 4
    for chunk in client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=5, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_headers={"x-request-id": "batch-stream"}):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in direct.choices]
    gw.stop()
    lines = {line["request_id"]: line for line in gw.access_log()}
    for rid in ("batch-whole", "batch-stream"):
        assert lines[rid]["pool"] == "vllm" and lines[rid]["completion_tokens"] == 4 * 5, lines[rid]


def test_a_scoring_request_with_echo_and_max_tokens_0_gets_its_prompt_back_from_the_batch_pool(
        batch_stack):
    # Evaluation harnesses score a text by asking for it back (echo) with nothing generated.
    interactive, batch, _, client = batch_stack
    scored = client.completions.create(model=MODEL, prompt=["The sky is blue.", "The sky is green."],
                                       max_tokens=0, echo=True)
    assert [c.text for c in scored.choices] == ["The sky is blue.", "The sky is green."]
    assert batch.stats(0)["completed"] == 1 and interactive.stats(0)["requests"] == 0


def test_metrics_count_requests_by_route_model_pool_endpoint_status(stack):
    _, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    text = gw.metrics()
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("gateway_requests_total{") and 'route="chat"' in line and 'status="200"' in line)
    assert total == 3
    for name in ("gateway_ttft_seconds_bucket", "gateway_request_duration_seconds_bucket",
                 "gateway_overhead_seconds_bucket", "gateway_endpoint_in_flight",
                 "gateway_routing_decisions_total"):
        assert name in text

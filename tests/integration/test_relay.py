"""The relay's promises: retry only before commit, an error event after it, and cancel on disconnect."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

from tests.conftest import FAST_HEALTH, MODEL, pool_toml

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def stream_body(max_tokens: int) -> bytes:
    return json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}).encode()


def in_flight_total(metrics: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("gateway_endpoint_in_flight{"))


def counter(metrics: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_stream_error_event_when_engine_resets_mid_stream(simulator, gateway):
    sim = simulator("sglang", extra=["--reset-after-chunks", "3"])
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    received = []
    start = time.monotonic()
    with pytest.raises(openai.APIError) as e:
        for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, stream=True):
            received.append(chunk)
    assert 1 <= len(received) <= 3
    assert "mid-stream" in str(e.value)
    assert time.monotonic() - start < 2
    assert counter(gw.metrics(), 'gateway_stream_aborted_total{reason="reset"}') == 1


def test_stream_error_event_without_done_when_engine_hangs_past_idle_timeout(simulator, gateway):
    sim = simulator("sglang", extra=["--hang-after-chunks", "2"])
    gw = gateway(FAST_HEALTH + "[timeouts]\nidle_s = 0.5\n" + pool_toml("s", "sglang", "interactive", sim.urls))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        body = stream_body(50)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n" % len(body) + body)
        start = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert time.monotonic() - start < 0.5 + 1.0 + 0.5
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"code":"upstream_disconnected"' in data
    assert b"[DONE]" not in data
    assert data.endswith(b"0\r\n\r\n")  # the chunked body ends properly


def test_stream_error_event_when_engine_sends_garbage(simulator, gateway):
    sim = simulator("sglang", extra=["--garbage-after-chunks", "2"])
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=50, stream=True):
            pass


def test_client_disconnect_stops_the_engine_and_frees_in_flight(simulator, gateway):
    sim = simulator("sglang", speed=0.5)  # slow tokens: the stream is far from done when the client leaves
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        body = stream_body(2000)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nX-Request-Id: leaver\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while data.count(b"data:") < 3:
            data += s.recv(65536)
    time.sleep(0.5)
    (record,) = [r for r in sim.requests(0) if r["headers"].get("x-request-id") == "leaver"]
    assert record["cancelled"] is True
    chunks_then = record["chunks_sent"]
    time.sleep(0.5)
    (record,) = [r for r in sim.requests(0) if r["headers"].get("x-request-id") == "leaver"]
    assert record["chunks_sent"] == chunks_then < 2000
    metrics = gw.metrics()
    assert in_flight_total(metrics) == 0
    assert counter(metrics, 'gateway_client_disconnects_total{route="chat"}') == 1


def test_retry_succeeds_on_a_different_endpoint_before_commit(simulator, gateway):
    bad = simulator("sglang", extra=["--error-rate", "1.0", "--error-status", "503"])
    good = simulator("sglang")
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", bad.urls + good.urls, policy="round_robin"))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    for i in range(10):
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                               max_tokens=3)
        assert reply.choices[0].message.content
    assert bad.stats(0)["requests"] >= 1
    assert good.stats(0)["requests"] == 10
    assert counter(gw.metrics(), 'gateway_upstream_retries_total{reason="status_503"}') == bad.stats(0)["requests"]


def test_reset_before_first_byte_is_retried_elsewhere(simulator, gateway):
    bad = simulator("sglang", extra=["--reset-after-chunks", "0"])
    good = simulator("sglang")
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", bad.urls + good.urls, policy="round_robin"))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    for i in range(6):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert counter(gw.metrics(), 'gateway_upstream_retries_total{reason="reset"}') >= 1

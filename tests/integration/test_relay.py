"""The relay's promises: retry only before commit, an error event after it, and cancel on disconnect."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import openai
import pytest
from aiohttp import web

from gateway.relay import Call
from gateway.sse import SseCheck
from gateway.server import Connection
from gateway.upstream import Exchange, _Connection
from tests.conftest import FAST_HEALTH, MODEL, cyclic_garbage, gateway_in_process, pool_toml, serving

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


# -- hedging (relay docstring, "Hedging") ------------------------------------------------------------

def hedging_gateway(gateway, urls: list[str], hedge_after_s: float, extra: str = ""):
    """Round robin, so the first leg alternates between the replicas; the answering replica is named."""
    return gateway(FAST_HEALTH + "[routing]\nendpoint_header = true\n" + extra
                   + pool_toml("s", "sglang", "interactive", urls, policy="round_robin",
                               extra=f"hedge_after_s = {hedge_after_s}\n"))


def ask(client: openai.OpenAI, i: int, stream: bool) -> tuple[str, str]:
    """(replica that answered, text) for one chat request."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4, stream=stream)
    reply = raw.parse()
    text = ("".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream
            else reply.choices[0].message.content)
    return raw.headers["x-gateway-endpoint"], text


def test_request_stalled_before_its_first_byte_is_answered_by_a_hedge_and_the_stalled_leg_is_cancelled(
        simulator, gateway):
    stalled = simulator("sglang", extra=["--slow-first-token", "300"])  # far past the client's timeout
    good = simulator("sglang")
    gw = hedging_gateway(gateway, stalled.urls + good.urls, 0.2)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=20)
    answers = [ask(client, i, stream=i % 2 == 1) for i in range(6)]
    good_id = good.urls[0].removeprefix("http://")
    assert all(endpoint == good_id and text for endpoint, text in answers)
    first_on_stalled = stalled.stats(0)["requests"]
    assert first_on_stalled == 3  # round robin sent every other request there first
    metrics = gw.metrics()
    assert counter(metrics, 'gateway_hedges_total{outcome="hedge_won",pool="s"}') == first_on_stalled
    assert counter(metrics, "gateway_hedges_total") == first_on_stalled
    assert counter(metrics, "gateway_upstream_retries_total") == 0
    assert in_flight_total(metrics) == 0  # the stalled legs were released when they lost
    deadline = time.monotonic() + 5
    while not all(r["cancelled"] for r in stalled.requests(0)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r["cancelled"] for r in stalled.requests(0)] == [True] * first_on_stalled


def test_first_leg_that_answers_before_the_hedge_wins_and_a_failing_hedge_only_drops_out(simulator, gateway):
    slow = simulator("sglang", extra=["--slow-first-token", "1.0"])
    failing = simulator("sglang", extra=["--error-rate", "1.0", "--error-status", "503"])
    gw = hedging_gateway(gateway, slow.urls + failing.urls, 0.2)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=20)
    endpoint, text = ask(client, 0, stream=True)  # round robin: the slow replica is the first leg
    assert (endpoint, bool(text)) == (slow.urls[0].removeprefix("http://"), True)
    assert failing.stats(0)["requests"] == 1
    metrics = gw.metrics()
    assert counter(metrics, 'gateway_hedges_total{outcome="first_won",pool="s"}') == 1
    assert counter(metrics, "gateway_hedges_total") == 1
    assert in_flight_total(metrics) == 0


def test_no_hedge_is_sent_when_the_retry_budget_is_spent(simulator, gateway):
    stalled = simulator("sglang", extra=["--slow-first-token", "300"])
    good = simulator("sglang")
    budget = "[retry_budget]\nratio = 0\nmin_per_s = 0\ncap = 0\n[timeouts]\nfirst_byte_s = 1.0\n"
    gw = hedging_gateway(gateway, stalled.urls + good.urls, 0.2, extra=budget)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=20)
    with pytest.raises(openai.APIStatusError) as e:
        ask(client, 0, stream=False)
    assert e.value.status_code == 504
    assert good.stats(0)["requests"] == 0
    assert counter(gw.metrics(), 'gateway_hedges_total{outcome="skipped",pool="s"}') == 1


def test_losing_leg_is_closed_and_its_slot_released_while_the_winner_still_streams(simulator, gateway):
    stalled = simulator("sglang", extra=["--slow-first-token", "300"])
    slow_tokens = simulator("sglang", speed=0.5)  # the winner's stream lasts far longer than this test looks
    gw = hedging_gateway(gateway, stalled.urls + slow_tokens.urls, 0.2)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        body = stream_body(2000)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        data = b""
        while data.count(b"data:") < 3:
            data += s.recv(65536)
        time.sleep(0.3)
        (record,) = stalled.requests(0)
        metrics = gw.metrics()
        assert record["cancelled"] is True
        assert counter(metrics, f'gateway_endpoint_in_flight{{endpoint="{stalled.urls[0].removeprefix("http://")}"')  == 0
        assert in_flight_total(metrics) == 1  # the winner's stream, still running
        assert b"[DONE]" not in data


def test_in_a_hedging_pool_a_first_leg_that_fails_at_once_is_retried_not_hedged(simulator, gateway):
    bad = simulator("sglang", extra=["--error-rate", "1.0", "--error-status", "503"])
    good = simulator("sglang")
    gw = hedging_gateway(gateway, bad.urls + good.urls, 5.0)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=20)
    answers = [ask(client, i, stream=i % 2 == 1) for i in range(4)]
    assert {endpoint for endpoint, _ in answers} == {good.urls[0].removeprefix("http://")}
    metrics = gw.metrics()
    assert counter(metrics, 'gateway_upstream_retries_total{reason="status_503"}') == bad.stats(0)["requests"] == 2
    assert counter(metrics, "gateway_hedges_total") == 0
    assert in_flight_total(metrics) == 0


def test_a_replica_that_loses_every_hedge_race_is_ejected_and_gets_no_more_requests(simulator, gateway):
    stalled = simulator("sglang", extra=["--slow-first-token", "300"])
    good = simulator("sglang")
    gw = hedging_gateway(gateway, stalled.urls + good.urls, 0.2, extra="[outlier]\nconsecutive_failures = 3\n")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0, timeout=20)
    for i in range(12):
        ask(client, i, stream=i % 2 == 1)
    stalled_id = stalled.urls[0].removeprefix("http://")
    metrics = gw.metrics()
    assert stalled.stats(0)["requests"] == 3  # round robin's every other request, until the third lost race
    assert counter(metrics, 'gateway_hedges_total{outcome="hedge_won",pool="s"}') == 3
    assert counter(metrics, f'gateway_endpoint_ejections_total{{endpoint="{stalled_id}"') == 1


async def test_a_finished_stream_leaves_nothing_for_the_cyclic_gc(simulator, tmp_path):
    # Objects caught in reference cycles wait for the cyclic GC, and a stream's used to: at a few
    # thousand streams a second that was a 10-20 ms pause every half second.
    sim = simulator("sglang")
    config = FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls)
    async with gateway_in_process(config, tmp_path) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = stream_body(4)
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(body) + body)
        with cyclic_garbage() as garbage:
            for _ in range(20):
                writer.write(request)
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                assert b"[DONE]" in await reader.readuntil(b"0\r\n\r\n")
        writer.close()
    assert [o for o in garbage if isinstance(o, (Call, Exchange, SseCheck))] == []


async def test_a_stream_its_client_left_leaves_nothing_for_the_cyclic_gc(simulator, tmp_path):
    # Chat users stop answers all the time; each stop closes an upstream connection.
    sim = simulator("sglang", speed=5.0)
    config = FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls)
    async with gateway_in_process(config, tmp_path) as gw:
        body = stream_body(300)
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % len(body)
                   + body)
        with cyclic_garbage() as garbage:
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(request)
                await reader.readuntil(b"data:")
                writer.close()
                await writer.wait_closed()
            deadline = time.monotonic() + 10
            while ((gw.server.connections or in_flight_total(gw.ledger.exposition().decode()))
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.02)  # until the gateway has let go of both sides
    assert [o for o in garbage if isinstance(o, (Connection, _Connection, Exchange, Call))] == []


@pytest.mark.parametrize("separators, cut", [
    ((",", ":"), None),
    ((",", ":"), b'"usage":{"prompt_tokens":5,"compl'),
    ((",", ":"), b'"usage":'),
    ((", ", ": "), None),
], ids=["whole stream in one read", "cut inside the usage object", "cut after its key", "spaced JSON"])
async def test_usage_is_counted_however_the_reads_cut_the_stream(tmp_path, separators, cut):
    # A short answer from a fast engine reaches the gateway in one read, its usage chunk included; a
    # longer one may be cut anywhere, the usage object too. Engines write compact JSON; others may not.
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": MODEL}
    events = [{**chunk, "choices": [{"index": 0, "text": " hi", "finish_reason": None}]},
              {**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
              {**chunk, "choices": [],
               "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}]
    whole = b"".join(b"data: " + json.dumps(e, separators=separators).encode() + b"\n\n" for e in events)
    whole += b"data: [DONE]\n\n"
    at = len(whole) if cut is None else whole.index(cut) + len(cut)

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(whole[:at])
        if at < len(whole):
            await asyncio.sleep(0.05)  # the gateway reads the first piece on its own
            await response.write(whole[at:])
        await response.write_eof()
        return response

    async def healthy(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", healthy)
    async with serving(app) as port:
        config = FAST_HEALTH + pool_toml("v", "vllm", "interactive", [f"http://127.0.0.1:{port}"])
        async with gateway_in_process(config, tmp_path) as gw:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.port}/v1", api_key="k", max_retries=0)
            stream = await client.completions.create(model=MODEL, prompt="p", max_tokens=7, stream=True)
            assert [c.usage.completion_tokens async for c in stream if c.usage] == [7]
            await client.close()
            deadline = time.monotonic() + 5
            while "gateway_tokens_total{" not in (metrics := gw.ledger.exposition().decode()):
                assert time.monotonic() < deadline, "the request was never settled"
                await asyncio.sleep(0.02)
    tokens = 'gateway_tokens_total{kind="%s",model="' + MODEL + '",pool="v"}'
    assert (counter(metrics, tokens % "prompt"), counter(metrics, tokens % "completion")) == (5, 7)

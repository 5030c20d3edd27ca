"""Fault knobs, from the CLI and from ``POST /sim/faults``, and client disconnects."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import openai
import pytest

from tests.engine_nodes.conftest import SimProcess

CHAT = {"model": "sim-model", "messages": [{"role": "user", "content": "Tell me a story."}]}


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def set_faults(sim: SimProcess, faults: dict, replica: int = 0) -> dict:
    request = urllib.request.Request(sim.url("/sim/faults", replica), data=json.dumps(faults).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def last_request(sim: SimProcess, replica: int = 0) -> dict:
    return get_json(sim.url("/sim/requests?limit=1", replica))[-1]


async def open_stream(port: int, max_tokens: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 streaming request, so the test controls exactly when the socket closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({**CHAT, "max_tokens": max_tokens, "stream": True}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    return reader, writer


async def read_events(reader: asyncio.StreamReader, count: int, timeout: float) -> bytes:
    """Read until ``count`` SSE events have arrived (or the peer closes); returns the raw bytes."""
    data = b""
    async with asyncio.timeout(timeout):
        while data.count(b"data: ") < count:
            chunk = await reader.read(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_error_rate_one_answers_every_request_with_the_configured_status(sim_factory):
    sim = sim_factory("--flavor", "vllm", "--model", "sim-model", "--speed", "500", "--error-rate", "1.0",
                      "--error-status", "503")
    c = openai.OpenAI(base_url=sim.url("/v1"), api_key="unused", max_retries=0, timeout=10)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError) as error:
            c.chat.completions.create(**CHAT, max_tokens=4)
        assert error.value.status_code == 503
        assert error.value.body["code"] == 503 and error.value.body["type"] == "ServiceUnavailableError"
    assert get_json(sim.url("/sim/stats"))["injected_errors"] == 3
    assert get_json(sim.url("/sim/faults"))["error_rate"] == 1.0


def test_faults_update_partially_and_clear_with_an_empty_object(sglang_sim):
    assert set_faults(sglang_sim, {"error_rate": 0.5, "error_status": 429})["error_status"] == 429
    after = set_faults(sglang_sim, {"hang_after_chunks": 3})
    assert after["error_rate"] == 0.5 and after["hang_after_chunks"] == 3
    assert set_faults(sglang_sim, {}) == set_faults(sglang_sim, {"clear": True})
    assert get_json(sglang_sim.url("/sim/faults"))["error_rate"] == 0.0


def test_unknown_fault_knob_is_rejected(sglang_sim):
    with pytest.raises(urllib.error.HTTPError) as error:
        set_faults(sglang_sim, {"explode": True})
    assert error.value.code == 400


async def test_reset_after_chunks_truncates_the_stream(sglang_sim):
    set_faults(sglang_sim, {"reset_after_chunks": 3})
    reader, writer = await open_stream(sglang_sim.port, max_tokens=50)
    try:
        data = await read_events(reader, 100, timeout=5)
    except ConnectionResetError:
        data = b""
    finally:
        writer.close()
    assert b"[DONE]" not in data
    assert data.count(b"data: ") <= 3
    record = last_request(sglang_sim)
    assert record["chunks_sent"] == 3 and not record["finished"]


async def test_hang_after_chunks_stalls_the_stream_until_the_client_leaves(sglang_sim):
    set_faults(sglang_sim, {"hang_after_chunks": 2})
    reader, writer = await open_stream(sglang_sim.port, max_tokens=50)
    data = await read_events(reader, 2, timeout=5)
    assert data.count(b"data: ") == 2
    with pytest.raises(TimeoutError):
        await read_events(reader, 3, timeout=0.5)  # nothing more arrives
    record = last_request(sglang_sim)
    assert record["chunks_sent"] == 2 and not record["finished"] and not record["cancelled"]
    writer.close()
    await asyncio.sleep(0.2)
    assert last_request(sglang_sim)["cancelled"] is True


async def test_garbage_after_chunks_sends_a_non_sse_line_and_closes(vllm_sim):
    set_faults(vllm_sim, {"garbage_after_chunks": 1})
    reader, writer = await open_stream(vllm_sim.port, max_tokens=10)
    data = b""
    async with asyncio.timeout(5):
        while chunk := await reader.read(65536):
            data += chunk
    writer.close()
    assert b"not server-sent events" in data and b"[DONE]" not in data
    assert data.count(b"data: ") == 1


async def test_slow_first_token_delays_the_first_chunk_in_wall_time(sglang_sim):
    set_faults(sglang_sim, {"slow_first_token": 0.6})
    started = time.monotonic()
    reader, writer = await open_stream(sglang_sim.port, max_tokens=2)
    await read_events(reader, 1, timeout=5)
    writer.close()
    assert time.monotonic() - started >= 0.6


def test_refuse_connections_closes_the_port_until_lifted_through_a_sibling(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "sim-model", "--speed", "500", replicas=2)
    set_faults(sim, {"port": sim.ports[1], "refuse_connections": True}, replica=0)
    with pytest.raises(urllib.error.URLError) as error:
        urllib.request.urlopen(sim.url("/health", 1), timeout=5)
    assert isinstance(error.value.reason, ConnectionRefusedError)
    set_faults(sim, {"port": sim.ports[1], "refuse_connections": False}, replica=0)
    with urllib.request.urlopen(sim.url("/health", 1), timeout=5) as response:
        assert response.status == 200


def test_refuse_connections_from_the_cli_never_listens(sim_factory):
    sim = sim_factory("--flavor", "vllm", "--model", "sim-model", "--refuse-connections")
    with pytest.raises(urllib.error.URLError) as error:
        urllib.request.urlopen(sim.url("/health"), timeout=5)
    assert isinstance(error.value.reason, ConnectionRefusedError)


def test_flap_health_alternates_healthy_and_unhealthy(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", "sim-model", "--flap-health", "0.25")
    seen = []
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(sim.url("/health"), timeout=5) as response:
                seen.append(response.status)
        except urllib.error.HTTPError as error:
            seen.append(error.code)
        time.sleep(0.05)
    transitions = sum(1 for a, b in zip(seen, seen[1:]) if a != b)
    assert set(seen) == {200, 503}
    assert transitions >= 2


async def test_client_disconnect_cancels_the_request_and_stops_chunk_production(sim_factory):
    # Real time: about 1 ms of simulated decode per token, so 5000 tokens would take seconds.
    sim = sim_factory("--flavor", "sglang", "--model", "sim-model", "--speed", "1")
    reader, writer = await open_stream(sim.port, max_tokens=5000)
    await read_events(reader, 3, timeout=5)
    writer.close()
    await asyncio.sleep(0.2)
    record = last_request(sim)
    assert record["cancelled"] is True and record["finished"] is False
    await asyncio.sleep(0.2)
    assert last_request(sim)["chunks_sent"] == record["chunks_sent"] < 5000
    stats = get_json(sim.url("/sim/stats"))
    assert stats["cancelled"] == 1 and stats["active"] == 0 and stats["running"] == 0

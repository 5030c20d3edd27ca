"""The client-facing HTTP/1.1 server, spoken to over raw sockets: framing, keep-alive and limits."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time

import openai
import pytest

from gateway.server import Connection
from tests.conftest import FAST_HEALTH, MODEL, cyclic_garbage, gateway_in_process, http_get, pool_toml
from tests.integration.test_errors import raw_request

BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY)


@pytest.fixture
def stack(simulator, gateway):
    sim = simulator("sglang")
    gw = gateway(FAST_HEALTH + "[timeouts]\nrequest_read_s = 1.0\n" + pool_toml("s", "sglang", "interactive", sim.urls))
    return sim, gw


def read_responses(s: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` Content-Length framed responses from one connection."""
    data, out = b"", []
    while len(out) < count:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {len(out)} responses"
        data += chunk
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            if len(rest) < length:
                break
            out.append(head + b"\r\n\r\n" + rest[:length])
            data = rest[length:]
    return out


def test_keep_alive_serves_many_requests_on_one_connection(stack):
    sim, gw = stack
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        for _ in range(5):
            s.sendall(REQUEST)
            (response,) = read_responses(s, 1)
            assert response.startswith(b"HTTP/1.1 200")


def test_pipelined_requests_are_answered_in_order(stack):
    _, gw = stack
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(REQUEST.replace(b"Host: gw", b"Host: gw\r\nX-Request-Id: first")
                  + REQUEST.replace(b"Host: gw", b"Host: gw\r\nX-Request-Id: second"))
        first, second = read_responses(s, 2)
    assert b"x-request-id: first" in first and b"x-request-id: second" in second


def test_a_client_that_expects_100_continue_is_told_to_send_its_body(stack):
    _, gw = stack
    head, body = REQUEST.split(b"\r\n\r\n", 1)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        for _ in range(2):  # and again on the same connection
            s.sendall(head + b"\r\nExpect: 100-continue\r\n\r\n")
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                chunk = s.recv(1)
                assert chunk, f"connection closed after {interim!r}"
                interim += chunk
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            s.sendall(body)
            (response,) = read_responses(s, 1)
            assert response.startswith(b"HTTP/1.1 200")


def test_a_request_asking_to_upgrade_to_h2c_is_served_over_http_1_1_body_and_all(stack):
    # What Java's HttpClient sends to every plain http:// server, and curl --http2.
    h2c = b"Host: gw\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    sim, gw = stack
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(REQUEST.replace(b"Host: gw\r\n", h2c))
        (response,) = read_responses(s, 1)
        assert response.startswith(b"HTTP/1.1 200")  # not 101: the upgrade is ignored
        s.sendall(b"GET /v1/models HTTP/1.1\r\n" + h2c + b"\r\n" + REQUEST)  # no body, then another request
        listed, answered = read_responses(s, 2)
        assert listed.startswith(b"HTTP/1.1 200") and MODEL.encode() in listed
        assert answered.startswith(b"HTTP/1.1 200")
    forwarded = sim.requests(0)[-2:]
    assert [json.loads(r["body"])["messages"] for r in forwarded] == [json.loads(BODY)["messages"]] * 2
    assert not any(name.lower() in ("upgrade", "http2-settings") for r in forwarded for name in r["headers"])


def test_connect_is_refused_with_400(stack):
    _, gw = stack
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"CONNECT engine:443 HTTP/1.1\r\nHost: engine:443\r\n\r\n")
        (response,) = read_responses(s, 1)
    assert response.startswith(b"HTTP/1.1 400") and b"CONNECT is not supported" in response


def test_a_gateway_listening_on_ipv6_any_serves_ipv4_and_ipv6_clients_on_both_ports(simulator, gateway):
    # A dual-stack cluster's kubelet probes and clients may come over either family.
    sim = simulator("sglang")
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), host="::")
    for address in ("127.0.0.1", "[::1]"):
        client = openai.OpenAI(base_url=f"http://{address}:{gw.port}/v1", api_key="k", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).choices[0].message.content
        assert http_get(f"http://{address}:{gw.admin_port}/metrics")[0] == 200


async def test_a_closed_connection_leaves_nothing_for_the_cyclic_gc(simulator, tmp_path):
    # Clients that open a connection per request (the OpenAI SDK after 5 s idle, probes) would
    # otherwise leave each one to the cyclic GC, whose pauses grow with what it has to free.
    sim = simulator("sglang")
    config = FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls)
    async with gateway_in_process(config, tmp_path) as gw:
        with cyclic_garbage() as garbage:
            for request in (REQUEST, b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n", b"NOT HTTP\r\n\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(request)
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 ")
                writer.close()
                await writer.wait_closed()
            await asyncio.sleep(0.1)  # the gateway's side of the last close
    assert [o for o in garbage if isinstance(o, Connection)] == []


def test_upstream_connections_are_reused_across_requests(stack):
    sim, gw = stack
    before = sim.stats(0)["accepted_connections"]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        for _ in range(20):
            s.sendall(REQUEST)
            read_responses(s, 1)
    # The engine counts its accepts; this test's own two stats calls and a health check may add to it.
    assert sim.stats(0)["accepted_connections"] - before <= 3
    assert "gateway_upstream_connects_total 1.0" in gw.metrics()


def test_a_compressed_body_is_refused_with_415_before_any_engine_sees_it(stack):
    sim, gw = stack
    before = len(sim.requests(0))
    packed = gzip.compress(BODY)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed) + packed)
        (response,) = read_responses(s, 1)
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 415") and b"\r\naccept-encoding: identity" in head.lower()
    assert json.loads(body)["error"]["code"] == "unsupported_content_encoding"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:  # identity is no encoding
        s.sendall(REQUEST.replace(b"Host: gw\r\n", b"Host: gw\r\nContent-Encoding: identity\r\n"))
        assert read_responses(s, 1)[0].startswith(b"HTTP/1.1 200")
    assert len(sim.requests(0)) == before + 1


def test_too_many_headers_is_431(stack):
    _, gw = stack
    headers = b"".join(b"X-Pad-%d: v\r\n" % i for i in range(150))
    status, headers_out, _ = raw_request(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n")
    assert status == 431
    assert headers_out.get("connection") == "close"


def test_oversized_header_is_431(stack):
    _, gw = stack
    status, _, _ = raw_request(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert status == 431


def test_request_sent_too_slowly_gets_408_and_close(stack):
    _, gw = stack
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
        start = time.monotonic()
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - start < 3.5


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x00b\r\n\r\n",
    b"GARBAGE\r\n\r\n",
])
def test_ambiguous_or_malformed_framing_is_400_and_never_reaches_an_engine(stack, request_bytes):
    sim, gw = stack
    status, _, body = raw_request(gw.port, request_bytes)
    assert status == 400
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert sim.stats(0)["requests"] == 0

"""Every error the gateway answers, with its status and OpenAI's error shape, seen through real sockets."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest

from tests.conftest import FAST_HEALTH, MODEL, free_ports, pool_toml

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes or one response is complete."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        headers = {k.lower(): v for k, v in headers.items()}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


def post(port: int, body: bytes, path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> tuple:
    return raw_request(port, b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n%s\r\n" % (path, len(body), extra) + body)


def assert_openai_error(body: bytes, code: str | None = None, param: str | None = None) -> dict:
    doc = json.loads(body)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert doc["error"]["code"] == code
    if param is not None:
        assert doc["error"]["param"] == param
    return doc["error"]


@pytest.fixture
def stack(simulator, gateway):
    sim = simulator("sglang", replicas=1)
    gw = gateway(FAST_HEALTH + pool_toml("sglang", "sglang", "interactive", sim.urls))
    return sim, gw


def test_malformed_json_is_400_invalid_json(stack):
    _, gw = stack
    status, _, body = post(gw.port, b'{"model": "x", "messages": [')
    assert status == 400
    assert_openai_error(body, code="invalid_json")


def test_wrong_field_type_is_400_naming_the_field(stack):
    _, gw = stack
    status, _, body = post(gw.port, b'{"model": "%s", "messages": [{"role": "user", "content": 7}]}' % MODEL.encode())
    assert status == 400
    assert_openai_error(body, param="messages[0].content")


def test_official_client_raises_bad_request_with_param(stack):
    _, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]
    assert e.value.param == "messages"


def test_unknown_model_is_404_model_not_found(stack):
    sim, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT["messages"])
    assert e.value.code == "model_not_found"
    assert sim.stats(0)["requests"] == 0


def test_unknown_model_names_mint_no_metric_series(stack):
    """Each label value is a series held forever, by the gateway and by Prometheus: names a client
    makes up must not become label values."""
    _, gw = stack
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    for i in range(3):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=f"made-up-{i}", messages=CHAT["messages"])
        assert f"made-up-{i}" in e.value.message  # the client is still told which name is unknown
    deadline = time.monotonic() + 10
    while 'gateway_requests_total{endpoint="",model="",pool="",route="chat",status="404"} 3.0' not in gw.metrics():
        assert time.monotonic() < deadline, "the refusals were not counted"
        time.sleep(0.05)
    assert "made-up" not in gw.metrics()


def test_body_over_the_limit_is_413_without_reading_it(stack):
    sim, gw = stack
    # Announce 17 MiB, send only the head: the answer must come without the body.
    start = time.monotonic()
    status, headers, body = raw_request(
        gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n{" % (17 * 1024 * 1024))
    assert status == 413
    assert headers.get("connection") == "close"
    assert_openai_error(body, code="request_too_large")
    assert time.monotonic() - start < 5
    assert sim.stats(0)["requests"] == 0


def test_chunked_body_over_the_limit_is_413(simulator, gateway):
    sim = simulator("sglang")
    gw = gateway(FAST_HEALTH + "[limits]\nmax_body_bytes = 1000\n" + pool_toml("s", "sglang", "interactive", sim.urls))
    chunk = b"x" * 600
    status, _, body = raw_request(
        gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk, len(chunk), chunk))
    assert status == 413
    assert_openai_error(body, code="request_too_large")


def test_wrong_method_is_405(stack):
    _, gw = stack
    status, _, body = raw_request(gw.port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 405
    assert_openai_error(body, code="method_not_allowed")


def test_unknown_path_is_404(stack):
    _, gw = stack
    status, _, body = raw_request(gw.port, b"GET /v2/nothing HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 404
    assert_openai_error(body, code="not_found")


def test_no_healthy_endpoint_is_503_with_retry_after(gateway):
    dead = f"http://127.0.0.1:{free_ports()}"
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", [dead]), wait_ready=False)
    deadline = time.monotonic() + 10
    while True:
        try:
            status, headers, body = post(gw.port, json.dumps(CHAT).encode())
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert status == 503
    assert headers["retry-after"] == "1"
    assert headers["x-should-retry"] == "true"
    assert_openai_error(body, code="no_healthy_upstream")


def test_upstream_connect_failure_is_502(simulator, gateway):
    sim = simulator("sglang")
    # Health checks far apart: the endpoint still counts as healthy when its process is gone.
    gw = gateway("[health]\ninterval_s = 60\n" + pool_toml("s", "sglang", "interactive", sim.urls))
    sim.stop()
    status, _, body = post(gw.port, json.dumps(CHAT).encode())
    assert status == 502
    assert_openai_error(body, code="upstream_error")


def test_upstream_first_byte_timeout_is_504(simulator, gateway):
    sim = simulator("sglang", extra=["--slow-first-token", "3"])
    gw = gateway(FAST_HEALTH + "[timeouts]\nfirst_byte_s = 0.3\n" + pool_toml("s", "sglang", "interactive", sim.urls))
    start = time.monotonic()
    status, _, body = post(gw.port, json.dumps(CHAT).encode())
    assert status == 504
    assert_openai_error(body, code="upstream_timeout")
    assert time.monotonic() - start < 2.5


def test_engine_client_error_passes_through_with_its_status(stack):
    sim, gw = stack
    sim.faults(0, error_rate=1.0, error_status=400)
    status, _, body = post(gw.port, json.dumps(CHAT).encode())
    assert status == 400
    error = assert_openai_error(body)
    assert error["message"]
    assert sim.stats(0)["requests"] == 1  # a 4xx is the client's problem: not retried


def test_engine_503_on_every_endpoint_passes_through_after_retries(simulator, gateway):
    sim = simulator("sglang", replicas=2, extra=["--error-rate", "1.0", "--error-status", "503"])
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    status, _, body = post(gw.port, json.dumps(CHAT).encode())
    assert status == 503
    assert_openai_error(body)
    assert sim.stats(0)["requests"] + sim.stats(1)["requests"] == 2  # one try on each, no more

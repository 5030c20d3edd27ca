"""A request's and the process's ends: client disconnects and graceful drain (scenarios 8 and 9 of
the reliability brief).

Streams are read over raw sockets, so a test sees exactly which bytes arrived and when, and can
hang up at a chosen event. The simulated engine's request log (``/sim/requests``) shows what the
engine did on its side: how many events it sent and whether its request was cancelled.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import threading
import time

import pytest

from gateway import auth
from tests.conftest import FAST_HEALTH, MODEL, http_get, http_post_json, pool_toml
from tests.integration.test_errors import assert_openai_error, post
from tests.integration.test_relay import counter, in_flight_total

pytestmark = pytest.mark.slow

SPEED = 0.05  # simulated seconds per wall second: about 25 ms per token, 0.1-0.2 s to the first one


def stream_request(content: str, max_tokens: int, request_id: str, key: str | None = None) -> bytes:
    body = json.dumps({"model": MODEL, "max_tokens": max_tokens, "stream": True,
                       "messages": [{"role": "user", "content": content}]}).encode()
    auth_header = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Request-Id: %s\r\n"
            b"%sContent-Length: %d\r\n\r\n" % (request_id.encode(), auth_header, len(body)) + body)


def sim_record(sim, request_id: str) -> dict:
    (record,) = [r for r in sim.requests(0, limit=50) if r["headers"].get("x-request-id") == request_id]
    return record


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- 8. client disconnect ---------------------------------------------------------------------------

def test_client_disconnect_stops_the_engine_within_200ms_frees_every_slot_and_is_not_held_against_it(
        simulator, gateway, tmp_path, monkeypatch):
    """Scenario 8 (extends tests/integration/test_relay.py, which checks one disconnect eventually
    cancels): five clients in a row hang up after 3 events of a 2,000-token stream. Each time the
    engine's request is cancelled within 200 ms of the hang-up, having sent at most 10 events more
    than the client had read (the events 200 ms of decoding produce at ~25 ms a token, plus what was
    in flight), and it sends nothing after; the in-flight gauge returns to 0, and so does the key's
    concurrency: the key may hold 1 request at a time, and each next stream is admitted. With
    ``outlier.consecutive_failures = 3``, the five disconnects eject nothing, while 3 streams the
    engine really breaks (reset after 3 events) do eject it: disconnects are not engine failures."""
    pepper = secrets.token_urlsafe(32)
    monkeypatch.setenv(auth.PEPPER_ENV, pepper)  # inherited by the gateway process
    key = auth.new_key("one-at-a-time")
    keys_file = tmp_path / "keys.jsonl"
    keys_file.write_text(auth.render_entry(auth.KeyRecord(key_id="one-at-a-time", concurrency=1),
                                           auth.key_digest(pepper.encode(), key)))
    sim = simulator("sglang", speed=SPEED)
    gw = gateway(FAST_HEALTH + f'[auth]\nkeys_file = "{keys_file}"\n[outlier]\nconsecutive_failures = 3\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls))
    ejections = f'gateway_endpoint_ejections_total{{endpoint="127.0.0.1:{sim.ports[0]}"'

    for i in range(5):
        request_id = f"leaver-{i}"
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(stream_request(f"a long story {i}", 2000, request_id, key))
            data = b""
            while data.count(b"data:") < 3:
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data[:200]
            read = data.count(b"data:")
        hung_up = time.monotonic()
        wait_for(lambda: sim_record(sim, request_id)["cancelled"], 1.0, "the engine to cancel")
        assert time.monotonic() - hung_up <= 0.2
        sent = sim_record(sim, request_id)["chunks_sent"]
        assert sent <= read + 10, (read, sent)
        wait_for(lambda: in_flight_total(gw.metrics()) == 0, 1.0, "the in-flight gauge to return to 0")
        time.sleep(0.2)
        assert sim_record(sim, request_id)["chunks_sent"] == sent

    metrics = gw.metrics()
    assert counter(metrics, 'gateway_client_disconnects_total{route="chat"}') == 5
    assert counter(metrics, ejections) == 0

    sim.faults(0, reset_after_chunks=3)
    for i in range(3):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(stream_request(f"a broken story {i}", 50, f"broken-{i}", key))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert b'"code":"upstream_disconnected"' in data and b"[DONE]" not in data
    assert counter(gw.metrics(), ejections) == 1


# -- 9. graceful drain ------------------------------------------------------------------------------

class Stream(threading.Thread):
    """One streaming request read to its end on a raw socket, in a thread."""

    def __init__(self, port: int, content: str, max_tokens: int):
        super().__init__(daemon=True)
        self.port = port
        self.request = stream_request(content, max_tokens, f"drain-{content.replace(' ', '-')}")
        self.data = b""
        self.first_event = threading.Event()
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=15) as s:
            s.sendall(self.request)
            while chunk := s.recv(65536):
                self.data += chunk
                if b"data:" in self.data:
                    self.first_event.set()
        self.ended_at = time.monotonic()

    @property
    def done(self) -> bool:
        return b"data: [DONE]" in self.data

    @property
    def errored(self) -> bool:
        return b'data: {"error"' in self.data


DRAIN_S = 3.0  # the brief's 30 s drain window, scaled


def request_drain_by_sigterm(gw) -> None:
    gw.proc.send_signal(signal.SIGTERM)


def request_drain_by_admin_api(gw) -> None:
    status, body = http_post_json(f"{gw.admin_url}/admin/drain", {})
    assert status == 200, body


@pytest.mark.parametrize("request_drain", [request_drain_by_sigterm, request_drain_by_admin_api],
                         ids=["sigterm", "admin_drain"])
def test_drain_fails_readiness_at_once_refuses_new_work_finishes_short_streams_and_exits_0(
        simulator, gateway, request_drain):
    """Scenario 9: with 6 short streams (~1 s) and 3 long ones (~25 s) running, SIGTERM (or
    ``POST /admin/drain``) with ``timeouts.drain_s`` = 3 s (the brief's 30 s, scaled): ``/readyz``
    answers 503 at once; new connections are refused, and a request on a connection that was
    already open gets 503 ``draining`` or a close; every short stream (each still running when the
    drain begins) ends with ``[DONE]``; each
    long stream ends with the error event and no ``[DONE]`` at the deadline; the process exits 0
    within the deadline + 2 s."""
    sim = simulator("sglang", replicas=2, speed=SPEED)
    gw = gateway(FAST_HEALTH + f"[timeouts]\ndrain_s = {DRAIN_S}\n"
                 + pool_toml("s", "sglang", "interactive", sim.urls))
    short = [Stream(gw.port, f"short {i}", 40) for i in range(6)]
    long = [Stream(gw.port, f"long {i}", 1000) for i in range(3)]
    for stream in short + long:
        assert stream.first_event.wait(5), stream.data
    idle = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")

    requested = time.monotonic()
    request_drain(gw)
    wait_for(lambda: http_get(f"{gw.admin_url}/readyz")[0] == 503, 0.5, "/readyz to answer 503")

    try:
        status, _, reply = post(gw.port, json.dumps({"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": "too late"}]}).encode())
    except ConnectionRefusedError:
        pass
    else:
        assert status == 503, reply
        assert_openai_error(reply, code="draining")
    with idle:
        body = json.dumps({"model": MODEL, "max_tokens": 4,
                           "messages": [{"role": "user", "content": "late"}]}).encode()
        try:
            idle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
            answer = idle.recv(65536)
        except ConnectionResetError:
            answer = b""
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer
        if answer:
            assert_openai_error(answer.split(b"\r\n\r\n", 1)[1], code="draining")

    assert gw.proc.wait(timeout=DRAIN_S + 2.0) == 0
    exited = time.monotonic()
    assert exited - requested <= DRAIN_S + 2.0
    for stream in short + long:
        stream.join(timeout=1)
        assert not stream.is_alive()
    assert all(s.done and not s.errored and 0 < s.ended_at - requested < DRAIN_S for s in short), [
        s.data[-200:] for s in short]
    for stream in long:
        assert stream.errored and not stream.done, stream.data[-300:]
        assert b'"code":"draining"' in stream.data
        assert DRAIN_S - 0.1 <= stream.ended_at - requested <= DRAIN_S + 1.0

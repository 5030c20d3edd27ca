"""The process: several workers on one port with metrics that add up and one admin port, and a graceful
SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

from engine_nodes.local_stack import free_ports, stop_process
from tests.conftest import FAST_HEALTH, MODEL, ROOT, http_get, pool_toml


def test_two_workers_share_the_port_and_their_metrics_add_up(simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    pids = set()
    for i in range(40):
        # A new connection per request lets the kernel spread them over both workers.
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=2)
        assert raw.status_code == 200
        client.close()
    for line in gw.log().splitlines():
        if '"supervisor started"' in line:
            pids = set(json.loads(line)["pids"])
    assert len(pids) == 2

    def total() -> float:  # the supervisor's admin port: the sum over both workers
        return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines()
                   if line.startswith("gateway_requests_total{") and 'status="200"' in line)

    # Workers flush their ledgers a few times a second: the sum converges within a flush interval.
    deadline = time.monotonic() + 3
    while total() != 40 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert total() == 40


def test_sigterm_lets_a_running_stream_finish_then_exits_zero(simulator, gateway):
    sim = simulator("sglang", speed=2.0)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    result: dict = {}

    def consume() -> None:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=60, stream=True))
        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 10
    while not any(r["stream"] for r in sim.requests(0)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    gw.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # Draining: readiness fails at once and new connections are refused.
    try:
        status = http_get(f"{gw.admin_url}/readyz")[0]
    except OSError:
        status = None
    assert status in (503, None)
    try:
        socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
        refused = False
    except OSError:
        refused = True
    assert refused
    reader.join(timeout=30)
    assert len(result["text"].split()) == 60
    assert gw.proc.wait(timeout=10) == 0


def admin_call(gw, method: str, path: str) -> tuple[int, object]:
    req = urllib.request.Request(f"{gw.admin_url}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_with_workers_the_admin_port_lists_every_workers_endpoints_and_an_eject_reaches_them_all(
        simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    ejected, kept = (f"127.0.0.1:{port}" for port in sim.ports)

    status, rows = admin_call(gw, "GET", "/admin/endpoints")
    assert status == 200
    assert sorted((r["worker"], r["endpoint"]) for r in rows) == sorted(
        (w, e) for w in (0, 1) for e in (ejected, kept))
    status, ready = admin_call(gw, "GET", "/readyz")
    assert status == 200 and len(ready["workers"]) == 2

    status, answer = admin_call(gw, "POST", f"/admin/endpoints/s/{ejected}/eject?seconds=300")
    assert status == 200 and [w["endpoint"] for w in answer["workers"]] == [ejected, ejected]
    rows = admin_call(gw, "GET", "/admin/endpoints")[1]
    assert {(r["worker"], r["available"]) for r in rows if r["endpoint"] == ejected} == {
        (0, False), (1, False)}
    before = len(sim.requests(0))
    for i in range(20):
        # A new connection per request lets the kernel spread them over both workers.
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                       max_tokens=2)
        client.close()
    assert len(sim.requests(0)) == before

    assert admin_call(gw, "POST", f"/admin/endpoints/s/{ejected}/restore")[0] == 200
    rows = admin_call(gw, "GET", "/admin/endpoints")[1]
    assert all(r["available"] for r in rows if r["endpoint"] == ejected)
    status, error = admin_call(gw, "POST", "/admin/endpoints/s/127.0.0.1:1/eject")
    assert status == 404 and error["error"]["code"] == "not_found"
    status, error = admin_call(gw, "POST", f"/admin/endpoints/s/{ejected}/eject?seconds=soon")
    assert status == 400 and error["error"]["param"] == "seconds"


def test_with_workers_an_admin_drain_drains_every_worker_and_the_supervisor_exits_zero(simulator, gateway):
    sim = simulator("sglang", replicas=1)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    status, answer = admin_call(gw, "POST", "/admin/drain")
    assert status == 200 and answer["workers"] == [{"draining": True}, {"draining": True}]
    assert gw.proc.wait(timeout=30) == 0
    assert "worker exited; restarting" not in gw.log()
    assert gw.log().count('"msg":"stopped"') == 2  # each worker drained, none was killed



def test_a_drain_one_worker_accepted_goes_through_when_another_did_not_answer(simulator, gateway):
    sim = simulator("sglang", replicas=1)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    pids = next(json.loads(line)["pids"] for line in gw.log().splitlines() if '"supervisor started"' in line)
    # Both workers past their start: one still importing dies of SIGTERM (it has accepted nothing), and
    # would not log "stopped".
    deadline = time.monotonic() + 20
    while gw.log().count('"msg":"gateway listening"') < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pids[1], signal.SIGSTOP)  # its admin port accepts, and nothing answers
    try:
        status, answer = admin_call(gw, "POST", "/admin/drain")
    finally:
        os.kill(pids[1], signal.SIGCONT)
    assert status == 200 and answer["workers"][0] == {"draining": True}
    assert answer["workers"][1]["error"]["code"] == "worker_unavailable"
    assert gw.proc.wait(timeout=30) == 0
    assert "worker exited; restarting" not in gw.log()  # the drained worker was not brought back
    assert gw.log().count('"msg":"stopped"') == 2


def test_requests_are_served_while_nobody_reads_the_gateways_output_and_dropped_lines_are_counted(
        simulator, tmp_path):
    # A log collector that stops reading fills the pipe; the requests must not wait for it.
    sim = simulator("sglang")
    port, admin_port = free_ports(), free_ports()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[listen]\nhost = "127.0.0.1"\nport = {port}\n'
                      f'[admin]\nhost = "127.0.0.1"\nport = {admin_port}\n'
                      '[logging]\nmax_pending_bytes = 65536\n'
                      + FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # never read
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if http_get(f"http://127.0.0.1:{port}/readyz", timeout=0.5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=5)
        for i in range(1000):  # about 350 KB of access log: the pipe holds 64 KB, the buffer 64 KB
            client.completions.create(model=MODEL, prompt=f"p{i}", max_tokens=1)
        metrics = http_get(f"http://127.0.0.1:{admin_port}/metrics")[1].decode()
        dropped = next(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith('gateway_log_lines_dropped_total{log="access"}'))
        assert 500 < dropped < 1000
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # it waits for its reader for 2 s, then exits
    finally:
        stop_process(proc)

"""Scenario 18, admin isolation: the control plane exists only on the admin listener, that listener binds
to loopback unless configured otherwise, and every admin action leaves an audit line naming the key id.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FAST_HEALTH, ROOT, free_ports, http_get, pool_toml
from tests.integration.test_errors import assert_openai_error
from tests.security import PEPPER_ENV, TEST_PEPPER, bodiless_call, issue_key, keyed_stack

ADMIN_PATHS = [("GET", "/admin/endpoints"), ("POST", "/admin/drain"), ("POST", "/admin/keys/reload"),
               ("POST", "/admin/endpoints/s/127.0.0.1:1/eject"), ("GET", "/metrics")]


@pytest.fixture
def stack(simulator, gateway, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_GATEWAY__LISTEN__PUBLIC_METRICS", "false")
    return keyed_stack(simulator, gateway, tmp_path, monkeypatch,
                       keys={"alice": [], "ops": ["--role", "admin"]})


def audit_lines(gw) -> list[dict]:
    return [doc for doc in (json.loads(line) for line in gw.log().splitlines() if line.startswith("{"))
            if doc.get("logger") == "gateway.audit"]


def test_admin_paths_and_metrics_are_404_on_the_public_listener(stack):
    """Scenario 18: with ``listen.public_metrics = false``, ``/admin/*`` and ``/metrics`` are unknown
    paths on the public port (404 not_found), even with the admin key; the admin port serves both."""
    admin_key = stack.keys["ops"]
    for method, path in ADMIN_PATHS:
        status, _, body = bodiless_call(stack.gw.port, method, path, admin_key)
        assert status == 404, (method, path)
        assert_openai_error(body, code="not_found")
    assert http_get(f"{stack.gw.url}/readyz")[0] == 200  # the public drain attempt did nothing
    assert http_get(f"{stack.gw.admin_url}/metrics")[0] == 200
    assert audit_lines(stack.gw) == []


def listening_addresses(port: int) -> list[str]:
    """Local addresses of the TCP sockets listening on ``port``, read from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


@pytest.fixture
def gateway_with_default_admin_host(simulator, tmp_path):
    """A gateway whose config leaves ``admin.host`` unset (the public listener is put on loopback, so
    the test listens on nothing else)."""
    sim = simulator("sglang")
    port, admin_port = free_ports(), free_ports()
    config = tmp_path / "gateway.toml"
    config.write_text(f'[listen]\nhost = "127.0.0.1"\nport = {port}\n[admin]\nport = {admin_port}\n'
                      + FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    with open(tmp_path / "gateway.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, Path(tmp_path / "gateway.log").read_text()
            try:
                if http_get(f"http://127.0.0.1:{admin_port}/healthz", timeout=0.5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.05)
        yield admin_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_admin_listener_binds_only_to_loopback_by_default(gateway_with_default_admin_host):
    """Scenario 18: the kernel's socket table shows the admin port listening on 127.0.0.1 and on no
    other address (IPv4 or IPv6) when the config does not name a host."""
    assert listening_addresses(gateway_with_default_admin_host) == ["0100007F"]  # 127.0.0.1, little-endian


def test_every_admin_action_writes_an_audit_line_naming_the_admin_key_id(stack):
    """Scenario 18: eject, restore, reload keys and drain each succeed with the admin key and write one
    ``gateway.audit`` line with ``key_id`` = the key's id (never the key)."""
    admin_key, port = stack.keys["ops"], stack.gw.admin_port
    endpoint = stack.sim.urls[0].removeprefix("http://")
    for method, path in [("POST", f"/admin/endpoints/s/{endpoint}/eject?seconds=5"),
                         ("POST", f"/admin/endpoints/s/{endpoint}/restore"),
                         ("POST", "/admin/keys/reload"), ("POST", "/admin/drain")]:
        status, _, body = bodiless_call(port, method, path, admin_key)
        assert status == 200, (path, body)
    deadline = time.monotonic() + 5
    while len(actions := [a for a in audit_lines(stack.gw) if a["msg"] == "admin action"]) < 4:
        assert time.monotonic() < deadline, actions
        time.sleep(0.05)
    assert [a["action"] for a in actions] == ["eject", "restore", "reload_keys", "drain"]
    assert all(a["key_id"] == "ops" for a in actions)
    assert admin_key not in stack.gw.log()


def test_refused_admin_calls_are_audited_without_the_presented_key(stack):
    """Scenario 18: an admin call without a key (401) or with a user key (403) is refused before it
    acts, and leaves an audit line with the path, the status and the peer, never the key."""
    user_key, port = stack.keys["alice"], stack.gw.admin_port
    assert bodiless_call(port, "POST", "/admin/drain")[0] == 401
    assert bodiless_call(port, "POST", "/admin/drain", user_key)[0] == 403
    assert http_get(f"{stack.gw.url}/readyz")[0] == 200
    deadline = time.monotonic() + 5
    while len(refused := [a for a in audit_lines(stack.gw) if a["msg"] == "admin request refused"]) < 2:
        assert time.monotonic() < deadline, refused
        time.sleep(0.05)
    assert [(a["path"], a["status"], a["peer"]) for a in refused] == [("/admin/drain", 401, "127.0.0.1"),
                                                                     ("/admin/drain", 403, "127.0.0.1")]
    assert user_key not in stack.gw.log()


def test_with_workers_admin_calls_need_an_admin_key_and_every_worker_audits_the_key_id(
        simulator, gateway, tmp_path, monkeypatch):
    """Scenario 18 with ``--workers 2``: the supervisor holds no keys; it passes each call to every
    worker, which refuses it or acts on it and audits it, naming the client the supervisor served."""
    monkeypatch.setenv(PEPPER_ENV, TEST_PEPPER)
    keys_file = tmp_path / "keys.jsonl"
    user_key, admin_key = issue_key(keys_file, "alice"), issue_key(keys_file, "ops", "--role", "admin")
    sim = simulator("sglang")
    gw = gateway(FAST_HEALTH + f'[auth]\nkeys_file = "{keys_file}"\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    endpoint = sim.urls[0].removeprefix("http://")
    eject = f"/admin/endpoints/s/{endpoint}/eject?seconds=5"
    status, headers, body = bodiless_call(gw.admin_port, "POST", eject)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert_openai_error(body, code="invalid_api_key")
    assert bodiless_call(gw.admin_port, "POST", eject, user_key)[0] == 403
    status, _, body = bodiless_call(gw.admin_port, "POST", eject, admin_key)
    assert status == 200, body
    deadline = time.monotonic() + 5
    while len(actions := [a for a in audit_lines(gw) if a["msg"] == "admin action"]) < 2:
        assert time.monotonic() < deadline, actions
        time.sleep(0.05)
    audited = [(a["action"], a["key_id"], a["forwarded_for"]) for a in actions]
    assert audited == [("eject", "ops", "127.0.0.1")] * 2
    assert admin_key not in gw.log() and user_key not in gw.log()

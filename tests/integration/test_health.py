"""Health checks and engine load signals against real simulator processes."""

from __future__ import annotations

import json
import threading
import time

import openai

from tests.conftest import MODEL, http_get, pool_toml

HEALTH = ('[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nunhealthy_threshold = 1\n'
          'scrape_interval_s = 0.1\nscrape_stale_s = 0.5\n')


def endpoints(gw) -> dict[str, dict]:
    return {e["endpoint"]: e for e in json.loads(http_get(f"{gw.admin_url}/admin/endpoints")[1])}


def test_load_other_clients_put_on_an_engine_counts_in_routing(simulator, gateway):
    sim = simulator("sglang", replicas=2, speed=0.5)
    gw = gateway(HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    direct = openai.OpenAI(base_url=f"{sim.url(0)}/v1", api_key="k", max_retries=0)
    # Load that bypasses this gateway (another gateway replica, say): long streams straight to replica 0.
    streams = [direct.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"x{i}"}],
                                              max_tokens=5000, stream=True) for i in range(4)]
    threads = [threading.Thread(target=lambda s=s: next(iter(s))) for s in streams]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20  # generous: the machine may be busy; the promise is not timing
    while endpoints(gw)[f"127.0.0.1:{sim.ports[0]}"]["load"] < 4:
        assert time.monotonic() < deadline, endpoints(gw)
        time.sleep(0.05)
    assert endpoints(gw)[f"127.0.0.1:{sim.ports[1]}"]["load"] == 0
    for s in streams:
        s.close()
    for t in threads:
        t.join(timeout=5)


def test_stale_engine_signal_is_visible_in_metrics(simulator, gateway):
    sim = simulator("sglang", replicas=1)
    gw = gateway('[health]\ninterval_s = 60\nscrape_interval_s = 0.1\nscrape_stale_s = 0.5\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls))
    time.sleep(0.5)
    assert 'gateway_engine_signal_stale{endpoint="127.0.0.1:%d",pool="s"} 0.0' % sim.ports[0] in gw.metrics()
    sim.stop()
    deadline = time.monotonic() + 5
    while 'gateway_engine_signal_stale{endpoint="127.0.0.1:%d",pool="s"} 1.0' % sim.ports[0] not in gw.metrics():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "engine load signal stale" in gw.log()


def test_endpoint_leaves_rotation_when_its_health_check_fails_and_returns(simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(HEALTH + pool_toml("s", "sglang", "interactive", sim.urls))
    sim.faults(0, flap_health=1.0)
    deadline = time.monotonic() + 5
    seen = set()
    while len(seen) < 2:
        assert time.monotonic() < deadline
        seen.add(endpoints(gw)[f"127.0.0.1:{sim.ports[0]}"]["healthy"])
        time.sleep(0.05)
    assert seen == {True, False}

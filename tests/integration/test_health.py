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


def test_stale_engine_signal_is_visible_in_metrics_and_admin(simulator, gateway):
    sim = simulator("sglang", replicas=1)
    gw = gateway('[health]\ninterval_s = 60\nscrape_interval_s = 0.1\nscrape_stale_s = 0.5\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls))
    time.sleep(0.5)
    assert 'gateway_engine_signal_stale{endpoint="127.0.0.1:%d",pool="s"} 0.0' % sim.ports[0] in gw.metrics()
    assert endpoints(gw)[f"127.0.0.1:{sim.ports[0]}"]["signal_stale"] is False
    sim.stop()
    deadline = time.monotonic() + 5
    while 'gateway_engine_signal_stale{endpoint="127.0.0.1:%d",pool="s"} 1.0' % sim.ports[0] not in gw.metrics():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert gw.wait_log("engine load signal stale")
    assert endpoints(gw)[f"127.0.0.1:{sim.ports[0]}"]["signal_stale"] is True


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


def test_replica_whose_engine_reports_a_saturated_kv_cache_takes_no_new_prompts_but_keeps_its_prefix_hits(
        simulator, gateway):
    sim = simulator("sglang", replicas=2, speed=0.05, extra=["--cache-tokens", "4096"])
    # Cold prompts go to their ring owner while it is within 1.25 x mean, which the holder's one
    # foreign stream leaves it: saturation alone is what moves them.
    gw = gateway(HEALTH + "[routing]\nendpoint_header = true\nring_choices = 1\nring_load_factor = 1.25\n"
                 + pool_toml("s", "sglang", "interactive", sim.urls))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)

    def ask(system: str, question: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=2, messages=[{"role": "system", "content": system * 100},
                                                 {"role": "user", "content": question}])
        return raw.headers["x-gateway-endpoint"]

    holder = ask("Be brief. ", "first")  # now holds this system prompt's prefix
    # Another client (not through this gateway) fills the holder's KV cache: about 3,720 of its
    # 4,096 tokens (the simulator counts 4 bytes a token), for the next 350 tokens of a slow stream.
    direct = openai.OpenAI(base_url=f"http://{holder}/v1", api_key="k", max_retries=0)
    filler = " ".join(f"filler-{i:05d}" for i in range(1140))
    stream = direct.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": filler}],
                                            max_tokens=350, stream=True)
    next(iter(stream))
    deadline = time.monotonic() + 10  # generous: the machine may be busy; the promise is not timing
    while not endpoints(gw)[holder]["saturated"]:
        assert time.monotonic() < deadline, endpoints(gw)
        time.sleep(0.05)

    # New prompts (cold system prompts; each replica owns about half of them on the ring) all go
    # to the other replica; the holder keeps the prompt it already caches.
    assert {ask(f"Persona {k}. ", "first") for k in range(8)} == set(endpoints(gw)) - {holder}
    assert {ask("Be brief. ", f"question {i}") for i in range(3)} == {holder}
    while 'branch="kv_saturated"' not in gw.metrics():  # the ledger settles metrics in batches
        assert time.monotonic() < deadline + 5
        time.sleep(0.05)
    assert gw.wait_log("engine KV cache saturated")

    stream.close()
    while endpoints(gw)[holder]["saturated"]:
        assert time.monotonic() < deadline + 10, endpoints(gw)
        time.sleep(0.05)
    assert gw.wait_log("engine KV cache has room again")

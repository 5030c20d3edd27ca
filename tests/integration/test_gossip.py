"""Gateway processes that share placements and loads by gossip, in front of the same simulator replicas.

With two gateways, each test makes the first place a session or a prompt, or keep streams, where the
second would not (the admin API ejects a replica in the first gateway only), then asks the second,
which can only know through gossip. With one gateway of two workers, the tests check that every
placement one worker makes reaches the other."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request

import openai
import pytest

from engine_nodes.local_stack import free_ports
from gateway import affinity
from gateway.gossip import Codec, Placement
from gateway.ring import HashRing
from gateway.settings import Routing
from tests.conftest import FAST_HEALTH, MODEL, pool_toml

SECRET = "gossip-test-secret-0123456789"
SYSTEM = "You answer questions about the archive of the harbour office, citing the ledger page. " * 12


@pytest.fixture
def pair(simulator, gateway, monkeypatch):
    """(simulator, first gateway, second gateway, their gossip ports): two replicas, gossip between
    the gateways."""
    return gossiping_pair(simulator, gateway, monkeypatch)


def gossiping_pair(simulator, gateway, monkeypatch, health: str = "", faults: tuple[str, ...] = (),
                   host: str = "127.0.0.1", addresses: tuple[str, str] = ("127.0.0.1", "127.0.0.1"),
                   own: tuple[str, str] = ("", "")):
    """``health``: more [health] settings; ``faults``: simulator fault flags; ``host``: both
    listeners' address; ``addresses``: how the peer list names each gateway; ``own``: more [gossip]
    settings of each gateway."""
    monkeypatch.setenv("EDGE_GATEWAY_GOSSIP_SECRET", SECRET)  # inherited by the gateway processes
    sim = simulator("sglang", replicas=2, extra=list(faults))
    ports = [free_ports(), free_ports()]
    peers = ", ".join(f'"{address}:{p}"' for address, p in zip(addresses, ports))
    gateways = [gateway(FAST_HEALTH + health + "[routing]\nendpoint_header = true\n"
                        f'[gossip]\nhost = "{host}"\nport = {port}\npeers = [{peers}]\ninterval_s = 0.01\n'
                        + settings + pool_toml("s", "sglang", "interactive", sim.urls))
                for port, settings in zip(ports, own)]
    return sim, gateways[0], gateways[1], ports


def ring_owner(sim, key: int) -> str:
    return HashRing([f"127.0.0.1:{p}" for p in sim.ports], Routing().vnodes).owner(key)


def eject(gw, endpoint: str) -> None:
    req = urllib.request.Request(f"{gw.admin_url}/admin/endpoints/s/{endpoint}/eject?seconds=60", method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def received(gw) -> float:
    return metric(gw, 'gateway_gossip_placements_total{direction="received"}')


def metric(gw, series: str) -> float:
    """The value of one series (name and labels) from the gateway's /metrics; 0 while absent."""
    for line in gw.metrics().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_received(gw, count: int) -> None:
    deadline = time.monotonic() + 10  # generous: the promise is where requests land, not how fast
    while received(gw) < count:
        assert time.monotonic() < deadline, "no placement arrived by gossip"
        time.sleep(0.02)


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)


def test_a_session_placed_by_one_gateway_is_followed_by_its_peer(pair):
    sim, first, second, _ = pair
    assert_followed(sim, first, second, "conversation-7")


def test_gateways_halfway_through_a_secret_rotation_share_placements_both_ways(simulator, gateway, monkeypatch):
    """The moment of a rotation's second rolling update: the new pod signs with the new secret and
    still accepts the old; the old pod signs with the old one and already accepts the new."""
    old, new = "the-old-gossip-secret-0123", "the-new-gossip-secret-0123"
    for name, value in (("OLD_POD_SIGNS", old), ("OLD_POD_ACCEPTS", new), ("NEW_POD_SIGNS", new),
                        ("NEW_POD_ACCEPTS", old)):
        monkeypatch.setenv(name, value)
    sim, old_pod, new_pod, _ = gossiping_pair(simulator, gateway, monkeypatch, own=tuple(
        f'secret_env = "{pod}_SIGNS"\nalso_accepted_env = "{pod}_ACCEPTS"\n' for pod in ("OLD_POD", "NEW_POD")))
    assert_shared_both_ways(sim, old_pod, new_pod, "conversation-9")
    for gw in (old_pod, new_pod):
        assert metric(gw, 'gateway_gossip_datagrams_dropped_total{reason="signature"}') == 0


def test_gateways_listening_on_ipv6_share_placements_with_peers_named_by_ipv6_and_ipv4_addresses(
        simulator, gateway, monkeypatch):
    # Dual stack: the second is reached by its IPv4 address, through the first's IPv6 socket.
    sim, first, second, _ = gossiping_pair(simulator, gateway, monkeypatch, host="::",
                                           addresses=("[::1]", "127.0.0.1"))
    assert_shared_both_ways(sim, first, second, "conversation-11")


def assert_shared_both_ways(sim, first, second, session: str) -> None:
    """The second follows a session the first placed, and the first hears of what the second sends."""
    assert_followed(sim, first, second, session)
    before = received(first)
    client(second).completions.create(model=MODEL, prompt=SYSTEM, max_tokens=4)
    wait_received(first, before + 1)


def assert_followed(sim, first, second, session: str) -> None:
    """The first gateway places a new session off its ring owner; the second follows it there."""
    owner = ring_owner(sim, affinity.key_hash(session))
    (elsewhere,) = {f"127.0.0.1:{p}" for p in sim.ports} - {owner}
    eject(first, owner)  # the first gateway places the new session on the other replica
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which ship came first?"}]
    before = received(second)
    raw = client(first).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=8, extra_headers={"X-Session-ID": session})
    assert raw.headers["x-gateway-endpoint"] == elsewhere
    wait_received(second, before + 1)

    # The second gateway never saw the session; without gossip it would presume it on its ring owner.
    messages += [{"role": "assistant", "content": raw.parse().choices[0].message.content},
                 {"role": "user", "content": "And the second?"}]
    for _ in range(3):
        raw = client(second).chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=8, extra_headers={"X-Session-ID": session})
        assert raw.headers["x-gateway-endpoint"] == elsewhere


def test_a_prompt_placed_by_one_gateway_is_a_prefix_hit_on_its_peer(pair):
    sim, first, second, _ = pair
    routing = Routing()
    keys = affinity.prefix_hashes(MODEL, SYSTEM, routing.block_chars, routing.max_prefix_chars)
    owner = ring_owner(sim, keys[routing.ring_key_blocks - 1])
    (elsewhere,) = {f"127.0.0.1:{p}" for p in sim.ports} - {owner}
    eject(first, owner)
    raw = client(first).completions.with_raw_response.create(model=MODEL, prompt=SYSTEM + "Q: first?", max_tokens=4)
    assert raw.headers["x-gateway-endpoint"] == elsewhere
    wait_received(second, 1)

    raw = client(second).completions.with_raw_response.create(model=MODEL, prompt=SYSTEM + "Q: second?", max_tokens=4)
    assert raw.headers["x-gateway-endpoint"] == elsewhere
    usage = raw.parse().usage
    assert usage.prompt_tokens_details.cached_tokens >= len(SYSTEM) // 8  # the engine did have it cached
    assert 'branch="prefix_hit"' in second.metrics()


def test_a_cold_prompt_is_placed_past_a_replica_that_a_peer_keeps_busy(simulator, gateway, monkeypatch):
    # The engines are scraped once a minute: only gossip can tell the second gateway what the first
    # has in flight. Streams hang at the engine after their first two events, so they stay open.
    sim, first, second, _ = gossiping_pair(simulator, gateway, monkeypatch, health="scrape_interval_s = 60\n",
                                           faults=("--hang-after-chunks", "2"))
    routing = Routing()
    prompt = SYSTEM + "Q: which berth did the first ship take?"
    keys = affinity.prefix_hashes(MODEL, prompt, routing.block_chars, routing.max_prefix_chars)
    owner = ring_owner(sim, keys[routing.ring_key_blocks - 1])
    (elsewhere,) = {f"127.0.0.1:{p}" for p in sim.ports} - {owner}
    eject(first, elsewhere)  # the first gateway sends everything to the owner
    streams = [client(first).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Tell story {i}"}], max_tokens=50, stream=True)
        for i in range(4)]
    try:
        for stream in streams:
            next(iter(stream))  # open at the owner
        deadline = time.monotonic() + 10
        while endpoint_state(second, owner)["peer_in_flight"] != 4:
            assert time.monotonic() < deadline, "the first gateway's load never reached the second"
            time.sleep(0.02)
        assert endpoint_state(second, owner)["in_flight"] == 0

        raw = client(second).completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=4)
        # The owner, with 4 of the pool's 4 requests, is over its bound.
        assert raw.headers["x-gateway-endpoint"] == elsewhere
    finally:
        for stream in streams:
            stream.close()
    deadline = time.monotonic() + 10
    while endpoint_state(second, owner)["peer_in_flight"] != 0:  # the first gateway's streams ended
        assert time.monotonic() < deadline, "the second gateway kept the first's finished requests"
        time.sleep(0.02)


def test_the_load_a_peer_reported_is_forgotten_once_the_peer_has_died(simulator, gateway, monkeypatch):
    sim, first, second, _ = gossiping_pair(simulator, gateway, monkeypatch, health="scrape_interval_s = 60\n",
                                           faults=("--hang-after-chunks", "2"))
    endpoint = f"127.0.0.1:{sim.ports[0]}"
    eject(first, f"127.0.0.1:{sim.ports[1]}")
    streams = [client(first).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Tell story {i}"}], max_tokens=50, stream=True)
        for i in range(3)]
    try:
        for stream in streams:
            next(iter(stream))
        deadline = time.monotonic() + 10
        while endpoint_state(second, endpoint)["peer_in_flight"] != 3:
            assert time.monotonic() < deadline, "the first gateway's load never reached the second"
            time.sleep(0.02)
        first.proc.kill()  # no last report: it is forgotten when it expires
        first.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while endpoint_state(second, endpoint)["peer_in_flight"] != 0:
            assert time.monotonic() < deadline, "the dead gateway's load was never forgotten"
            time.sleep(0.1)
    finally:
        for stream in streams:
            stream.close()


def test_a_peer_name_that_does_not_resolve_is_counted_and_the_other_peers_still_share(simulator, gateway,
                                                                                       monkeypatch):
    monkeypatch.setenv("EDGE_GATEWAY_GOSSIP_SECRET", SECRET)
    sim = simulator("sglang", replicas=2)
    port = free_ports(2)  # worker i listens on port + i
    gw = gateway(FAST_HEALTH + f'[gossip]\nhost = "127.0.0.1"\nport = {port}\n'
                 # .invalid never resolves (RFC 6761).
                 f'peers = ["127.0.0.1:{port}", "edge-gateway-peer.invalid:{port}"]\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    assert_workers_share(gw)
    assert metric(gw, "gateway_gossip_peer_lookup_failures_total") >= 2  # each worker's lookup at start
    assert gw.wait_log("gossip peer lookup failed")


def endpoint_state(gw, endpoint: str) -> dict:
    with urllib.request.urlopen(f"{gw.admin_url}/admin/endpoints", timeout=5) as resp:
        (state,) = [e for e in json.loads(resp.read()) if e["endpoint"] == endpoint]
    return state


def test_a_datagram_not_signed_with_the_shared_secret_changes_no_placement(pair):
    sim, _, second, ports = pair
    session = "conversation-8"
    owner = ring_owner(sim, affinity.key_hash(session))
    (elsewhere,) = {f"127.0.0.1:{p}" for p in sim.ports} - {owner}
    forged = next(Codec([b"not-the-secret-at-all"], 8192).encode(1, [
        Placement("s", elsewhere, [], affinity.key_hash(session))]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(forged, ("127.0.0.1", ports[1]))
    deadline = time.monotonic() + 10
    while 'gateway_gossip_datagrams_dropped_total{reason="signature"} 1.0' not in second.metrics():
        assert time.monotonic() < deadline
        time.sleep(0.02)

    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Which ship came first?"}]
    raw = client(second).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=4, extra_headers={"X-Session-ID": session})
    assert raw.headers["x-gateway-endpoint"] == owner


def test_the_workers_of_one_gateway_share_placements_through_their_peers(simulator, gateway, monkeypatch):
    monkeypatch.setenv("EDGE_GATEWAY_GOSSIP_SECRET", SECRET)
    sim = simulator("sglang", replicas=2)
    port = free_ports(2)  # worker i listens on port + i
    # A host name stands for its addresses (here /etc/hosts: 127.0.0.1), as a headless Service's does.
    # The file says one worker and the command line two: every worker must send to both ports.
    gw = gateway(FAST_HEALTH + f'[gossip]\nhost = "127.0.0.1"\nport = {port}\npeers = ["localhost:{port}"]\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls), workers=1, args=["--workers", "2"])
    assert_workers_share(gw)


def test_the_workers_of_one_gateway_share_placements_with_nothing_configured(simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    assert_workers_share(gw)


def test_workers_sharing_among_themselves_accept_only_the_secret_their_supervisor_drew(simulator, gateway,
                                                                                       monkeypatch):
    # Meant for pods with peers; were it passed on, this one (too short) would stop the workers.
    monkeypatch.setenv("EDGE_GATEWAY_GOSSIP_SECRET_ALSO_ACCEPTED", "short")
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    assert_workers_share(gw)


def test_a_restarted_worker_still_shares_placements_with_its_siblings(simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    assert_workers_share(gw)
    (started,) = [json.loads(line) for line in gw.log().splitlines() if '"supervisor started"' in line]
    os.kill(started["pids"][0], signal.SIGKILL)  # a worker this test's gateway started
    deadline = time.monotonic() + 20
    while "worker exited; restarting" not in gw.log():
        assert time.monotonic() < deadline, "the supervisor did not restart the worker"
        time.sleep(0.05)
    gw.wait_ready()
    assert_workers_share(gw)


def test_workers_share_nothing_when_between_workers_is_off(simulator, gateway):
    sim = simulator("sglang", replicas=2)
    gw = gateway(FAST_HEALTH + "[gossip]\nbetween_workers = false\n"
                 + pool_toml("s", "sglang", "interactive", sim.urls), workers=2)
    for i in range(40):
        ask(gw, i)
    time.sleep(0.5)  # 25 gossip intervals
    assert received(gw) == 0
    assert "gateway_gossip_placements_total" not in gw.metrics()


def ask(gw, i: int) -> None:
    """A fresh connection each time: the kernel spreads them over the workers."""
    openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0).completions.create(
        model=MODEL, prompt=f"{i} " + SYSTEM, max_tokens=2)


def assert_workers_share(gw) -> None:
    """Both workers listen, and every placement one of them makes reaches the other."""
    # Readiness needs one worker only; placements sent before the other listens are lost, by design.
    # Once one has arrived anywhere, both workers listen.
    deadline = time.monotonic() + 10
    before = received(gw)
    while received(gw) == before:
        assert time.monotonic() < deadline, "no placement arrived by gossip"
        ask(gw, -1)
        time.sleep(0.05)
    assert "gateway_gossip_peers 2.0" in gw.metrics()
    before = received(gw)
    for i in range(20):
        ask(gw, i)
    wait_received(gw, before + 20)  # each placement reached the other worker

"""Pools whose replicas come from DNS SRV records: a real DNS server on loopback UDP, simulator replicas,
and the gateway process between them. The test edits the zone and watches the gateway follow."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import openai
import pytest

from gateway import discovery
from tests.conftest import MODEL, http_get

SRV = "_http._tcp.engines.inference.svc.cluster.local."


class Zone:
    """A DNS server on loopback answering SRV queries for ``SRV`` from a table the test edits: the
    replicas' ports (targets are 127.0.0.1), or ``rcode`` to fail every query. As real servers do,
    it truncates a UDP answer that does not fit the client's size (512 bytes without EDNS) and
    answers the same query over TCP on the same port."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.rcode = dns.rcode.NOERROR
        self.queries = 0
        self.tcp_queries = 0
        self._tcp = socket.create_server(("127.0.0.1", 0))
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(self._tcp.getsockname())
        for sock in (self._tcp, self._udp):
            sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self._tcp.getsockname()[1]}"
        self._stopped = False
        self._threads = [threading.Thread(target=serve, daemon=True) for serve in (self._serve_udp, self._serve_tcp)]
        for thread in self._threads:
            thread.start()

    def answer(self, data: bytes, max_size: int | None) -> bytes:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        self.queries += 1
        if self.rcode != dns.rcode.NOERROR:
            response.set_rcode(self.rcode)
        elif query.question[0].name.to_text() != SRV:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif self.ports:
            response.answer.append(dns.rrset.from_text(
                SRV, 5, "IN", "SRV", *[f"0 10 {port} 127.0.0.1." for port in self.ports]))
        if max_size is None:
            return response.to_wire()
        try:
            return response.to_wire(max_size=max(512, query.payload) if query.edns >= 0 else 512)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _serve_udp(self) -> None:
        while not self._stopped:
            try:
                data, peer = self._udp.recvfrom(4096)
            except TimeoutError:
                continue
            self._udp.sendto(self.answer(data, max_size=512), peer)

    def _serve_tcp(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                size = int.from_bytes(conn.recv(2), "big")
                data = b""
                while len(data) < size:
                    data += conn.recv(size - len(data))
                self.tcp_queries += 1
                wire = self.answer(data, max_size=None)
                conn.sendall(len(wire).to_bytes(2, "big") + wire)

    def stop(self) -> None:
        self._stopped = True
        for thread in self._threads:
            thread.join(timeout=2)
        self._tcp.close()
        self._udp.close()


@pytest.fixture
def zone() -> Iterator[Zone]:
    z = Zone()
    yield z
    z.stop()


def config(zone: Zone, slow_start_s: float = 0.01) -> str:
    return (f'[discovery]\ninterval_s = 0.1\ntimeout_s = 0.5\nnameservers = ["{zone.address}"]\n'
            '[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nunhealthy_threshold = 1\n'
            f'[outlier]\nslow_start_s = {slow_start_s}\n'
            f'[[pools]]\nname = "s"\nengine = "sglang"\nrole = "interactive"\nmodels = ["{MODEL}"]\n'
            f'srv = "{SRV.rstrip(".")}"\n')


def replicas(gw) -> dict[str, dict]:
    return {e["endpoint"]: e for e in json.loads(http_get(f"{gw.admin_url}/admin/endpoints")[1])}


def readiness(gw) -> int | None:
    try:
        return http_get(f"{gw.url}/readyz", timeout=2)[0]
    except OSError:
        return None


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout  # generous: the promise is that it happens, not how fast
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def ask(client: openai.OpenAI, n: int, tag: str) -> None:
    for i in range(n):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": f"{tag} question {i} " * 40}])


def test_replicas_join_and_leave_the_pool_as_its_srv_records_change(simulator, gateway, zone):
    sim = simulator("sglang", replicas=3)
    ids = [f"127.0.0.1:{p}" for p in sim.ports]
    zone.ports = sim.ports[:1]
    gw = gateway(config(zone))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    assert list(replicas(gw)) == ids[:1]
    ask(client, 5, "one")
    assert sim.stats(0)["requests"] == 5

    zone.ports = sim.ports
    wait_for(lambda: all(e["available"] for e in replicas(gw).values()) and len(replicas(gw)) == 3,
             "the two new replicas never joined")
    ask(client, 60, "three")
    assert all(sim.stats(i)["requests"] > 0 for i in (1, 2)), [sim.stats(i)["requests"] for i in range(3)]

    zone.ports = sim.ports[1:]
    wait_for(lambda: list(replicas(gw)) == ids[1:], "the removed replica never left")
    before = sim.stats(0)["requests"]
    ask(client, 20, "two")
    assert sim.stats(0)["requests"] == before
    metrics = gw.metrics()
    assert f'gateway_endpoint_healthy{{endpoint="{ids[0]}",pool="s"}}' not in metrics
    assert f'gateway_endpoint_healthy{{endpoint="{ids[1]}",pool="s"}} 1.0' in metrics
    assert 'gateway_discovery_endpoints{pool="s"} 2.0' in metrics
    assert gw.wait_log("pool replicas changed")


def test_a_stream_on_a_replica_that_leaves_dns_finishes(simulator, gateway, zone):
    sim = simulator("sglang", replicas=2, speed=0.05)  # 200 tokens take about 5 s
    zone.ports = sim.ports[:1]
    gw = gateway(config(zone))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, max_tokens=200, stream=True,
                                            messages=[{"role": "user", "content": "a long answer"}])
    first = next(iter(stream))
    zone.ports = sim.ports[1:]
    wait_for(lambda: list(replicas(gw)) == [f"127.0.0.1:{sim.ports[1]}"], "the replica never left")
    assert sim.stats(0)["running"] == 1  # the stream was still being generated when its replica left
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason == "length"
    ask(client, 3, "after")
    assert sim.stats(1)["requests"] == 3


def test_a_failed_lookup_keeps_the_last_replicas_and_is_counted(simulator, gateway, zone):
    sim = simulator("sglang", replicas=2)
    zone.ports = sim.ports
    gw = gateway(config(zone))
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0)
    for rcode, reason in ((dns.rcode.SERVFAIL, "servfail"), (dns.rcode.NXDOMAIN, "nxdomain")):
        zone.rcode = rcode
        counted = f'gateway_discovery_failures_total{{pool="s",reason="{reason}"}}'
        wait_for(lambda: counted in gw.metrics(), f"a {reason} answer was not counted")  # noqa: B023 (called at once)
        assert len(replicas(gw)) == 2
        ask(client, 4, reason)
    zone.rcode = dns.rcode.NOERROR
    zone.ports = []  # an empty answer is a failure too: a pool is never emptied by DNS
    wait_for(lambda: 'reason="no_answer"' in gw.metrics(), "an empty answer was not counted")
    assert len(replicas(gw)) == 2
    zone.ports = sim.ports
    wait_for(lambda: "replica lookup works again" in gw.log(), "the recovery was not logged")
    assert gw.log().count("replica lookup failed") == 1  # once per run of failures, not per lookup
    assert sim.stats(0)["requests"] + sim.stats(1)["requests"] == 8


def test_gateway_is_unready_until_its_first_lookup_finds_replicas(simulator, gateway, zone):
    sim = simulator("sglang", replicas=1)
    zone.rcode = dns.rcode.SERVFAIL
    gw = gateway(config(zone), wait_ready=False)
    wait_for(lambda: readiness(gw) is not None and zone.queries >= 2, "the gateway never listened or asked")
    assert readiness(gw) == 503
    zone.rcode, zone.ports = dns.rcode.NOERROR, sim.ports
    gw.wait_ready()
    assert list(replicas(gw)) == [f"127.0.0.1:{sim.ports[0]}"]


def test_a_replica_that_joins_after_start_up_slow_starts_and_one_found_at_start_up_does_not(
        simulator, gateway, zone):
    sim = simulator("sglang", replicas=2)
    zone.ports = sim.ports[:1]
    gw = gateway(config(zone, slow_start_s=60))
    zone.ports = sim.ports
    wait_for(lambda: len(replicas(gw)) == 2 and all(e["available"] for e in replicas(gw).values()),
             "the new replica never joined")
    weights = {e: r["weight"] for e, r in replicas(gw).items()}
    assert weights[f"127.0.0.1:{sim.ports[0]}"] == 1.0
    assert weights[f"127.0.0.1:{sim.ports[1]}"] < 0.5


async def test_an_answer_too_big_for_udp_is_read_over_tcp(zone):
    # 40 replicas' records do not fit 512 bytes: a cluster with long pod names reaches that sooner.
    zone.ports = list(range(30000, 30040))
    urls = await discovery.lookup(discovery.resolver([zone.address]), SRV, timeout_s=2.0)
    assert urls == sorted(f"http://127.0.0.1:{port}" for port in zone.ports)
    assert zone.tcp_queries >= 1

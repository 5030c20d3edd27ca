"""A pool's replicas change as discovery finds them; what routing knows about a kept replica stays."""

from __future__ import annotations

from gateway import settings
from gateway.pool import Endpoint, Pool


def pool(urls: list[str]) -> Pool:
    return Pool(settings.Pool(name="p", engine="sglang", role="interactive", models=["m"], endpoints=urls), None)


def test_replacing_endpoints_keeps_a_kept_replicas_state_and_reports_who_joined_and_left():
    p = pool(["http://a:1", "http://b:1"])
    a, b = p.endpoints
    a.in_flight, a.healthy = 3, True
    old = p.endpoints
    joined, left = p.replace_endpoints([Endpoint(u, "p") for u in ("http://a:1", "http://c:1", "http://c:1")])
    assert [e.id for e in p.endpoints] == ["a:1", "c:1"]
    assert p.endpoints[0] is a and (a.in_flight, a.healthy) == (3, True)
    assert [e.id for e in joined] == ["c:1"] and left == [b]
    assert [e.id for e in old] == ["a:1", "b:1"]  # a request holding the old list is not disturbed


def test_a_replica_that_joins_a_pool_in_panic_is_routed_as_in_panic():
    p = pool(["http://a:1"])
    p.set_panic(True)
    (joined,), _ = p.replace_endpoints([Endpoint("http://a:1", "p"), Endpoint("http://b:1", "p")])
    joined.healthy, joined.ejected_until = True, 99.0
    joined.refresh()
    assert joined.panic and joined.available

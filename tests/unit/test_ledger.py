"""The ledger's batched metric updates equal prometheus-client's own, one observation at a time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.ledger import observe_many
from gateway.metrics import LATENCY_BUCKETS

values = st.lists(st.one_of(st.floats(min_value=0, max_value=500, allow_nan=False),
                            st.sampled_from(list(LATENCY_BUCKETS))), max_size=200)


@settings(max_examples=200, deadline=None)
@given(values)
def test_observe_many_renders_exactly_like_observe_one_by_one(batch):
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("h", "h", ["l"], buckets=LATENCY_BUCKETS, registry=one).labels("x")
    h2 = Histogram("h", "h", ["l"], buckets=LATENCY_BUCKETS, registry=many).labels("x")
    for v in batch:
        h1.observe(v)
    observe_many(h2, batch)
    strip = lambda text: b"\n".join(line for line in text.splitlines() if b"_created" not in line)  # noqa: E731
    assert strip(generate_latest(one)) == strip(generate_latest(many))

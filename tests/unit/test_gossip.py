"""Gossip's datagrams: what goes in comes out, within the size limit, only under the secrets, and
across versions."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.gossip import TAG_BYTES, Codec, Datagram, Load, Placement, secrets_from_env
from gateway.settings import Gossip

SECRET = b"0123456789abcdef-secret"
U64 = st.integers(min_value=0, max_value=2**64 - 1)
POOLS = st.sampled_from(["sglang-llama8b", "p"])
ENDPOINTS = st.sampled_from(
    ["sglang-llama8b-0.sglang-llama8b.inference.svc.cluster.local:30000", "127.0.0.1:1"])
placements = st.builds(
    Placement,
    pool=POOLS,
    endpoint=ENDPOINTS,
    prefix=st.lists(U64, max_size=200),
    session=st.none() | U64,
    opening=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(placements, max_size=60), limit=st.integers(min_value=512, max_value=9000))
def test_every_placement_arrives_in_order_in_datagrams_within_the_size_limit(batch, limit):
    received = [p for d in sent_within(limit, lambda codec: codec.encode(7, batch)) for p in d.placements]
    assert [(p.pool, p.endpoint, p.session, p.opening) for p in received] == \
        [(p.pool, p.endpoint, p.session, p.opening) for p in batch]
    for sent, got in zip(batch, received):
        # A placement too long for a datagram keeps a leading part of its prompt, which is still true.
        assert got.prefix == sent.prefix[:len(got.prefix)]
        if len(sent.prefix) * 9 + 200 < limit - 64:
            assert got.prefix == sent.prefix


loads = st.builds(Load, pool=POOLS, endpoint=ENDPOINTS, in_flight=st.integers(min_value=0, max_value=2**31))


@settings(max_examples=100, deadline=None)
@given(report=st.lists(loads, max_size=400), limit=st.integers(min_value=512, max_value=9000))
def test_every_load_arrives_in_order_in_datagrams_within_the_size_limit(report, limit):
    datagrams = sent_within(limit, lambda codec: codec.encode_loads(7, report))
    assert [load for d in datagrams for load in d.loads] == report


def sent_within(limit: int, encode) -> list[Datagram]:
    """What ``encode`` makes with a codec of that datagram size limit, decoded; each datagram fits."""
    codec = Codec([SECRET], limit)
    datagrams = list(encode(codec))
    assert all(len(d) <= limit for d in datagrams)
    return [codec.decode(d) for d in datagrams]


class DatagramBeforeLoads(msgspec.Struct, array_like=True):
    """A datagram as gateways sent it before loads were gossiped."""

    sender: int
    placements: list[Placement]


def test_gateways_with_and_without_load_reports_read_each_others_placements():
    codec = Codec([SECRET], 8192)
    placement = Placement("p", "127.0.0.1:1", [1, 2, 3], 42)
    old = msgspec.msgpack.encode(DatagramBeforeLoads(7, [placement]))
    assert codec.decode(codec.sign(old)).placements == [placement]
    (new,) = codec.encode(7, [placement])
    assert msgspec.msgpack.decode(new[TAG_BYTES:], type=DatagramBeforeLoads).placements == [placement]
    (report,) = codec.encode_loads(7, [Load("p", "127.0.0.1:1", 3)])
    assert msgspec.msgpack.decode(report[TAG_BYTES:], type=DatagramBeforeLoads).placements == []


def test_a_datagram_tampered_with_or_signed_with_another_secret_is_refused():
    codec = Codec([SECRET], 8192)
    (datagram,) = codec.encode(7, [Placement("p", "127.0.0.1:1", [1, 2, 3], 42)])
    flipped = datagram[:-1] + bytes([datagram[-1] ^ 1])
    for data in (flipped, next(Codec([b"another-secret-of-16"], 8192).encode(7, [Placement("p", "e", [1])])),
                 datagram[:TAG_BYTES - 1]):
        with pytest.raises(ValueError, match="signature"):
            codec.decode(data)


def test_a_signed_datagram_that_is_not_a_placement_list_is_refused_as_malformed():
    codec = Codec([SECRET], 8192)
    body = b"\x93\x01\x02\x03"  # msgpack [1, 2, 3]
    with pytest.raises(ValueError, match="malformed"):
        codec.decode(codec.sign(body))


def test_a_datagram_under_the_also_accepted_secret_is_accepted_and_never_signed_with():
    old, new = b"the-old-secret-0123", b"the-new-secret-0123"
    rotating = Codec([new, old], 8192)  # mid-rotation: signs with the new secret, still accepts the old
    placement = Placement("p", "127.0.0.1:1", [1, 2, 3], 42)
    (from_old,) = Codec([old], 8192).encode(7, [placement])
    assert rotating.decode(from_old).placements == [placement]
    (from_rotating,) = rotating.encode(7, [placement])
    with pytest.raises(ValueError, match="signature"):
        Codec([old], 8192).decode(from_rotating)
    assert Codec([new], 8192).decode(from_rotating).placements == [placement]


def test_peers_without_a_secret_stop_start_up_naming_the_variable():
    config = Gossip()
    with pytest.raises(SystemExit, match="EDGE_GATEWAY_GOSSIP_SECRET"):
        secrets_from_env(config, environ={"EDGE_GATEWAY_GOSSIP_SECRET": "short"})
    assert secrets_from_env(config, environ={"EDGE_GATEWAY_GOSSIP_SECRET": "x" * 16}) == [b"x" * 16]


def test_a_short_also_accepted_secret_stops_start_up_naming_its_variable():
    config = Gossip()
    environ = {"EDGE_GATEWAY_GOSSIP_SECRET": "x" * 16, "EDGE_GATEWAY_GOSSIP_SECRET_ALSO_ACCEPTED": "short"}
    with pytest.raises(SystemExit, match="EDGE_GATEWAY_GOSSIP_SECRET_ALSO_ACCEPTED"):
        secrets_from_env(config, environ=environ)
    environ["EDGE_GATEWAY_GOSSIP_SECRET_ALSO_ACCEPTED"] = "y" * 16
    assert secrets_from_env(config, environ=environ) == [b"x" * 16, b"y" * 16]

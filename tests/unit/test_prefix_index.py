"""Approximate prefix index (gateway.prefix_index)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.affinity import prefix_hashes
from gateway.prefix_index import FORGET_BATCH, PrefixIndex

TTL = 60.0


def chain(text: str) -> list[int]:
    return prefix_hashes("m", text, 4, 4096)


def test_match_returns_the_deepest_known_prefix_and_only_the_endpoints_holding_all_of_it():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaabbbbcccc"), "A", 0.0)
    index.record(chain("aaaabbbb"), "B", 0.0)
    assert index.match(chain("aaaabbbbccccdddd"), 1.0) == (3, ("A",))
    depth, holders = index.match(chain("aaaabbbbxxxx"), 1.0)
    assert depth == 2 and sorted(holders) == ["A", "B"]
    assert index.match(chain("zzzz"), 1.0) == (0, ())


def test_an_unknown_first_block_hides_deeper_blocks_of_other_chains():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaabbbb"), "A", 0.0)
    assert index.match(chain("xxxxbbbb"), 1.0) == (0, ())


def test_entries_older_than_ttl_are_ignored_and_dropped():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaabbbb"), "A", 0.0)
    assert index.match(chain("aaaabbbb"), TTL - 1) == (2, ("A",))
    assert index.match(chain("aaaabbbb"), TTL + 1) == (0, ())
    assert len(index) == 0


def test_one_endpoint_expiring_leaves_the_fresh_holders_of_the_same_block():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaabbbb"), "A", 0.0)
    index.record(chain("aaaabbbb"), "B", 30.0)
    assert index.match(chain("aaaabbbb"), TTL + 10) == (2, ("B",))
    assert len(index) == 3, "the expired endpoint's entry of the matched block is dropped, lazily"


def test_recording_again_refreshes_the_lifetime():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaa"), "A", 0.0)
    index.record(chain("aaaa"), "A", 50.0)
    assert index.match(chain("aaaa"), 100.0) == (1, ("A",))


def test_entries_never_exceed_capacity_and_least_recently_recorded_prefixes_go_first():
    index = PrefixIndex(50, TTL)
    hot = chain("hot!hot!hot!")
    for i in range(200):
        index.record(chain(f"{i:04d}cold{i:04d}"), f"E{i % 3}", float(i) / 10)
        index.record(hot, "H", float(i) / 10)
        assert len(index) <= 50
    assert index.match(hot, 20.0) == (3, ("H",))
    assert index.match(chain("0000cold0000"), 20.0) == (0, ())
    assert index.match(chain("0199cold0199"), 20.0)[0] == 3


def test_forget_removes_an_endpoint_everywhere():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaabbbb"), "A", 0.0)
    index.record(chain("aaaa"), "B", 0.0)
    for _ in index.forget("A"):
        pass
    assert index.match(chain("aaaabbbb"), 1.0) == (1, ("B",))
    assert len(index) == 1


def test_forget_walks_in_steps_that_keep_prompts_recorded_at_once_prefix_closed_and_keep_new_records():
    index = PrefixIndex(100_000, TTL)
    chains = [chain(f"{i:04d}" * 6) for i in range(2 * FORGET_BATCH // 6 + 50)]  # six blocks each
    for c in chains:
        index.record(c, "A", 0.0)
    steps = index.forget("A")
    walked = 0
    for _ in steps:
        walked += 1
        for c in chains:  # A holds a prefix of every chain: never a deeper block without the shallower
            held = [("A" in index.match(c[:k], 1.0)[1] and index.match(c[:k], 1.0)[0] == k)
                    for k in range(1, len(c) + 1)]
            assert held == sorted(held, reverse=True)
        if walked == 1:
            index.record(chain("newcomer"), "B", 1.0)
    assert walked == -(-len(chains) * 6 // FORGET_BATCH)
    assert len(index) == 2 and index.match(chain("newcomer"), 2.0) == (2, ("B",))


def test_memory_is_counted_in_entries_of_block_and_endpoint():
    index = PrefixIndex(1000, TTL)
    index.record(chain("aaaabbbb"), "A", 0.0)
    index.record(chain("aaaabbbb"), "B", 0.0)
    index.record(chain("aaaabbbb"), "A", 1.0)
    assert len(index) == 4


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 8), st.sampled_from("ABC"), st.floats(0, 5)),
                    min_size=1, max_size=60),
       capacity=st.integers(1, 30))
def test_known_blocks_stay_prefix_closed_under_eviction_and_expiry(ops, capacity):
    """If block d of a prompt is known, so is every block before it: what binary search relies on."""
    index = PrefixIndex(capacity, 3.0)
    bases = [f"base{b}" * 8 for b in range(6)]
    now = 0.0
    for base, blocks, endpoint, step in ops:
        now += step
        index.record(chain(bases[base][:4 * blocks]), endpoint, now)
        assert len(index) <= capacity
    for base in bases:
        keys = chain(base)
        depths = [index.match(keys[:d], now)[0] for d in range(1, len(keys) + 1)]
        deepest = depths[-1]
        assert depths == [min(d, deepest) for d in range(1, len(keys) + 1)]


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError):
        PrefixIndex(0, TTL)
    with pytest.raises(ValueError):
        PrefixIndex(10, 0)

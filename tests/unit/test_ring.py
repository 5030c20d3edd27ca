"""Consistent-hash ring and bounded-load lookup (gateway.ring)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from math import ceil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

from gateway.ring import PREFERENCE_DEPTH, HashRing, load_bound

ROOT = Path(__file__).resolve().parents[2]
_rng = random.Random(7)
KEYS = [_rng.getrandbits(64) for _ in range(10_000)]
member_ids = st.lists(st.from_regex(r"10\.0\.[0-9]{1,2}\.[0-9]{1,3}:[0-9]{4,5}", fullmatch=True),
                      min_size=1, max_size=20, unique=True)
keys = st.integers(0, 2**64 - 1)


def names(n: int) -> list[str]:
    return [f"10.0.0.{i}:30000" for i in range(n)]


def reference_walk(members: list[str], vnodes: int, key: int) -> list[str]:
    """Owner order by brute force: sort all points, start at the first point >= key."""
    points = sorted((xxh3_64_intdigest(m.encode(), i), m) for m in members for i in range(vnodes))
    start = next((i for i, (p, _) in enumerate(points) if p >= key), 0)
    order: list[str] = []
    for _, m in points[start:] + points[:start]:
        if m not in order:
            order.append(m)
    return order


@settings(max_examples=40, deadline=None)
@given(members=member_ids, key=keys)
def test_walk_matches_brute_force_clockwise_order_past_the_precomputed_head(members, key):
    ring = HashRing(members, vnodes=8)
    expected = reference_walk(members, 8, key)
    assert list(ring.walk(key)) == expected
    assert ring.owner(key) == expected[0]
    assert ring.preference(key) == tuple(expected[:PREFERENCE_DEPTH])


@settings(max_examples=30, deadline=None)
@given(members=member_ids, key=keys, seed=st.integers(0, 1000))
def test_owner_is_the_same_for_any_member_order_and_any_instance(members, key, seed):
    shuffled = list(members)
    random.Random(seed).shuffle(shuffled)
    assert HashRing(members).owner(key) == HashRing(shuffled).owner(key)
    assert list(HashRing(members).walk(key)) == list(HashRing(shuffled).walk(key))


def test_owners_do_not_depend_on_the_process_hash_seed():
    script = ("from gateway.ring import HashRing; r = HashRing([f'e{i}' for i in range(7)]);"
              "print([r.owner(k * 2654435761 % 2**64) for k in range(200)])")
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30,
                       cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


@pytest.mark.parametrize("n", range(2, 17))
def test_about_one_nth_of_keys_move_when_a_member_joins_or_leaves(n):
    before = HashRing(names(n))
    joined = HashRing(names(n + 1))
    left = HashRing(names(n - 1)) if n > 1 else None
    newcomer = names(n + 1)[-1]
    leaver = names(n)[-1]
    moved_on_join = [k for k in KEYS if before.owner(k) != joined.owner(k)]
    assert all(joined.owner(k) == newcomer for k in moved_on_join), "a join must only take keys"
    assert len(moved_on_join) / len(KEYS) <= 1 / (n + 1) + 0.05
    moved_on_leave = [k for k in KEYS if before.owner(k) != left.owner(k)]
    assert all(before.owner(k) == leaver for k in moved_on_leave), "a leave must only hand over its keys"
    assert len(moved_on_leave) / len(KEYS) <= 1 / n + 0.05


def test_vnodes_spread_keys_evenly():
    ring = HashRing(names(8))
    counts: dict[str, int] = {}
    for k in KEYS:
        owner = ring.owner(k)
        counts[owner] = counts.get(owner, 0) + 1
    assert max(counts.values()) / (len(KEYS) / 8) < 1.25
    assert min(counts.values()) / (len(KEYS) / 8) > 0.75


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), c=st.sampled_from([1.0, 1.1, 1.25, 2.0]), seed=st.integers(0, 10**6),
       slow=st.lists(st.sampled_from([0.1, 0.5, 1.0]), min_size=12, max_size=12), choices=st.integers(1, 4))
def test_bounded_owner_never_puts_a_member_above_its_bound(n, c, seed, slow, choices):
    ring = HashRing(names(n))
    weight = dict(zip(names(n), slow))
    rng = random.Random(seed)
    load = dict.fromkeys(names(n), 0.0)
    placed: list[str] = []
    for _ in range(300):
        if placed and rng.random() < 0.45:
            load[placed.pop(rng.randrange(len(placed)))] -= 1
            continue
        total = sum(load.values())
        member = ring.bounded_owner(rng.getrandbits(64), load, c, weight, choices)
        share = weight[member] / sum(weight.values())
        assert load[member] + 1 <= load_bound(c, total, share)
        load[member] += 1
        placed.append(member)


def test_bounded_owner_is_the_plain_owner_while_it_is_within_bound():
    ring = HashRing(names(4))
    load = dict.fromkeys(names(4), 3.0)
    for k in KEYS[:500]:
        assert ring.bounded_owner(k, load, 1.25) == ring.owner(k)


def test_bounded_owner_walks_past_an_overloaded_owner_to_the_next_member_clockwise():
    ring = HashRing(names(4))
    key = KEYS[0]
    first, second = list(ring.walk(key))[:2]
    load = dict.fromkeys(names(4), 1.0)
    load[first] = 10.0  # total 13: bound ceil(1.25 * 14 / 4) = 5
    assert ring.bounded_owner(key, load, 1.25) == second


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), choices=st.integers(1, 5), key=keys,
       loads=st.lists(st.integers(0, 12), min_size=12, max_size=12))
def test_bounded_owner_with_choices_is_the_least_loaded_of_the_first_members_within_bound(
        n, choices, key, loads):
    ring = HashRing(names(n))
    load = {m: float(x) for m, x in zip(names(n), loads)}
    bound = load_bound(1.25, sum(load.values()), 1 / n)
    passing = [m for m in ring.walk(key) if load[m] + 1 <= bound]
    chosen = ring.bounded_owner(key, load, 1.25, choices=choices)
    if passing:
        candidates = passing[:choices]
        assert chosen == min(candidates, key=lambda m: load[m])  # min() keeps the earliest of ties
        if choices == 1:
            assert chosen == passing[0]
    else:
        assert chosen in load


def test_bounded_owner_with_equal_loads_is_the_owner_for_any_number_of_choices():
    ring = HashRing(names(6))
    load = dict.fromkeys(names(6), 2.0)
    for k in KEYS[:300]:
        assert {ring.bounded_owner(k, load, 1.25, choices=d) for d in (1, 2, 3, 6)} == {ring.owner(k)}


def test_bounded_owner_skips_members_missing_from_load_as_unavailable():
    ring = HashRing(names(3))
    key = KEYS[1]
    order = list(ring.walk(key))
    load = {m: 0.0 for m in order[1:]}
    assert ring.bounded_owner(key, load, 1.25) == order[1]
    assert ring.bounded_owner(key, {}, 1.25) is None


def test_bounded_owner_answers_even_when_fractional_loads_leave_no_member_within_bound():
    ring = HashRing(names(2))
    load = {names(2)[0]: 1.2, names(2)[1]: 1.1}  # total 2.3: bound ceil(3.3 / 2) = 2 < 2.1
    assert ring.bounded_owner(KEYS[2], load, 1.0) == names(2)[1]


def test_slow_starting_member_gets_a_proportionally_smaller_bound():
    assert load_bound(1.25, 99, 0.1 / 3.1) == ceil(1.25 * 100 * 0.1 / 3.1)
    assert load_bound(1.25, 7, 0.25) == 3
    assert load_bound(1.0, 3, 0.25) == 1  # exact product: no extra request from float error


def test_empty_ring_has_no_owner():
    ring = HashRing([])
    assert ring.owner(5) is None
    assert list(ring.walk(5)) == []
    assert ring.bounded_owner(5, {"a": 0.0}, 1.25) is None


def test_duplicate_members_are_rejected():
    with pytest.raises(ValueError):
        HashRing(["a", "a"])

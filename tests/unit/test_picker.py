"""Routing policies (gateway.picker), driven with plain in-test endpoints and a simple load model."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.affinity import key_hash, prefix_hashes
from gateway.picker import BRANCHES, POLICIES, Decision, RouteKeys, make_policy
from gateway.ring import HashRing
from gateway.settings import Pool

BLOCK = 256
# ring_choices 3 balances one process best (picker docstring); the tests of processes that share
# clients pass 1, the settings' default.
SETTINGS = {"c": 1.25, "ring_c": 1.25, "session_slack": 2.0, "vnodes": 160, "ring_key_blocks": 2,
            "ring_choices": 3, "index_capacity_blocks": 100_000, "index_ttl_s": 600.0,
            "session_capacity": 10_000, "session_ttl_s": 3600.0, "max_candidates": 3, "seed": 1}


@dataclass
class Ep:
    id: str
    load: float = 0.0
    weight: float = 1.0
    available: bool = True
    saturated: bool = False


def endpoints(n: int) -> list[Ep]:
    return [Ep(f"10.0.0.{i}:30000") for i in range(n)]


def policy(name: str, **overrides):
    return make_policy(name, **{**SETTINGS, **overrides})


def keys(text: str = "", session: str | None = None) -> RouteKeys:
    prefix = prefix_hashes("m", text, BLOCK, 32768) if text else []
    return RouteKeys(prefix, key_hash(session) if session is not None else None)


def send(pol, eps: list[Ep], route: RouteKeys, now: float = 0.0) -> Decision:
    """Pick, then tell the policy the request went to its first choice, as the gateway does."""
    decision = pol.pick(eps, route, now)
    pol.observe(decision.endpoints[0].id, route, now)
    return decision


def text_of(*parts: str) -> str:
    """Whole 256-character blocks, one per part, so prefix depths are easy to state."""
    return "".join((p * BLOCK)[:BLOCK] for p in parts)


# --- every policy ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(POLICIES), n=st.integers(1, 9), data=st.data())
def test_every_policy_returns_distinct_available_endpoints_and_places_new_work_off_saturated_ones(name, n, data):
    eps = endpoints(n)
    pol = policy(name, max_candidates=data.draw(st.integers(1, 4)))
    for step in range(6):
        for e in eps:
            e.available = data.draw(st.booleans())
            e.saturated = data.draw(st.booleans())
            e.load = data.draw(st.integers(0, 20))
            e.weight = data.draw(st.sampled_from([1.0, 1.0, 0.2]))
        route = keys(data.draw(st.sampled_from(["", "a" * 300, "b" * 700])),
                     data.draw(st.sampled_from([None, "s1", "s2"])))
        decision = pol.pick(eps, route, float(step))
        available = [e for e in eps if e.available]
        routable = [e for e in available if not e.saturated] or available
        assert decision.branch in BRANCHES
        affinity = name in ("prefix", "session") and decision.branch not in ("no_session_key", "no_prefix_key")
        assert len(decision.endpoints) == min(pol.max_candidates, len(available if affinity else routable))
        assert len({e.id for e in decision.endpoints}) == len(decision.endpoints)
        assert all(e.available for e in decision.endpoints)
        if decision.branch not in ("prefix_hit", "session"):  # new work: placed off saturated endpoints
            assert decision.endpoints[:1] == [] or decision.endpoints[0] in routable
@pytest.mark.parametrize("name", POLICIES)
def test_no_available_endpoint_gives_an_empty_decision(name):
    eps = endpoints(3)
    for e in eps:
        e.available = False
    assert policy(name).pick(eps, keys("x" * 300, "s"), 0.0) == Decision([], "no_endpoint", 0)
    assert policy(name).pick([], keys("x" * 300), 0.0) == Decision([], "no_endpoint", 0)


def test_unknown_policy_and_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="unknown routing policy"):
        policy("cache_aware")
    for bad in ({"c": 0.9}, {"ring_c": 0.9}, {"session_slack": -1}, {"max_candidates": 0}, {"vnodes": 0}, {"index_ttl_s": 0}):
        with pytest.raises(ValueError):
            policy("prefix", **bad)


# --- baselines ------------------------------------------------------------------------------------

def test_round_robin_visits_available_endpoints_in_turn_with_the_next_ones_as_fallbacks():
    eps = endpoints(4)
    eps[2].available = False
    pol = policy("round_robin")
    firsts = [pol.pick(eps, keys(), 0.0) for _ in range(6)]
    assert [d.endpoints[0].id for d in firsts] == [eps[i].id for i in (0, 1, 3, 0, 1, 3)]
    assert [e.id for e in firsts[0].endpoints] == [eps[0].id, eps[1].id, eps[3].id]
    assert {d.branch for d in firsts} == {"round_robin"}


def test_random_is_reproducible_with_a_seed():
    eps = endpoints(8)
    a, b = policy("random", seed=5), policy("random", seed=5)
    sequence = [[e.id for e in a.pick(eps, keys(), 0.0).endpoints] for _ in range(20)]
    assert sequence == [[e.id for e in b.pick(eps, keys(), 0.0).endpoints] for _ in range(20)]
    assert len({tuple(s) for s in sequence}) > 10


def test_least_load_picks_the_lowest_load_per_weight_and_rotates_ties():
    eps = endpoints(4)
    pol = policy("least_load")
    assert {pol.pick(eps, keys(), 0.0).endpoints[0].id for _ in range(4)} == {e.id for e in eps}
    for e, load in zip(eps, (5, 2, 9, 3)):
        e.load = load
    decision = pol.pick(eps, keys(), 0.0)
    assert [e.id for e in decision.endpoints] == [eps[1].id, eps[3].id, eps[0].id]
    assert decision.branch == "least_load"


def test_slow_starting_endpoint_fills_gradually():
    eps = endpoints(2)
    eps[0].weight, eps[0].load = 0.1, 0.0
    eps[1].load = 5.0
    assert policy("least_load").pick(eps, keys(), 0.0).endpoints[0] is eps[1]
    eps[1].load = 10.0
    assert policy("least_load").pick(eps, keys(), 0.0).endpoints[0] is eps[0]


def test_power_of_two_takes_the_less_loaded_of_its_two_draws():
    eps = endpoints(2)
    eps[0].load = 7.0
    pol = policy("power_of_two")
    for _ in range(20):
        decision = pol.pick(eps, keys(), 0.0)
        assert [e.id for e in decision.endpoints] == [eps[1].id, eps[0].id]
        assert decision.branch == "power_of_two"


BATCH_DEFAULT = Pool(name="b", engine="vllm", role="batch", models=["m"],
                     endpoints=["http://h:1"]).effective_policy


@pytest.mark.parametrize("name", [BATCH_DEFAULT, "prefix", "session"])
def test_processes_that_share_a_stale_signal_do_not_herd_onto_an_emptied_replica(name):
    """Four gateway processes, one scrape interval: the engines last reported 20 requests on every
    replica but the first, which has just emptied. Each process sees that stale picture plus its own
    sends, as ``pool.Endpoint.load`` does. Least-load would send the first replica 20 from each
    process (80 + its share, about 2.4x the mean); the batch pools' default must not, draw after
    draw, nor may the affinity policies with requests that carry no key."""
    stale = [0.0] + [20.0] * 7
    spreads = []
    for seed in range(20):
        sent = [0] * len(stale)
        for process in range(4):
            pol = policy(name, seed=seed * 10 + process)
            view = endpoints(len(stale))
            for e, load in zip(view, stale):
                e.load = load
            for _ in range(40):
                chosen = view.index(pol.pick(view, keys(), 0.0).endpoints[0])
                view[chosen].load += 1
                sent[chosen] += 1
        loads = [s + n for s, n in zip(stale, sent)]
        spreads.append(max(loads) / (sum(loads) / len(loads)))
    assert max(spreads) <= 1.6 and sum(spreads) / len(spreads) <= 1.25, (name, spreads)


# --- prefix ---------------------------------------------------------------------------------------

def test_cold_prompt_goes_to_its_ring_owner_identically_from_every_process_and_replica():
    eps = endpoints(5)
    route = keys(text_of("s", "t", "u"))
    decisions = [policy("prefix").pick(eps, route, 0.0) for _ in range(3)]
    assert {d.endpoints[0].id for d in decisions} == {HashRing([e.id for e in eps]).owner(route.prefix[1])}
    assert {d.branch for d in decisions} == {"ring"}
    assert decisions[0].matched_blocks == 0


def test_cold_prompt_goes_to_the_least_loaded_of_its_first_ring_choices_candidates():
    eps = endpoints(6)
    by_id = {e.id: e for e in eps}
    route = keys(text_of("s", "t", "u"))
    walk = list(HashRing([e.id for e in eps]).walk(route.prefix[1]))
    for e in eps:
        e.load = 5.0
    by_id[walk[0]].load, by_id[walk[1]].load, by_id[walk[2]].load = 4.0, 3.0, 2.0
    by_id[walk[3]].load = 0.0  # less loaded still, but not one of the key's three candidates
    decisions = [policy("prefix").pick(eps, route, 0.0) for _ in range(3)]
    assert {d.endpoints[0].id for d in decisions} == {walk[2]}
    assert policy("prefix", ring_choices=2).pick(eps, route, 0.0).endpoints[0].id == walk[1]
    assert policy("prefix", ring_choices=1).pick(eps, route, 0.0).endpoints[0].id == walk[0]


def test_cold_prompts_spread_over_the_ring():
    eps = endpoints(4)
    pol = policy("prefix")
    counts = dict.fromkeys((e.id for e in eps), 0)
    for i in range(400):
        counts[pol.pick(eps, keys(f"user {i} asks: " * 40), 0.0).endpoints[0].id] += 1
    assert max(counts.values()) < 1.5 * 100 and min(counts.values()) > 0.5 * 100


def test_request_goes_to_the_endpoint_holding_its_longest_prefix():
    eps = endpoints(4)
    pol = policy("prefix")
    pol.observe(eps[0].id, keys(text_of("s", "a")), 0.0)
    pol.observe(eps[1].id, keys(text_of("s", "a", "b")), 0.0)
    decision = pol.pick(eps, keys(text_of("s", "a", "b", "c")), 1.0)
    assert decision.endpoints[0] is eps[1]
    assert (decision.branch, decision.matched_blocks) == ("prefix_hit", 3)
    decision = pol.pick(eps, keys(text_of("s", "a", "x")), 1.0)
    assert (decision.endpoints[0], decision.matched_blocks) == (eps[0], 2)


def test_holder_above_c_times_mean_overflows_to_the_ring_and_the_next_request_finds_two_holders():
    eps = endpoints(4)
    for e in eps:
        e.load = 4.0
    pol = policy("prefix")
    route = keys(text_of("s", "a"))
    pol.observe(eps[0].id, route, 0.0)
    eps[0].load = 5.0  # total 17: bound ceil(1.25 * 18 / 4) = 6, and 5 + 1 fits
    assert (pol.pick(eps, route, 1.0).branch, pol.pick(eps, route, 1.0).endpoints[0]) == ("prefix_hit", eps[0])
    eps[0].load = 6.0  # total 18: bound ceil(1.25 * 19 / 4) = 6, and 6 + 1 does not
    overflow = send(pol, eps, route, 1.0)
    assert overflow.branch == "overflow" and overflow.matched_blocks == 2
    assert overflow.endpoints[0] is not eps[0]
    second = pol.pick(eps, route, 2.0)
    assert (second.branch, second.endpoints[0]) == ("prefix_hit", overflow.endpoints[0])


def test_holder_whose_kv_cache_is_saturated_keeps_its_prefix_but_an_unavailable_one_sends_it_to_the_ring():
    eps = endpoints(3)
    pol = policy("prefix")
    route = keys(text_of("s", "a"))
    pol.observe(eps[0].id, route, 0.0)
    eps[0].saturated = True
    decision = pol.pick(eps, route, 1.0)
    assert (decision.branch, decision.endpoints[0]) == ("prefix_hit", eps[0])
    eps[0].available = False
    decision = pol.pick(eps, route, 1.0)
    assert decision.branch == "holder_unavailable" and decision.endpoints[0] is not eps[0]


def ring_order(eps: list[Ep], route: RouteKeys) -> list[Ep]:
    """The endpoints in the ring order of a prompt's ring key (its first two blocks)."""
    by_id = {e.id: e for e in eps}
    return [by_id[i] for i in HashRing([e.id for e in eps], SETTINGS["vnodes"]).walk(route.prefix[1])]


def test_cold_prompt_skips_a_ring_owner_whose_kv_cache_is_saturated_and_the_branch_says_so():
    eps = endpoints(4)
    pol = policy("prefix")
    route = keys(text_of("s", "a"))
    owner, successor = ring_order(eps, route)[:2]
    owner.saturated = True
    decision = send(pol, eps, route, 0.0)
    assert (decision.branch, decision.endpoints[0]) == ("kv_saturated", successor)
    owner.saturated = False
    assert (pol.pick(eps, route, 1.0).branch, pol.pick(eps, route, 1.0).endpoints[0]) == ("prefix_hit", successor)


def test_every_endpoint_saturated_places_as_if_none_were():
    eps = endpoints(4)
    route = keys(text_of("s", "a"))
    plain = policy("prefix").pick(eps, route, 0.0)
    for e in eps:
        e.saturated = True
    assert policy("prefix").pick(eps, route, 0.0) == plain
    assert policy("least_load").pick(eps, route, 0.0).endpoints[0] is eps[0]


def test_request_without_prompt_goes_to_the_less_loaded_of_two_random_endpoints():
    eps = endpoints(2)  # two endpoints: the random two are both
    eps[0].load, eps[1].load = 3.0, 1.0
    for seed in range(10):
        decision = policy("prefix", seed=seed).pick(eps, keys(), 0.0)
        assert (decision.branch, decision.endpoints) == ("no_prefix_key", [eps[1], eps[0]])


def test_conversation_turns_follow_the_previous_turn_without_a_session_key():
    eps = endpoints(4)
    pol = policy("prefix")
    system = "You are a support agent for a bank. " * 40
    placements: dict[int, set[str]] = {}
    for turn in range(6):
        for user in range(20):
            history = "".join(f"[user] question {q} from customer {user}: " * 8 + "[assistant] answer " * 10
                              for q in range(turn + 1))
            decision = send(pol, eps, keys(system + history), float(turn))
            placements.setdefault(user, set()).add(decision.endpoints[0].id)
            if turn:
                assert decision.branch == "prefix_hit"
                assert decision.matched_blocks > len(prefix_hashes("m", system, BLOCK, 32768))
    assert all(len(where) == 1 for where in placements.values())


def simulate_shared_prompts(n_endpoints: int, prompts: int, requests: int, seed: int) -> tuple[float, float, float]:
    """Requests = one of `prompts` system prompts + a unique user message; each keeps its endpoint
    busy for 8-24 steps, 4 arrive per step. Returns (share sent to an endpoint that had already
    received its system prompt, time-averaged max/mean in-flight, max/mean of requests served)."""
    rng = random.Random(seed)
    eps = endpoints(n_endpoints)
    pol = policy("prefix")
    systems = [f"System prompt {p}: you are assistant number {p}. " + "Follow the policy. " * 60
               for p in range(prompts)]
    seen: dict[str, set[int]] = {e.id: set() for e in eps}
    served = dict.fromkeys(seen, 0)
    running: list[tuple[int, Ep]] = []
    on_holder, ratios = 0, []
    for i in range(requests):
        step = i // 4
        for done in [r for r in running if r[0] <= step]:
            running.remove(done)
            done[1].load -= 1
        p = rng.randrange(prompts)
        route = keys(systems[p] + f"user {rng.randrange(10_000)} asks {rng.random()}")
        chosen = send(pol, eps, route, float(step)).endpoints[0]
        on_holder += p in seen[chosen.id]
        seen[chosen.id].add(p)
        served[chosen.id] += 1
        chosen.load += 1
        running.append((step + rng.randint(8, 24), chosen))
        if step >= 25 and i % 4 == 3:
            loads = [e.load for e in eps]
            ratios.append(max(loads) / (sum(loads) / len(loads)))
    return (on_holder / requests, sum(ratios) / len(ratios),
            max(served.values()) / (requests / n_endpoints))


@pytest.mark.parametrize("n_endpoints", [4, 8])
def test_shared_system_prompts_stay_on_their_holders_while_load_stays_balanced(n_endpoints):
    on_holder, inflight_ratio, served_ratio = simulate_shared_prompts(n_endpoints, 10, 2000, seed=3)
    assert on_holder >= 0.90
    assert inflight_ratio <= 1.3
    assert served_ratio <= 1.3


def test_one_prompt_shared_by_every_request_spreads_over_all_endpoints():
    on_holder, inflight_ratio, served_ratio = simulate_shared_prompts(4, 1, 2000, seed=4)
    assert on_holder >= 0.95
    assert inflight_ratio <= 1.3
    assert served_ratio <= 1.3


# --- sessions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["session", "prefix"])
def test_a_sessions_hundred_turns_land_on_one_of_its_ring_candidates(name):
    eps = endpoints(4)
    rng = random.Random(1)
    pol = policy(name)
    where, branches = set(), []
    for turn in range(100):
        for e in eps:
            e.load = rng.randint(3, 6)
        decision = send(pol, eps, keys(f"turn {turn} " * 50, session="conversation-42"), float(turn))
        where.add(decision.endpoints[0].id)
        branches.append(decision.branch)
    assert len(where) == 1 and branches == ["session_new"] + ["session"] * 99
    ring = HashRing([e.id for e in eps])
    assert where <= set(list(ring.walk(key_hash("conversation-42")))[:3])


def test_new_session_goes_to_its_least_loaded_candidate_within_bound_and_then_keeps_its_slack():
    eps = endpoints(4)
    by_id = {e.id: e for e in eps}
    route = keys(session="user-5")
    walk = list(HashRing([e.id for e in eps]).walk(route.session))
    for e in eps:
        e.load = 4.0
    by_id[walk[0]].load = 6.0  # total 18: bound ceil(1.25 * 19 / 4) = 6; the owner is full
    by_id[walk[2]].load = 3.0
    pol = policy("session", session_slack=2.0)
    first = send(pol, eps, route, 0.0)
    assert (first.endpoints[0].id, first.branch) == (walk[2], "session_new")
    by_id[walk[2]].load = 7.0  # total 21: bound 7; a known session keeps its endpoint up to 7 + 2
    kept = pol.pick(eps, route, 1.0)
    assert (kept.endpoints[0].id, kept.branch) == (walk[2], "session")
    other = keys(session="user-6")
    assert pol.pick(eps, other, 1.0).branch == "session_new"
    assert by_id[pol.pick(eps, other, 1.0).endpoints[0].id].load + 1 <= 7, "a new session gets no slack"


def test_session_moves_once_when_its_endpoint_dies_and_stays_after_it_recovers():
    eps = endpoints(4)
    pol = policy("session")
    route = keys(session="user-7")
    order = list(HashRing([e.id for e in eps]).walk(route.session))
    home = next(e for e in eps if e.id == order[0])
    trace = []
    for turn in range(100):
        home.available = not 30 <= turn < 60
        decision = send(pol, eps, route, float(turn))
        trace.append((decision.endpoints[0].id, decision.branch))
    assert trace[0] == (order[0], "session_new")
    assert all(t == (order[0], "session") for t in trace[1:30])
    assert trace[30] == (order[1], "session_moved")
    assert all(t == (order[1], "session") for t in trace[31:])
    assert len(pol) == 1


def test_new_session_is_placed_off_a_saturated_owner_while_a_placed_one_stays_on_its_endpoint():
    eps = endpoints(4)
    pol = policy("session")
    old, new = keys(session="user-7"), keys(session="user-8")
    home = send(pol, eps, old, 0.0).endpoints[0]
    order = list(HashRing([e.id for e in eps], SETTINGS["vnodes"]).walk(new.session))
    for e in eps:
        e.saturated = e is home or e.id == order[0]
    assert (send(pol, eps, old, 1.0).branch, send(pol, eps, old, 2.0).endpoints[0]) == ("session", home)
    placed = send(pol, eps, new, 3.0)
    assert placed.branch == "kv_saturated" and not placed.endpoints[0].saturated


def test_with_one_ring_choice_an_unknown_session_is_presumed_on_its_ring_owner_and_keeps_its_slack():
    eps = endpoints(4)
    route = keys(session="user-8")
    owner = next(e for e in eps if e.id == HashRing([e.id for e in eps]).owner(route.session))
    for e in eps:
        e.load = 4.0
    owner.load = 7.0  # total 19: bound ceil(1.25 * 20 / 4) = 7; 7 + 1 <= 7 + 2
    agreeing = [policy("session", ring_choices=1) for _ in range(3)]  # three processes, none saw it
    assert {(p.pick(eps, route, 0.0).endpoints[0].id, p.pick(eps, route, 0.0).branch) for p in agreeing} == {
        (owner.id, "session")}
    balancing = policy("session", ring_choices=3).pick(eps, route, 0.0)
    assert balancing.branch == "session_new" and balancing.endpoints[0] is not owner


def test_an_opening_turn_is_placed_within_its_bound_though_no_process_remembers_its_session():
    eps = endpoints(4)
    route = keys(session="user-8")
    opening = RouteKeys(route.prefix, route.session, opening=True)
    owner = next(e for e in eps if e.id == HashRing([e.id for e in eps]).owner(route.session))
    for e in eps:
        e.load = 4.0
    owner.load = 7.0  # total 19: bound 7; a presumed session keeps the owner (7 + 1 <= 7 + 2)
    pol = policy("session", ring_choices=1)
    assert pol.pick(eps, route, 0.0).endpoints[0] is owner
    placed = pol.pick(eps, opening, 0.0)
    assert placed.branch == "session_new" and placed.endpoints[0] is not owner
    owner.load = 5.0  # within its bound: the opening turn goes to the owner, as every process expects
    assert pol.pick(eps, opening, 0.0).endpoints[0] is owner


@pytest.mark.parametrize("name", ["session", "prefix"])
def test_new_work_is_placed_within_ring_c_while_placed_work_stays_within_c(name):
    eps = endpoints(4)
    text = text_of("a", "b")
    route = keys(text, session="user-3") if name == "session" else keys(text)
    ring_key = route.session if name == "session" else route.prefix[1]
    owner = next(e for e in eps if e.id == HashRing([e.id for e in eps]).owner(ring_key))
    for e in eps:
        e.load = 3.0
    owner.load = 4.0  # total 13: bound at c = 1.25 is ceil(1.25 * 14 / 4) = 5, at c = 1.0 it is 4
    loose, tight = policy(name, ring_choices=1), policy(name, ring_choices=1, ring_c=1.0)
    first = route if name == "prefix" else RouteKeys(route.prefix, route.session, opening=True)
    assert loose.pick(eps, first, 0.0).endpoints[0] is owner
    placed = send(tight, eps, first, 0.0)
    assert placed.endpoints[0] is not owner and placed.branch in ("ring", "session_new")
    home = placed.endpoints[0]
    home.load = 4.0  # the same load that sent new work past the owner keeps placed work home
    kept = tight.pick(eps, route, 1.0)
    assert kept.endpoints[0] is home and kept.branch in ("prefix_hit", "session")


def test_session_stays_within_its_slack_and_moves_beyond_it():
    eps = endpoints(4)
    pol = policy("session", session_slack=2.0)
    route = keys(session="user-9")
    home = next(e for e in eps if e.id == HashRing([e.id for e in eps]).owner(route.session))
    assert send(pol, eps, route, 0.0).endpoints[0] is home
    for e in eps:
        e.load = 4.0
    home.load = 7.0  # total 19: bound ceil(1.25 * 20 / 4) = 7; 7 + 1 <= 7 + 2
    assert pol.pick(eps, route, 0.0).branch == "session"
    home.load = 9.0  # total 21: bound 7; 9 + 1 > 7 + 2
    decision = pol.pick(eps, route, 0.0)
    assert decision.branch == "session_moved" and decision.endpoints[0] is not home


def test_remembered_sessions_are_bounded_and_expire_to_a_fresh_placement():
    eps = endpoints(3)
    pol = policy("session", session_capacity=10, session_ttl_s=100.0)
    eps[0].available = False
    moved = [f"s{i}" for i in range(200) if HashRing([e.id for e in eps]).owner(key_hash(f"s{i}")) == eps[0].id]
    for i, session in enumerate(moved):
        send(pol, eps, keys(session=session), float(i) / 100)
        assert len(pol) <= 10
    eps[0].available = True
    last = moved[-1]
    assert pol.pick(eps, keys(session=last), 2.0).endpoints[0] is not eps[0], "still sticky"
    assert pol.pick(eps, keys(session=last), 200.0).endpoints[0] is eps[0], "expired: back home"


def test_a_retry_elsewhere_moves_the_session_to_where_the_request_went():
    eps = endpoints(3)
    pol = policy("session")
    route = keys(session="user-1")
    first = pol.pick(eps, route, 0.0)
    pol.observe(first.endpoints[1].id, route, 0.0)  # the first choice failed; the fallback served it
    assert pol.pick(eps, route, 1.0).endpoints[0] is first.endpoints[1]
    pol.observe(first.endpoints[0].id, route, 2.0)
    assert pol.pick(eps, route, 3.0).endpoints[0] is first.endpoints[0]
    assert len(pol) == 1


def test_session_policy_without_session_key_balances_load_and_says_so():
    eps = endpoints(2)
    eps[0].load = 5.0
    for seed in range(10):
        decision = policy("session", seed=seed).pick(eps, keys("hello"), 0.0)
        assert (decision.branch, decision.endpoints[0]) == ("no_session_key", eps[1])


def test_prefix_policy_routes_a_session_key_by_session_and_still_learns_its_prefix():
    eps = endpoints(4)
    pol = policy("prefix")
    prompt = text_of("s", "a", "b")
    first = send(pol, eps, keys(prompt, session="chat-3"), 0.0)
    assert first.branch == "session_new"
    follow = pol.pick(eps, keys(prompt + text_of("c")), 1.0)
    assert (follow.branch, follow.endpoints[0]) == ("prefix_hit", first.endpoints[0])


def test_adding_an_endpoint_moves_about_one_nth_of_new_sessions_and_only_to_it():
    eps = endpoints(4)
    pol = policy("session")
    sessions = [keys(session=f"s{i}") for i in range(2000)]
    before = [pol.pick(eps, s, 0.0).endpoints[0].id for s in sessions]
    eps.append(Ep("10.0.0.9:30000"))
    after = [pol.pick(eps, s, 0.0).endpoints[0].id for s in sessions]
    moved = [b for a, b in zip(before, after) if a != b]
    assert set(moved) == {"10.0.0.9:30000"}
    assert len(moved) / len(sessions) <= 1 / 5 + 0.05


def test_known_sessions_stay_put_when_an_endpoint_joins():
    eps = endpoints(4)
    pol = policy("session")
    sessions = [keys(session=f"s{i}") for i in range(500)]
    before = [send(pol, eps, s, 0.0).endpoints[0].id for s in sessions]
    eps.append(Ep("10.0.0.9:30000"))
    assert [pol.pick(eps, s, 1.0).endpoints[0].id for s in sessions] == before


def test_an_endpoint_that_left_and_came_back_holds_no_prefixes_or_sessions_any_more():
    eps = endpoints(4)
    pol = policy("prefix")
    prompt, session = keys(text_of("s", "a", "b")), keys(session="user-7")
    owner = pol.pick(eps, prompt, 0.0).endpoints[0]  # where the prompt goes while nobody holds it
    holder = next(e for e in eps if e is not owner)
    pol.observe(holder.id, prompt, 0.0)
    pol.observe(holder.id, session, 0.0)
    assert [pol.pick(eps, r, 1.0).endpoints[0] for r in (prompt, session)] == [holder, holder]
    for _ in pol.forget(holder.id):
        pass
    decision = pol.pick(eps, prompt, 2.0)
    assert (decision.branch, decision.endpoints[0]) == ("ring", owner)
    assert len(pol.sessions) == 0


def test_pool_endpoint_satisfies_the_candidate_contract():
    from gateway import pool

    eps = [pool.Endpoint(f"http://127.0.0.1:{30000 + i}", "interactive") for i in range(3)]
    for e in eps:
        e.healthy = True
        e.refresh()
    decision = send(policy("prefix"), eps, keys(text_of("s", "a")), 0.0)
    assert decision.branch == "ring" and len(decision.endpoints) == 3

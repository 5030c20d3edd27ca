"""Routing policies: choose an ordered list of endpoints (the choice, then distinct fallbacks).

Contract
--------
``policy.pick(endpoints, keys, now)`` looks only at ``available`` endpoints and returns a
:class:`Decision`: the chosen endpoint first, then up to ``max_candidates - 1`` distinct fallbacks
for retries, the ``branch`` that decided (a metric label), and the depth of the longest known prefix
in blocks. ``policy.observe(endpoint_id, keys, now)`` must be called once a request has actually
been sent to an endpoint (the choice or a fallback): stateful policies learn where prefixes and
sessions live from it, never from ``pick``, so a retry teaches them the real placement. Nothing here
does I/O or reads a clock; ``now`` is ``time.monotonic()`` from the caller.

Policies
--------
``round_robin``, ``random`` and ``least_load`` / ``power_of_two`` (on ``(load + 1) / weight``, so
that slow-starting endpoints fill up gradually) are the baselines.

``session``: a session key's home is its owner on the consistent-hash ring (``ring.HashRing``), so
every gateway process and replica agrees on it without shared state. The session stays on its
current endpoint while that endpoint is available and within its load bound plus a slack (below).
Otherwise it moves to its bounded-load owner (the next acceptable endpoint clockwise), and a
bounded, expiring map remembers the move, so it stays there, even when the old endpoint recovers,
instead of flapping back and paying a second cold prefill. Only moved sessions take memory.
Without a session key the request goes to the least-loaded endpoint (branch ``no_session_key``).

``prefix`` (the interactive default): a request with a session key is routed as above. Otherwise:

1. Look the prompt's block keys up in the ``PrefixIndex``: the endpoints holding its longest known
   prefix. Pick the least loaded of them; keep it if it is within its load bound (``prefix_hit``).
2. Else (``overflow``), or if nothing matched (``ring``), send the request to the bounded-load owner
   of the ring key, the chain key of the first ``ring_key_blocks`` blocks. A cold prefix thus lands
   on the same endpoint from every process and replica with the same members and a similar load
   view, and the load bound (not the cache) decides when it lands elsewhere, so a busy endpoint never
   draws all new traffic.

A prefix shared by every request (a common system prompt) is handled by the two steps together.
It starts on one ring owner; when that owner passes its bound, the overflow goes to the next
endpoint clockwise, which from then on also holds the prefix. Step 1 chooses the least loaded of
all holders, so a hot prefix spreads over as many endpoints as its load needs, and every request
still lands where its prefix is cached. Deeper, conversation-specific prefixes have one holder, so
turn n + 1 of a conversation follows turn n. Each hot prefix is cached on a few endpoints instead of
one: a little KV memory spent for balance. One gap: if a conversation's first user message ends in
the same block as the shared system prompt, turn 1 left no conversation-specific whole block, so
turn 2 goes to the least loaded holder of the system prompt; it re-prefills that message and the
first answer there, and later turns follow it.

Bounds
------
A prefix holder is kept, and a ring owner takes a request, only within the Mirrokni bound
``ring.load_bound``: at most ``ceil(c * (total + 1) * share)`` requests after taking it, i.e. about
``c`` times the mean. A session's endpoint keeps it up to ``session_slack`` requests beyond that
bound: a move costs a prefill of the whole conversation, while a couple of extra requests in flight
cost little, and without slack, at low load (bound 2 or 3) sessions would be pushed around by the
rounding of the bound alone. (A simulation of 32 sessions on 4 endpoints: 137 moves in 3,500 turns
with no slack, none with a slack of 2, and the same max/mean load.) Prefix hits get no slack: a hot
prefix answers overload by spreading to more holders, which keeps the load within ``c`` times the
mean.

Cost: ``pick`` is O(endpoints + log(prefix keys) + ring points walked) and allocates a few small
containers; ``observe`` is O(prefix keys). The ring is rebuilt only when the list of endpoint ids
changes.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from heapq import nsmallest
from math import inf
from typing import NamedTuple, Protocol

import msgspec

from gateway.prefix_index import PrefixIndex
from gateway.ring import HashRing, load_bound


class Candidate(Protocol):
    """What the picker reads of an endpoint (``pool.Endpoint`` satisfies it)."""

    @property
    def id(self) -> str:
        """Stable, unique endpoint id (its ring identity)."""

    @property
    def load(self) -> float:
        """In-flight requests combined with the engine's queue; higher is busier."""

    @property
    def weight(self) -> float:
        """Share in (0, 1]: 1 normally, less while slow-starting."""

    @property
    def available(self) -> bool:
        """Healthy and not ejected; the picker ignores endpoints that are not."""


class RouteKeys(msgspec.Struct, frozen=True, gc=False):
    """A request's routing keys: ``affinity.prefix_hashes`` of its canonical prompt (may be empty
    when the request has no prompt) and ``affinity.key_hash`` of its session key, if any."""

    prefix: list[int]
    session: int | None = None


class Decision(NamedTuple):
    """``endpoints``: the choice first, then distinct fallbacks (empty if none is available);
    ``branch``: which rule decided, a metric label; ``matched_blocks``: depth of the longest prefix
    found in the index (0 for policies that do not look)."""

    endpoints: list[Candidate]
    branch: str
    matched_blocks: int


class Policy(Protocol):
    """A routing policy; see the module docstring for the contract of ``pick`` and ``observe``."""

    name: str

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision: ...

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None: ...


BRANCHES = ("no_endpoint", "round_robin", "random", "least_load", "power_of_two", "session",
            "session_moved", "no_session_key", "prefix_hit", "overflow", "ring", "holder_unavailable",
            "no_prefix_key")


def _pressure(endpoint: Candidate) -> float:
    return (endpoint.load + 1.0) / endpoint.weight


class _NoAffinity:
    """Base of the policies that learn nothing from where requests went: ``observe`` does nothing."""

    __slots__ = ("max_candidates",)
    name = ""

    def __init__(self, max_candidates: int):
        self.max_candidates = max_candidates

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        return None


class RoundRobin(_NoAffinity):
    """Each available endpoint in turn; fallbacks are the next ones in order."""

    __slots__ = ("_turn",)
    name = "round_robin"

    def __init__(self, max_candidates: int):
        super().__init__(max_candidates)
        self._turn = 0

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        available = [e for e in endpoints if e.available]
        n = len(available)
        if not n:
            return Decision([], "no_endpoint", 0)
        start = self._turn % n
        self._turn = start + 1
        return Decision([available[(start + i) % n] for i in range(min(self.max_candidates, n))],
                        "round_robin", 0)


class RandomChoice(_NoAffinity):
    """Uniformly random endpoint and fallbacks; ``seed`` makes the sequence reproducible."""

    __slots__ = ("_rng",)
    name = "random"

    def __init__(self, max_candidates: int, seed: int | None):
        super().__init__(max_candidates)
        self._rng = random.Random(seed)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        available = [e for e in endpoints if e.available]
        if not available:
            return Decision([], "no_endpoint", 0)
        return Decision(self._rng.sample(available, min(self.max_candidates, len(available))), "random", 0)


class LeastLoad(_NoAffinity):
    """The endpoints with the lowest ``(load + 1) / weight``; ties go to each endpoint in turn, so
    an idle pool is not a queue in front of its first endpoint."""

    __slots__ = ("_turn",)
    name = "least_load"

    def __init__(self, max_candidates: int):
        super().__init__(max_candidates)
        self._turn = 0

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        return self.choose([e for e in endpoints if e.available], "least_load")

    def choose(self, available: list[Candidate], branch: str) -> Decision:
        n = len(available)
        if not n:
            return Decision([], "no_endpoint", 0)
        start = self._turn % n
        self._turn = start + 1
        rotated = available[start:] + available[:start]
        return Decision(nsmallest(min(self.max_candidates, n), rotated, key=_pressure), branch, 0)


class PowerOfTwo(_NoAffinity):
    """The less loaded of two random endpoints; the other is the first fallback, then random ones."""

    __slots__ = ("_rng",)
    name = "power_of_two"

    def __init__(self, max_candidates: int, seed: int | None):
        super().__init__(max_candidates)
        self._rng = random.Random(seed)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        available = [e for e in endpoints if e.available]
        n = len(available)
        if not n:
            return Decision([], "no_endpoint", 0)
        drawn = self._rng.sample(available, min(max(2, self.max_candidates), n))
        if n > 1 and _pressure(drawn[1]) < _pressure(drawn[0]):
            drawn[0], drawn[1] = drawn[1], drawn[0]
        return Decision(drawn[:self.max_candidates], "power_of_two", 0)


class _LoadView:
    """One request's view of the endpoints: every id (the ring's members), and the available ones
    by id with their loads and weights."""

    __slots__ = ("by_id", "ids", "load", "total", "weight", "weight_sum")

    def __init__(self, endpoints: Sequence[Candidate]):
        ids: list[str] = []
        by_id: dict[str, Candidate] = {}
        load: dict[str, float] = {}
        slow_start = False
        for e in endpoints:
            endpoint_id = e.id
            ids.append(endpoint_id)
            if e.available:
                by_id[endpoint_id] = e
                load[endpoint_id] = e.load
                if e.weight != 1.0:
                    slow_start = True
        self.ids = ids
        self.by_id = by_id
        self.load = load
        self.total = sum(load.values())
        # Equal weights are the norm; the ring then skips per-member share arithmetic.
        self.weight = {i: e.weight for i, e in by_id.items()} if slow_start else None
        self.weight_sum = sum(self.weight.values()) if self.weight is not None else float(len(load))

    def keeps(self, endpoint_id: str, c: float, slack: float) -> bool:
        """Whether an endpoint may keep an affinity request: within its load bound plus ``slack``."""
        share = (self.weight[endpoint_id] if self.weight is not None else 1.0) / self.weight_sum
        return self.load[endpoint_id] + 1.0 <= load_bound(c, self.total, share) + slack

    def along(self, ring: HashRing, key: int, first: str, count: int) -> list[Candidate]:
        """``first``, then available endpoints clockwise from ``key``, ``count`` at most."""
        by_id = self.by_id
        chosen = [by_id[first]]
        if count > 1:
            for member in ring.walk(key):
                if member != first and member in by_id:
                    chosen.append(by_id[member])
                    if len(chosen) == count:
                        break
        return chosen


class _RingCache:
    """The ring over the endpoint ids last seen, rebuilt when they change. Health flaps do not
    rebuild it: unavailable endpoints stay on the ring and are walked past, which moves exactly the
    keys a rebuild without them would move."""

    __slots__ = ("ids", "ring", "vnodes")

    def __init__(self, vnodes: int):
        self.vnodes = vnodes
        self.ids: list[str] = []
        self.ring = HashRing((), vnodes)

    def get(self, ids: list[str]) -> HashRing:
        if ids != self.ids:
            self.ring = HashRing(ids, self.vnodes)
            self.ids = ids
        return self.ring


class SessionAffinity:
    """Sticky sessions on the bounded-load ring (module docstring, ``session``)."""

    __slots__ = ("_least_load", "_moved", "_rings", "c", "capacity", "max_candidates", "slack", "ttl_s")
    name = "session"

    def __init__(self, *, c: float, slack: float, vnodes: int, capacity: int, ttl_s: float,
                 max_candidates: int, rings: _RingCache | None = None):
        self.c = c
        self.slack = slack
        self.max_candidates = max_candidates
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._rings = rings if rings is not None else _RingCache(vnodes)
        # Session key -> (endpoint id, last time a request went there), for sessions living away
        # from their ring owner only; LRU order.
        self._moved: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._least_load = LeastLoad(max_candidates)

    def __len__(self) -> int:
        """Sessions remembered as moved away from their ring owner."""
        return len(self._moved)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        if keys.session is None:
            return self._least_load.choose([e for e in endpoints if e.available], "no_session_key")
        view = _LoadView(endpoints)
        if not view.by_id:
            return Decision([], "no_endpoint", 0)
        return self.route(self._rings.get(view.ids), view, keys.session, now)

    def route(self, ring: HashRing, view: _LoadView, session: int, now: float) -> Decision:
        """Where ``session`` goes given this view; used by the prefix policy as well."""
        moved = self._moved.get(session)
        current = moved[0] if moved is not None and moved[1] >= now - self.ttl_s else ring.owner(session)
        if current in view.by_id and view.keeps(current, self.c, self.slack):
            return Decision(view.along(ring, session, current, self.max_candidates), "session", 0)
        target = ring.bounded_owner(session, view.load, self.c, view.weight)
        assert target is not None  # the ring holds every endpoint of the view
        # Only when fractional loads leave no endpoint within bound can the target be the current one.
        branch = "session" if target == current else "session_moved"
        return Decision(view.along(ring, session, target, self.max_candidates), branch, 0)

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        session = keys.session
        if session is None:
            return
        moved = self._moved
        if self._rings.ring.owner(session) == endpoint_id:
            moved.pop(session, None)
            return
        moved[session] = (endpoint_id, now)
        moved.move_to_end(session)
        cutoff = now - self.ttl_s
        while moved and (len(moved) > self.capacity or next(iter(moved.values()))[1] < cutoff):
            moved.popitem(last=False)


class PrefixAffinity:
    """Longest-prefix routing with load bounds, ring placement for cold prefixes, sessions first
    (module docstring, ``prefix``)."""

    __slots__ = ("_least_load", "_rings", "c", "index", "max_candidates", "ring_key_blocks", "sessions")
    name = "prefix"

    def __init__(self, *, c: float, session_slack: float, vnodes: int, ring_key_blocks: int,
                 index_capacity_blocks: int, index_ttl_s: float, session_capacity: int, session_ttl_s: float,
                 max_candidates: int):
        self.c = c
        self.ring_key_blocks = ring_key_blocks
        self.max_candidates = max_candidates
        self.index = PrefixIndex(index_capacity_blocks, index_ttl_s)
        self._rings = _RingCache(vnodes)
        self.sessions = SessionAffinity(c=c, slack=session_slack, vnodes=vnodes, capacity=session_capacity,
                                        ttl_s=session_ttl_s, max_candidates=max_candidates, rings=self._rings)
        self._least_load = LeastLoad(max_candidates)

    def pick(self, endpoints: Sequence[Candidate], keys: RouteKeys, now: float) -> Decision:
        prefix = keys.prefix
        if keys.session is None and not prefix:
            return self._least_load.choose([e for e in endpoints if e.available], "no_prefix_key")
        view = _LoadView(endpoints)
        if not view.by_id:
            return Decision([], "no_endpoint", 0)
        ring = self._rings.get(view.ids)
        if keys.session is not None:
            return self.sessions.route(ring, view, keys.session, now)
        ring_key = prefix[min(self.ring_key_blocks, len(prefix)) - 1]
        depth, holders = self.index.match(prefix, now)
        if not depth:
            branch = "ring"
        else:
            best: Candidate | None = None
            lowest = inf
            for endpoint_id in holders:
                endpoint = view.by_id.get(endpoint_id)
                if endpoint is not None and (pressure := _pressure(endpoint)) < lowest:
                    best, lowest = endpoint, pressure
            if best is None:
                branch = "holder_unavailable"
            elif view.keeps(best.id, self.c, 0.0):
                return Decision(view.along(ring, ring_key, best.id, self.max_candidates), "prefix_hit", depth)
            else:
                branch = "overflow"
        target = ring.bounded_owner(ring_key, view.load, self.c, view.weight)
        assert target is not None  # the ring holds every endpoint of the view
        return Decision(view.along(ring, ring_key, target, self.max_candidates), branch, depth)

    def observe(self, endpoint_id: str, keys: RouteKeys, now: float) -> None:
        if keys.prefix:
            self.index.record(keys.prefix, endpoint_id, now)
        if keys.session is not None:
            self.sessions.observe(endpoint_id, keys, now)


POLICIES = ("prefix", "session", "round_robin", "random", "least_load", "power_of_two")


def make_policy(name: str, *, c: float, session_slack: float, vnodes: int, ring_key_blocks: int,
                index_capacity_blocks: int, index_ttl_s: float, session_capacity: int, session_ttl_s: float,
                max_candidates: int, seed: int | None = None) -> Policy:
    """Build the policy called ``name`` (one of ``POLICIES``) for one pool.

    ``c``: load factor of the bounds (>= 1); ``session_slack``: requests a session's endpoint may
    hold beyond its bound before the session moves (>= 0); ``vnodes``: ring points per endpoint;
    ``ring_key_blocks``: blocks that key a cold prefix on the ring; ``index_capacity_blocks`` /
    ``index_ttl_s``: prefix index size and entry lifetime; ``session_capacity`` / ``session_ttl_s``:
    moved-session map size and idle lifetime; ``max_candidates``: length of a decision's endpoint
    list (choice + fallbacks); ``seed``: for ``random`` and ``power_of_two`` (None: from the OS).
    """
    if c < 1.0:
        raise ValueError(f"c must be >= 1, got {c}")
    if session_slack < 0:
        raise ValueError(f"session_slack must be >= 0, got {session_slack}")
    for key, value in (("vnodes", vnodes), ("ring_key_blocks", ring_key_blocks),
                       ("index_capacity_blocks", index_capacity_blocks),
                       ("session_capacity", session_capacity), ("max_candidates", max_candidates)):
        if value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    if index_ttl_s <= 0 or session_ttl_s <= 0:
        raise ValueError("index_ttl_s and session_ttl_s must be positive")
    if name == "prefix":
        return PrefixAffinity(c=c, session_slack=session_slack, vnodes=vnodes,
                              ring_key_blocks=ring_key_blocks, index_capacity_blocks=index_capacity_blocks,
                              index_ttl_s=index_ttl_s, session_capacity=session_capacity,
                              session_ttl_s=session_ttl_s, max_candidates=max_candidates)
    if name == "session":
        return SessionAffinity(c=c, slack=session_slack, vnodes=vnodes, capacity=session_capacity,
                               ttl_s=session_ttl_s, max_candidates=max_candidates)
    if name == "round_robin":
        return RoundRobin(max_candidates)
    if name == "random":
        return RandomChoice(max_candidates, seed)
    if name == "least_load":
        return LeastLoad(max_candidates)
    if name == "power_of_two":
        return PowerOfTwo(max_candidates, seed)
    raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICIES)}")

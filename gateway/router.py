"""The route step: traffic class -> pool -> routing keys -> the pool's policy -> ordered candidates.

Interactive traffic (the default) goes to the model's SGLang interactive pool; batch traffic
(``X-Workload-Class: batch`` or ``"service_tier": "flex"``) to its vLLM batch pool. Batch may borrow
the interactive pool only while that pool is nearly idle (mean load per endpoint under
``routing.batch_borrow_below``); interactive spills to the batch pool only when
``routing.interactive_spill`` is on. Every decision, spills included, is counted by pool, policy and
branch (the ledger counts what the call carries).
"""

from __future__ import annotations

import random
import time

from gateway import affinity
from gateway.errors import GatewayError, model_not_found
from gateway.picker import RouteKeys
from gateway.pool import Pool
from gateway.relay import Call
from gateway.settings import Routing

INTERACTIVE, BATCH = "interactive", "batch"
# Messages that set up a conversation rather than take a turn in it.
_INSTRUCTION_ROLES = frozenset(("system", "developer"))


class Router:
    def __init__(self, pools: list[Pool], routing: Routing):
        self.routing = routing
        self.pools = pools
        self.by_model: dict[str, dict[str, list[Pool]]] = {}
        for pool in pools:
            for model in pool.models:
                self.by_model.setdefault(model, {INTERACTIVE: [], BATCH: []})[pool.role].append(pool)
        self.session_headers = [h.lower().encode() for h in routing.session_headers]
        self._random = random.Random(0).random
        self.session_fields = list(routing.session_fields)

    def route(self, call: Call, header, decoded, text: str, workload: str) -> None:
        """Fill ``call.pool`` and ``call.candidates`` (first = choice, rest = retry fallbacks)."""
        model = decoded.model
        pools = self.by_model.get(model)
        if pools is None:
            raise model_not_found(model)
        call.workload = workload
        pool, spilled = self._pool(pools, workload)
        if pool is None:
            raise GatewayError("no_healthy_upstream", f"no healthy endpoint serves model `{model}`")
        r = self.routing
        session = self._session(header, decoded)
        keys = RouteKeys(
            prefix=affinity.prefix_hashes(model, text, r.block_chars, r.max_prefix_chars),
            session=session, opening=session is not None and _opens_conversation(decoded))
        now = time.monotonic()
        decision = pool.policy.pick(pool.endpoints, keys, now)
        candidates = decision.endpoints
        if not candidates:
            raise GatewayError("no_healthy_upstream", f"no healthy endpoint serves model `{model}`")
        branch = decision.branch
        first = candidates[0]
        # Slow start: load bounds cap what a returning replica holds, but a lightly loaded replica
        # turns its slots over fast; also admit it only a `weight` share of the requests it is picked for.
        if first.weight < 1.0 and len(candidates) > 1 and self._random() > first.weight:
            candidates = candidates[1:] + [first]
            branch = "slow_start"
        call.keys = keys
        call.pool = pool
        call.candidates = candidates
        call.policy = pool.policy.name
        call.branch = "spill" if spilled else branch
        call.matched_blocks = decision.matched_blocks

    def _pool(self, pools: dict[str, list[Pool]], workload: str) -> tuple[Pool | None, bool]:
        own, other = (pools[BATCH], pools[INTERACTIVE]) if workload == BATCH else (pools[INTERACTIVE], pools[BATCH])
        for pool in own:
            if pool.has_healthy():
                return pool, False
        for pool in other:
            if not pool.has_healthy():
                continue
            if workload == BATCH and _mean_load(pool) < self.routing.batch_borrow_below:
                return pool, True
            if workload == INTERACTIVE and (self.routing.interactive_spill or not own):
                return pool, bool(own)
        return None, False

    def _session(self, header, decoded) -> int | None:
        """``header(name)`` gives a request header's value; the first session source present wins."""
        for name in self.session_headers:
            value = header(name)
            if value:
                return affinity.key_hash(value.decode("latin-1"))
        for field in self.session_fields:
            value = getattr(decoded, field, None)
            if value:
                return affinity.key_hash(value)
        return None


def _mean_load(pool: Pool) -> float:
    eps = pool.available()
    return sum(e.load for e in eps) / len(eps) if eps else float("inf")


def _opens_conversation(decoded) -> bool:
    """Whether a request starts its conversation: a chat with one message besides system and
    developer instructions. Only chats can tell; a completion's prompt says nothing about turns."""
    messages = getattr(decoded, "messages", None)
    if messages is None:
        return False
    turns = 0
    for message in messages:
        if message.role not in _INSTRUCTION_ROLES:
            turns += 1
            if turns > 1:
                return False
    return turns == 1

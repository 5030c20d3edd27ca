"""Per-key admission: requests/min and tokens/min token buckets, and a concurrency count.

**Token bucket.** A bucket holds up to ``capacity`` units (the burst; one minute's worth unless the
key sets ``burst_requests`` / ``burst_tokens``) and refills continuously at ``per_minute / 60`` units
per second. Refill is lazy: the level is brought up to date, from the elapsed time, only when the
bucket is touched, so an idle key costs nothing. A request needs 1 unit of the request bucket and its
*estimated* tokens of the token bucket (never more than the token bucket's capacity, so a request
larger than the burst still gets in once the bucket is full, instead of never).

**Admit, then settle.** :meth:`Limiter.admit` checks every limit of the key and charges them all, or
none: a refused request costs the key nothing. When it refuses, ``Retry-After`` is the exact time
until the bucket that blocks holds what the request needs (``deficit / rate``), the longest of them
if several block. At 60 rpm with the burst spent, that is 1 s for the next request. A concurrency
refusal has no refill time (a slot frees when some request ends), so it says 1 s.
:meth:`Limiter.settle` returns the concurrency slot, exactly once however often it is called, and
replaces the token estimate by the real usage: an over-estimate is refunded (up to the capacity), an
under-estimate is charged.

**Below zero.** Settling may leave the token bucket *below zero*: the key is in debt and waits until
the refill pays it back, so a key cannot exceed its tokens/min by sending small estimates (no
``max_tokens``, or text that packs more than one token into 4 bytes). The debt is floored at minus one
capacity, which bounds any wait at twice the time a full bucket takes to refill: two minutes with the
default burst, which openai-python still honours (it ignores a Retry-After over 120 s). Without a
usage figure (a stream cut before its usage chunk) the estimate stands.

**Cost.** admit and settle are O(1): a dict lookup by key id and a few float operations, with no
allocation beyond the :class:`Admission`. Memory is one small state per key seen. A state whose
buckets have refilled completely and that has nothing in flight is indistinguishable from a fresh one,
so :meth:`Limiter.sweep` (run every ``SWEEP_EVERY`` admissions) drops those states exactly, without
changing any answer.

**Scope.** The buckets live in one process: with ``workers = N`` each worker keeps its own, so a key
may get up to N times its limits. Time is always passed in as ``now`` (monotonic seconds); this module
reads no clock.
"""

from __future__ import annotations

import math

from gateway.auth import KeyRecord
from gateway.errors import GatewayError

SWEEP_EVERY = 4096
CONCURRENCY_RETRY_S = 1.0
# Completion tokens assumed when a request sets no max_tokens; the real usage settles the difference.
DEFAULT_COMPLETION_ESTIMATE = 256


def estimate_tokens(prompt_bytes: int, max_tokens: int | None, choices: int = 1,
                    default_completion: int = DEFAULT_COMPLETION_ESTIMATE) -> int:
    """Tokens to charge at admission: about 4 bytes of text per prompt token, plus the completion
    budget the request asked for, once per completion it asked for (``n`` x prompts)."""
    # Never below one token: a negative figure would refill the bucket instead of charging it.
    budget = default_completion if max_tokens is None else max_tokens
    return max(1, -(-prompt_bytes // 4) + choices * budget)


class TokenBucket:
    """A lazily refilled bucket of ``capacity`` units gaining ``rate`` units per second."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: int, capacity: int, now: float):
        self.rate = per_minute / 60.0
        self.capacity = float(capacity)
        self.level = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:  # a clock that steps back refills nothing and moves nothing back
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until the (just refilled) level reaches ``amount``."""
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> float:
        """Remove ``amount`` (negative: give back), keeping the level within [-capacity, capacity];
        returns what was actually removed."""
        before = self.level
        self.level = min(self.capacity, max(-self.capacity, before - amount))
        return before - self.level

    def full_after(self, now: float) -> float:
        """Seconds from ``now`` until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate - (now - self.stamp))

    def reshape(self, per_minute: int, capacity: int) -> None:
        """New limits from a reloaded keys file; the current level carries over (clamped)."""
        self.rate = per_minute / 60.0
        self.capacity = float(capacity)
        self.level = max(-self.capacity, min(self.capacity, self.level))


class _KeyState:
    __slots__ = ("in_flight", "record", "requests", "tokens")

    def __init__(self, record: KeyRecord, now: float):
        self.record = record
        self.requests = _bucket(record.rpm, record.burst_requests, now)
        self.tokens = _bucket(record.tpm, record.burst_tokens, now)
        self.in_flight = 0

    def follow(self, record: KeyRecord, now: float) -> None:
        """Adopt the limits of a reloaded record for the same key id."""
        self.requests = _reshape(self.requests, record.rpm, record.burst_requests, now)
        self.tokens = _reshape(self.tokens, record.tpm, record.burst_tokens, now)
        self.record = record

    def idle(self, now: float) -> bool:
        return self.in_flight == 0 and all(
            b is None or b.full_after(now) == 0.0 for b in (self.requests, self.tokens))


def _bucket(per_minute: int | None, burst: int | None, now: float) -> TokenBucket | None:
    return None if per_minute is None else TokenBucket(per_minute, burst or per_minute, now)


def _reshape(bucket: TokenBucket | None, per_minute: int | None, burst: int | None,
             now: float) -> TokenBucket | None:
    if bucket is None or per_minute is None:
        return _bucket(per_minute, burst, now)
    bucket.refill(now)
    bucket.reshape(per_minute, burst or per_minute)
    return bucket


class Admission:
    """A request let in: holds one concurrency slot and the tokens charged for it until settled."""

    __slots__ = ("_open", "_state", "charged_tokens", "key_id")

    def __init__(self, state: _KeyState, charged_tokens: float):
        self.key_id = state.record.key_id
        self.charged_tokens = charged_tokens
        self._state = state
        self._open = True

    @property
    def settled(self) -> bool:
        return not self._open

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for this key as of ``now``."""
        return rate_limit_headers(self._state, now)


class RateLimited(GatewayError):
    """429 ``rate_limit_exceeded`` with the real wait and the key's ``x-ratelimit-*`` headers."""

    def __init__(self, message: str, retry_after_s: float, limit_headers: list[tuple[bytes, bytes]]):
        super().__init__("rate_limited", message, retry_after_s=retry_after_s)
        self.limit_headers = limit_headers

    def headers(self) -> list[tuple[bytes, bytes]]:
        return super().headers() + self.limit_headers


class Limiter:
    """Per-key limits for one process. Single-threaded: call it from the event loop only."""

    def __init__(self) -> None:
        self._states: dict[str, _KeyState] = {}
        self._admissions = 0

    def admit(self, record: KeyRecord, estimated_tokens: int, now: float) -> Admission:
        """Let the request in and charge it, or raise :class:`RateLimited` and charge nothing."""
        self._admissions += 1
        if self._admissions % SWEEP_EVERY == 0:
            self.sweep(now)  # before the lookup: it may drop this very key's (idle) state
        state = self._states.get(record.key_id)
        if state is None:
            state = self._states[record.key_id] = _KeyState(record, now)
        elif state.record is not record:
            state.follow(record, now)

        requests, tokens = state.requests, state.tokens
        if ((record.concurrency is not None and state.in_flight >= record.concurrency)
                or (requests is not None and requests.refill(now) < 1.0)
                or (tokens is not None and tokens.refill(now) < min(estimated_tokens, tokens.capacity))):
            raise _refusal(state, estimated_tokens, now)
        if requests is not None:
            requests.take(1.0)
        charged = tokens.take(estimated_tokens) if tokens is not None else 0.0
        state.in_flight += 1
        return Admission(state, charged)

    def settle(self, admission: Admission, actual_tokens: int | None, now: float) -> bool:
        """Return the slot and reconcile tokens with the real usage (None: keep the estimate).
        Only the first call does anything; it returns True, later calls False."""
        if not admission._open:
            return False
        admission._open = False
        state = admission._state
        state.in_flight -= 1
        tokens = state.tokens
        if actual_tokens is not None and tokens is not None:
            tokens.refill(now)
            tokens.take(actual_tokens - admission.charged_tokens)
        return True

    def in_flight(self, key_id: str) -> int:
        state = self._states.get(key_id)
        return state.in_flight if state is not None else 0

    def sweep(self, now: float) -> int:
        """Forget keys whose state equals a fresh one (buckets full, nothing in flight)."""
        idle = [key_id for key_id, state in self._states.items() if state.idle(now)]
        for key_id in idle:
            del self._states[key_id]
        return len(idle)

    def __len__(self) -> int:
        return len(self._states)


def _refusal(state: _KeyState, estimated_tokens: int, now: float) -> RateLimited:
    """The 429 for a request some limit of ``state`` blocks: every blocking limit named, and the wait
    until all of them would let it in."""
    record, requests, tokens = state.record, state.requests, state.tokens
    waits: list[float] = []
    blocked: list[str] = []
    if record.concurrency is not None and state.in_flight >= record.concurrency:
        waits.append(CONCURRENCY_RETRY_S)
        blocked.append(f"concurrent requests (limit {record.concurrency})")
    if requests is not None and requests.refill(now) < 1.0:
        waits.append(requests.wait_for(1.0))
        blocked.append(f"requests per minute (limit {record.rpm})")
    if tokens is not None and tokens.refill(now) < min(estimated_tokens, tokens.capacity):
        waits.append(tokens.wait_for(min(estimated_tokens, tokens.capacity)))
        blocked.append(f"tokens per minute (limit {record.tpm}, this request ~{estimated_tokens})")
    wait = max(waits)
    return RateLimited(f"Rate limit reached for key {record.key_id} on {' and '.join(blocked)}. "
                       f"Retry in {wait:.3f} s.", wait, rate_limit_headers(state, now))


def rate_limit_headers(state: _KeyState, now: float) -> list[tuple[bytes, bytes]]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for the limits the key has."""
    out: list[tuple[bytes, bytes]] = []
    for name, bucket, per_minute in ((b"requests", state.requests, state.record.rpm),
                                     (b"tokens", state.tokens, state.record.tpm)):
        if bucket is None:
            continue
        bucket.refill(now)
        out.append((b"x-ratelimit-limit-" + name, b"%d" % per_minute))
        out.append((b"x-ratelimit-remaining-" + name, b"%d" % max(0, math.floor(bucket.level))))
        out.append((b"x-ratelimit-reset-" + name, _duration(bucket.full_after(now))))
    return out


def _duration(seconds: float) -> bytes:
    """A duration the way OpenAI writes its reset headers: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1.0:
        return b"%dms" % math.ceil(seconds * 1000)
    if seconds < 60.0:
        return b"%ss" % (b"%.3f" % seconds).rstrip(b"0").rstrip(b".")
    minutes, rest = divmod(math.ceil(seconds), 60)
    return b"%dm%ds" % (minutes, rest)

"""Continuous batching: the scheduler loop of one simulated engine replica.

A request (``Sequence``) goes ``waiting -> running -> finished`` (or ``aborted`` when its client
leaves). One asyncio task per replica runs engine steps, each a list of named stages:

1. **admit**: move waiting requests to running, first come first served, while fewer than
   ``max_running_requests`` run and the KV pool can hold the request's uncached prompt pages plus
   room for ``max_tokens`` output tokens. The prefix cache is consulted here: the longest cached
   prefix is locked and only the rest is allocated (``prefix_cache.PageCache``). The head of the
   queue blocks the others, as in SGLang's and vLLM's FCFS policies.
2. **plan**: spend the chunked-prefill budget (``chunked_prefill_tokens``) on the uncached prompt
   tokens of running requests in admission order (a long prompt is split over several steps), and
   let every request whose prompt is complete decode. Prefill and decode share the step, as with
   vLLM's chunked prefill (SGLang alternates prefill and decode batches by default; mixing them
   keeps the model simpler and changes step times only slightly).
3. **run**: the step lasts ``timing.TimingModel.step_seconds`` of *simulated* time, and the loop
   sleeps until the step's end mapped to wall time (``origin + t_end / speed``). Simulated time
   advances only by step durations, and jumps forward to the next arrival when the engine is idle,
   so the timings a request reports (``sim_ttft``) are exactly the model's, whatever the host's
   speed. When the host cannot keep up (huge ``speed``), the wall mapping slides instead of the
   engine bursting to catch up, and the loop still yields (``sleep(0)``) between steps so HTTP
   handlers run. An idle engine waits on an event: no polling.
4. **emit**: a request whose last prompt chunk ran gets its first token; decoding requests get one
   token each, or with EAGLE-3 ``floor(m)`` or ``ceil(m)`` tokens where ``m`` is the profile's
   ``mean_accepted_tokens`` (chosen by a per-request seeded RNG so the mean is exact and runs
   repeat). Newly computed full prompt pages are published to the prefix cache. Finished requests
   release their pages.

Cost per step is O(running requests), with no per-token work beyond a counter and a wake-up of the
request's consumer.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import deque
from dataclasses import dataclass

from engine_nodes.profiles import Speculative
from engine_nodes.sim.prefix_cache import PageCache
from engine_nodes.sim.timing import StepShape, TimingModel


class CapacityError(ValueError):
    """The request can never run on this replica (longer than the context or the whole KV pool)."""


@dataclass(frozen=True)
class EngineLimits:
    max_running_requests: int
    chunked_prefill_tokens: int
    max_context: int


class Sequence:
    """One generation request inside the engine, and the handle its HTTP handler waits on."""

    __slots__ = (
        "rid", "prompt_tokens", "keys", "max_tokens", "words", "_accept_rng",
        "cached_tokens", "computed_tokens", "locked_keys", "private_pages", "produced",
        "finished", "aborted", "admitted", "arrival_sim", "first_token_sim", "finish_sim", "_waiter",
    )

    def __init__(self, rid: str, prompt_tokens: int, keys: list[int], max_tokens: int,
                 words: list[str], digest: int) -> None:
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.keys = keys
        self.max_tokens = max_tokens
        self.words = words
        self._accept_rng = random.Random(digest ^ 0x5EC)
        self.cached_tokens = 0
        self.computed_tokens = 0
        self.locked_keys: list[int] = []
        self.private_pages = 0
        self.produced = 0
        self.finished = False
        self.aborted = False
        self.admitted = False
        self.arrival_sim = 0.0
        self.first_token_sim: float | None = None
        self.finish_sim: float | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def sim_ttft(self) -> float | None:
        return None if self.first_token_sim is None else self.first_token_sim - self.arrival_sim

    async def wait_beyond(self, consumed: int) -> None:
        """Return once more than ``consumed`` tokens exist or the sequence has ended."""
        while self.produced <= consumed and not self.finished:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def accepted_tokens(self, spec: Speculative | None) -> int:
        if spec is None:
            return 1
        base = math.floor(spec.mean_accepted_tokens)
        k = base + (1 if self._accept_rng.random() < spec.mean_accepted_tokens - base else 0)
        return max(1, min(k, spec.num_draft_tokens))


@dataclass
class EngineCounters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    steps: int = 0
    verify_steps: int = 0  # request-steps that verified an EAGLE-3 draft
    accepted_tokens: int = 0  # tokens emitted by those verify steps


class RecentRatio:
    """Sum of values over sum of weights across the last ``size`` samples (a gauge's recent mean)."""

    def __init__(self, size: int) -> None:
        self._items: deque[tuple[float, float]] = deque(maxlen=size)
        self._value = 0.0
        self._weight = 0.0

    def add(self, value: float, weight: float) -> None:
        if len(self._items) == self._items.maxlen:
            old_value, old_weight = self._items[0]
            self._value -= old_value
            self._weight -= old_weight
        self._items.append((value, weight))
        self._value += value
        self._weight += weight

    def ratio(self) -> float:
        return self._value / self._weight if self._weight > 0 else 0.0


class Engine:
    def __init__(self, timing: TimingModel, cache: PageCache, limits: EngineLimits, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.timing = timing
        self.cache = cache
        self.limits = limits
        self.speed = speed
        self.spec = timing.profile.speculative
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.counters = EngineCounters()
        # SGLang refreshes its decode gauges every 40 decode steps (--decode-log-interval).
        self.gen_throughput = RecentRatio(40)  # tokens per simulated second
        self.accept_length = RecentRatio(40)  # tokens per EAGLE-3 verify
        self._work = asyncio.Event()  # set when a request arrives or KV pages are freed
        self._loop = asyncio.get_running_loop()
        self._origin = self._loop.time()
        self._step_end = 0.0  # simulated time at which the current (or last) step ends
        self._idle = True

    def sim_now(self) -> float:
        return (self._loop.time() - self._origin) * self.speed

    def submit(self, seq: Sequence) -> None:
        self.check(seq)
        # While a step runs, an arrival is stamped no later than the step's end, because the host may
        # be behind the simulated clock (then the wall time of the arrival says nothing).
        seq.arrival_sim = self.sim_now() if self._idle else min(self.sim_now(), self._step_end)
        self.waiting.append(seq)
        self._work.set()

    def check(self, seq: Sequence) -> None:
        """Raise CapacityError if ``seq`` can never run here (so a request's sequences go in all or none)."""
        total = seq.prompt_tokens + seq.max_tokens
        if total > self.limits.max_context:
            raise CapacityError(
                f"This model's maximum context length is {self.limits.max_context} tokens. However, you "
                f"requested {total} tokens ({seq.prompt_tokens} in the messages, {seq.max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion."
            )
        if self._pages_for(total) > self.cache.capacity_pages:
            raise CapacityError(
                f"The request needs {total} tokens of KV cache but the pool holds "
                f"{self.cache.capacity_tokens} tokens."
            )

    def abort(self, seq: Sequence) -> None:
        """The client went away: the request leaves the queue or the batch now and frees its pages."""
        if seq.finished:
            return
        seq.aborted = True
        self._finish(seq)
        self.counters.aborted_requests += 1
        if seq.admitted:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)

    async def run(self) -> None:
        while True:
            if not self.running and not self.waiting:
                self._idle = True
                self._work.clear()
                await self._work.wait()
                self._idle = False
                continue
            self._admit()
            prefill, decode, shape = self._plan()
            if not prefill and not decode:
                if self.waiting and self.waiting[0].arrival_sim > self._step_end:
                    self._step_end = self.waiting[0].arrival_sim  # idle until the next arrival
                    continue
                # Nothing admissible: KV is full of pages that running requests will free.
                self._work.clear()
                await self._work.wait()
                continue
            seconds = self.timing.step_seconds(shape)
            await self._sleep_until_step_end(seconds)
            self._emit(prefill, decode, seconds)

    # -- stages ------------------------------------------------------------------------------

    def _admit(self) -> None:
        cache = self.cache
        page = cache.page_size
        while self.waiting and len(self.running) < self.limits.max_running_requests:
            seq = self.waiting[0]
            if seq.arrival_sim > self._step_end:
                break  # arrives during the coming step: it joins the next one
            # At least the last prompt token is always computed, so it yields the first output token.
            matchable = min(len(seq.keys), (seq.prompt_tokens - 1) // page)
            matched = cache.match(seq.keys, matchable)
            private = self._pages_for(seq.prompt_tokens + seq.max_tokens) - matched
            if not cache.try_admit(seq.keys, matched, private):
                break
            self.waiting.popleft()
            seq.admitted = True
            seq.locked_keys = seq.keys[:matched]
            seq.private_pages = private
            seq.cached_tokens = seq.computed_tokens = matched * page
            cache.record_lookup(seq.prompt_tokens, seq.cached_tokens)
            self.counters.prompt_tokens += seq.prompt_tokens
            self.running.append(seq)

    def _plan(self) -> tuple[list[tuple[Sequence, int]], list[Sequence], StepShape]:
        budget = self.limits.chunked_prefill_tokens
        prefill: list[tuple[Sequence, int]] = []
        decode: list[Sequence] = []
        prefill_tokens = prefill_context = decode_context = 0
        for seq in self.running:
            remaining = seq.prompt_tokens - seq.computed_tokens
            if remaining > 0:
                if budget == 0:
                    continue
                chunk = min(remaining, budget)
                budget -= chunk
                prefill.append((seq, chunk))
                prefill_tokens += chunk
                prefill_context += int(chunk * (seq.computed_tokens + chunk / 2))
            else:
                decode.append(seq)
                decode_context += seq.prompt_tokens + seq.produced
        shape = StepShape(prefill_tokens, prefill_context, len(decode), decode_context)
        return prefill, decode, shape

    async def _sleep_until_step_end(self, seconds: float) -> None:
        self._step_end += seconds
        delay = self._origin + self._step_end / self.speed - self._loop.time()
        if delay < 0:
            # The host fell behind: slide the wall-clock mapping rather than burst to catch up, so
            # simulated time stays continuous (and reported timings exact) at any speed.
            self._origin -= delay
            delay = 0
        await asyncio.sleep(delay)

    def _emit(self, prefill: list[tuple[Sequence, int]], decode: list[Sequence], seconds: float) -> None:
        now = self._step_end
        counters = self.counters
        counters.steps += 1
        emitted = 0
        any_finished = False
        for seq, chunk in prefill:
            if seq.finished:
                continue
            seq.computed_tokens += chunk
            self._publish_pages(seq)
            if seq.computed_tokens == seq.prompt_tokens:
                seq.first_token_sim = now
                emitted += self._produce(seq, 1, now)
                any_finished |= seq.finished
        spec = self.spec
        accepted = 0
        for seq in decode:
            if seq.finished:
                continue
            k = seq.accepted_tokens(spec)
            accepted += k
            emitted += self._produce(seq, k, now)
            any_finished |= seq.finished
        if decode:
            self.gen_throughput.add(emitted, seconds)
            if spec is not None:
                counters.verify_steps += len(decode)
                counters.accepted_tokens += accepted
                self.accept_length.add(accepted, len(decode))
        counters.generation_tokens += emitted
        if any_finished:
            self.running = [s for s in self.running if not s.finished]

    # -- helpers -----------------------------------------------------------------------------

    def _produce(self, seq: Sequence, tokens: int, now: float) -> int:
        n = min(tokens, seq.max_tokens - seq.produced)
        seq.produced += n
        if seq.produced == seq.max_tokens:
            seq.finish_sim = now
            self._finish(seq)
            self.counters.finished_requests += 1
        seq.wake()
        return n

    def _publish_pages(self, seq: Sequence) -> None:
        full = min(seq.computed_tokens // self.cache.page_size, len(seq.keys))
        for key in seq.keys[len(seq.locked_keys):full]:
            self.cache.publish(key)
            seq.locked_keys.append(key)
            seq.private_pages -= 1

    def _finish(self, seq: Sequence) -> None:
        seq.finished = True
        if seq.admitted:
            self.cache.release(seq.locked_keys, seq.private_pages)
            seq.locked_keys = []
            seq.private_pages = 0
            self._work.set()
        seq.wake()

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.cache.page_size)

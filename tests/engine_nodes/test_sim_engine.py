"""The scheduler, prefix cache and timing model in-process: batching rules and their costs."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from dataclasses import replace

import pytest

from engine_nodes import profiles
from engine_nodes.sim import tokens
from engine_nodes.sim.engine import CapacityError, Engine, EngineLimits, Sequence
from engine_nodes.sim.explain import PUBLISHED, predict
from engine_nodes.sim.prefix_cache import PageCache
from engine_nodes.sim.timing import StepShape, TimingModel
from tests.engine_nodes.conftest import REPO

PROFILE = profiles.get("vllm-h100-llama8b-batch")


def sequence(prompt: bytes, max_tokens: int = 4, page_size: int = 16) -> Sequence:
    digest = tokens.prompt_digest(0, "m", prompt)
    return Sequence(rid="r", prompt_tokens=tokens.token_count(prompt), keys=tokens.page_keys(prompt, page_size, 1),
                    max_tokens=max_tokens, words=tokens.output_words(digest, max_tokens), digest=digest)


@contextlib.asynccontextmanager
async def running_engine(profile=PROFILE, capacity_pages: int = 10_000, speed: float = 1e6):
    cache = PageCache(capacity_pages, profile.page_size)
    engine = Engine(TimingModel(profile), cache,
                    EngineLimits(profile.max_running_requests, profile.chunked_prefill_tokens, 131072), speed)
    task = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def finish(seq: Sequence) -> None:
    async with asyncio.timeout(5):
        await seq.wait_beyond(seq.max_tokens - 1)


# -- prefix cache ----------------------------------------------------------------------------

def test_match_stops_at_the_first_missing_page():
    cache = PageCache(8, 16)
    assert cache.try_admit([1, 2, 3], 0, 3)
    for key in (1, 2):
        cache.publish(key)
    assert cache.match([1, 2, 3], 3) == 2
    assert cache.match([9, 2], 2) == 0


def test_referenced_pages_are_never_evicted_and_admission_is_all_or_nothing():
    cache = PageCache(4, 16)
    assert cache.try_admit([1, 2], 0, 2)
    cache.publish(1)
    cache.publish(2)
    assert not cache.try_admit([], 0, 3)  # 2 free, the 2 indexed pages are still referenced
    assert cache.free_pages == 2 and cache.used_pages == 2


def test_private_pages_are_those_running_requests_own_and_nobody_can_hit():
    cache = PageCache(8, 16)
    assert cache.try_admit([1, 2, 3], 0, 4)  # three prompt pages, one page of output room
    assert cache.private_pages == 4
    cache.publish(1)
    cache.publish(2)
    assert cache.private_pages == 2 and cache.used_pages == 4  # computed pages are hittable now
    cache.release([1, 2], 2)
    assert cache.private_pages == 0 and cache.indexed_pages == 2


def test_eviction_takes_least_recently_released_leaves_first():
    cache = PageCache(4, 16)
    assert cache.try_admit([1, 2], 0, 2)
    cache.publish(1)
    cache.publish(2)
    cache.release([1, 2], 0)  # released last-to-first: the leaf 2 is older than its root 1
    assert cache.used_pages == 0
    assert cache.try_admit([], 0, 3)
    assert cache.stats.evicted_pages == 1
    assert cache.match([1, 2], 2) == 1  # the root survived, the leaf went


# -- scheduler -------------------------------------------------------------------------------

async def test_long_prompt_is_prefilled_in_chunks_of_the_budget():
    profile = replace(PROFILE, chunked_prefill_tokens=512)
    async with running_engine(profile) as engine:
        seq = sequence(b"x" * 4 * 1500, max_tokens=1)  # 1500 tokens: chunks of 512, 512, 476
        engine.submit(seq)
        await finish(seq)
    assert engine.counters.steps == 3
    assert seq.produced == 1


async def test_cached_prefix_is_not_prefilled_again():
    async with running_engine() as engine:
        prompt = b"shared system prompt " * 400
        cold = sequence(prompt)
        engine.submit(cold)
        await finish(cold)
        warm = sequence(prompt)
        engine.submit(warm)
        await finish(warm)
    assert cold.cached_tokens == 0
    assert warm.cached_tokens == (warm.prompt_tokens - 1) // 16 * 16
    assert warm.sim_ttft < cold.sim_ttft / 5


async def test_running_requests_are_capped_and_the_rest_wait():
    profile = replace(PROFILE, max_running_requests=2)
    async with running_engine(profile, speed=1.0) as engine:
        seqs = [sequence(f"prompt {i}".encode() * 50, max_tokens=500) for i in range(5)]
        for seq in seqs:
            engine.submit(seq)
        await asyncio.sleep(0.02)
        assert len(engine.running) == 2 and len(engine.waiting) == 3
        engine.abort(seqs[0])
        await asyncio.sleep(0.02)
        assert len(engine.running) == 2 and len(engine.waiting) == 2  # the freed slot was refilled


async def test_abort_frees_the_requests_kv_pages():
    async with running_engine(speed=1.0) as engine:
        seq = sequence(b"y" * 4000, max_tokens=1000)
        engine.submit(seq)
        await asyncio.sleep(0.02)
        assert engine.cache.used_pages > 0
        engine.abort(seq)
        assert engine.cache.used_pages == 0 and seq.aborted and not engine.running


async def test_request_longer_than_the_pool_is_refused():
    async with running_engine(capacity_pages=4) as engine:
        with pytest.raises(CapacityError):
            engine.submit(sequence(b"z" * 4 * 100, max_tokens=1))


# -- timing model ----------------------------------------------------------------------------

def test_decode_is_memory_bound_at_batch_one_and_prefill_compute_bound():
    model = TimingModel(PROFILE)
    one = model.step_seconds(StepShape(decode_requests=1, decode_context_tokens=100))
    weights_only = model.weight_bytes / (PROFILE.tp * model.hw.hbm_tb_s * 1e12 * model.eff.hbm)
    assert weights_only < one < weights_only * 1.2
    assert model.ttft_seconds(8000) > 10 * model.ttft_seconds(100)


def test_moe_reads_only_routed_experts_at_small_batch():
    moe = TimingModel(replace(PROFILE, model="qwen3-30b-a3b"))
    assert moe.weight_bytes_read(1) < 0.25 * moe.weight_bytes
    assert moe.weight_bytes_read(4096) == pytest.approx(moe.weight_bytes, rel=1e-3)


def test_eagle3_emits_its_mean_accepted_tokens_per_verify():
    spec = profiles.get("sglang-h100-llama8b-fp8-eagle3").speculative
    seq = sequence(b"p")
    draws = [seq.accepted_tokens(spec) for _ in range(5000)]
    assert sum(draws) / len(draws) == pytest.approx(spec.mean_accepted_tokens, abs=0.05)
    assert set(draws) <= {2, 3}


def test_predictions_stay_within_a_factor_of_two_of_every_published_figure():
    for ref in PUBLISHED:
        profile = next(p for p in profiles.PROFILES.values() if p.model == ref.model)
        spec = profiles.get("sglang-h100-llama8b-fp8-eagle3").speculative if ref.speculative else None
        setup = replace(profile, hardware=ref.hardware, quantization=ref.quantization, tp=ref.tp, speculative=spec)
        predicted = predict(TimingModel(setup), ref.metric, ref.concurrency, ref.prompt_tokens, ref.output_tokens)
        assert 0.5 < predicted / ref.value_ms < 2.0, ref


def test_explain_prints_every_profile_next_to_its_sources():
    out = subprocess.run([sys.executable, "-m", "engine_nodes", "sim", "--explain"], cwd=REPO, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    for name in profiles.PROFILES:
        assert name in out
    assert out.count("published") >= len(PUBLISHED)
    assert "no published figure found" in out  # said, not invented, where nothing was found
    assert "arXiv:2503.01840" in out and "NIM" in out

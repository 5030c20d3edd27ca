"""Per-key limits: token buckets that refuse with the real refill time, and slots returned exactly once."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import limits
from gateway.auth import ANONYMOUS, KeyRecord
from gateway.limits import Admission, Limiter, RateLimited


def admit_all(limiter: Limiter, record: KeyRecord, n: int, now: float, tokens: int = 1) -> list[Admission]:
    admitted = []
    for _ in range(n):
        try:
            admitted.append(limiter.admit(record, tokens, now))
        except RateLimited:
            pass
    return admitted


def refusal(limiter: Limiter, record: KeyRecord, tokens: int, now: float) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        limiter.admit(record, tokens, now)
    return info.value


def header(error: RateLimited, name: bytes) -> bytes:
    return dict(error.headers())[name]


def test_burst_of_120_at_60_rpm_admits_exactly_60_and_the_61st_waits_one_second():
    limiter, key = Limiter(), KeyRecord(key_id="team-a", rpm=60, tpm=20000)
    assert len(admit_all(limiter, key, 60, now=0.0)) == 60
    refused = [refusal(limiter, key, 1, 0.0) for _ in range(60)]
    assert all(r.retry_after_s == pytest.approx(1.0) for r in refused)
    error = refused[0]
    assert error.kind.status == 429
    assert (error.kind.type, error.kind.code) == ("rate_limit_error", "rate_limit_exceeded")
    assert (header(error, b"retry-after"), header(error, b"retry-after-ms")) == (b"1", b"1000")
    assert header(error, b"x-should-retry") == b"true"
    assert "requests per minute" in error.message and "team-a" in error.message


def test_retry_after_is_the_true_refill_time_not_earlier_and_not_later():
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=60)
    admit_all(limiter, key, 60, now=10.0)
    wait = refusal(limiter, key, 1, 10.4).retry_after_s
    assert wait == pytest.approx(0.6)
    refusal(limiter, key, 1, 10.4 + wait - 0.01)
    limiter.admit(key, 1, 10.4 + wait + 1e-9)


def test_tokens_per_minute_refuses_with_the_time_the_estimate_takes_to_refill():
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=1000, tpm=20000)
    assert len(admit_all(limiter, key, 30, now=0.0, tokens=1000)) == 20
    error = refusal(limiter, key, 1000, 0.0)
    assert error.retry_after_s == pytest.approx(1000 / (20000 / 60))  # 3 s
    assert header(error, b"retry-after") == b"3" and "tokens per minute" in error.message
    limiter.admit(key, 1000, 3.0 + 1e-9)


def test_refused_request_charges_no_bucket():
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=10, tpm=100)
    limiter.admit(key, 95, 0.0)
    for _ in range(20):
        refusal(limiter, key, 50, 0.0)  # blocked on tokens: must not spend request units
    assert len(admit_all(limiter, key, 20, now=0.0, tokens=0)) == 9


def test_request_larger_than_the_token_burst_gets_in_once_the_bucket_is_full_and_leaves_debt():
    limiter, key = Limiter(), KeyRecord(key_id="k", tpm=600)  # 10 tokens/s
    admission = limiter.admit(key, 1500, 0.0)
    assert admission.charged_tokens == 1200  # floored at minus one capacity
    assert refusal(limiter, key, 10, 0.0).retry_after_s == pytest.approx((600 + 10) / 10)


def test_settle_refunds_an_over_estimate():
    limiter, key = Limiter(), KeyRecord(key_id="k", tpm=1000)
    admission = limiter.admit(key, 1000, 0.0)
    refusal(limiter, key, 900, 0.0)
    assert limiter.settle(admission, 100, 0.0)
    limiter.admit(key, 900, 0.0)


def test_settle_charges_an_under_estimate_as_debt_paid_back_by_refill():
    limiter, key = Limiter(), KeyRecord(key_id="k", tpm=600)  # 10 tokens/s
    admission = limiter.admit(key, 100, 0.0)
    limiter.settle(admission, 700, 0.0)  # level 600 - 700 = -100
    assert refusal(limiter, key, 100, 0.0).retry_after_s == pytest.approx(20.0)


def test_debt_is_floored_so_no_wait_exceeds_two_minutes():
    limiter, key = Limiter(), KeyRecord(key_id="k", tpm=600)
    limiter.settle(limiter.admit(key, 10, 0.0), 10**9, 0.0)
    wait = refusal(limiter, key, 10**9, 0.0).retry_after_s
    assert wait == pytest.approx(120.0)
    assert int(header(refusal(limiter, key, 10**9, 0.0), b"retry-after")) <= 120


def test_settle_without_usage_keeps_the_estimate():
    limiter, key = Limiter(), KeyRecord(key_id="k", tpm=1000)
    assert limiter.settle(limiter.admit(key, 600, 0.0), None, 0.0) is True
    assert refusal(limiter, key, 500, 0.0).retry_after_s > 0  # 400 tokens left, not the 1000 of no charge
    assert not limiter.admit(key, 400, 0.0).settled


def test_concurrency_slot_is_returned_exactly_once_even_if_settle_is_called_twice():
    limiter, key = Limiter(), KeyRecord(key_id="k", concurrency=2)
    first, second = limiter.admit(key, 1, 0.0), limiter.admit(key, 1, 0.0)
    error = refusal(limiter, key, 1, 0.0)
    assert error.retry_after_s == limits.CONCURRENCY_RETRY_S and "concurrent" in error.message
    assert limiter.settle(first, 1, 0.0) is True
    assert limiter.settle(first, 1, 0.0) is False
    assert first.settled and limiter.in_flight("k") == 1
    third = limiter.admit(key, 1, 0.0)
    refusal(limiter, key, 1, 0.0)  # the double settle did not free a second slot
    for admission in (second, third, second, third):
        limiter.settle(admission, 1, 0.0)
    assert limiter.in_flight("k") == 0


def test_another_key_is_unaffected_by_a_key_that_is_rate_limited():
    limiter = Limiter()
    noisy, quiet = KeyRecord(key_id="noisy", rpm=60, tpm=20000), KeyRecord(key_id="quiet", rpm=60, tpm=20000)
    admit_all(limiter, noisy, 120, now=0.0, tokens=100)
    assert len(admit_all(limiter, quiet, 60, now=0.0)) == 60


def test_key_without_limits_is_always_admitted_and_its_in_flight_is_counted():
    limiter = Limiter()
    admissions = admit_all(limiter, ANONYMOUS, 10_000, now=0.0, tokens=10**6)
    assert len(admissions) == 10_000 and limiter.in_flight(ANONYMOUS.key_id) == 10_000
    for admission in admissions:
        limiter.settle(admission, 10**6, 1.0)
    assert limiter.in_flight(ANONYMOUS.key_id) == 0


def test_reloaded_record_with_lower_limits_applies_to_the_same_key_at_once():
    limiter = Limiter()
    admit_all(limiter, KeyRecord(key_id="k", rpm=600), 580, now=0.0)
    tighter = KeyRecord(key_id="k", rpm=60)
    assert len(admit_all(limiter, tighter, 100, now=0.0)) == 20  # what was left, not a fresh bucket
    assert refusal(limiter, tighter, 1, 0.0).retry_after_s == pytest.approx(1.0)


def test_reloaded_record_keeps_a_level_above_the_new_burst_only_up_to_the_new_burst():
    limiter = Limiter()
    admit_all(limiter, KeyRecord(key_id="k", rpm=600), 10, now=0.0)
    assert len(admit_all(limiter, KeyRecord(key_id="k", rpm=60), 100, now=0.0)) == 60


def test_configured_burst_sizes_the_bucket_and_refill_keeps_the_per_minute_rate():
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=60, burst_requests=5)
    assert len(admit_all(limiter, key, 20, now=0.0)) == 5
    assert len(admit_all(limiter, key, 20, now=3.0)) == 3


def test_success_headers_report_limits_remaining_and_time_to_full():
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=60, tpm=20000)
    admissions = admit_all(limiter, key, 10, now=0.0, tokens=500)
    headers = dict(admissions[-1].headers(0.0))
    assert headers == {
        b"x-ratelimit-limit-requests": b"60", b"x-ratelimit-remaining-requests": b"50",
        b"x-ratelimit-reset-requests": b"10s", b"x-ratelimit-limit-tokens": b"20000",
        b"x-ratelimit-remaining-tokens": b"15000", b"x-ratelimit-reset-tokens": b"15s",
    }
    assert dict(admissions[-1].headers(9.5))[b"x-ratelimit-reset-requests"] == b"500ms"
    assert limits._duration(375.2) == b"6m16s" and limits._duration(1.25) == b"1.25s"


def test_sweep_forgets_only_idle_full_keys_and_forgetting_changes_no_answer():
    limiter = Limiter()
    busy, refilling, idle = (KeyRecord(key_id=i, rpm=60) for i in ("busy", "refilling", "idle"))
    limiter.admit(busy, 1, 0.0)
    limiter.settle(limiter.admit(idle, 1, 0.0), 1, 0.0)
    admit_all(limiter, refilling, 30, now=50.0)
    assert limiter.sweep(60.0) == 1 and len(limiter) == 2
    assert limiter.in_flight("busy") == 1
    assert len(admit_all(limiter, refilling, 60, now=60.0)) == 40  # its partial bucket was kept
    assert len(admit_all(limiter, idle, 100, now=60.0)) == 60


def test_periodic_sweep_inside_admit_keeps_the_charge_of_the_request_that_triggered_it():
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=60)
    limiter.settle(limiter.admit(key, 1, 0.0), 1, 0.0)
    for _ in range(limits.SWEEP_EVERY - 2):
        limiter.settle(limiter.admit(ANONYMOUS, 1, 0.0), 1, 0.0)
    # The next admission is number SWEEP_EVERY: the sweep runs and finds this key idle and full.
    assert len(admit_all(limiter, key, 100, now=100.0)) == 60


@given(rpm=st.integers(1, 600), burst=st.integers(1, 100),
       gaps=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=1, max_size=200))
@settings(max_examples=200, deadline=None)
def test_admitted_requests_never_exceed_burst_plus_refill_and_every_retry_after_is_exact(rpm, burst, gaps):
    limiter, key = Limiter(), KeyRecord(key_id="k", rpm=rpm, burst_requests=burst)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        try:
            limiter.admit(key, 1, now)
            admitted += 1
        except RateLimited as e:
            wait = e.retry_after_s
            assert 0.0 < wait <= 60.0 / rpm + 1e-9
            # Probe copies, so the probes do not change the history under test.
            if wait > 1e-3:
                refusal(copy.deepcopy(limiter), key, 1, now + wait - 1e-3)
            copy.deepcopy(limiter).admit(key, 1, now + wait + 1e-6)
    assert admitted <= burst + rpm * now / 60.0 + 1e-6


def test_estimate_is_prompt_bytes_over_four_rounded_up_plus_max_tokens_or_the_default_per_choice():
    assert limits.estimate_tokens(400, 100) == 200
    assert limits.estimate_tokens(401, 0) == 101
    assert limits.estimate_tokens(0, None) == limits.DEFAULT_COMPLETION_ESTIMATE
    assert limits.estimate_tokens(8, None, default_completion=10) == 12
    assert limits.estimate_tokens(400, 100, choices=4) == 100 + 400  # e.g. two prompts, n = 2

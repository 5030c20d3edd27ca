"""Per-target numbers, the markdown table, the PASS/FAIL lines and the JSON record.

- **hit ratio** = sum(cached_tokens) / sum(prompt_tokens) over successful requests, from each
  response's usage; the engines' own counters (``/sim/stats`` ``prefix_hit_tokens /
  prefix_query_tokens``, the sum behind ``sglang:cache_hit_rate``) give the cross-check.
- **% of oracle** = hit ratio / the same-size shared-cache oracle (``oracle.py``).
- **TTFT** p50 / p99: nearest-rank percentiles of the client-measured wall times, in ms. Simulated
  engine time is wall time x ``--speed``.
- **load spread**: per sample, max over mean of the replicas' running + waiting requests, averaged
  over the samples whose mean is positive, taken while requests arrive (the drain after the last
  arrival is left out: its few stragglers say nothing about balance); p90 as well.
- **private KV**: the KV tokens per replica that running requests hold and nobody can hit
  (uncomputed prompt pages, room reserved for output), mean over the same samples. The same-size
  oracle pins nothing; ``replay.py`` also prints the oracle for the room this leaves.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from loadtests.replay_lib.driver import LoadSamples, Outcome
from loadtests.replay_lib.loss import HitLoss
from loadtests.replay_lib.oracle import OracleResult

HIT_TARGET = 0.95  # of the same-size oracle
SPREAD_TARGET = 1.3


@dataclass(frozen=True)
class TargetSummary:
    target: str
    requests: int
    errors: int
    hit_ratio: float
    engine_hit_ratio: float
    of_oracle: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    spread_mean: float
    spread_p90: float
    mean_busy: float  # running + waiting per replica, mean over the samples while requests arrive
    mean_private_kv: float  # kv_private_tokens per replica, mean over the same samples
    wall_s: float
    max_lateness_ms: float
    replica_hit_rates: list[float] = field(default_factory=list)  # each replica's sglang:cache_hit_rate
    # Per replica: prompt tokens looked up, of which hit, and KV pages evicted (/sim/stats).
    replica_work: list[dict[str, int]] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)
    branches: dict[str, float] = field(default_factory=dict)
    hit_loss: HitLoss | None = None  # the hit ratio taken apart (loss.py)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def load_spread(samples: LoadSamples, until_s: float) -> tuple[float, float, float]:
    """(mean spread, p90 spread, mean busy per replica) over the samples taken until ``until_s``."""
    ratios, means = [], []
    for t, loads in zip(samples.times, samples.loads, strict=True):
        if t > until_s:
            break
        mean = sum(loads) / len(loads)
        means.append(mean)
        if mean > 0:
            ratios.append(max(loads) / mean)
    if not ratios:
        return math.nan, math.nan, 0.0
    return sum(ratios) / len(ratios), percentile(ratios, 90), sum(means) / len(means)


def mean_private_kv(samples: LoadSamples, until_s: float) -> float:
    """KV tokens running requests held privately, per replica, mean over the samples until ``until_s``."""
    per_sample = [sum(kv) / len(kv) for t, kv in zip(samples.times, samples.private_kv, strict=True)
                  if t <= until_s and kv]
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


def summarise(
    target: str,
    outcomes: list[Outcome],
    samples: LoadSamples,
    arrivals_end_s: float,
    wall_s: float,
    engine_stats: list[dict],
    replica_hit_rates: list[float],
    oracle: OracleResult,
    branches: dict[str, float],
    hit_loss: HitLoss | None = None,
) -> TargetSummary:
    ok = [o for o in outcomes if o.error is None]
    prompt = sum(o.prompt_tokens for o in ok)
    cached = sum(o.cached_tokens for o in ok)
    hit = cached / prompt if prompt else math.nan
    queried = sum(s["prefix_query_tokens"] for s in engine_stats)
    engine_hit = sum(s["prefix_hit_tokens"] for s in engine_stats) / queried if queried else math.nan
    ttfts = [o.ttft_s * 1000 for o in ok if o.ttft_s is not None]
    spread, spread_p90, busy = load_spread(samples, arrivals_end_s)
    errors = [o.error for o in outcomes if o.error is not None]
    return TargetSummary(
        target=target,
        requests=len(outcomes),
        errors=len(errors),
        hit_ratio=hit,
        engine_hit_ratio=engine_hit,
        of_oracle=hit / oracle.same_size if oracle.same_size else math.nan,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        spread_mean=spread,
        spread_p90=spread_p90,
        mean_busy=busy,
        mean_private_kv=mean_private_kv(samples, arrivals_end_s),
        wall_s=wall_s,
        max_lateness_ms=max((o.lateness_s for o in outcomes), default=0.0) * 1000,
        replica_hit_rates=replica_hit_rates,
        replica_work=[
            {
                "prompt_tokens": s["prefix_query_tokens"],
                "hit_tokens": s["prefix_hit_tokens"],
                "evicted_pages": s["evicted_pages"],
                "completed": s["completed"],
            }
            for s in engine_stats
        ],
        error_examples=sorted(set(errors))[:3],
        branches=branches,
        hit_loss=hit_loss,
    )


def table(rows: list[TargetSummary]) -> str:
    lines = [
        "| target | requests | errors | hit ratio (engines) | % of same-size oracle | TTFT p50 ms | "
        "TTFT p99 ms | load spread mean (p90) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        of_oracle = "n/a" if math.isnan(r.of_oracle) else f"{100 * r.of_oracle:.1f}%"
        lines.append(
            f"| {r.target} | {r.requests} | {r.errors} | {r.hit_ratio:.3f} ({r.engine_hit_ratio:.3f}) | "
            f"{of_oracle} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | "
            f"{r.spread_mean:.2f} ({r.spread_p90:.2f}) |"
        )
    return "\n".join(lines)


def verdicts(ours: TargetSummary, rivals: list[TargetSummary]) -> list[tuple[str, bool | None]]:
    """The issue's three targets for our gateway; None when a rival needed for the check is missing."""
    out: list[tuple[str, bool | None]] = [
        (
            f"hit ratio >= {HIT_TARGET:.0%} of the same-size oracle ({100 * ours.of_oracle:.1f}%)",
            ours.of_oracle >= HIT_TARGET,
        ),
        (f"load spread <= {SPREAD_TARGET} ({ours.spread_mean:.2f})", ours.spread_mean <= SPREAD_TARGET),
    ]
    if rivals:
        names = ", ".join(f"{r.target} {r.ttft_p99_ms:.0f} ms" for r in rivals)
        out.append(
            (
                f"TTFT p99 {ours.ttft_p99_ms:.0f} ms below {names}",
                all(ours.ttft_p99_ms < r.ttft_p99_ms and r.errors < r.requests for r in rivals),
            )
        )
    else:
        out.append(("TTFT p99 below sglang-router (not run)", None))
    return out


def as_json(summary: TargetSummary) -> dict:
    return asdict(summary)

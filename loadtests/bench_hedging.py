"""``python -m loadtests.bench_hedging``: TTFT when one replica stalls, with and without hedging.

A gray failure: one of four simulated SGLang replicas holds every request for ``--stall-s`` before
it starts work (the simulator's ``slow_first_token`` fault), while it keeps passing health checks
and never answers an error, so neither health checks nor error-based ejection catch it. The same open-loop load (``--requests`` streamed
chats with distinct prompts at ``--rate`` per second) goes, one target after the other and each
with a fresh simulator, through:

- ``gateway``: this gateway's defaults (prefix policy, no hedging);
- ``gateway-hedge``: the same with ``hedge_after_s`` (``--hedge-after-s``);
- ``sglang-rr`` / ``sglang-ca``: sglang-router 0.3.2 (PyPI) with ``round_robin`` / ``cache_aware``,
  installed into ``.venv-replay`` on first use, as ``loadtests/replay.py`` does.

It prints, per target, client-side TTFT (first SSE event) p50 / p90 / p99 / max, how many requests
waited longer than the stall, failures, and for our gateway the hedge outcomes from its metrics.
Each target takes about ``requests / rate`` seconds plus start-up; the four take about 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from loadtests.replay_lib import stack
from loadtests.replay_lib.report import percentile

MODEL = "llama-3.1-8b"
TARGETS = ("gateway", "gateway-hedge", "sglang-rr", "sglang-ca")


@dataclass
class Result:
    target: str
    ttfts: list[float]
    failures: int
    hedges: dict[str, float]
    per_replica: list[int]  # requests each replica received, the stalled one first (hedge legs too)


async def _one(session: aiohttp.ClientSession, url: str, index: int) -> float | None:
    """TTFT in seconds of one streamed chat, or None if it failed."""
    body = {"model": MODEL, "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Request {index}: summarise the weather in one line."}]}
    sent = time.perf_counter()
    ttft = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return None
            async for line in resp.content:
                if line.startswith(b"data: ") and ttft is None:
                    ttft = time.perf_counter() - sent
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    return ttft


async def _load(url: str, requests: int, rate: float) -> list[float | None]:
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        tasks = []
        for i in range(requests):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(session, url, i)))
        return await asyncio.gather(*tasks)


def run_target(target: str, args: argparse.Namespace, workdir: Path, router_python: Path | None) -> Result:
    spec = stack.SimSpec(replicas=4, speed=1.0, cache_tokens=200_000, model=MODEL)
    with stack.simulator(spec, workdir) as replicas:
        # The stalled replica: alive, healthy, never failing; only slow to start anything.
        status = stack.http_post_json(replicas.urls[0] + "/sim/faults", {"slow_first_token": args.stall_s})
        assert status == 200, f"could not set the fault on {replicas.urls[0]}"
        if target.startswith("gateway"):
            extra = f"hedge_after_s = {args.hedge_after_s}\n" if target == "gateway-hedge" else ""
            front_cm = stack.gateway(replicas, "prefix", MODEL, workdir, pool_extra=extra)
        else:
            assert router_python is not None
            policy = "round_robin" if target == "sglang-rr" else "cache_aware"
            front_cm = stack.sglang_router(router_python, replicas, policy, workdir)
        with front_cm as front:
            outcomes = asyncio.run(_load(front.url, args.requests, args.rate))
            hedges = stack.counter_by(front.metrics_url, "gateway_hedges_total", "outcome")
        per_replica = [stack.http_json(url + "/sim/stats")["requests"] for url in replicas.urls]
    ttfts = [t for t in outcomes if t is not None]
    return Result(target, ttfts, len(outcomes) - len(ttfts), hedges, per_replica)


def table(results: list[Result], stall_s: float) -> str:
    rows = ["| target | requests ok | failures | TTFT p50 ms | p90 ms | p99 ms | max ms | waited > stall | hedges | requests per replica (stalled first) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = sorted(r.ttfts)
        hedges = ", ".join(f"{k} {v:g}" for k, v in sorted(r.hedges.items())) or "—"
        ms = [f"{percentile(t, p) * 1000:,.0f}" if t else "—" for p in (50, 90, 99)]
        rows.append(f"| {r.target} | {len(t)} | {r.failures} | {' | '.join(ms)} | "
                    f"{(t[-1] * 1000 if t else 0):,.0f} | {sum(1 for x in t if x >= stall_s)} | {hedges} | "
                    f"{' / '.join(map(str, r.per_replica))} |")
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {','.join(TARGETS)}")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (open loop)")
    p.add_argument("--stall-s", type=float, default=3.0, help="the stalled replica's delay before any work")
    p.add_argument("--hedge-after-s", type=float, default=0.5)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}; expected some of {', '.join(TARGETS)}")
    router_python = None
    if any(t.startswith("sglang") for t in targets):
        router_python = stack.ensure_router_venv(lambda m: print(m, file=sys.stderr))
    results = []
    with stack.scratch_dir() as tmp:
        for target in targets:
            print(f"{target}: {args.requests} requests at {args.rate:g}/s ...", file=sys.stderr, flush=True)
            results.append(run_target(target, args, Path(tmp), router_python))
    print(f"One of 4 replicas stalls {args.stall_s:g} s before any work; {args.requests} streamed chats at "
          f"{args.rate:g}/s; hedge_after_s = {args.hedge_after_s:g} for gateway-hedge.\n")
    print(table(results, args.stall_s))
    return 0 if all(r.failures == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

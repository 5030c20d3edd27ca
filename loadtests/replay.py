"""Routing-quality benchmark: replay public traces through a router to N simulated SGLang replicas.

    python loadtests/replay.py                 # full run: 8 replicas, both traces, 4 targets each
    python loadtests/replay.py --quick         # smoke run: 3 replicas, few requests, our gateway only
    python loadtests/replay.py --traces mooncake --targets gateway:prefix,sglang:cache_aware
    python loadtests/replay.py --targets gateway:prefix --gateway-workers 2 [--no-gossip]

For each trace (Mooncake FAST'25 synthetic, hh-rlhf sessions; ``../shared/traces``):

1. **Workload** (``replay_lib/workload.py``): sample and scale the trace, turn each ``hash_id`` into
   a fixed block of text (equal ids, equal text) and render one request body per trace request.
2. **Oracles** (``replay_lib/oracle.py``): the hit ratio of one shared cache, unlimited and of the
   pool's total KV size, over the very pages the simulator will key. After the run, for information,
   a third one: the shared cache of the room that running requests left free under our gateway
   (each replica's mean ``kv_private_tokens`` taken off), since the same-size oracle pins nothing.
3. **Targets**, each on a fresh simulator process (cold caches, zeroed counters) with one router in
   front (``replay_lib/stack.py``): our gateway with the ``prefix`` policy, our gateway with
   ``round_robin`` (baseline), and sglang-router 0.3.2 (``cache_aware`` and ``round_robin``,
   installed into ``.venv-replay`` on first use).
4. **Replay** (``replay_lib/driver.py``): open loop at the trace's arrival times, compressed by the
   simulator's ``--speed`` so the engines see trace time; streaming, with usage.
5. **Report** (``replay_lib/report.py``): a markdown table per trace, the oracle lines, PASS/FAIL for
   the issue's targets (hit ratio >= 95% of the same-size oracle, load spread <= 1.3, TTFT p99
   below both sglang-router policies), each target's hit ratio taken apart into placement, timing
   and eviction losses (``replay_lib/loss.py``), our gateway's routing branches, and a JSON record
   in ``loadtests/results/replay-<timestamp>.json``.

Why the scenarios below look as they do. The machine has 2 cores for clients, routers and 8
simulated replicas, and the whole benchmark must take under 10 minutes, so each target replays for
~25-45 s of wall time at 20-30 requests per second (about what 2 cores can push through client,
router and simulator). Three knobs then put the engines where routing matters:

- ``rate_scale`` compresses the trace's arrivals in simulated time. The simulated 8B model on H100s
  is far faster than the model Mooncake was recorded on, so at the trace's own rate the replicas
  would idle and every policy would look the same; the scale brings them to a steady load where
  queueing, and so the prefill that cache hits save, shows in TTFT. The price: reuses come sooner
  in simulated time, so a few arrive while the first use is still being prefilled, which no router
  can turn into a hit (the oracle ignores this, so it stays an upper bound).
- ``speed`` below 1 runs the simulated engines slower than the wall clock, so that the wall-clock
  request rate the machine can drive keeps about 6-20 requests busy per replica: enough for load
  balance to be measurable (with one or two requests per replica, max/mean is noise).
- ``cache_tokens`` (per replica) is chosen so that the same-size oracle is clearly below the
  unlimited one (the capacity binds) while running requests still leave most of each pool to cached
  prefixes. hh-rlhf prompts are short (about 94 tokens): there the KV pool must still hold the
  longest request, so capacity hardly binds and the trace tests session affinity instead.

Every such choice is printed in the report header and stored in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_nodes import profiles
from gateway.ledger import FLUSH_INTERVAL_S
from loadtests.replay_lib import report, stack
from loadtests.replay_lib.driver import engine_counters, engine_metric, engine_requests, replay
from loadtests.replay_lib.loss import hit_loss, placements
from loadtests.replay_lib.oracle import shared_cache_oracles
from loadtests.replay_lib.workload import (
    HH_BLOCK_TOKENS,
    NO_CAP,
    BlockText,
    Shaping,
    load_mooncake,
    load_sessions,
    render,
)

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT.parent / "shared" / "traces"
RESULTS = ROOT / "loadtests" / "results"
MODEL = "llama-3.1-8b"
PROFILE = profiles.get(profiles.DEFAULT_PROFILE["sglang"])  # what the simulator runs without --profile
ALL_TARGETS = ("gateway:prefix", "gateway:round_robin", "sglang:cache_aware", "sglang:round_robin")


@dataclass(frozen=True)
class Scenario:
    trace: str  # "mooncake" or "hh_rlhf"
    shaping: Shaping
    speed: float  # simulated seconds per wall second
    cache_tokens: int  # KV pool per replica


FULL = {
    "mooncake": Scenario(
        "mooncake",
        Shaping(
            block_tokens=128,
            max_requests=1000,
            group_sample=4,
            max_blocks=64,
            max_output_tokens=256,
            rate_scale=240.0,
        ),
        speed=0.1,
        cache_tokens=65536,
    ),
    "hh_rlhf": Scenario(
        "hh_rlhf",
        Shaping(block_tokens=HH_BLOCK_TOKENS, max_requests=800, max_output_tokens=256, rate_scale=1000.0),
        speed=0.05,
        cache_tokens=4096,
    ),
}
# Smoke run: a few requests that still reuse prefixes (1 in 64 Mooncake groups keeps documents with
# many questions early on), on 3 replicas, fast.
QUICK = {
    "mooncake": replace(
        FULL["mooncake"],
        shaping=replace(FULL["mooncake"].shaping, max_requests=40, group_sample=64),
        speed=0.5,
    ),
    "hh_rlhf": replace(FULL["hh_rlhf"], shaping=replace(FULL["hh_rlhf"].shaping, max_requests=60), speed=0.5),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    scenarios = QUICK if args.quick else FULL
    replicas = args.replicas or (3 if args.quick else 8)
    targets = (
        args.targets.split(",") if args.targets else (["gateway:prefix"] if args.quick else list(ALL_TARGETS))
    )
    if args.no_gossip and args.gateway_workers < 2:
        raise SystemExit("--no-gossip needs --gateway-workers 2 or more: one process has no one to tell")
    for t in targets:
        if t not in ALL_TARGETS:
            raise SystemExit(f"unknown target {t!r}; expected some of {', '.join(ALL_TARGETS)}")
    started = time.monotonic()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    record: dict = {
        "started": datetime.now(UTC).isoformat(),
        "git_head": head.stdout.strip() or None,  # the working tree may differ from it
        "replicas": replicas,
        "traces": {},
    }
    router_python, router_problem = None, None
    if any(t.startswith("sglang:") for t in targets):
        try:
            router_python = stack.ensure_router_venv(_log)
        except (OSError, subprocess.CalledProcessError, stack.StackError) as e:
            router_problem = f"sglang-router cannot run here: {e}"
            _log(router_problem)
    record["sglang_router"] = router_problem or stack.ROUTER_PACKAGE
    processes = stack.GatewayProcesses(args.gateway_workers, not args.no_gossip)
    record["gateway_processes"] = asdict(processes)
    for name in args.traces.split(","):
        scenario = _override(scenarios[name], args)
        record["traces"][name] = run_trace(scenario, replicas, targets, router_python, router_problem, processes)
    record["wall_s"] = time.monotonic() - started
    print(f"\ntotal wall time {record['wall_s']:.0f} s")
    out = Path(args.json) if args.json else RESULTS / f"replay-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=_json_default))
    print(f"JSON: {out}")
    return 0


def run_trace(
    scenario: Scenario,
    replicas: int,
    targets: list[str],
    router_python: Path | None,
    router_problem: str | None,
    processes: stack.GatewayProcesses,
) -> dict:
    shaping = scenario.shaping
    if scenario.trace == "mooncake":
        requests = load_mooncake(TRACES / "mooncake" / "synthetic_trace.jsonl", shaping)
    else:
        requests = load_sessions(TRACES / "hh_rlhf" / "hh_harmless_test_sessions.jsonl", shaping)
    items = render(requests, BlockText(scenario.trace, shaping.block_tokens), MODEL)
    oracle = shared_cache_oracles(items, MODEL, PROFILE.page_size, replicas * scenario.cache_tokens)
    arrivals_end = requests[-1].arrival_s / scenario.speed
    header = _header(scenario, replicas, requests, oracle, arrivals_end, processes)
    print("\n" + header, flush=True)
    rows: list[report.TargetSummary] = []
    failures: dict[str, str] = {}
    spec = stack.SimSpec(replicas, scenario.speed, scenario.cache_tokens, MODEL)
    for target in targets:
        kind, policy = target.split(":")
        if kind == "sglang" and router_python is None:
            continue
        try:
            summary = _run_target(
                target, kind, policy, spec, items, scenario.speed, arrivals_end, oracle, router_python, processes
            )
        except stack.StackError as e:
            failures[target] = str(e)
            print(f"  {target}: could not run: {e}", flush=True)
            continue
        rows.append(summary)
        print(
            f"  {target}: {summary.requests} requests, {summary.errors} errors, hit {summary.hit_ratio:.3f}, "
            f"TTFT p99 {summary.ttft_p99_ms:.0f} ms, spread {summary.spread_mean:.2f} at mean busy "
            f"{summary.mean_busy:.1f} per replica, "
            f"wall {summary.wall_s:.1f} s, max dispatch lateness {summary.max_lateness_ms:.0f} ms",
            flush=True,
        )
    print("\n" + report.table(rows))
    print(f"\noracle, shared cache of unlimited size: hit ratio {oracle.unlimited:.3f}")
    print(
        f"oracle, shared LRU cache of {replicas} x {scenario.cache_tokens} tokens: "
        f"hit ratio {oracle.same_size:.3f}"
    )
    ours = next((r for r in rows if r.target == "gateway:prefix"), None)
    verdicts: list[tuple[str, bool | None]] = []
    room_oracle = None
    if ours is not None:
        # Informational, not a target: what one shared cache reaches in the room running requests
        # left free under our routing (the same-size oracle pins nothing).
        room = max(1, round(scenario.cache_tokens - ours.mean_private_kv))
        room_oracle = shared_cache_oracles(items, MODEL, PROFILE.page_size, replicas * room).same_size
        print(
            f"oracle, shared LRU cache of the room running requests left under gateway:prefix "
            f"({replicas} x {room} tokens, mean): hit ratio {room_oracle:.3f}"
            + (f"; gateway:prefix reached {100 * ours.hit_ratio / room_oracle:.1f}% of it" if room_oracle else "")
        )
        rivals = [r for r in rows if r.target.startswith("sglang:")]
        verdicts = report.verdicts(ours, rivals)
        for text, ok in verdicts:
            print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}: gateway:prefix {text}")
        if router_problem:
            print(f"note: {router_problem}")
    for r in rows:
        if r.hit_loss is not None:
            print(f"{r.target} hit ratio step by step (replay_lib/loss.py): {r.hit_loss.line()}")
        if r.branches:
            shown = ", ".join(f"{k}={v:.0f}" for k, v in sorted(r.branches.items()))
            print(f"{r.target} routing branches: {shown}")
        if r.error_examples:
            print(f"{r.target} errors, e.g.: {r.error_examples}")
    return {
        "header": header,
        "scenario": asdict(scenario),
        "oracle": asdict(oracle),
        "room_oracle_same_size": room_oracle,
        "targets": [report.as_json(r) for r in rows],
        "failures": failures,
        "verdicts": [{"check": t, "pass": ok} for t, ok in verdicts],
    }


def _run_target(
    target: str,
    kind: str,
    policy: str,
    spec: stack.SimSpec,
    items,
    speed: float,
    arrivals_end: float,
    oracle,
    router_python: Path | None,
    processes: stack.GatewayProcesses,
) -> report.TargetSummary:
    with stack.scratch_dir() as tmp, stack.simulator(spec, Path(tmp)) as reps:
        if kind == "gateway":
            front_cm = stack.gateway(reps, policy, spec.model, Path(tmp), processes=processes)
        else:
            assert router_python is not None
            front_cm = stack.sglang_router(router_python, reps, policy, Path(tmp))
        with front_cm as front:
            result = asyncio.run(replay(front.url, items, speed, reps.urls))
            time.sleep(2 * FLUSH_INTERVAL_S)  # the last requests' decisions reach the metrics in batches
            branches = (stack.counter_by(front.metrics_url, "gateway_routing_decisions_total", "branch")
                        if kind == "gateway" else {})
            engine_stats = asyncio.run(engine_counters(reps.urls))
            hit_rates = asyncio.run(engine_metric(reps.urls, "sglang:cache_hit_rate"))
            logs = asyncio.run(engine_requests(reps.urls, 2 * len(items)))
    loss = hit_loss(items, result.outcomes, placements(items, logs), PROFILE.page_size, MODEL)
    return report.summarise(
        target,
        result.outcomes,
        result.samples,
        arrivals_end,
        result.wall_s,
        engine_stats,
        hit_rates,
        oracle,
        branches,
        loss,
    )


def _header(s: Scenario, replicas: int, requests, oracle, arrivals_end: float,
            processes: stack.GatewayProcesses) -> str:
    sh = s.shaping
    trace_span = requests[-1].arrival_s * sh.rate_scale
    outs = [r.output_tokens for r in requests]
    ins = [r.input_tokens for r in requests]
    if s.trace == "mooncake":
        sampling = (
            f"1 in {sh.group_sample} prefix groups (by a hash of the first hash id), their first "
            f"{len(requests)} requests"
        )
        api = "/v1/completions, the block text as the prompt"
    else:
        sampling = f"the first {len(requests)} requests of whole sessions"
        api = (
            "/v1/chat/completions, a chat growing turn by turn, X-Session-ID per session; "
            "a turn waits for the previous turn's answer"
        )
    cap = f"{sh.max_blocks} blocks" if sh.max_blocks < NO_CAP else "none"
    lines = [
        f"## {s.trace}: {len(requests)} requests, {replicas} replicas in one simulator process "
        f"(SGLang flavour, profile {PROFILE.name}, served as {MODEL})",
        f"- sampling: {sampling}, spanning {trace_span:.0f} s of trace time",
        f"- requests: {api}; {sh.block_tokens} tokens per trace block; prompt cap {cap}; output cap "
        f"{sh.max_output_tokens} tokens; prompt tokens mean {sum(ins) / len(ins):.0f} (max {max(ins)}), "
        f"output tokens mean {sum(outs) / len(outs):.0f}",
        f"- time: simulated time = trace time / {sh.rate_scale:g} (rate scale); simulator --speed "
        f"{s.speed:g}, replay compressed to match (wall = simulated / {s.speed:g}); arrivals span "
        f"{arrivals_end:.1f} s of wall time",
        f"- KV pool: --cache-tokens {s.cache_tokens} per replica (pages of {PROFILE.page_size} tokens); "
        f"oracles over {oracle.prompt_tokens} prompt tokens",
        f"- routers: our gateway ({processes.describe()}) with {_gateway_settings()} (access log off), sglang-router "
        f"{stack.ROUTER_PACKAGE.split('==')[1]} with default policy settings (--log-level warn)",
        "- TTFT: wall-clock ms measured by the client (x speed = simulated engine time); load spread: "
        "/sim/stats running + waiting per replica every 100 ms, while requests arrive",
    ]
    return "\n".join(lines)


def _gateway_settings() -> str:
    """The gateway's routing settings as the run overrides them (the gateway reads the same
    environment), so that a table says what it measured."""
    prefix = "EDGE_GATEWAY__ROUTING__"
    overrides = sorted(f"{k[len(prefix):].lower()} = {v}" for k, v in os.environ.items() if k.startswith(prefix))
    return f"routing overrides {', '.join(overrides)}" if overrides else "default routing settings"


def _override(s: Scenario, args: argparse.Namespace) -> Scenario:
    shaping = s.shaping
    if args.max_requests:
        shaping = replace(shaping, max_requests=args.max_requests)
    if args.rate_scale:
        shaping = replace(shaping, rate_scale=args.rate_scale)
    return replace(
        s, shaping=shaping, speed=args.speed or s.speed, cache_tokens=args.cache_tokens or s.cache_tokens
    )


def _json_default(obj: object) -> object:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 3 replicas, few requests, our gateway only"
    )
    p.add_argument("--traces", default="mooncake,hh_rlhf")
    p.add_argument("--targets", help=f"comma-separated, from {','.join(ALL_TARGETS)}")
    p.add_argument("--replicas", type=int)
    p.add_argument("--max-requests", type=int)
    p.add_argument("--rate-scale", type=float)
    p.add_argument("--speed", type=float)
    p.add_argument("--cache-tokens", type=int)
    p.add_argument("--gateway-workers", type=int, default=1,
                   help="our gateway's worker processes; the replay's pooled connections spread over them")
    p.add_argument("--no-gossip", action="store_true",
                   help="with --gateway-workers, the workers do not share placements (gateway/gossip.py), "
                        "which by default they do")
    p.add_argument(
        "--json", help="where to write the JSON record (default loadtests/results/replay-<time>.json)"
    )
    return p


if __name__ == "__main__":
    sys.exit(main())

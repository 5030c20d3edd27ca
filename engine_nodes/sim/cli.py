"""``engine-node sim``: run K simulated replicas in one process, or explain the timing model.

    engine-node sim --flavor sglang|vllm --model NAME --port N [--replicas K] [--profile NAME]
                    [--speed X] [--seed S] [--host 127.0.0.1] [--cache-tokens N] [fault flags]
    engine-node sim --explain [--profile NAME]

Replica ``i`` listens on ``port + i``. When all listen, one line ``READY <port> <port> ...`` goes to
stdout. SIGTERM or SIGINT stops every replica and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from engine_nodes import profiles
from engine_nodes.sim.explain import explain
from engine_nodes.sim.faults import Faults
from engine_nodes.sim.server import Replica, ReplicaConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine-node sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", choices=("sglang", "vllm"))
    parser.add_argument("--model", help="served model name, listed by /v1/models and echoed in responses")
    parser.add_argument("--port", type=int, help="port of the first replica")
    parser.add_argument("--replicas", type=int, default=1, help="replicas on consecutive ports (default 1)")
    parser.add_argument("--profile", help="launch profile (default: engine_nodes.profiles.DEFAULT_PROFILE[flavor])")
    parser.add_argument("--speed", type=float, default=1.0, help="simulated seconds per wall second (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of output text and error faults (default 0)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cache-tokens", type=int, help="KV pool size in tokens (default: from the profile)")
    parser.add_argument("--explain", action="store_true",
                        help="print predicted TTFT and inter-token latency next to published figures, then exit")
    faults = parser.add_argument_group("faults (also settable at run time with POST /sim/faults)")
    faults.add_argument("--error-rate", type=float, default=0.0)
    faults.add_argument("--error-status", type=int, default=500)
    faults.add_argument("--hang-after-chunks", type=int)
    faults.add_argument("--reset-after-chunks", type=int)
    faults.add_argument("--garbage-after-chunks", type=int)
    faults.add_argument("--slow-first-token", type=float, default=0.0, metavar="SECONDS")
    faults.add_argument("--refuse-connections", action="store_true")
    faults.add_argument("--flap-health", type=float, default=0.0, metavar="PERIOD_S")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.explain:
        names = [args.profile] if args.profile else sorted(profiles.PROFILES)
        try:
            print(explain([profiles.get(name) for name in names]))
        except KeyError as exc:
            parser.error(str(exc.args[0]))
        return 0
    if args.flavor is None or args.model is None or args.port is None:
        parser.error("--flavor, --model and --port are required (unless --explain)")
    try:
        configs, faults = _configs(args)
    except (KeyError, ValueError) as exc:
        parser.error(str(exc.args[0] if isinstance(exc, KeyError) else exc))
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        asyncio.run(_serve(configs, faults))
    except OSError as exc:  # typically a port already in use
        print(f"engine-node sim: {exc}", file=sys.stderr)
        return 1
    return 0


def _configs(args: argparse.Namespace) -> tuple[list[ReplicaConfig], Faults]:
    profile = profiles.get(args.profile or profiles.DEFAULT_PROFILE[args.flavor])
    if profile.engine != args.flavor:
        raise ValueError(f"profile {profile.name} is for {profile.engine}, not {args.flavor}")
    if args.replicas < 1 or args.speed <= 0:
        raise ValueError("--replicas must be >= 1 and --speed > 0")
    faults = Faults(
        error_rate=args.error_rate, error_status=args.error_status,
        hang_after_chunks=args.hang_after_chunks, reset_after_chunks=args.reset_after_chunks,
        garbage_after_chunks=args.garbage_after_chunks, slow_first_token=args.slow_first_token,
        refuse_connections=args.refuse_connections, flap_health=args.flap_health,
    )
    configs = [
        ReplicaConfig(flavor=args.flavor, model=args.model, profile=profile, host=args.host,
                      port=args.port + i, seed=args.seed, speed=args.speed, cache_tokens=args.cache_tokens)
        for i in range(args.replicas)
    ]
    return configs, faults


async def _serve(configs: list[ReplicaConfig], faults: Faults) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    replicas: dict[int, Replica] = {}
    for config in configs:
        replicas[config.port] = Replica(config, replicas)
    try:
        for replica in replicas.values():
            await replica.start(faults)
        sys.stdout.write("READY " + " ".join(str(port) for port in replicas) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await asyncio.gather(*(replica.stop() for replica in replicas.values()), return_exceptions=True)

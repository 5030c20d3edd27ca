"""Where the gateway's CPU goes under load: a py-spy profile, folded by the stage of the request path.

    python -m loadtests.profile_overhead                      # non-streaming, 64 connections, 15 s
    python -m loadtests.profile_overhead --scenario st_c64    # burst streaming

The set-up is ``bench_overhead``'s: the fast backend and the gateway (default configuration) pinned
to CPU 1, ``wrk`` pinned to CPU 0. While wrk runs, ``py-spy record --format raw`` samples the gateway
at ``--rate`` Hz (active samples only). Each sample's innermost gateway frame names the stage that
was running, from the module it is in, and the frames under it (libraries, the interpreter, a
``transport.write``) are charged to that stage. Samples with no gateway frame below the entry
point are the event loop and its C callbacks (uvloop and httptools, which py-spy cannot see into)
or library code called from the loop itself.

It prints the share of samples per stage and the twenty functions with the most samples of their
own, and says what that means per request from the gateway's CPU per request in the same run
(``/proc/PID/stat``). Sampling wall time of a busy process on a core shared with the backend counts
some preemption as the running frame, so the shares are a guide, not an exact split (the brief's
own caveat).

Needs ``py-spy`` (the ``profile`` extra; ``make profile`` installs it) and ``wrk`` (Debian).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.bench_overhead import (
    CLIENT_CPU,
    SCENARIOS,
    SERVER_CPU,
    TARGETS,
    Process,
    run_wrk,
    start_backend,
    start_target,
    tree_cpu,
    wait_ready,
)

# gateway module -> the stage of handler -> auth -> decode -> admit -> route -> relay -> settle it serves
STAGES = {
    "server": "client HTTP (server.py)",
    "handlers": "handler steps (handlers.py)",
    "auth": "auth and keys", "keys": "auth and keys", "limits": "auth and keys",
    "protocol": "decode (protocol.py)",
    "admission": "admit (admission.py)",
    "router": "route", "affinity": "route", "ring": "route", "prefix_index": "route", "picker": "route",
    "pool": "route",
    "relay": "relay (relay.py)", "sse": "relay (relay.py)",
    "upstream": "upstream pool (upstream.py)",
    "ledger": "settle: metrics and access log", "logs": "settle: metrics and access log",
    "metrics": "settle: metrics and access log",
    "outlier": "health and outliers", "health": "health and outliers",
}
OUTSIDE = "event loop and libraries (no gateway frame below the loop)"
# A sample whose innermost gateway frame is the entry point is in the event loop's own C code.
LOOP_MODULES = {"__main__", "app"}
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def fold(raw: str) -> tuple[collections.Counter, collections.Counter, int]:
    """(samples per stage, samples per innermost function, total) from py-spy's raw format."""
    stages: collections.Counter = collections.Counter()
    functions: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        stage = OUTSIDE
        for frame in reversed(frames):  # innermost first
            m = _FRAME.match(frame)
            if m and "/gateway/" in f"/{m['file']}":
                module = Path(m["file"]).stem
                if module not in LOOP_MODULES:
                    stage = STAGES.get(module, f"other gateway ({module}.py)")
                break
        stages[stage] += n
        m = _FRAME.match(frames[-1])
        functions[f"{m['func']} ({Path(m['file']).name})" if m else frames[-1]] += n
    return stages, functions, total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="ns_c64", choices=[s for s in SCENARIOS if not SCENARIOS[s].paced])
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    beside = Path(sys.executable).with_name("py-spy")  # the venv's, when run as .venv/bin/python -m ...
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if py_spy is None or shutil.which("wrk") is None:
        print("profile_overhead needs py-spy (pip install '.[profile]') and wrk (apt-get install wrk)",
              file=sys.stderr)
        return 2
    scenario = SCENARIOS[args.scenario]
    started: list[Process] = []
    ports: set[int] = set()
    try:
        with tempfile.TemporaryDirectory(prefix="profile-overhead-") as tmp:
            workdir = Path(tmp)
            _backend, backend_port = start_backend(started, workdir, ports, 0.0, SERVER_CPU)
            gateway = start_target(started, TARGETS["gateway"], backend_port, workdir, ports, SERVER_CPU, "profile")
            wait_ready(gateway.port, gateway.proc)
            run_wrk(gateway.port, scenario, 2, CLIENT_CPU)  # warm-up
            raw_path = workdir / "profile.txt"
            spy = subprocess.Popen([py_spy, "record", "--format", "raw", "--rate", str(args.rate), "--duration",
                                    str(args.seconds + 1), "--pid", str(gateway.proc.pid), "--output",
                                    str(raw_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)  # py-spy attached before the load starts
            cpu_before = sum(tree_cpu(gateway.roots()).values())
            result = run_wrk(gateway.port, scenario, args.seconds, CLIENT_CPU)
            cpu = sum(tree_cpu(gateway.roots()).values()) - cpu_before
            _, err = spy.communicate(timeout=args.seconds + 30)
            if spy.returncode != 0 or not raw_path.exists():
                print(f"py-spy failed: {err.strip()[-500:]}", file=sys.stderr)
                return 1
            raw = raw_path.read_text()
    finally:
        for proc in reversed(started):
            proc.stop()

    stages, functions, total = fold(raw)
    requests = result["requests"]
    us_per_request = cpu / requests * 1e6 if requests else float("nan")
    print(f"# Where the gateway's CPU goes ({args.scenario}, {time.strftime('%Y-%m-%d %H:%M')})\n")
    print(f"wrk: {requests:,} requests in {args.seconds} s ({requests / args.seconds:,.0f}/s); gateway CPU "
          f"{us_per_request:.0f} µs per request; py-spy: {total:,} active samples at {args.rate} Hz.\n")
    print("| stage | share of samples | ≈ µs per request |")
    print("|---|---|---|")
    for stage, n in stages.most_common():
        print(f"| {stage} | {100 * n / total:.1f} % | {us_per_request * n / total:.1f} |")
    print("\nFunctions with the most samples of their own:\n")
    print("| function | share |")
    print("|---|---|")
    for name, n in functions.most_common(20):
        print(f"| {name} | {100 * n / total:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``engine-node drain``: an engine pod's preStop hook, so that a scale-down or a restart loses nothing.

    engine-node drain --port 30000 --settle-s 15 --max-wait-s 40

When Kubernetes stops an engine pod (the autoscaler removes a replica, a rolling update replaces
it), it takes the pod out of its headless Service's DNS at once, runs this hook, and only then
sends the engine SIGTERM. An engine ends on SIGTERM with whatever it is running, and the gateways
keep sending new requests until their next lookup shows the pod gone (``discovery.interval_s`` plus
the DNS cache's TTL). So the hook keeps the engine serving:

1. for ``--settle-s``, while the gateways notice that the pod left DNS and stop sending to it;
2. then until the engine's own metrics show no request running or queued (read as the gateway
   reads them, ``gateway/engine_signals.py``), polled every ``--poll-s``, and at most until
   ``--max-wait-s`` from the start.

An idle replica therefore goes after ``settle_s``, a busy one when its last request ends. The pod's
``terminationGracePeriodSeconds`` must exceed ``max_wait_s`` (``tests/test_infra.py`` checks it).
An engine whose metrics cannot be read is taken as idle: it cannot be waited for. The hook always
exits 0, and says on stderr why it stopped waiting (the kubelet shows a failing hook as an event).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from gateway.engine_signals import engine_signals


def held_requests(metrics_url: str, timeout_s: float = 2.0) -> float | None:
    """Running plus queued requests the engine reports, or None when its metrics cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    signals = engine_signals(text)
    return signals[0] + signals[1] if signals is not None else 0.0


def wait_idle(metrics_url: str, settle_s: float, max_wait_s: float, poll_s: float = 1.0) -> str:
    """Wait as the module docstring says; returns why it stopped: ``idle``, ``unreachable`` or
    ``max_wait``."""
    deadline = time.monotonic() + max_wait_s
    time.sleep(min(settle_s, max_wait_s))
    while True:
        held = held_requests(metrics_url)
        if held is None:
            return "unreachable"
        if held == 0:
            return "idle"
        if time.monotonic() >= deadline:
            return "max_wait"
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-node drain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the engine's HTTP port")
    p.add_argument("--metrics-path", default="/metrics")
    p.add_argument("--settle-s", type=float, default=15.0,
                   help="keep serving this long first, while the gateways notice the pod left DNS (default 15)")
    p.add_argument("--max-wait-s", type=float, required=True,
                   help="stop waiting this long after the start; below terminationGracePeriodSeconds")
    p.add_argument("--poll-s", type=float, default=1.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = f"http://{args.host}:{args.port}{args.metrics_path}"
    started = time.monotonic()
    reason = wait_idle(url, args.settle_s, args.max_wait_s, args.poll_s)
    held = held_requests(url)
    print(f"engine-node drain: stopped waiting after {time.monotonic() - started:.1f} s: {reason}"
          + (f" ({held:g} requests still held)" if held else ""), file=sys.stderr)
    return 0

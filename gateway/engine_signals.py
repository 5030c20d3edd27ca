"""What an engine's own ``/metrics`` says about its load: running and queued requests, and KV usage.

One stdlib-only module, because two places read it: the gateway's scrapes (``health.py``) and an
engine pod's preStop hook (``engine_nodes/drain.py``), which runs in the engine's image.

SGLang exports ``sglang:num_running_reqs``, ``sglang:num_queue_reqs`` and ``sglang:token_usage``;
vLLM ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``
(or ``vllm:gpu_cache_usage_perc`` from older vLLM). A line scan, not a full exposition parser: these
are plain gauges, and the scrape runs every second for every engine.
"""

from __future__ import annotations

_RUNNING = ("sglang:num_running_reqs", "vllm:num_requests_running")
_WAITING = ("sglang:num_queue_reqs", "vllm:num_requests_waiting")
# vLLM before the V1 metrics exports KV usage only under its deprecated name, gpu_cache_usage_perc.
_KV = ("sglang:token_usage", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def engine_signals(text: str) -> tuple[float, float, float] | None:
    """(running, waiting, kv usage) summed over label sets, or None if the engine exports none of them."""
    running = waiting = kv = 0.0
    found = False
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _RUNNING or name in _WAITING or name in _KV:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            found = True
            if name in _RUNNING:
                running += value
            elif name in _WAITING:
                waiting += value
            else:
                kv = max(kv, value)
    return (running, waiting, kv) if found else None

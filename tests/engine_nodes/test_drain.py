"""``engine-node drain`` (the engine pods' preStop hook) against simulated SGLang and vLLM replicas."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from engine_nodes import drain
from engine_nodes.local_stack import free_ports
from tests.engine_nodes.conftest import REPO

MODEL = "llama-3.1-8b"


def stream_in_background(url: str, max_tokens: int) -> dict:
    """Start one streamed chat in a thread; the dict gets ``done_at`` and ``body`` (or ``error``)
    when it ends."""
    outcome: dict = {}
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Write a long essay."}]}).encode()

    def run() -> None:
        request = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                outcome["body"] = resp.read()
        except (OSError, http.client.HTTPException) as e:  # the simulator stopped under it
            outcome["error"] = e
        outcome["done_at"] = time.monotonic()

    threading.Thread(target=run, daemon=True).start()
    return outcome


def wait_until_held(metrics_url: str) -> None:
    deadline = time.monotonic() + 10
    while not drain.held_requests(metrics_url):
        assert time.monotonic() < deadline, "the request never showed in the engine's metrics"
        time.sleep(0.02)


@pytest.mark.parametrize("flavor", ["sglang", "vllm"])
def test_drain_returns_only_once_the_engines_last_request_has_ended(sim_factory, flavor):
    sim = sim_factory("--flavor", flavor, "--model", MODEL, "--speed", "2")
    metrics_url = sim.url("/metrics")
    assert drain.held_requests(metrics_url) == 0
    outcome = stream_in_background(sim.url(), max_tokens=200)
    wait_until_held(metrics_url)
    assert drain.wait_idle(metrics_url, settle_s=0.05, max_wait_s=30, poll_s=0.02) == "idle"
    # The engine holds nothing at the return. (The client may still be reading the last bytes: the
    # engine counts a request done when it has generated it, so the client's end is no ordering.)
    assert drain.held_requests(metrics_url) == 0
    deadline = time.monotonic() + 10
    while "done_at" not in outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outcome["body"].rstrip().endswith(b"data: [DONE]")  # and the stream was not cut


def test_drain_gives_up_at_max_wait_while_a_request_still_runs(sim_factory):
    sim = sim_factory("--flavor", "sglang", "--model", MODEL, "--speed", "0.2")
    metrics_url = sim.url("/metrics")
    outcome = stream_in_background(sim.url(), max_tokens=4000)
    wait_until_held(metrics_url)
    assert drain.wait_idle(metrics_url, settle_s=0.0, max_wait_s=0.3, poll_s=0.05) == "max_wait"
    assert drain.held_requests(metrics_url) == 1 and "done_at" not in outcome


def test_drain_of_an_engine_that_is_gone_returns_at_once_and_the_hook_exits_0():
    port = free_ports()  # nothing listens there
    assert drain.wait_idle(f"http://127.0.0.1:{port}/metrics", settle_s=0.0, max_wait_s=30) == "unreachable"
    result = subprocess.run([sys.executable, "-m", "engine_nodes", "drain", "--port", str(port),
                             "--settle-s", "0", "--max-wait-s", "30"],
                            cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0
    assert "unreachable" in result.stderr

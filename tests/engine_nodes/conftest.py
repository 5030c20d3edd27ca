"""Fixtures: simulator processes started for real on loopback, and cleaned up even when a test fails."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine_nodes.local_stack import free_ports

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 20.0


@dataclass
class SimProcess:
    process: subprocess.Popen[str]
    ports: list[int]

    @property
    def port(self) -> int:
        return self.ports[0]

    def url(self, path: str = "", replica: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[replica]}{path}"

    def stop(self) -> int:
        """SIGTERM, then wait; returns the exit code (kills after a grace period)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=10)


def start_sim(*args: str, replicas: int = 1) -> SimProcess:
    base = free_ports(replicas)
    command = [sys.executable, "-m", "engine_nodes", "sim", "--port", str(base), "--replicas", str(replicas), *args]
    # stderr goes to a file: a pipe nobody drains would block a chatty simulator.
    stderr = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + READY_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            line = process.stdout.readline()
            if line.startswith("READY "):
                return SimProcess(process, [int(p) for p in line.split()[1:]])
            if not line and process.poll() is not None:
                break
    with contextlib.suppress(Exception):
        process.kill()
    process.wait(timeout=10)
    stderr.seek(0)
    raise RuntimeError(f"simulator did not become ready: {stderr.read()[-2000:]}")


@pytest.fixture
def sim_factory() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def factory(*args: str, replicas: int = 1) -> SimProcess:
        sim = start_sim(*args, replicas=replicas)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


def _fresh(sim: SimProcess) -> SimProcess:
    """Clear the fault knobs, request log and counters a previous test left on a shared simulator."""
    for path in ("/sim/faults", "/sim/reset"):
        request = urllib.request.Request(sim.url(path), data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass
    return sim


@pytest.fixture(scope="module")
def _shared_sglang() -> Iterator[SimProcess]:
    sim = start_sim("--flavor", "sglang", "--model", "sim-model", "--speed", "200", "--seed", "7")
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def _shared_vllm() -> Iterator[SimProcess]:
    sim = start_sim("--flavor", "vllm", "--model", "sim-model", "--speed", "200", "--seed", "7")
    yield sim
    sim.stop()


@pytest.fixture
def sglang_sim(_shared_sglang) -> SimProcess:
    """An SGLang-flavoured replica shared by a module's tests, with faults, log and counters cleared."""
    return _fresh(_shared_sglang)


@pytest.fixture
def vllm_sim(_shared_vllm) -> SimProcess:
    """A vLLM-flavoured replica shared by a module's tests, with faults, log and counters cleared."""
    return _fresh(_shared_vllm)

"""Smoke test of ``loadtests/request_cost.py``: the in-process measurement drives real requests
through the whole gateway and gets a 200 for each, and every relayed event reaches the client (the
tool exits non-zero otherwise)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode,unit", [("plain", "non-streaming request"), ("burst", "burst-streamed request"),
                                       ("paced", r"relayed SSE event \(paced\)")])
def test_request_cost_gets_every_answer_through_the_gateway_and_reports_cpu_per_unit(mode, unit):
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.request_cost", "--mode", mode, "--count", "300", "--warmup", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"request_cost exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    m = re.fullmatch(rf"([\d.]+) µs of CPU per {unit} \(in process, 300 measured\)\n", done.stdout)
    assert m is not None, done.stdout
    assert float(m.group(1)) > 0

"""Smoke test of ``loadtests/request_cost.py``: the in-process measurement drives real requests
through the whole gateway and gets a 200 for each (the tool exits non-zero on any other answer)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind,flags", [("non-streaming", []), ("burst-streamed", ["--burst"])])
def test_request_cost_answers_every_request_with_200_and_reports_cpu_per_request(kind, flags):
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.request_cost", "--requests", "300", "--warmup", "50", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"request_cost exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    m = re.fullmatch(rf"([\d.]+) µs of CPU per {kind} request \(in process, 300 requests\)\n", done.stdout)
    assert m is not None, done.stdout
    assert float(m.group(1)) > 0

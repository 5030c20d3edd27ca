"""Smoke test of the open-streams scale check: a small ``bench_streams`` run through two workers.

It proves the harness measures what it claims: the streams are open at once through the gateway
(its process tree holds two sockets per stream at the peak), all of them still flow at the end of
the hold, and the gateway lets go of them when the clients leave. The figures themselves (RSS per
stream, CPU) are reported, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STREAMS = 400


def test_bench_streams_holds_every_stream_open_through_the_gateway_and_releases_them(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_streams", "--streams", str(STREAMS), "--workers", "2",
         "--hold", "2", "--token-ms", "500", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"bench_streams exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    (path,) = tmp_path.glob("bench_streams-*.json")
    result = json.loads(path.read_text())
    print(json.dumps(result))
    assert result["problems"] == []
    assert result["opened"] == result["flowing_at_end_of_hold"] == STREAMS
    assert result["error_events"] == result["dropped"] == result["connect_failed"] == 0
    assert result["sockets_peak"] >= 2 * STREAMS, "the streams were not all open through the gateway at once"
    assert result["sockets_after_close"] < result["sockets_idle"] + STREAMS // 10
    assert result["events_received"] >= STREAMS * 2  # the first event, and more during the hold
    assert "RSS per open stream" in done.stdout

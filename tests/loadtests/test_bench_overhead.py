"""Smoke test of the overhead benchmark harness: one ``--quick`` run against direct and the gateway.

No PyPI routers and no nginx, so it needs only ``wrk`` (Debian) besides the project venv. The run
takes about 15 s: a backend, the gateway, 1 s per point; the test checks that the printed table has
real numbers for both targets and that the gateway kept its upstream connections alive.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICK_CONNECTIONS = {"ns_c1": 1, "ns_c64": 64, "st_c16": 16}
QUICK_SCENARIOS = tuple(QUICK_CONNECTIONS)
RUN_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[str, dict]:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: the benchmark smoke test needs it (apt-get install -y wrk)")
    results = tmp_path_factory.mktemp("bench-results")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.bench_overhead", "--quick", "--targets", "direct,gateway",
         "--no-install", "--results-dir", str(results)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness stops its backend and gateway on SIGTERM
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"bench_overhead --quick did not finish within {RUN_TIMEOUT_S} s")
    assert proc.returncode == 0, f"bench_overhead exited {proc.returncode}:\n{err[-3000:]}"
    files = list(results.glob("bench_overhead-*.json"))
    assert len(files) == 1, f"expected one results file, found {files}"
    return out, json.loads(files[0].read_text())


def detail_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """(scenario, target) -> the cells of the 'every target x scenario' table."""
    section = report.split("## Every target x scenario", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] in QUICK_SCENARIOS:
            rows[(cells[0], cells[1])] = cells
    return rows


NUMBER = re.compile(r"^[+-]?[\d,]+(\.\d+)?$")


def test_quick_run_prints_numeric_figures_for_direct_and_gateway(quick_run):
    report, _ = quick_run
    rows = detail_rows(report)
    for scenario in QUICK_SCENARIOS:
        for target in ("direct", "gateway"):
            cells = rows.get((scenario, target))
            assert cells is not None, f"no row for {target} at {scenario} in:\n{report}"
            rps, p50, p99 = cells[2], cells[3], cells[4]
            for name, value in (("req/s", rps), ("p50", p50), ("p99", p99)):
                assert NUMBER.match(value), f"{target} {scenario} {name} is not a number: {value!r}"
            assert float(rps.replace(",", "")) > 0, f"{target} {scenario} served nothing"
            assert cells[10] == "0", f"{target} {scenario} had errors: {cells[10]}"
        proxy_cpu = rows[(scenario, "gateway")][7]
        assert NUMBER.match(proxy_cpu) and float(proxy_cpu.replace(",", "")) > 0, \
            f"gateway CPU per request missing at {scenario}: {proxy_cpu!r}"


def test_gateway_reuses_its_upstream_connections_during_the_run(quick_run):
    report, results = quick_run
    gateway = [m for m in results["medians"] if m["target"] == "gateway"]
    assert {m["scenario"] for m in gateway} == set(QUICK_SCENARIOS)
    for m in gateway:
        # A pool may reopen what the previous run's dropped client connections abandoned (at most one
        # per client connection); a proxy that reconnects per request opens one per request.
        assert m["backend_accepts"] <= QUICK_CONNECTIONS[m["scenario"]], \
            f"gateway opened {m['backend_accepts']} upstream connections at {m['scenario']}: {m}"
    assert re.search(r"^PASS  upstream connections reused", report, re.MULTILINE), report

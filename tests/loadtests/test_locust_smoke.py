"""The locustfile cannot rot: a few seconds of every user class against a real gateway and simulators.

One headless Locust run of two to four users per class for six seconds, with the failover shape
(one of the two interactive replicas killed at three seconds, revived at the end), against two
simulated SGLang replicas and one vLLM replica behind the gateway, all fast-forwarded. The tests
then read what that run left behind: Locust's exit status and CSV, the KPI samples, and the
summary table. The trace class runs only if the public traces are present (``LOADTEST_TRACES``,
default ``../shared/traces``); a clone without them skips that class's test and says why.

Locust monkey-patches sockets with gevent when it is imported, so everything that imports it (the
locustfile, the shapes) runs in a subprocess, never inside pytest.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from loadtests import kpi, workload
from tests.conftest import FAST_HEALTH, ROOT, GatewayProcess, Simulator, http_get, pool_toml

LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
SHAPES = ROOT / "loadtests" / "shapes.py"
TRACES = Path(os.environ.get("LOADTEST_TRACES", ROOT.parent / "shared" / "traces"))
HAVE_TRACES = (TRACES / workload.TRACE_FORMATS["hh_rlhf"].path).is_file()
RUN_S = 6
LOCUST_TIMEOUT_S = 45


@dataclass
class SmokeRun:
    process: subprocess.CompletedProcess
    results: Path
    record: kpi.Record
    victim_faults_after: dict


def locust(files: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--only-summary", *args]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=LOCUST_TIMEOUT_S)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> SmokeRun:
    tmp = tmp_path_factory.mktemp("locust")
    started: list = []
    try:
        interactive = Simulator("sglang", 2, 50.0, [])
        started.append(interactive)
        batch = Simulator("vllm", 1, 50.0, [])
        started.append(batch)
        gateway = GatewayProcess(pool_toml("interactive", "sglang", "interactive", interactive.urls)
                                 + pool_toml("batch", "vllm", "batch", batch.urls) + FAST_HEALTH, tmp)
        started.append(gateway)
        classes = ["InteractiveChatUser", "BatchUser"] + (["TraceReplayUser"] if HAVE_TRACES else [])
        settings = {"LOADTEST_THINK_S": "0.05,0.2", "LOADTEST_SEED": "7", "LOADTEST_TRACES": str(TRACES),
                    "LOADTEST_SHAPE": "failover", "LOADTEST_KILL_SIM": interactive.url(1),
                    "LOADTEST_SIM_ADMIN": interactive.url(0)}
        process = locust(f"{LOCUSTFILE},{SHAPES}",
                         ["-u", str(3 * len(classes)), "-r", "50", "-t", f"{RUN_S}s", "--host", gateway.url,
                          "--csv", str(tmp / "locust"), *classes], settings)
        status, body = http_get(f"{interactive.url(1)}/sim/faults")
        victim_faults_after = json.loads(body) if status == 200 else {"status": status}
    finally:
        for process_owner in reversed(started):
            process_owner.stop()
    assert (tmp / kpi.FILE_NAME).is_file(), process.stderr[-3000:]
    return SmokeRun(process, tmp, kpi.load(tmp), victim_faults_after)


def test_chat_and_batch_users_complete_requests_without_failures(smoke_run):
    assert smoke_run.process.returncode == 0, smoke_run.process.stderr[-3000:]
    for name in ("chat", "batch"):
        samples = smoke_run.record.classes[name]
        assert samples.requests > 0 and samples.failures == 0, (name, smoke_run.record.errors[:5])


def test_streamed_chat_records_ttft_and_inter_token_samples(smoke_run):
    chat = smoke_run.record.classes["chat"]
    assert len(chat.ttft_s) == chat.requests
    assert all(0 < t < RUN_S for t in chat.ttft_s)
    assert len(chat.itl_s) > chat.requests  # several gaps per streamed reply
    assert chat.completion_tokens > 0 and len(chat.tokens_per_s) == chat.requests


def test_batch_requests_are_not_streamed_so_record_no_ttft(smoke_run):
    batch = smoke_run.record.classes["batch"]
    assert batch.ttft_s.tolist() == [] and batch.itl_s.tolist() == []
    assert len(batch.e2e_s) == batch.requests and batch.completion_tokens >= 256 * batch.requests


def test_multi_turn_chat_sessions_hit_the_prefix_cache(smoke_run):
    chat = smoke_run.record.classes["chat"]
    assert chat.cache_reported == chat.requests
    assert 0 < chat.cached_tokens < chat.prompt_tokens


def test_locust_stats_carry_the_custom_kpi_events(smoke_run):
    with (smoke_run.results / "locust_stats.csv").open(newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    for key in [("POST", "chat"), ("POST", "batch"), ("TTFT", "chat"), ("ITL", "chat"), ("TOKENS/S", "chat"),
                ("TOKENS/S", "batch")]:
        assert key in rows and int(rows[key]["Request Count"]) > 0, key
    assert ("TTFT", "batch") not in rows


def test_summary_prints_a_row_of_numbers_per_user_class(smoke_run):
    result = subprocess.run([sys.executable, "-m", "loadtests.summary", str(smoke_run.results)], cwd=ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| user class"))}
    header = [c.strip() for c in next(line for line in result.stdout.splitlines()
                                      if line.startswith("| user class")).strip("|").split("|")][1:]
    streaming_only = {"TTFT p50", "TTFT p99", "ITL p50", "ITL p99"}
    for name in ["chat", "batch", "all"] + (["trace"] if HAVE_TRACES else []):
        cells = dict(zip(header, rows[name], strict=True))
        for column, cell in cells.items():
            if name == "batch" and column in streaming_only:
                assert cell == "-", (name, column, cell)
            else:
                assert float(cell.rstrip(" %")) >= 0, (name, column, cell)
        assert float(cells["TTFT p50"] if name != "batch" else cells["e2e p50"]) > 0
        assert cells["failures"] == "0"


def test_trace_replay_user_replays_the_public_traces(smoke_run):
    if not HAVE_TRACES:
        pytest.skip(f"the public traces are not in {TRACES} (set LOADTEST_TRACES): trace user not exercised")
    trace = smoke_run.record.classes["trace"]
    assert trace.requests > 0 and trace.failures == 0, smoke_run.record.errors[:5]
    assert len(trace.ttft_s) == trace.requests


def test_failover_drill_kills_a_replica_mid_run_and_revives_it_at_the_end(smoke_run):
    kills = [mark for mark in smoke_run.record.marks if mark["what"].startswith("kill ")]
    assert len(kills) == 1 and kills[0]["ok"]
    assert 1 < kills[0]["t"] - smoke_run.record.started_at < RUN_S - 1
    assert smoke_run.victim_faults_after.get("refuse_connections") is False
    # The gateway retried every request that met the dead replica before its first byte.
    assert sum(s.failures for s in smoke_run.record.classes.values()) == 0, smoke_run.record.errors[:5]


def test_trace_user_without_traces_stops_with_an_error_naming_the_folder(tmp_path):
    missing = tmp_path / "no-traces-here"
    # The user stops in on_start, before any request: the host is never contacted.
    process = locust(str(LOCUSTFILE), ["-u", "1", "-r", "1", "-t", "2s", "--host", "http://127.0.0.1:9",
                                       "--csv", str(tmp_path / "locust"), "TraceReplayUser"],
                     {"LOADTEST_TRACES": str(missing)})
    assert process.returncode == 0, process.stderr[-3000:]
    assert f"{missing}" in process.stderr and "LOADTEST_TRACES" in process.stderr
    record = kpi.load(tmp_path)
    assert any("TraceReplayUser stopped" in note for note in record.notes)
    assert record.classes == {}


def test_shapes_scale_with_the_base_user_count_and_run_time():
    probe = ("import json; from loadtests.shapes import users_at as u; print(json.dumps(["
             "[u('steady', t, 20, 120) for t in (0, 60, 119)],"
             "[u('ramp', t, 20, 120) for t in range(0, 120, 4)],"
             "[u('burst', t, 20, 120) for t in (10, 30, 89, 90, 110)],"
             "sum(u('burst', t, 2, 600) == 20 for t in range(600))]))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    steady, ramp, burst, burst_seconds = json.loads(result.stdout)
    assert steady == [20, 20, 20]
    assert ramp[0] == 2 and ramp[-1] == 20 and ramp == sorted(ramp)
    assert burst == [20, 200, 200, 20, 20]
    assert burst_seconds == 60  # 10 x the users for one minute


def test_trace_prompts_share_exactly_the_blocks_their_hash_ids_share():
    text = workload.TextSource(3)
    trace = workload.Trace("t", [(None, ())], block_tokens=16, source=text)
    first = trace.prompt(workload.TraceRequest(40, 1, (1, 2, 3), 0), pass_no=0)
    second = trace.prompt(workload.TraceRequest(48, 1, (1, 2, 4), 1), pass_no=0)
    again = trace.prompt(workload.TraceRequest(40, 1, (1, 2, 3), 0), pass_no=1)
    assert len(first) == 160 and len(second) == 192
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert 128 <= shared < 128 + 16  # blocks 1 and 2 (64 bytes each) match; block 3 differs at its head
    assert again[:64] != first[:64]  # a second pass over the trace starts cold

"""The routing-quality benchmark (loadtests/replay.py): its workload, its oracle, and a smoke run.

The smoke run replays a few requests of each trace through our gateway to 3 simulated replicas
(``--quick``: no sglang-router) and checks the report holds numbers that make sense together.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.replay_lib.driver import Outcome, request_id
from loadtests.replay_lib.loss import hit_loss, placements
from loadtests.replay_lib.oracle import prompt_bytes, shared_cache_oracles
from loadtests.replay_lib.workload import BlockText, Rendered, Shaping, TraceRequest, load_sessions, render

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT.parent / "shared" / "traces"
MODEL = "llama-3.1-8b"


def _completion(blocks: tuple[int, ...], tokens: int) -> TraceRequest:
    return TraceRequest(arrival_s=0.0, blocks=blocks, input_tokens=tokens, output_tokens=4)


def test_equal_hash_ids_give_equal_text_and_blocks_fill_whole_pages():
    text = BlockText("mooncake", 128)
    a, b = render([_completion((1, 2, 3), 384), _completion((1, 2, 9), 384)], text, MODEL)
    assert a.prompt_text[:1024] == b.prompt_text[:1024]  # two shared blocks of 128 tokens x 4 bytes
    assert a.prompt_text[1024:] != b.prompt_text[1024:]
    assert len(a.prompt_text.encode()) == 384 * 4
    assert text.prompt((1, 2), 200) == a.prompt_text[:800]  # a partial last block is a prefix of the full one


def test_oracle_counts_shared_pages_and_evicts_beyond_capacity():
    text = BlockText("mooncake", 128)
    # Three distinct 2-block prompts, then the first again: only a cache holding all three hits it.
    items = render(
        [
            _completion((1, 2), 256),
            _completion((3, 4), 256),
            _completion((5, 6), 256),
            _completion((1, 2), 256),
        ],
        text,
        MODEL,
    )
    roomy = shared_cache_oracles(items, MODEL, 16, capacity_tokens=3 * 256)
    tight = shared_cache_oracles(items, MODEL, 16, capacity_tokens=2 * 256)
    # The repeat hits every page but the one holding its last token: 240 of 1024 prompt tokens.
    assert roomy.unlimited == roomy.same_size == pytest.approx(240 / 1024)
    assert tight.same_size == 0.0
    assert tight.unlimited == roomy.unlimited


def test_hit_loss_separates_placement_timing_and_eviction():
    # One 256-token prompt sent three times: first to replica 0 (prefilled by t=1.0), then to replica
    # 1 at t=0.5, then to replica 0 at t=0.6, before the first prefill is done. A repeat hits every
    # page but the one with its last token: 240 tokens. The engines reported 0 and 0 hits, then 240.
    text = BlockText("mooncake", 128)
    items = render([_completion((1, 2), 256)] * 3, text, MODEL)
    outcomes = [Outcome(0, status=200, ttft_s=1.0, prompt_tokens=256, sent_at=0.0),
                Outcome(1, status=200, ttft_s=1.0, prompt_tokens=256, sent_at=0.5),
                Outcome(2, status=200, ttft_s=0.1, prompt_tokens=256, cached_tokens=240, sent_at=0.6)]

    def record(i: int, named: bool) -> dict:
        headers = {"x-request-id": request_id(i)} if named else {}
        return {"finished": True, "headers": headers, "body": json.dumps({"prompt": items[i].prompt_text})}

    by_id = placements(items, [[record(0, True), record(2, True)], [record(1, True)]])
    assert by_id.where == [0, 1, 0] and by_id.by_prompt == 0
    # Without ids, equal prompts are matched in order: still one replica per request.
    by_prompt = placements(items, [[record(0, False), record(2, False)], [record(1, False)]])
    assert sorted(by_prompt.where) == [0, 0, 1] and by_prompt.by_prompt == 3
    loss = hit_loss(items, outcomes, by_id, 16, MODEL)
    assert loss.requests == 3 and loss.by_prompt == 0
    assert loss.unlimited == pytest.approx(480 / 768)  # both repeats, anywhere
    assert loss.same_replica == pytest.approx(240 / 768)  # only the third, on the first's replica
    assert loss.prefilled == 0.0  # ... whose prefill was not done when the third was sent
    # The engine's own count is reported as is: engines publish pages chunk by chunk during a
    # prefill, so it may exceed "prefilled".
    assert loss.actual == pytest.approx(240 / 768)


def test_session_turns_render_as_a_growing_chat_with_a_session_header():
    requests = load_sessions(
        TRACES / "hh_rlhf" / "hh_harmless_test_sessions.jsonl", Shaping(block_tokens=16, max_requests=40)
    )
    rendered = render(requests, BlockText("hh_rlhf", 16), MODEL)
    by_session: dict[int, list[Rendered]] = {}
    for item in rendered:
        by_session.setdefault(item.request.session, []).append(item)
    longest = max(by_session.values(), key=len)
    assert len(longest) >= 3
    reused_blocks = 0
    for earlier, later in itertools.pairwise(longest):
        assert later.headers == earlier.headers == {"X-Session-ID": f"hh-{earlier.request.session}"}
        # Every message but the last is repeated verbatim...
        assert later.messages[: len(earlier.messages) - 1] == earlier.messages[:-1]
        # ...so the engine sees at least the blocks the trace says the two turns share as a common prefix.
        shared_blocks = len(os.path.commonprefix([earlier.request.blocks, later.request.blocks]))
        shared_bytes = len(os.path.commonprefix([prompt_bytes(earlier), prompt_bytes(later)]))
        assert shared_bytes >= shared_blocks * 16 * 4
        reused_blocks += shared_blocks
    assert reused_blocks > 0


@pytest.mark.timeout(90)
def test_quick_replay_reports_numbers_bounded_by_the_unlimited_oracle(tmp_path):
    out = tmp_path / "replay.json"
    proc = subprocess.run(
        [sys.executable, "loadtests/replay.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = re.findall(
        r"^\| gateway:prefix \| (\d+) \| (\d+) \| ([\d.]+) \(([\d.]+)\) \| ([\d.]+)% \| (\d+) \| (\d+) \| "
        r"([\d.]+) \(([\d.]+)\) \|$",
        proc.stdout,
        re.MULTILINE,
    )
    assert len(rows) == 2, proc.stdout  # one table row per trace, every cell a number
    record = json.loads(out.read_text())
    assert set(record["traces"]) == {"mooncake", "hh_rlhf"}
    for name, trace in record["traces"].items():
        oracle = trace["oracle"]
        (ours,) = trace["targets"]
        assert ours["target"] == "gateway:prefix"
        assert ours["requests"] > 0 and ours["errors"] == 0, ours["error_examples"]
        assert 0.0 < ours["hit_ratio"] <= oracle["unlimited"] + 1e-9, (name, ours["hit_ratio"], oracle)
        assert oracle["same_size"] <= oracle["unlimited"]
        # The clients' usage and the engines' own counters agree on the hit ratio.
        assert math.isclose(ours["hit_ratio"], ours["engine_hit_ratio"], rel_tol=1e-6)
        assert 0 < ours["ttft_p50_ms"] <= ours["ttft_p99_ms"]
        assert ours["spread_mean"] >= 1.0
        assert sum(ours["branches"].values()) == ours["requests"]


@pytest.mark.timeout(90)
def test_quick_replay_runs_our_gateway_as_two_workers_that_gossip(tmp_path):
    out = tmp_path / "replay.json"
    proc = subprocess.run(
        [sys.executable, "loadtests/replay.py", "--quick", "--traces", "hh_rlhf", "--gateway-workers", "2",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=80, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "our gateway (2 worker processes, gossip between them)" in proc.stdout
    record = json.loads(out.read_text())
    assert record["gateway_processes"] == {"workers": 2, "gossip": True}
    (ours,) = record["traces"]["hh_rlhf"]["targets"]
    assert ours["requests"] > 0 and ours["errors"] == 0, ours["error_examples"]
    # Both workers' decisions are counted: the supervisor's metrics sum over them.
    assert sum(ours["branches"].values()) == ours["requests"]

"""The stalled-replica benchmark (loadtests/bench_hedging.py): a smoke run through our gateway only."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtests import bench_hedging


def test_hedged_gateway_run_reaches_the_stalled_replica_and_no_request_waits_out_the_stall(tmp_path: Path):
    args = argparse.Namespace(requests=40, rate=20.0, stall_s=2.0, hedge_after_s=0.2)
    result = bench_hedging.run_target("gateway-hedge", args, tmp_path, None)
    assert result.failures == 0 and len(result.ttfts) == 40
    assert result.per_replica[0] >= 1  # the stalled replica was the first leg of some requests
    # Every request that started there was answered by its hedge, and no other was hedged.
    assert result.hedges == {"hedge_won": result.per_replica[0]}
    assert "| gateway-hedge | 40 | 0 |" in bench_hedging.table([result], args.stall_s)

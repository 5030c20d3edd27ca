"""The profile folding of loadtests/profile_overhead.py: each sample goes to the stage of its
innermost gateway frame."""

from __future__ import annotations

from loadtests.profile_overhead import OUTSIDE, fold

LOOP = "run (asyncio/runners.py:118);main (gateway/__main__.py:60)"


def test_samples_are_charged_to_the_innermost_gateway_module_and_the_rest_to_the_loop():
    raw = "\n".join([
        f"{LOOP};route (gateway/router.py:50);prefix_hashes (gateway/affinity.py:90) 3",
        f"{LOOP};start (gateway/upstream.py:101);write (uvloop/transport.py:10) 5",
        f"{LOOP};_log (gateway/ledger.py:140);encode (msgspec/json.py:3) 1",
        f"{LOOP} 2",
        "select (selectors.py:400) 1",
    ])
    stages, functions, total = fold(raw)
    assert total == 12
    assert stages == {"route": 3, "upstream pool (upstream.py)": 5, "settle: metrics and access log": 1,
                      OUTSIDE: 3}
    assert functions.most_common(1) == [("write (transport.py)", 5)]

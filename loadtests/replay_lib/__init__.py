"""Building blocks of ``loadtests/replay.py``: trace workloads, cache oracles, the process stack, the
replay driver and the report. See that script's docstring for how they fit together."""

"""``python -m loadtests.summary RESULTS_DIR``: the load test's KPI table, one row per user class.

Reads what a run leaves in its results folder: the locustfile's ``kpi_samples.json`` (raw samples,
see ``loadtests/kpi.py``) for the table, and Locust's ``*_failures.csv`` for the reasons of any
failures, grouped as Locust groups them. The counts come from the samples rather than from
Locust's ``*_stats.csv``, which Locust rewrites once a second and does not rewrite at exit, so its
last second is missing.

| column | meaning |
| --- | --- |
| requests, failures | chat completions sent, and those that failed (any non-200, broken stream, timeout) |
| 429s | failures that were HTTP 429 (rate limited) |
| req/s | requests per second of the run |
| TTFT p50/p99 | ms from sending the request to the first content delta (streaming classes only) |
| ITL p50/p99 | ms between content deltas, over every gap of every stream (streaming classes only) |
| e2e p50/p99 | ms from sending the request to its last byte |
| tokens/s | completion tokens of the class per second of the run (throughput, not speed per stream) |
| tok/s/req p50 | median of completion tokens over end-to-end time, per request |
| cache hit | cached / prompt tokens, from ``usage.prompt_tokens_details.cached_tokens`` |

Percentiles are exact (nearest rank over the raw samples), not Locust's rounded buckets; latency
columns cover successful requests only. A ``-`` cell means the class has no such sample (no stream,
or no successful request). Under the table come the run's marks (a failover drill's kill) with the
failures after each, the requests still running when the test stopped (a long one is a stuck
request, not a slow one), Locust's failure reasons, and notes (a user class that could not run).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loadtests import kpi

COLUMNS = ("user class", "requests", "failures", "429s", "req/s", "TTFT p50", "TTFT p99", "ITL p50",
           "ITL p99", "e2e p50", "e2e p99", "tokens/s", "tok/s/req p50", "cache hit")


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the smallest sample with at least p % of the samples at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def locust_failures(directory: Path) -> list[str]:
    """Locust's failure reasons, most frequent first; empty if the run left no failures CSV."""
    reasons = []
    for path in sorted(directory.glob("*_failures.csv")):
        with path.open(newline="") as f:
            reasons += [(int(row["Occurrences"]), f"{row['Method']} {row['Name']}: {row['Error']}")
                        for row in csv.DictReader(f)]
    return [f"{n} x {why}" for n, why in sorted(reasons, reverse=True)]


def table(record: kpi.Record) -> list[list[str]]:
    """One row per user class, then an "all" row when there are several."""
    duration = record.duration_s
    classes = sorted(record.classes.items())
    if len(classes) > 1:
        total = kpi.ClassSamples()
        for _, samples in classes:
            total.merge(samples)
        classes.append(("all", total))
    rows = []
    for name, s in classes:
        rows.append([
            name, str(s.requests), str(s.failures), str(s.throttled),
            _number(s.requests / duration if duration else None, 2),
            _ms(percentile(s.ttft_s, 50)), _ms(percentile(s.ttft_s, 99)),
            _ms(percentile(s.itl_s, 50)), _ms(percentile(s.itl_s, 99)),
            _ms(percentile(s.e2e_s, 50)), _ms(percentile(s.e2e_s, 99)),
            _number(s.completion_tokens / duration if duration else None, 0),
            _number(percentile(s.tokens_per_s, 50), 0),
            _percent(s.cached_tokens, s.prompt_tokens) if s.cache_reported else "-",
        ])
    return rows


def render(directory: Path) -> str:
    record = kpi.load(directory)
    rows = table(record)
    lines = [
        f"Run of {record.duration_s:.0f} s. Times in ms; percentiles exact over raw samples "
        "(ITL: every gap between content deltas); tokens/s: completion tokens per second of run.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for mark in record.marks:
        after = [e for e in record.errors if e["t"] >= mark["t"]]
        reasons = Counter(f"{e['class']}: {e['message']}" for e in after)
        detail = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
        lines.append(f"\n- at {mark['t'] - record.started_at:.1f} s: {mark['what']}"
                     f"{'' if mark['ok'] else ' (FAILED)'}; failures after it: {len(after)}"
                     + (f" ({detail})" if detail else ""))
    if record.unfinished:
        by_class = Counter(u["class"] for u in record.unfinished)
        longest = max(u["running_s"] for u in record.unfinished)
        lines.append(f"\n- still running when the test stopped: {len(record.unfinished)} "
                     f"({', '.join(f'{n} {c}' for c, n in sorted(by_class.items()))}); "
                     f"the longest had run {longest:.1f} s")
    reasons = locust_failures(directory)
    if reasons:
        lines.append("\n- Locust's failure reasons: " + "; ".join(reasons[:5]))
    lines += [f"\n- note: {note}" for note in record.notes]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="folder holding kpi_samples.json and Locust's CSV files")
    args = parser.parse_args(argv)
    if not (args.results / kpi.FILE_NAME).is_file():
        print(f"no {kpi.FILE_NAME} in {args.results}: was the run started with --csv or LOADTEST_RESULTS?",
              file=sys.stderr)
        return 1
    print(render(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

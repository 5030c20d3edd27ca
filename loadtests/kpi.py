"""The load test's KPI record: raw samples per user class, kept for exact percentiles.

Locust's statistics keep response times in rounded buckets (whole milliseconds below 100 ms,
coarser above) and have no place for a ratio, so the locustfile records its KPIs a second time,
here, and ``python -m loadtests.summary`` reads them back:

- per user class (``chat``, ``batch``, ``trace``): request, failure and 429 counts, the token counts
  of ``usage`` (prompt, ``prompt_tokens_details.cached_tokens``, completion), and the raw samples of
  TTFT, inter-token gaps, end-to-end latency and per-request tokens/s, in seconds;
- failures with their time and message, and *marks* (named moments such as "replica killed"), so a
  failover drill can be read as "what failed after the kill";
- requests still running when the test stopped, with how long they had run: Locust abandons them
  without a trace, and a request stuck on a dead replica looks exactly like that.

Only successful requests contribute latency samples; a failed request counts as a failure and
nothing else, as in vLLM's and SGLang's serving benchmarks.

Cost: 8 bytes per sample (``array('d')``); a two-minute local run keeps well under 10 MB. In a
distributed run (``--master`` / ``--worker`` or ``--processes``) each worker sends what it recorded
since its last report along with Locust's own stats report, and the master merges it; only the
master (or a standalone process) saves the file.
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

FILE_NAME = "kpi_samples.json"
MAX_ERRORS = 2000  # failures kept with their message; the counters count them all
_SERIES = ("ttft_s", "itl_s", "e2e_s", "tokens_per_s")
_COUNTERS = ("requests", "failures", "throttled", "prompt_tokens", "cached_tokens", "cache_reported",
             "completion_tokens")


@dataclass
class ClassSamples:
    requests: int = 0
    failures: int = 0
    throttled: int = 0  # answered 429
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_reported: int = 0  # successful requests whose usage carried cached_tokens
    completion_tokens: int = 0
    ttft_s: array = field(default_factory=lambda: array("d"))
    itl_s: array = field(default_factory=lambda: array("d"))
    e2e_s: array = field(default_factory=lambda: array("d"))
    tokens_per_s: array = field(default_factory=lambda: array("d"))

    def merge(self, other: ClassSamples) -> None:
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in _SERIES:
            getattr(self, name).extend(getattr(other, name))

    def as_json(self) -> dict:
        doc: dict = {name: getattr(self, name) for name in _COUNTERS}
        # Microsecond resolution is finer than any clock here and halves the file.
        doc.update({name: [round(v, 6) for v in getattr(self, name)] for name in _SERIES})
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> ClassSamples:
        samples = cls(**{name: int(doc.get(name, 0)) for name in _COUNTERS})
        for name in _SERIES:
            getattr(samples, name).extend(float(v) for v in doc.get(name, ()))
        return samples


@dataclass
class Record:
    """Everything one run measured; what ``kpi_samples.json`` holds."""

    classes: dict[str, ClassSamples] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)  # {"t", "class", "status", "message"}
    marks: list[dict] = field(default_factory=list)  # {"t", "what", "ok"}
    unfinished: list[dict] = field(default_factory=list)  # {"class", "running_s"}, at the stop
    notes: list[str] = field(default_factory=list)
    started_at: float = 0.0  # wall clock, seconds
    stopped_at: float = 0.0

    @property
    def duration_s(self) -> float:
        return max(0.0, self.stopped_at - self.started_at)

    def as_json(self) -> dict:
        return {"started_at": self.started_at, "stopped_at": self.stopped_at, "notes": self.notes,
                "marks": self.marks, "errors": self.errors, "unfinished": self.unfinished,
                "classes": {name: s.as_json() for name, s in self.classes.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> Record:
        return cls(classes={name: ClassSamples.from_json(s) for name, s in doc.get("classes", {}).items()},
                   errors=list(doc.get("errors", [])), marks=list(doc.get("marks", [])),
                   unfinished=list(doc.get("unfinished", [])), notes=list(doc.get("notes", [])),
                   started_at=float(doc.get("started_at", 0.0)), stopped_at=float(doc.get("stopped_at", 0.0)))


class Recorder:
    """Collects one process's samples; merges workers' reports on a master."""

    def __init__(self) -> None:
        self.record = Record()
        self._unreported = Record()  # a worker's samples since its last report

    def start(self) -> None:
        self.record = Record(started_at=time.time())
        self._unreported = Record()

    def stop(self) -> None:
        self.record.stopped_at = time.time()

    def samples(self, user_class: str) -> ClassSamples:
        """The unreported samples of a class: what the locustfile adds to."""
        return self._unreported.classes.setdefault(user_class, ClassSamples())

    def error(self, user_class: str, status: int, message: str) -> None:
        if len(self._unreported.errors) < MAX_ERRORS:
            self._unreported.errors.append(
                {"t": time.time(), "class": user_class, "status": status, "message": message[:300]})

    def unfinished(self, user_class: str, running_s: float) -> None:
        self._unreported.unfinished.append({"class": user_class, "running_s": running_s})

    def mark(self, what: str, ok: bool) -> None:
        self._unreported.marks.append({"t": time.time(), "what": what, "ok": ok})

    def note(self, text: str) -> None:
        if text not in self._unreported.notes and text not in self.record.notes:
            self._unreported.notes.append(text)

    def drain(self) -> dict:
        """A worker's report: its samples since the last report, as JSON; they leave this process."""
        report = self._unreported.as_json()
        self._unreported = Record()
        return report

    def absorb(self, report: dict) -> None:
        """Merge a worker's report (or this process's own unreported samples) into the record."""
        incoming = Record.from_json(report)
        for name, samples in incoming.classes.items():
            self.record.classes.setdefault(name, ClassSamples()).merge(samples)
        room = MAX_ERRORS - len(self.record.errors)
        self.record.errors.extend(incoming.errors[:max(0, room)])
        self.record.marks.extend(incoming.marks)
        self.record.unfinished.extend(incoming.unfinished)
        self.record.notes.extend(n for n in incoming.notes if n not in self.record.notes)

    def save(self, directory: Path) -> Path:
        self.absorb(self.drain())
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILE_NAME
        path.write_text(json.dumps(self.record.as_json()))
        return path


def load(directory: Path) -> Record:
    return Record.from_json(json.loads((directory / FILE_NAME).read_text()))

"""Fault knobs: the ways a replica can misbehave, set from the CLI or at run time.

``Faults`` is immutable; ``POST /sim/faults`` builds a new one from a partial JSON update and swaps
it in, so a request sees one consistent set of knobs. JSON keys equal the CLI flags with
underscores (``--error-rate`` is ``error_rate``).

A *chunk* is one SSE event (``data: ...``), counting the role chunk; a non-streaming response is one
chunk. "After N chunks" means N chunks reach the client and then the fault strikes, so N = 0 strikes
before anything is sent (for a non-streaming request, N >= 1 lets it complete).

| knob | effect |
| --- | --- |
| ``error_rate``, ``error_status`` | each generation request fails with that probability (seeded) with an OpenAI error of that status, before any work |
| ``hang_after_chunks`` | the stream stalls after N chunks (the request leaves the batch; the connection stays open until the client leaves) |
| ``reset_after_chunks`` | the TCP connection is reset (RST) after N chunks |
| ``garbage_after_chunks`` | after N chunks a line that is neither SSE nor JSON is sent and the connection closes |
| ``slow_first_token`` | seconds of wall time added before the request enters the engine (not scaled by ``--speed``) |
| ``refuse_connections`` | the listening socket closes, so connects are refused; idle keep-alive connections close too |
| ``flap_health`` | period in wall seconds: ``/health`` alternates healthy and 503 each period (0: off) |

Wall-clock knobs ignore ``--speed`` because they exist to trip the gateway's wall-clock timeouts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class Faults:
    error_rate: float = 0.0
    error_status: int = 500
    hang_after_chunks: int | None = None
    reset_after_chunks: int | None = None
    garbage_after_chunks: int | None = None
    slow_first_token: float = 0.0
    refuse_connections: bool = False
    flap_health: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be within [0, 1]")
        if not 400 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP error status (400-599)")
        for name in ("hang_after_chunks", "reset_after_chunks", "garbage_after_chunks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.slow_first_token < 0 or self.flap_health < 0:
            raise ValueError("slow_first_token and flap_health must be >= 0")

    def updated(self, patch: dict[str, object]) -> Faults:
        """Apply a partial update; ``{}`` or ``{"clear": true}`` returns the defaults."""
        if not patch or patch.get("clear") is True:
            return Faults()
        kinds = {f.name: f.type for f in fields(self)}
        changes: dict[str, object] = {}
        for name, value in patch.items():
            if name not in kinds:
                raise ValueError(f"unknown fault knob {name!r}; known: {', '.join(kinds)}")
            changes[name] = _coerce(name, kinds[name], value)
        return replace(self, **changes)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def _coerce(name: str, kind: object, value: object) -> object:
    kind = str(kind)
    if value is None and "None" in kind:
        return None
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number")
    if kind.startswith("int"):
        if value != int(value):
            raise ValueError(f"{name} must be an integer")
        return int(value)
    return float(value)

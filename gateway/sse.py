"""A cheap, incremental check that an engine's event stream is still a well-formed SSE stream.

The relay forwards upstream bytes as they come, without re-encoding. Before a read is forwarded,
:class:`SseCheck` confirms that every complete line in it is an SSE field (``data:``, ``event:``,
``id:``, ``retry:``, a ``:`` comment) or blank, and that the bytes are UTF-8. A read that fails is
never forwarded: the relay ends the stream with an error event instead, so a client never has to
parse garbage (the OpenAI SDK would die on a UnicodeDecodeError rather than raise ``APIError``).

Cost: one ``split`` and a ``startswith`` per line, plus a UTF-8 decode only for non-ASCII reads,
well under a microsecond per event. The incomplete last line of a read is carried into the next.
"""

from __future__ import annotations

import codecs

FIELDS = (b"data:", b":", b"event:", b"id:", b"retry:", b"\r")
MAX_LINE = 4 * 1024 * 1024


class SseCheck:
    __slots__ = ("carry", "_utf8")

    def __init__(self) -> None:
        self.carry = b""
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def feed(self, data: bytes) -> bool:
        """True while the stream is well formed, counting ``data`` in."""
        lines = (self.carry + data if self.carry else data).split(b"\n")
        self.carry = lines.pop()
        if len(self.carry) > MAX_LINE:
            return False
        for line in lines:
            if line and not line.startswith(FIELDS):
                return False
        if data.isascii() and not self._utf8.getstate()[0]:
            return True  # no multi-byte sequence is pending from the previous read
        try:
            self._utf8.decode(data)
        except UnicodeDecodeError:
            return False
        return True

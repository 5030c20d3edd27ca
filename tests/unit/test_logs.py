"""The log output, against a real pipe: it never blocks on the reader, keeps order, counts drops."""

from __future__ import annotations

import json
import logging
import os
import threading

from gateway import logs
from gateway.settings import Logging

LINE = b"x" * 1023 + b"\n"


def read_all(fd: int, size: int) -> bytes:
    """``size`` bytes, or everything until the writer closes if fewer."""
    data = b""
    while len(data) < size:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data


def access_line(request_id: str) -> logs.AccessLine:
    return logs.AccessLine(1.0, request_id, "", "chat", "m", "p", "127.0.0.1:1", "ring", 200, "ok", False, 1,
                           None, None, 1.0, None, None, None)


def test_output_never_waits_for_a_stalled_reader_and_counts_the_lines_it_drops():
    reader, writer = os.pipe()
    output = logs.Output(max_pending_bytes=256 * 1024)
    handing = threading.Thread(target=lambda: [output.put(writer, LINE, 1, "access") for _ in range(2000)])
    handing.start()
    handing.join(timeout=10)
    assert not handing.is_alive(), "put() waited for the pipe's reader"
    dropped = output.take_dropped()["access"]
    # The pipe holds 64 KB and the buffer 256 KB: about 320 of the 2,000 lines fit.
    kept = 2000 - dropped
    assert 250 <= kept <= 400
    assert read_all(reader, kept * len(LINE)) == LINE * kept  # whole lines, all of the kept ones
    output.close(timeout_s=5)
    assert output.take_dropped() == {}
    os.close(reader)
    os.close(writer)


def test_access_lines_and_log_records_are_written_in_the_order_they_were_handed_over():
    reader, writer = os.pipe()  # both to one pipe, as with 2>&1
    output = logs.Output(max_pending_bytes=1 << 20)
    access = logs.AccessLog(True, output, fd=writer)
    handler = logs._OutputHandler(output, fd=writer)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test_logs")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        access.write(access_line("first"))
        access.flush()
        logger.warning("second")
        access.write(access_line("third"))
        access.flush()
    finally:
        logger.removeHandler(handler)
    output.close(timeout_s=5)
    os.close(writer)
    lines = [json.loads(line) for line in read_all(reader, 1 << 20).splitlines()]
    assert [line.get("request_id") or line.get("msg") for line in lines] == ["first", "second", "third"]
    os.close(reader)


def test_lines_nobody_can_read_any_more_are_counted_as_dropped():
    reader, writer = os.pipe()
    os.close(reader)  # EPIPE from now on (Python ignores SIGPIPE)
    output = logs.Output(max_pending_bytes=1 << 20)
    output.put(writer, LINE * 3, 3, "app")
    output.close(timeout_s=5)
    assert output.take_dropped() == {"app": 3}
    os.close(writer)


def test_setup_sends_log_records_through_the_returned_output():
    root = logging.getLogger()
    before = root.handlers[:], root.level
    try:
        output = logs.setup(Logging(level="warning", max_pending_bytes=1234))
        assert output.max_pending_bytes == 1234
        assert [type(h) for h in root.handlers] == [logs._OutputHandler] and root.level == logging.WARNING
    finally:
        root.handlers[:], level = before
        root.setLevel(level)

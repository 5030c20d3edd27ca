"""What one request costs the gateway's own code, with no sockets and no second process.

    python -m loadtests.request_cost                   # non-streaming: CPU µs per request
    python -m loadtests.request_cost --burst           # a stream whose 68 events arrive in one read
    python -m loadtests.request_cost --instructions    # instructions per request, under callgrind

It builds the real gateway (``app.Gateway``: default settings, one prefix-routed SGLang pool of two
endpoints, metrics and the access log on) and drives its protocol objects through in-memory
transports. The client connection is fed the benchmark's requests (the 64 bodies of
``bench/chat.lua``); each upstream request is answered, on the next loop turn, with the fast
backend's canned response. Every step runs: parsing, auth, decode, routing, relay, the ledger.
Only the syscalls and the other processes are left out.

Why: ``bench_overhead`` gives the truth with sockets, but its figures move by 15-25 % between runs on
this VM, so small changes to the hot path cannot be judged with it. Here, process CPU time moves by a few
percent, and callgrind's instruction count (``--instructions``: two runs of different lengths, so
start-up cancels out) does not move at all. Instructions are not time: memory-bound work (joining
or scanning a 15 KB stream) runs many instructions per cycle. The ledger's periodic flusher is not
started, so metrics and log lines are settled in full batches of 64 however slow the run (callgrind
is about 50x slower); in service, quiet periods flush smaller batches.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import orjson
import uvloop

from gateway import settings
from gateway.app import Gateway
from gateway.server import Connection
from gateway.upstream import _Connection
from loadtests.fast_backend import BURST, JSON_HEAD, NON_STREAM

ENDPOINTS = ("127.0.0.1", 18001), ("127.0.0.1", 18002)
CONFIG = ('[[pools]]\nname = "bench"\nengine = "sglang"\nrole = "interactive"\nmodels = ["bench"]\n'
          f'endpoints = {json.dumps([f"http://{h}:{p}" for h, p in ENDPOINTS])}\n')
PROJECT = Path(__file__).resolve().parent.parent


def requests(stream: bool) -> list[bytes]:
    """The 64 requests of ``bench/chat.lua``: a shared system prompt, then a user message that differs."""
    system = "You are a concise assistant behind an edge gateway; answer in plain text. " * 11
    out = []
    for k in range(1, 65):
        user = f"Request {k:02d} of 64: list three facts about the number {k * 7} and explain why each one holds."
        body = orjson.dumps({"model": "bench", "messages": [{"role": "system", "content": system},
                                                            {"role": "user", "content": user}],
                             "max_tokens": 64 if stream else 16, "stream": stream})
        out.append(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                   b"Content-Type: application/json\r\nAuthorization: Bearer sk-bench\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return out


class MemoryTransport(asyncio.Transport):
    """Hands every write to a callback; stands in for a socket."""

    def __init__(self, on_write):
        super().__init__()
        self.on_write = on_write
        self.closing = False

    def write(self, data) -> None:
        self.on_write(data)

    def get_extra_info(self, name, default=None):
        return default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(count: int, warmup: int, burst: bool, access_log: BinaryIO) -> float:
    """CPU seconds per request over ``count`` requests, after ``warmup`` of them."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(CONFIG)
    try:
        config = settings.load(f.name, environ={})
    finally:
        os.unlink(f.name)
    gateway = Gateway(config, serve_admin=False)
    gateway.access_log.stream = access_log
    loop = asyncio.get_running_loop()
    answer = BURST if burst else JSON_HEAD % len(NON_STREAM) + NON_STREAM
    for key in ENDPOINTS:
        idle = []
        for _ in range(4):
            upstream = _Connection(gateway.upstream, key)
            upstream.connection_made(MemoryTransport(
                lambda data, c=upstream: loop.call_soon(c.data_received, answer)))
            idle.append(upstream)
        gateway.upstream._idle[key] = idle
    for pool in gateway.pools:
        for endpoint in pool.endpoints:
            endpoint.healthy = True
            endpoint.refresh()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)  # as gateway/__main__.py runs it

    response: list[bytes] = []  # the writes of the response in progress
    answered: list[asyncio.Future] = [loop.create_future()]  # the current request's

    def on_write(data: bytes) -> None:
        response.append(data)
        head = response[0].split(b"\r\n\r\n", 1)[0]
        # A response ends with its one write (content-length) or with the chunked terminator.
        if data.endswith(b"0\r\n\r\n") or (data is response[0] and b"\r\ncontent-length:" in head):
            answered[0].set_result(b"".join(response))
            response.clear()

    client = Connection(gateway.server)
    client.connection_made(MemoryTransport(on_write))
    bodies = requests(burst)

    async def run(n: int) -> None:
        for i in range(n):
            client.data_received(bodies[i % len(bodies)])
            whole = await answered[0]
            if not whole.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"request_cost: the gateway answered {whole[:300]!r}")
            answered[0] = loop.create_future()

    await run(warmup)
    start = time.process_time()
    await run(count)
    return (time.process_time() - start) / count


def instructions(args) -> int:
    """Instructions per request: callgrind over two runs that differ only in length."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("request_cost: --instructions needs valgrind (Debian: apt-get install valgrind)")
    totals = []
    for count in (args.requests, 5 * args.requests):
        cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
               "loadtests.request_cost", "--requests", str(count), "--warmup", "0"] + (["--burst"] if args.burst else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=PROJECT)
        totals.append(int(re.search(r"Collected : (\d+)", done.stderr).group(1)))
    return (totals[1] - totals[0]) // (4 * args.requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests measured")
    parser.add_argument("--warmup", type=int, default=2000, help="requests run first, not measured")
    parser.add_argument("--burst", action="store_true", help="streamed requests, whole stream in one read")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    args = parser.parse_args(argv)
    kind = "burst-streamed" if args.burst else "non-streaming"
    if args.instructions:
        if args.requests == parser.get_default("requests"):
            args.requests = 500
        print(f"{instructions(args):,} instructions per {kind} request (callgrind, in process)")
        return 0
    with tempfile.TemporaryFile() as access_log:
        per_request = uvloop.run(measure(args.requests, args.warmup, args.burst, access_log))
    print(f"{per_request * 1e6:.1f} µs of CPU per {kind} request (in process, {args.requests:,} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

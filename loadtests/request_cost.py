"""What one request costs the gateway's own code, with no sockets and no second process.

    python -m loadtests.request_cost                   # non-streaming: CPU µs per request
    python -m loadtests.request_cost --mode burst      # streams whose 68 events arrive in one read
    python -m loadtests.request_cost --mode paced      # per relayed event, one event per upstream read
    python -m loadtests.request_cost --instructions    # instructions instead, under callgrind

It builds the real gateway (``app.Gateway``: default settings, one prefix-routed SGLang pool of two
endpoints, metrics and the access log on) and drives its protocol objects through in-memory
transports. The client connection is fed the benchmark's requests (the 64 bodies of
``bench/chat.lua``); each upstream request is answered, on the next loop turn, with the fast
backend's canned response. Every step runs: parsing, auth, decode, routing, relay, the ledger.
Only the syscalls and the other processes are left out.

Why: ``bench_overhead`` gives the truth with sockets, but its figures move by 15-30 % between runs on
this VM, so small changes to the hot path cannot be judged with it. Here, process CPU time still moves
by about 10 %, but callgrind's instruction count (``--instructions``: two runs of different lengths,
so start-up cancels out) does not move at all. Instructions are not time: memory-bound work (joining
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
from loadtests.fast_backend import BURST, JSON_HEAD, NON_STREAM, SSE_HEAD, STREAM_EVENTS

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


def build_gateway(answer: bytes, access_log: BinaryIO) -> tuple[Gateway, list[_Connection]]:
    """The gateway with its default settings, both endpoints healthy, and four idle upstream
    connections per endpoint (returned too) that answer every request with ``answer`` on the next
    loop turn."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(CONFIG)
    try:
        config = settings.load(f.name, environ={})
    finally:
        os.unlink(f.name)
    gateway = Gateway(config)
    gateway.access_log.fd = access_log.fileno()
    loop = asyncio.get_running_loop()
    upstreams = []
    for key in ENDPOINTS:
        idle = []
        for _ in range(4):
            upstream = _Connection(gateway.upstream, key)
            upstream.connection_made(MemoryTransport(
                lambda data, c=upstream: loop.call_soon(c.data_received, answer)))
            idle.append(upstream)
        upstreams += idle
        gateway.upstream._idle[key] = idle  # the pool's own list: no sockets behind these connections
    for pool in gateway.pools:
        for endpoint in pool.endpoints:
            endpoint.healthy = True
            endpoint.refresh()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)  # as gateway/__main__.py runs it
    return gateway, upstreams


async def per_request(count: int, warmup: int, burst: bool, access_log: BinaryIO) -> float:
    """CPU seconds per request over ``count`` requests, after ``warmup`` of them."""
    gateway, _ = build_gateway(BURST if burst else JSON_HEAD % len(NON_STREAM) + NON_STREAM, access_log)
    loop = asyncio.get_running_loop()
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


async def per_event(count: int, warmup: int, access_log: BinaryIO) -> float:
    """CPU seconds per relayed SSE event of one open stream whose engine sends one event per read
    (the paced case), over ``count`` events after ``warmup``."""
    first, event = (b"%x\r\n%s\r\n" % (len(e), e) for e in STREAM_EVENTS[:2])
    gateway, upstreams = build_gateway(SSE_HEAD + first, access_log)
    writes: list[bytes] = []
    client = Connection(gateway.server)
    client.connection_made(MemoryTransport(writes.append))
    client.data_received(requests(True)[0])
    while not writes:
        await asyncio.sleep(0)
    if not writes[0].startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"request_cost: the gateway answered {writes[0][:300]!r}")
    (stream,) = [c for c in upstreams if c.exchange is not None]
    for _ in range(warmup):
        stream.data_received(event)
    start = time.process_time()
    for _ in range(count):
        stream.data_received(event)
    cpu = time.process_time() - start
    if len(writes) != 1 + warmup + count or not writes[-1].endswith(STREAM_EVENTS[1] + b"\r\n"):
        raise SystemExit(f"request_cost: {len(writes) - 1} of {warmup + count} events reached the client")
    return cpu / count


UNITS = {"plain": "non-streaming request", "burst": "burst-streamed request", "paced": "relayed SSE event (paced)"}


def instructions(mode: str, count: int) -> int:
    """Instructions per unit: callgrind over two runs that differ only in length."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("request_cost: --instructions needs valgrind (Debian: apt-get install valgrind)")
    totals = []
    for n in (count, 5 * count):
        cmd = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
               "loadtests.request_cost", "--mode", mode, "--count", str(n), "--warmup", "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=PROJECT)
        totals.append(int(re.search(r"Collected : (\d+)", done.stderr).group(1)))
    return (totals[1] - totals[0]) // (4 * count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(UNITS), default="plain",
                        help="plain: non-streaming requests; burst: streams whose events arrive in one read; "
                             "paced: the events of one stream, one per read")
    parser.add_argument("--count", type=int, help="requests (or events) measured; default 20,000 (200,000 "
                                                  "events), or a fifth of that with --instructions")
    parser.add_argument("--warmup", type=int, default=2000, help="requests (or events) run first, not measured")
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind")
    args = parser.parse_args(argv)
    count = args.count or (200_000 if args.mode == "paced" else 20_000) // (40 if args.instructions else 1)
    if args.instructions:
        print(f"{instructions(args.mode, count):,} instructions per {UNITS[args.mode]} (callgrind, in process)")
        return 0
    with tempfile.TemporaryFile() as access_log:
        if args.mode == "paced":
            cost = uvloop.run(per_event(count, args.warmup, access_log))
        else:
            cost = uvloop.run(per_request(count, args.warmup, args.mode == "burst", access_log))
    print(f"{cost * 1e6:.2f} µs of CPU per {UNITS[args.mode]} (in process, {count:,} measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

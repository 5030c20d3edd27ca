"""Scale check: thousands of concurrent open streams held through the gateway, and RSS per stream.

    python -m loadtests.bench_streams                                  # 10,000 streams, --workers 2
    python -m loadtests.bench_streams --streams 300 --workers 1 --hold 2   # smoke run

**Method.** A slow backend (``loadtests/fast_backend.py --token-ms 2000``: a stream's first event at
once, then one event every 2 s, 67 events in all, so every stream stays open for over two minutes)
and the gateway with its defaults, except that a replica may hold every stream (``max_in_flight``;
the default, 64, would queue and then refuse most of them: that is admission working, not scale).
This script is the client: ``--streams`` connections, each sending one streaming chat request, opened
at most ``OPENING_AT_ONCE`` at a time, over uvloop Protocols so that the client is not the limit.

1. Idle: once the gateway answers, the RSS and open sockets of its process tree (``/proc``).
2. Open: every stream must answer ``200`` and deliver its first SSE event within ``--open-timeout``.
3. Hold ``--hold`` seconds with every stream open; RSS and open sockets are sampled every second (peak
   kept), and the gateway's CPU over the hold is read. At the end every stream must still be
   flowing: an event within the last two token intervals, no error event, no dropped connection.
4. Close every client connection: the gateway must cancel the upstream side, so its open sockets fall
   back to the idle count, give or take the health-check, scrape and keep-alive connections each
   worker holds per endpoint (checked for ``CLOSE_TIMEOUT_S``).

RSS per open stream = (RSS with every stream open - idle RSS) / streams: the buffers, protocol
objects, parsers and the handler's frame of one stream on both sides of the gateway.

Why ``--workers 2`` by default: each stream holds two sockets in the gateway (client and upstream),
and this machine's hard limit on open files per process is 20,000 (``ulimit -Hn``; an unprivileged
process cannot raise it), so one process holds at most about 9,990 streams. Two workers behind
``SO_REUSEPORT`` hold 10,000 with about 5,000 each.

The run prints a table and writes ``loadtests/results/bench_streams-<timestamp>.json``; it exits 1 if
a stream failed or the gateway did not let go of the closed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from loadtests.bench_overhead import (
    RESULTS_DIR,
    Process,
    free_port,
    gateway_config,
    python_for_project,
    start_backend,
    tree_cpu,
    wait_ready,
)

TOKEN_MS = 2000.0
OPENING_AT_ONCE = 256  # connections being opened concurrently (the listen backlog is 4096)
CLOSE_TIMEOUT_S = 15.0
# Sockets a worker may open or drop between two counts whatever the streams do, per endpoint: its
# health check's, its metrics scrape's and one kept-alive upstream connection.
SOCKETS_PER_WORKER_AND_ENDPOINT = 3
ENDPOINTS = 2  # start_backend runs two replicas
STREAM_BODY = json.dumps({"model": "bench", "stream": True, "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Hold this stream open, please."}]}).encode()


@dataclass
class Tally:
    """What the client saw, over all streams."""

    opened: int = 0  # answered 200 and delivered a first event
    refused: dict[str, int] = field(default_factory=dict)  # status line -> count
    error_events: int = 0
    dropped: int = 0  # connection closed by the other side before we closed it
    connect_failed: int = 0


class StreamClient(asyncio.Protocol):
    """One streaming request on its own connection; counts what arrives, never buffers it."""

    def __init__(self, tally: Tally, request: bytes):
        self.tally = tally
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status_ok = False
        self.events = 0
        self.last_event_at = 0.0
        self.closing = False
        self.settled = asyncio.Event()  # first event, refusal or loss: the stream's opening is over

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self.status_ok:
            self.head += data
            if b"\r\n" not in self.head:
                return
            status_line = self.head.split(b"\r\n", 1)[0].decode("latin-1")
            if not status_line.startswith("HTTP/1.1 200"):
                self.tally.refused[status_line] = self.tally.refused.get(status_line, 0) + 1
                self.settled.set()
                self.close()
                return
            self.status_ok = True
            data, self.head = self.head, b""
        if b'{"error"' in data:
            self.tally.error_events += 1
        if (events := data.count(b"data:")) > 0:
            if not self.events:
                self.tally.opened += 1
                self.settled.set()
            self.events += events
            self.last_event_at = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self.settled.set()
        if not self.closing:
            self.tally.dropped += 1

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()


def tree_rss_and_sockets(roots: list[int]) -> tuple[float, int]:
    """RSS (MiB) and open sockets of every process in the trees under ``roots``."""
    rss_kib, sockets = 0, 0
    for pid in tree_cpu(roots):  # the tree's pids, from one /proc snapshot
        try:
            with open(f"/proc/{pid}/status") as f:
                rss_kib += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with os.scandir(f"/proc/{pid}/fd") as fds:
                sockets += sum(1 for fd in fds if os.readlink(fd.path).startswith("socket:"))
        except (OSError, StopIteration):
            continue  # exited meanwhile
    return rss_kib / 1024, sockets


async def open_streams(port: int, count: int, tally: Tally, clients: list[StreamClient]) -> None:
    """Open ``count`` streams, appending each connected client to ``clients`` (kept on a timeout)."""
    loop = asyncio.get_running_loop()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n" % len(STREAM_BODY)) + STREAM_BODY
    gate = asyncio.Semaphore(OPENING_AT_ONCE)

    async def one() -> None:
        async with gate:
            client = StreamClient(tally, request)
            try:
                await loop.create_connection(lambda: client, "127.0.0.1", port)
            except OSError:
                tally.connect_failed += 1
                return
            clients.append(client)
            await client.settled.wait()  # hold the slot until the stream is open: a steady ramp

    await asyncio.gather(*(one() for _ in range(count)))


async def scenario(args: argparse.Namespace, gateway: Process, port: int) -> dict:
    roots = [gateway.pid]
    idle_rss, idle_sockets = tree_rss_and_sockets(roots)
    tally = Tally()
    clients: list[StreamClient] = []
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(open_streams(port, args.streams, tally, clients), args.open_timeout)
    except TimeoutError:
        pass  # the streams not open by now count as not opened
    open_s = time.monotonic() - t0
    peak_rss, peak_sockets = tree_rss_and_sockets(roots)
    cpu_before = sum(tree_cpu(roots).values())
    hold_end = time.monotonic() + args.hold
    while time.monotonic() < hold_end:
        await asyncio.sleep(1.0)
        rss, sockets = tree_rss_and_sockets(roots)
        peak_rss, peak_sockets = max(peak_rss, rss), max(peak_sockets, sockets)
    held_rss, _ = tree_rss_and_sockets(roots)
    cpu_hold = sum(tree_cpu(roots).values()) - cpu_before
    recent = time.monotonic() - 2 * args.token_ms / 1000 - 0.5
    flowing = sum(1 for c in clients if c.status_ok and not c.closing and c.last_event_at >= recent)
    events = sum(c.events for c in clients)

    for c in clients:
        c.close()
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    slack = socket_slack(args.workers)
    while True:
        after_rss, after_sockets = tree_rss_and_sockets(roots)
        if after_sockets <= idle_sockets + slack or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    return {
        "streams": args.streams, "workers": args.workers, "token_ms": args.token_ms, "hold_s": args.hold,
        "opened": tally.opened, "open_s": round(open_s, 2), "flowing_at_end_of_hold": flowing,
        "events_received": events, "refused": tally.refused, "error_events": tally.error_events,
        "dropped": tally.dropped, "connect_failed": tally.connect_failed,
        "rss_idle_mib": round(idle_rss, 1), "rss_held_mib": round(held_rss, 1), "rss_peak_mib": round(peak_rss, 1),
        "rss_per_stream_kib": round((held_rss - idle_rss) * 1024 / max(tally.opened, 1), 1),
        "sockets_idle": idle_sockets, "sockets_peak": peak_sockets, "sockets_after_close": after_sockets,
        "rss_after_close_mib": round(after_rss, 1),
        "cpu_s_per_s_during_hold": round(cpu_hold / args.hold, 3),
    }


def socket_slack(workers: int) -> int:
    return SOCKETS_PER_WORKER_AND_ENDPOINT * workers * ENDPOINTS


def verdict(r: dict) -> list[str]:
    """What failed, in words (empty: every stream was held and let go)."""
    problems = []
    if r["opened"] != r["streams"]:
        problems.append(f"{r['streams'] - r['opened']} stream(s) not opened")
    if r["flowing_at_end_of_hold"] != r["streams"]:
        problems.append(f"{r['streams'] - r['flowing_at_end_of_hold']} stream(s) not flowing at the end of the hold")
    for key in ("error_events", "dropped", "connect_failed"):
        if r[key]:
            problems.append(f"{key}: {r[key]}")
    if r["refused"]:
        problems.append(f"refused: {r['refused']}")
    if r["sockets_after_close"] > r["sockets_idle"] + socket_slack(r["workers"]):
        problems.append(f"open sockets after close {r['sockets_after_close']} (idle {r['sockets_idle']})")
    return problems


def report(r: dict, problems: list[str]) -> str:
    rows = [
        ("open streams held", (f"{r['flowing_at_end_of_hold']:,} of {r['streams']:,} "
                              f"(gateway --workers {r['workers']}, hold {r['hold_s']:g} s)")),
        ("time to open all", f"{r['open_s']} s"),
        ("errors", (f"refused {sum(r['refused'].values())}, error events {r['error_events']}, "
                   f"dropped {r['dropped']}, connect failed {r['connect_failed']}")),
        ("gateway RSS idle / held / peak", f"{r['rss_idle_mib']} / {r['rss_held_mib']} / {r['rss_peak_mib']} MiB"),
        ("**RSS per open stream**", f"**{r['rss_per_stream_kib']} KiB**"),
        ("gateway open sockets idle / peak / after close",
         f"{r['sockets_idle']} / {r['sockets_peak']:,} / {r['sockets_after_close']}"),
        ("gateway RSS after close", f"{r['rss_after_close_mib']} MiB"),
        ("gateway CPU while holding", (f"{r['cpu_s_per_s_during_hold']} s/s "
                                      f"({r['streams'] * 1000 / r['token_ms']:,.0f} events/s relayed)")),
    ]
    lines = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    lines.append("\nPASS: every stream held without error and released" if not problems
                 else "\nFAIL: " + "; ".join(problems))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hold", type=float, default=10.0, help="seconds every stream is held open")
    p.add_argument("--token-ms", type=float, default=TOKEN_MS, help="backend: ms between a stream's events")
    p.add_argument("--open-timeout", type=float, default=120.0, help="seconds for every stream to open")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    if args.streams + 64 > hard:
        print(f"bench_streams: {args.streams} client sockets exceed this process's open-file limit {hard}",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started: list[Process] = []
    ports: set[int] = set()
    cpus = f"0-{(os.cpu_count() or 1) - 1}"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
            workdir = Path(tmp)
            _backend, backend_port = start_backend(started, workdir, ports, args.token_ms, cpus)
            port = free_port(ports)
            endpoints = [f"http://127.0.0.1:{backend_port}", f"http://127.0.0.1:{backend_port + 1}"]
            config = workdir / "gateway.toml"
            config.write_text(gateway_config(port, free_port(ports), endpoints)
                              + f"target_in_flight = {args.streams}\nmax_in_flight = {args.streams}\n")
            gateway = Process(started, "gateway", [python_for_project(), "-m", "gateway", "--config",
                                                   str(config), "--workers", str(args.workers)],
                              cpus, workdir, stdout_name="gateway-access.log")
            wait_ready(port, gateway)
            result = uvloop.run(scenario(args, gateway, port))
            result["gateway_alive_at_end"] = gateway.alive()
    finally:
        for proc in reversed(started):
            proc.stop()
    problems = verdict(result)
    if not result["gateway_alive_at_end"]:
        problems.append("the gateway exited during the run")
    print(f"# Open streams through the gateway ({time.strftime('%Y-%m-%d %H:%M')})\n")
    print(report(result, problems))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    out = args.results_dir / f"bench_streams-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({**result, "problems": problems}, indent=1))
    print(f"\nRaw results: {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

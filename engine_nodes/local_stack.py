"""``python -m engine_nodes.local_stack --config gateway/example.toml``: the `make run` demo.

Reads the gateway's own config, starts one simulator process per pool (its endpoints must be
consecutive ports on 127.0.0.1, which is what the example config lists), waits until every replica
listens, then runs the gateway in the foreground. Ctrl-C or SIGTERM stops the gateway first (it
drains), then the simulators.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
from urllib.parse import urlsplit


def simulator_commands(config_path: str, speed: float) -> list[list[str]]:
    from gateway.settings import load

    settings = load(config_path)
    commands = []
    for pool in settings.pools:
        ports = [urlsplit(u).port for u in pool.endpoints]
        hosts = {urlsplit(u).hostname for u in pool.endpoints}
        if hosts - {"127.0.0.1", "localhost"} or ports != list(range(ports[0], ports[0] + len(ports))):
            raise SystemExit(f"pool {pool.name}: local_stack needs consecutive ports on 127.0.0.1")
        commands.append([sys.executable, "-m", "engine_nodes", "sim", "--flavor", pool.engine,
                         "--model", pool.models[0], "--port", str(ports[0]),
                         "--replicas", str(len(ports)), "--speed", str(speed)])
    return commands


def start_simulators(commands: list[list[str]]) -> list[subprocess.Popen]:
    procs = []
    try:
        for cmd in commands:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            line = proc.stdout.readline()  # type: ignore[union-attr]  # "" if it died first
            if not line.startswith("READY"):
                raise RuntimeError(f"simulator did not start: {' '.join(cmd)} said {line!r}")
            print(f"simulator ready: {' '.join(cmd[3:])} -> ports {line.split()[1:]}", file=sys.stderr)
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        stop_process(proc)


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; always reaps the process."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


PORTS_FROM = 10000  # above the well-known and most registered service ports


def free_ports(n: int = 1) -> int:
    """First of ``n`` consecutive ports free on 127.0.0.1 right now (for simulators on K ports).

    Drawn below the kernel's ephemeral range, never from it: a port there that is free when checked
    can be handed a moment later to any outgoing connection as its local port. A gateway under test
    once failed to bind such a port (address in use) just after its own health checks had begun.
    """
    top = max(_ephemeral_low() - n, PORTS_FROM + 1000)  # a kernel whose range starts low: share it
    for _ in range(200):
        base = random.randrange(PORTS_FROM, top)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no block of free ports on 127.0.0.1")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768, its default, elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gateway/example.toml")
    parser.add_argument("--speed", type=float, default=1.0, help="simulator time compression")
    args = parser.parse_args(argv)
    sims = start_simulators(simulator_commands(args.config, args.speed))
    gateway = subprocess.Popen([sys.executable, "-m", "gateway", "--config", args.config])
    forward = lambda signum, frame: gateway.send_signal(signal.SIGTERM)  # noqa: E731
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = gateway.wait()
    finally:
        if gateway.poll() is None:
            gateway.kill()
        stop(sims)
    return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

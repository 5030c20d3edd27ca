"""``python -m loadtests.run``: the `make loadtest` run, start to summary, in one command.

1. Start the `make run` stack (``engine_nodes.local_stack``: simulated SGLang and vLLM replicas and the
   gateway, from the gateway's config with its environment overrides), after checking that every
   port it needs is free, and wait until the gateway's ``/readyz`` answers 200. If the ports are
   taken because `make run` is already up (its gateway answers ``/readyz``), load that stack.
2. Run Locust headless with the locustfile and the shapes (``--shape``, default ``steady``) for
   ``--run-time`` seconds, writing Locust's CSV files and HTML report and the KPI samples to ``--out``.
3. Print the summary table (``loadtests.summary``) and save it as ``summary.md`` next to them.
4. Stop the stack (SIGTERM: the gateway drains, then the simulators stop).

``--host URL`` skips steps 1 and 4 and loads a gateway that is already running. For the failover
drill against the local stack, the victim is the interactive pool's second replica, revived
through its first (set ``LOADTEST_KILL_SIM`` / ``LOADTEST_KILL_CMD`` to choose another).

The exit status is Locust's: 0 when no request failed, 1 when some did; 2 when the stack's ports
are taken.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from engine_nodes.local_stack import stop_process
from loadtests import kpi, summary

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0  # the gateway drains streams for up to timeouts.drain_s (30 s by default)


def stack_ports(settings) -> list[tuple[str, int]]:
    """Every (host, port) the local stack listens on: gateway, admin, and each replica."""
    ports = [(settings.listen.host, settings.listen.port), (settings.admin.host, settings.admin.port)]
    for pool in settings.pools:
        ports += [(urlsplit(u).hostname or "127.0.0.1", urlsplit(u).port or 80) for u in pool.endpoints]
    return ports


def busy_ports(ports: list[tuple[str, int]]) -> list[int]:
    busy = []
    for host, port in ports:
        with socket.socket() as s:
            # As the servers will: a port held only by TIME_WAIT connections of an earlier run is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                busy.append(port)
    return busy


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(url: str, stack: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.poll() is not None:
            raise RuntimeError(f"the stack exited with status {stack.returncode} before it was ready")
        if is_ready(url):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url}/readyz did not answer 200 within {timeout:.0f} s")


def locust_command(args: argparse.Namespace, host: str) -> list[str]:
    files = f"{REPO / 'loadtests' / 'locustfile.py'},{REPO / 'loadtests' / 'shapes.py'}"
    return [sys.executable, "-m", "locust", "-f", files, "--headless", "--only-summary",
            "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.run_time}s", "--host", host,
            "--csv", str(args.out / "locust"), "--html", str(args.out / "locust.html"), *args.locust_args]


def drill_env(settings) -> dict[str, str]:
    """Kill the interactive pool's second replica, revive it through the first."""
    pool = next((p for p in settings.pools if p.role == "interactive" and len(p.endpoints) > 1), None)
    if pool is None:
        raise SystemExit("the failover drill needs an interactive pool with at least two replicas")
    return {"LOADTEST_KILL_SIM": pool.endpoints[1], "LOADTEST_SIM_ADMIN": pool.endpoints[0]}


def start_stack(config: Path, speed: float, log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "engine_nodes.local_stack", "--config", str(config),
                                 "--speed", str(speed)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("gateway/example.toml"),
                        help="gateway config of the local stack")
    parser.add_argument("--speed", type=float, default=1.0, help="simulator time compression (1: real time)")
    parser.add_argument("--host", help="load this gateway instead of starting the local stack")
    parser.add_argument("--shape", default="steady", choices=("steady", "ramp", "burst", "failover"))
    parser.add_argument("-u", "--users", type=int, default=32, help="base user count")
    parser.add_argument("-r", "--spawn-rate", type=float, default=8.0)
    parser.add_argument("-t", "--run-time", type=int, default=120, help="seconds")
    parser.add_argument("--out", type=Path, help="results folder (default: loadtest-results/<UTC time>)")
    parser.add_argument("locust_args", nargs="*", help="after --: more locust options, or user class names")
    args = parser.parse_args(argv)
    args.out = args.out or Path("loadtest-results") / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LOADTEST_SHAPE": args.shape}
    has_victim = bool(env.get("LOADTEST_KILL_CMD") or env.get("LOADTEST_KILL_SIM"))
    needs_victim = args.shape == "failover" and not has_victim

    stack = None
    if args.host:
        if needs_victim:
            raise SystemExit("--shape failover with --host needs LOADTEST_KILL_CMD or LOADTEST_KILL_SIM")
        host = args.host
    else:
        from gateway.settings import load

        settings = load(str(args.config))
        listen_host = "127.0.0.1" if settings.listen.host in ("0.0.0.0", "") else settings.listen.host
        host = f"http://{listen_host}:{settings.listen.port}"
        if needs_victim:
            env.update(drill_env(settings))
        busy = busy_ports(stack_ports(settings))
        if busy and is_ready(host):
            print(f"a gateway already answers at {host} (`make run`?): loading it as it is", file=sys.stderr)
        elif busy:
            print(f"ports in use: {', '.join(map(str, busy))}. Stop what holds them (`ss -ltnp`), or run on "
                  "other ports: a copy of the config with other endpoint ports, and/or "
                  "EDGE_GATEWAY__LISTEN__PORT=... EDGE_GATEWAY__ADMIN__PORT=...", file=sys.stderr)
            return 2
        else:
            stack = start_stack(args.config.resolve(), args.speed, args.out / "stack.log")
    try:
        if stack is not None:
            wait_ready(host, stack, READY_TIMEOUT_S)
            print(f"stack ready at {host} (simulator speed {args.speed}); log in {args.out / 'stack.log'}",
                  file=sys.stderr)
        code = subprocess.run(locust_command(args, host), cwd=REPO, env=env).returncode
    finally:
        if stack is not None:
            stop_process(stack, STOP_TIMEOUT_S)
    if not (args.out / kpi.FILE_NAME).is_file():
        print(f"locust exited with status {code} and left no {kpi.FILE_NAME} in {args.out}", file=sys.stderr)
        return code or 2
    table = summary.render(args.out)
    (args.out / "summary.md").write_text(table + "\n")
    print(f"\nResults in {args.out} (locust.html, locust_*.csv, kpi_samples.json, summary.md)\n")
    print(table)
    return code


if __name__ == "__main__":
    sys.exit(main())

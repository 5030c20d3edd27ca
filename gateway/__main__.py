"""``edge-gateway --config FILE [--workers N]``: read settings, install uvloop, serve, drain on SIGTERM.

With one worker, one process serves the public and the admin listener. With ``--workers N`` a small
supervisor starts N worker processes that share the public port (SO_REUSEPORT, the kernel spreads
connections), serves the admin listener itself, restarts a worker that dies, and forwards SIGTERM so
that every worker drains. Metrics go through prometheus-client's multiprocess directory, so any
``/metrics`` reports the sum over all workers; the rest of the admin API is asked of every worker,
on a loopback socket the supervisor binds for each (``admin.supervisor_app``). Unless
``gossip.peers`` names the region's processes, the workers share their placements with each other
over loopback sockets the supervisor binds (``gossip.between_workers``, gateway/gossip.py).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

log = logging.getLogger("gateway")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML settings file (environment EDGE_GATEWAY__* overrides it)")
    parser.add_argument("--workers", type=int, help="worker processes (overrides `workers` in the config)")
    # Started by the supervisor, with the worker's index (its gossip port is gossip.port + index),
    # its admin socket and, when the workers gossip among themselves, their loopback sockets
    # (gossip.Siblings).
    parser.add_argument("--worker", type=int, metavar="INDEX", help=argparse.SUPPRESS)
    parser.add_argument("--admin-fd", type=int, metavar="FD", help=argparse.SUPPRESS)
    parser.add_argument("--siblings", metavar="FD:PORTS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from gateway import logs, settings

    try:
        config = settings.load(args.config, workers=args.workers)
    except settings.SettingsError as e:
        print(f"edge-gateway: {e}", file=sys.stderr)
        return 2
    output = logs.setup(config.logging)
    try:
        if args.worker is not None:
            from gateway.gossip import Siblings

            siblings = Siblings.parse(args.siblings) if args.siblings else None
            admin_sock = socket.socket(fileno=args.admin_fd)
            return _serve(config, output, reuse_port=True, worker=args.worker, siblings=siblings,
                          admin_sock=admin_sock)
        if config.workers == 1:
            return _serve(config, output, reuse_port=False, worker=0)
        return _supervise(config, args.config)
    finally:
        output.close(timeout_s=2.0)  # the last lines ("stopped"), unless nobody reads them


def _serve(config, output, reuse_port: bool, worker: int, siblings=None, admin_sock=None) -> int:
    import uvloop

    from gateway.app import Gateway

    async def run() -> None:
        gateway = Gateway(config, worker=worker, siblings=siblings, admin_sock=admin_sock, output=output)
        # Before start: a SIGTERM that arrives while the process starts (a supervisor stopping its
        # workers as one of them comes up) must drain it, not kill it.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, gateway.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_keys)
        await gateway.start(reuse_port=reuse_port)
        # Everything built so far lives as long as the process: keep the cyclic GC from walking it
        # again and again, and let the short-lived per-request objects pile up a little longer
        # between young-generation collections (fewer, not longer, pauses).
        gc.freeze()
        gc.set_threshold(20000, 20, 20)
        await gateway.stop_requested.wait()
        log.info("draining", extra={"fields": {"drain_s": config.timeouts.drain_s}})
        await gateway.drain()
        await gateway.stop()
        log.info("stopped")

    uvloop.run(run())
    return 0


def _supervise(config, config_path: str | None) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="edge-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client is imported
    import uvloop
    from prometheus_client import multiprocess

    from gateway.admin import bind_worker_admin, start_admin, supervisor_app
    from gateway.gossip import Siblings, bind_siblings
    from gateway.metrics import Metrics

    workers = config.workers
    socks = bind_siblings(workers) if config.gossip.between_workers and not config.gossip.peers else []
    # The secret is drawn anew at every start, and is the only one accepted: only this supervisor's
    # workers ever hold it.
    env = None
    if socks:
        env = {**os.environ, config.gossip.secret_env: secrets.token_hex(32)}
        env.pop(config.gossip.also_accepted_env, None)
    ports = tuple(sock.getsockname()[1] for sock in socks)
    admin_socks = [bind_worker_admin() for _ in range(workers)]

    def start(worker: int) -> subprocess.Popen:
        admin_fd = admin_socks[worker].fileno()
        cmd = [sys.executable, "-m", "gateway", "--worker", str(worker), "--workers", str(workers),
               "--admin-fd", str(admin_fd)]
        cmd += ["--config", config_path] if config_path else []
        if not socks:
            return subprocess.Popen(cmd, pass_fds=(admin_fd,))
        sock = socks[worker]
        cmd += ["--siblings", Siblings(sock.fileno(), ports).argument()]
        return subprocess.Popen(cmd, pass_fds=(admin_fd, sock.fileno()), env=env)

    async def run() -> None:
        metrics = Metrics()
        procs = [start(i) for i in range(workers)]
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)

        def reload_keys() -> None:
            for proc in procs:
                proc.send_signal(signal.SIGHUP)

        loop.add_signal_handler(signal.SIGHUP, reload_keys)

        restarts_held = False

        def hold_restarts(held: bool) -> None:
            nonlocal restarts_held
            restarts_held = held

        app = supervisor_app(worker_ports=[sock.getsockname()[1] for sock in admin_socks],
                             metrics_text=metrics.exposition,
                             alive=lambda: sum(p.poll() is None for p in procs),
                             hold_restarts=hold_restarts, stop=stopping.set)
        runner, port = await start_admin(app, config)
        log.info("supervisor started", extra={"fields": {"workers": workers, "admin_port": port,
                                                         "pids": [p.pid for p in procs]}})
        while not stopping.is_set():
            for i, proc in enumerate(procs):
                if proc.poll() is not None and not restarts_held:
                    log.error("worker exited; restarting", extra={"fields": {"pid": proc.pid,
                                                                             "code": proc.returncode}})
                    multiprocess.mark_process_dead(proc.pid)
                    procs[i] = start(i)
            try:
                await asyncio.wait_for(stopping.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = loop.time() + config.timeouts.drain_s + 5
        while any(p.poll() is None for p in procs) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        await runner.cleanup()

    try:
        uvloop.run(run())
    finally:
        for sock in socks + admin_socks:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

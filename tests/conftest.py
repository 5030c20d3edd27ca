"""Fixtures that start real processes on loopback: simulator replicas and the gateway itself.

Every process a test starts is stopped by its fixture, by PID, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from aiohttp import web

from engine_nodes.local_stack import free_ports, stop_process

ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama-3.1-8b"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_post_json(url: str, doc: dict, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Simulator:
    """One ``engine_nodes sim`` process hosting ``replicas`` replicas on consecutive ports."""

    def __init__(self, flavor: str, replicas: int, speed: float, extra: list[str]):
        self.base = free_ports(replicas)
        self.ports = list(range(self.base, self.base + replicas))
        cmd = [sys.executable, "-m", "engine_nodes", "sim", "--flavor", flavor, "--model", MODEL,
               "--port", str(self.base), "--replicas", str(replicas), "--speed", str(speed), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY"):
            stop_process(self.proc)
            raise RuntimeError(f"simulator failed to start: {line!r}")

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def url(self, i: int) -> str:
        return self.urls[i]

    def requests(self, i: int, limit: int = 1000) -> list[dict]:
        return json.loads(http_get(f"{self.url(i)}/sim/requests?limit={limit}")[1])

    def stats(self, i: int) -> dict:
        return json.loads(http_get(f"{self.url(i)}/sim/stats")[1])

    def faults(self, i: int, **knobs) -> None:
        status, body = http_post_json(f"{self.url(i)}/sim/faults", knobs)
        assert status == 200, body

    def stop(self) -> None:
        stop_process(self.proc)


class GatewayProcess:
    """``python -m gateway`` with a TOML config written for the test."""

    def __init__(self, config: str, tmp: Path, workers: int = 1, wait_ready: bool = True,
                 args: Sequence[str] = (), host: str = "127.0.0.1"):
        self.port = free_ports()
        self.admin_port = free_ports()
        path = tmp / f"gateway-{self.port}.toml"
        path.write_text(
            f'region = "test"\nworkers = {workers}\n'
            f'[listen]\nhost = "{host}"\nport = {self.port}\n'
            f'[admin]\nhost = "{host}"\nport = {self.admin_port}\n' + config)
        self.log_path = tmp / f"gateway-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(path), *args],
                                     cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            try:
                self.wait_ready()
            except RuntimeError:
                self.stop()  # the fixture never saw it, so would leave it running
                raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.log()}")
            try:
                if http_get(f"{self.url}/readyz", timeout=0.5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gateway not ready in {timeout}s: {self.log()}")

    def log(self) -> str:
        """The process's output so far, in whole lines: the log thread may be mid-write of the last."""
        exited = self.proc.poll() is not None
        text = self.log_path.read_text(errors="replace")
        return text if exited else text[:text.rfind("\n") + 1]

    def wait_log(self, text: str, timeout: float = 5.0) -> bool:
        """Whether ``text`` reaches the output within ``timeout``: the log thread writes a line a little
        after the event that logged it, and a test may see the event (a metric, an admin answer) first."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def access_log(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{") and '"request_id"' in line:
                out.append(json.loads(line))
        return out

    def metrics(self) -> str:
        return http_get(f"{self.admin_url}/metrics")[1].decode()

    def stop(self) -> int:
        stop_process(self.proc, grace_s=40)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def pool_toml(name: str, engine: str, role: str, urls: list[str], policy: str | None = None,
              extra: str = "") -> str:
    lines = [f'[[pools]]\nname = "{name}"\nengine = "{engine}"\nrole = "{role}"\nmodels = ["{MODEL}"]',
             "endpoints = [" + ", ".join(f'"{u}"' for u in urls) + "]"]
    if policy:
        lines.append(f'policy = "{policy}"')
    return "\n".join(lines) + "\n" + extra


FAST_HEALTH = '[health]\ninterval_s = 0.2\ntimeout_s = 0.5\nunhealthy_threshold = 1\n'


@pytest.fixture
def simulator() -> Iterator:
    started: list[Simulator] = []

    def start(flavor: str = "sglang", replicas: int = 1, speed: float = 200.0, extra: list[str] = ()) -> Simulator:
        sim = Simulator(flavor, replicas, speed, list(extra))
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator:
    started: list[GatewayProcess] = []

    def start(config: str, workers: int = 1, wait_ready: bool = True,
              args: Sequence[str] = (), host: str = "127.0.0.1") -> GatewayProcess:
        """``args``: more command-line arguments; ``host``: of the public and admin listeners."""
        gw = GatewayProcess(config, tmp_path, workers, wait_ready, args, host)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@contextlib.asynccontextmanager
async def gateway_in_process(config: str, tmp: Path) -> AsyncIterator:
    """The gateway's own objects (``app.Gateway``) in the test's event loop, on loopback ports the
    kernel picks, once its first pool has a healthy replica: for promises about what the process
    holds, which only its own objects can show. Everything else starts ``python -m gateway``."""
    from gateway import settings
    from gateway.app import Gateway

    path = tmp / "gateway-in-process.toml"
    path.write_text('[listen]\nhost = "127.0.0.1"\nport = 0\n'
                    '[admin]\nhost = "127.0.0.1"\nport = 0\n' + config)
    gateway = Gateway(settings.load(str(path), environ={}))
    await gateway.start()
    try:
        deadline = time.monotonic() + 10
        while not gateway.pools[0].has_healthy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        yield gateway
    finally:
        await gateway.stop()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """``app`` (a stand-in engine) served on a loopback port the kernel picks, in the test's loop;
    yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list]:
    """The objects that only the cyclic GC could free, of what the block made (filled at its end)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list = []
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()

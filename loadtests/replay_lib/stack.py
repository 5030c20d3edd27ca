"""The processes a replay target runs on loopback: simulator replicas, then one router in front.

Every target gets a fresh simulator process (``python -m engine_nodes sim --replicas N``), so it
starts with cold caches and zeroed counters, and one router: our gateway (``python -m gateway``,
config written to a temporary TOML) or ``sglang-router`` (``python -m
sglang_router.launch_router``), which lives in its own virtualenv (``.venv-replay``) so that its
dependencies never touch the project's. Each process is started with ``Popen`` and stopped by its
PID (SIGTERM, then SIGKILL after a grace period), from a ``with`` block, so a failed replay leaves
nothing behind.

Readiness is checked the way each router reports it: the gateway's admin ``/admin/endpoints``
listing every endpoint healthy (with several workers, whose admin listener has no such page: every
endpoint healthy in the metrics and ``/readyz``), sglang-router's ``/workers`` listing every worker healthy. Without
network access sglang-router fails to fetch the model's tokenizer from the Hugging Face hub (it
ignores ``HF_HUB_OFFLINE``); that is a background step of worker registration that runs after the
workers are activated, its failure is a logged warning, and HTTP routing works on text without it,
so readiness never waits for it (startup takes about 2 s here).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine_nodes.local_stack import free_ports, stop_process

ROOT = Path(__file__).resolve().parents[2]
ROUTER_VENV = ROOT / ".venv-replay"
ROUTER_PACKAGE = "sglang-router==0.3.2"


class StackError(RuntimeError):
    """A process of the stack failed to start or become ready."""


def http_json(url: str, timeout: float = 2.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def http_text(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def http_post_json(url: str, doc: dict, timeout: float = 5.0) -> int:
    request = urllib.request.Request(url, data=json.dumps(doc).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        resp.read()
        return resp.status


def counter_by(metrics_url: str | None, metric: str, label: str) -> dict[str, float]:
    """A gateway counter from its admin /metrics, summed by one label ({} without a gateway, or if
    the scrape fails)."""
    if metrics_url is None:
        return {}
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in http_text(metrics_url).splitlines():
            if line.startswith(metric + "{"):
                labels, value = line.rsplit(" ", 1)
                key = labels.split(f'{label}="', 1)[1].split('"', 1)[0]
                out[key] = out.get(key, 0.0) + float(value)
    return out


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            if ready():
                return
        time.sleep(0.1)
    raise StackError(f"{what} not ready after {timeout_s:.0f} s: {_tail(log)}")


def _tail(log: Path, chars: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class SimSpec:
    replicas: int
    speed: float
    cache_tokens: int
    model: str = "llama-3.1-8b"


@dataclass(frozen=True)
class Replicas:
    urls: list[str]
    pid: int


@contextlib.contextmanager
def simulator(spec: SimSpec, workdir: Path) -> Iterator[Replicas]:
    base = free_ports(spec.replicas)
    log = workdir / f"sim-{base}.log"
    cmd = [
        sys.executable,
        "-m",
        "engine_nodes",
        "sim",
        "--flavor",
        "sglang",
        "--model",
        spec.model,
        "--port",
        str(base),
        "--replicas",
        str(spec.replicas),
        "--speed",
        str(spec.speed),
        "--cache-tokens",
        str(spec.cache_tokens),
    ]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("READY"):
            raise StackError(f"simulator failed to start: {line!r} {_tail(log)}")
        yield Replicas([f"http://127.0.0.1:{p}" for p in line.split()[1:]], proc.pid)
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class Front:
    """A router in front of the replicas: where clients send requests, and our gateway's admin
    metrics (None for sglang-router, whose branch counts the report does not read)."""

    url: str
    metrics_url: str | None
    pid: int


@dataclass(frozen=True)
class GatewayProcesses:
    """How many gateway processes serve a replay, and whether they share placements by gossip."""

    workers: int = 1
    gossip: bool = True  # as the gateway does by default

    def describe(self) -> str:
        if self.workers == 1:
            return "one process"
        return f"{self.workers} worker processes" + (", gossip between them" if self.gossip else ", no gossip")


@contextlib.contextmanager
def gateway(replicas: Replicas, policy: str, model: str, workdir: Path, pool_extra: str = "",
            processes: GatewayProcesses = GatewayProcesses()) -> Iterator[Front]:
    """Our gateway with its defaults but for the log; ``pool_extra``: more TOML lines for the pool."""
    port, admin = free_ports(1), free_ports(1)
    config = workdir / f"gateway-{port}.toml"
    endpoints = ", ".join(f'"{u}"' for u in replicas.urls)
    # Workers share placements by default; the comparison without it turns that off.
    gossip = "" if processes.gossip else "[gossip]\nbetween_workers = false\n"
    # Access log off and warnings only: sglang-router runs with --log-level warn as well, so
    # neither spends the shared CPU on per-request log lines.
    config.write_text(
        f'region = "replay"\nworkers = {processes.workers}\n'
        f'[listen]\nhost = "127.0.0.1"\nport = {port}\n'
        f'[admin]\nhost = "127.0.0.1"\nport = {admin}\n'
        f'[logging]\nlevel = "warning"\naccess_log = false\n'
        f"[health]\ninterval_s = 0.5\n" + gossip +
        f'[[pools]]\nname = "replay"\nengine = "sglang"\nrole = "interactive"\nmodels = ["{model}"]\n'
        f'endpoints = [{endpoints}]\npolicy = "{policy}"\n' + pool_extra
    )
    log = workdir / f"gateway-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--config", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        admin_url = f"http://127.0.0.1:{admin}"

        def ready() -> bool:
            rows = http_json(f"{admin_url}/admin/endpoints")
            return len(rows) == len(replicas.urls) and all(r["available"] for r in rows)

        def workers_ready() -> bool:
            # With workers the admin listener is the supervisor's (metrics and /healthz only), and
            # the health gauge is the highest over the workers: every replica healthy in one of
            # them, plus two health intervals for the others.
            healthy = [line for line in http_text(f"{admin_url}/metrics").splitlines()
                       if line.startswith("gateway_endpoint_healthy{") and line.endswith(" 1.0")]
            if len(healthy) < len(replicas.urls):
                return False
            http_text(f"http://127.0.0.1:{port}/readyz")  # raises unless 200
            time.sleep(1.0)
            return True

        _wait(ready if processes.workers == 1 else workers_ready, proc, "gateway", log, 30.0)
        yield Front(f"http://127.0.0.1:{port}", f"{admin_url}/metrics", proc.pid)
    finally:
        stop_process(proc, grace_s=40.0)


def ensure_router_venv(log) -> Path:
    """The Python of ``.venv-replay`` with sglang-router installed (created on first use)."""
    python = ROUTER_VENV / "bin" / "python"
    probe = [str(python), "-c", "import sglang_router.launch_router"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    log(f"installing {ROUTER_PACKAGE} into {ROUTER_VENV} ...")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(ROUTER_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", ROUTER_PACKAGE], check=True, stdout=subprocess.DEVNULL
    )
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        raise StackError(f"{ROUTER_PACKAGE} installed but sglang_router.launch_router does not import")
    return python


@contextlib.contextmanager
def sglang_router(python: Path, replicas: Replicas, policy: str, workdir: Path) -> Iterator[Front]:
    port, prometheus = free_ports(1), free_ports(1)
    log = workdir / f"sglang-router-{port}.log"
    # Its Prometheus listener is moved off the default port 29000, which another process may hold.
    cmd = [
        str(python),
        "-m",
        "sglang_router.launch_router",
        "--worker-urls",
        *replicas.urls,
        "--policy",
        policy,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(prometheus),
        "--log-level",
        "warn",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            workers = http_json(f"{url}/workers").get("workers", [])
            return len(workers) == len(replicas.urls) and all(w.get("is_healthy") for w in workers)

        _wait(ready, proc, "sglang-router", log, 60.0)
        yield Front(url, None, proc.pid)
    finally:
        stop_process(proc)


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="replay-")

"""Security scenarios 13-19 (and schemathesis, of 20) of the reliability brief, against real gateway and
simulator processes.

Shared here: issuing API keys the way an operator does (``python -m gateway.keys new``, so the keys
file holds only peppered digests), a gateway that authenticates with them, a gateway shared by a
whole module, and raw HTTP/1.1 requests.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import FAST_HEALTH, MODEL, ROOT, GatewayProcess, Simulator, pool_toml
from tests.integration.test_errors import raw_request

PEPPER_ENV = "EDGE_GATEWAY_KEY_PEPPER"
TEST_PEPPER = "security-tests-pepper-0123456789abcdef"  # not a secret: digests of throwaway keys

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def issue_key(keys_file: Path, key_id: str, *options: str) -> str:
    """A new key appended to ``keys_file`` by the CLI; returns the key, which exists nowhere else.

    The pepper must already be in this process's environment (the CLI and the gateway read it)."""
    command = [sys.executable, "-m", "gateway.keys", "new", "--id", key_id, "--append", str(keys_file),
               *options]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


@dataclass
class KeyedStack:
    """One simulator replica behind a gateway that requires API keys."""

    sim: Simulator
    gw: GatewayProcess
    keys_file: Path
    keys: dict[str, str]  # key id -> key


def keyed_stack(simulator, gateway, tmp_path: Path, monkeypatch, keys: dict[str, list[str]],
                sim_speed: float = 200.0) -> KeyedStack:
    """Issue ``keys`` (id -> CLI options) and start an SGLang simulator and a gateway that authenticates."""
    monkeypatch.setenv(PEPPER_ENV, TEST_PEPPER)
    keys_file = tmp_path / "keys.jsonl"
    issued = {key_id: issue_key(keys_file, key_id, *options) for key_id, options in keys.items()}
    sim = simulator("sglang", speed=sim_speed)
    gw = gateway(FAST_HEALTH + f'[auth]\nkeys_file = "{keys_file}"\n'
                 + pool_toml("s", "sglang", "interactive", sim.urls))
    return KeyedStack(sim, gw, keys_file, issued)


@contextlib.contextmanager
def shared_stack(directory: Path, config: str = "",
                 flavor: str = "sglang") -> Iterator[tuple[Simulator, GatewayProcess]]:
    """One simulator replica and a gateway for a whole module (the function-scoped conftest fixtures
    restart both per test): for tests that each check only their own requests."""
    sim = Simulator(flavor, 1, 200.0, [])
    try:
        gw = GatewayProcess(FAST_HEALTH + config + pool_toml("s", flavor, "interactive", sim.urls), directory)
        try:
            yield sim, gw
        finally:
            gw.stop()
    finally:
        sim.stop()


def bodiless_call(port: int, method: str, path: str,
                  key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request without a body (admin calls, GETs) on its own connection: (status, headers, body)."""
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    return raw_request(port, b"%s %s HTTP/1.1\r\nHost: gw\r\n%sContent-Length: 0\r\nConnection: close\r\n\r\n"
                       % (method.encode(), path.encode(), auth))


def chat_request(body: dict | bytes | None = None, key: str | None = None, extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 chat completion POST, as raw bytes; ``extra`` is more header lines."""
    data = body if isinstance(body, bytes) else json.dumps(body or CHAT).encode()
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key is not None else b""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n%s%s"
            b"Content-Length: %d\r\n\r\n" % (auth, extra, len(data)) + data)

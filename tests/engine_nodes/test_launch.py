"""``engine-node launch`` run as a real subprocess: what it prints, and how it fails."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from engine_nodes import launch, profiles

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine_nodes", "launch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_sglang_launch_server_command_of_the_profile() -> None:
    profile = profiles.get("sglang-h200-llama70b-fp8-eagle3")
    result = run_cli("--profile", profile.name, "--dry-run")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv == launch.command(profile)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--tp-size") + 1] == "4"
    assert argv[argv.index("--speculative-algorithm") + 1] == "EAGLE3"
    assert argv[argv.index("--port") + 1] == "30000"


def test_dry_run_prints_vllm_serve_with_the_weights_as_its_first_argument() -> None:
    profile = profiles.get("vllm-h100-llama70b-batch")
    result = run_cli("--profile", profile.name, "--dry-run")
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv == launch.command(profile)
    assert argv[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct"]
    assert {"--async-scheduling", "--enable-chunked-prefill", "--enable-prefix-caching"} <= set(argv)
    assert argv[argv.index("--port") + 1] == "8000"


def test_host_and_port_options_reach_the_engine_command_line() -> None:
    result = run_cli("--profile", "vllm-h100-llama8b-batch", "--dry-run",
                     "--host", "127.0.0.1", "--port", "31234")
    argv = shlex.split(result.stdout)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "31234"


def test_list_shows_every_profile_with_its_tp_and_the_least_tp_that_fits() -> None:
    result = run_cli("--list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == set(profiles.PROFILES)
    for name, row in rows.items():
        profile = profiles.get(name)
        assert row[-2:] == [str(profile.tp), str(profile.least_tp_that_fits())]


def test_unknown_profile_is_a_usage_error_naming_the_known_profiles() -> None:
    result = run_cli("--profile", "no-such-profile", "--dry-run")
    assert result.returncode == 2
    assert "vllm-h100-llama8b-batch" in result.stderr


def test_profile_or_list_is_required() -> None:
    result = run_cli("--dry-run")
    assert result.returncode == 2
    assert "--profile" in result.stderr


def test_launch_on_a_node_without_the_engine_says_so_and_exits_127(tmp_path: Path) -> None:
    # An empty PATH: `vllm` cannot be found, so the exec fails before any engine could start.
    env = {**os.environ, "PATH": str(tmp_path)}
    result = run_cli("--profile", "vllm-h100-llama8b-batch", env=env)
    assert result.returncode == 127
    assert "'vllm' not found" in result.stderr
    assert result.stdout == ""

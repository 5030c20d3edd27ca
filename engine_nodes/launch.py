"""``engine-node launch``: turn a launch profile into the real engine's command line, and run it.

    engine-node launch --list
    engine-node launch --profile sglang-h100-llama8b-fp8-eagle3 --dry-run
    engine-node launch --profile vllm-h100-llama8b-batch --host 0.0.0.0 --port 8000

The command line is built in one place, :func:`command`, which the CLI, the ``--dry-run`` output
and the tests all use; ``tests/engine_nodes/test_profiles.py`` parses every SGLang profile's
arguments with SGLang's own ``ServerArgs`` parser and every vLLM profile's with ``vllm serve``'s
parser, so a renamed or removed engine flag fails CI rather than a GPU node's start-up.

Every flag a profile depends on is passed explicitly, even where it matches today's engine
default: defaults move between releases, and vLLM treats an explicit ``--async-scheduling`` as a
requirement (start-up fails on an incompatible option) where the default falls back with a
warning.

Besides the profile's own settings, each engine gets what the gateway needs from a replica:
``--served-model-name`` set to the catalog key the gateway's pools list (the same name the
simulator serves, so a real replica can replace a simulated one in a pool), metrics enabled, and
usage reported in every streamed response together with cached prompt tokens.

Without ``--dry-run`` the process replaces itself with the engine (``os.execvp``), so signals from
a supervisor (systemd, Kubernetes) reach the engine directly.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from engine_nodes.catalog import HARDWARE
from engine_nodes.profiles import PROFILES, Profile, get

DEFAULT_PORT = {"sglang": 30000, "vllm": 8000}  # each engine's own default port
DEFAULT_HOST = "0.0.0.0"  # the gateway reaches replicas from another host


def server_args(profile: Profile, host: str = DEFAULT_HOST, port: int | None = None) -> list[str]:
    """The engine's arguments for ``profile`` (after ``-m sglang.launch_server`` / ``vllm serve``)."""
    port = DEFAULT_PORT[profile.engine] if port is None else port
    engine_args = _sglang_args if profile.engine == "sglang" else _vllm_args
    return engine_args(profile, host, port) + list(profile.extra_args)


def command(profile: Profile, host: str = DEFAULT_HOST, port: int | None = None) -> list[str]:
    """The full argv that starts the engine replica ``profile`` describes."""
    if profile.engine == "sglang":
        program = [sys.executable, "-m", "sglang.launch_server"]
    else:
        program = ["vllm", "serve"]
    return program + server_args(profile, host, port)


def _sglang_args(p: Profile, host: str, port: int) -> list[str]:
    args = [
        "--model-path", p.weights_path,
        "--served-model-name", p.model,
        "--host", host,
        "--port", str(port),
        "--tp-size", str(p.tp),
        "--mem-fraction-static", str(p.mem_fraction),
        "--page-size", str(p.page_size),
        "--chunked-prefill-size", str(p.chunked_prefill_tokens),
        "--max-running-requests", str(p.max_running_requests),
        "--enable-metrics",
        "--enable-cache-report",
        "--stream-response-default-include-usage",
    ]
    if p.quantization_method:
        args += ["--quantization", p.quantization_method]
    spec = p.speculative
    if spec is not None:
        args += [
            "--speculative-algorithm", spec.algorithm,
            "--speculative-draft-model-path", spec.draft_model,
            "--speculative-num-steps", str(spec.num_steps),
            "--speculative-eagle-topk", str(spec.eagle_topk),
            "--speculative-num-draft-tokens", str(spec.num_draft_tokens),
        ]
        if spec.draft_quantization:
            args += ["--speculative-draft-model-quantization", spec.draft_quantization]
    return args


def _vllm_args(p: Profile, host: str, port: int) -> list[str]:
    args = [
        p.weights_path,
        "--served-model-name", p.model,
        "--host", host,
        "--port", str(port),
        "--tensor-parallel-size", str(p.tp),
        "--gpu-memory-utilization", str(p.mem_fraction),
        "--block-size", str(p.page_size),
        "--enable-chunked-prefill",
        "--max-num-batched-tokens", str(p.chunked_prefill_tokens),
        "--max-num-seqs", str(p.max_running_requests),
        "--async-scheduling",
        "--enable-prefix-caching",
        "--enable-force-include-usage",
        "--enable-prompt-tokens-details",
    ]
    if p.quantization_method:
        args += ["--quantization", p.quantization_method]
    return args


def profile_table() -> str:
    """One line per profile: what it runs, and the TP it uses next to the least TP that fits."""
    header = ("profile", "engine", "role", "gpus", "model", "weights", "tp", "least tp that fits")
    rows = [header]
    for p in sorted(PROFILES.values(), key=lambda p: p.name):
        rows.append((p.name, p.engine, p.role, f"{p.tp}x{HARDWARE[p.hardware].name}", p.model,
                     f"{p.quantization} {p.weights_gb():.1f} GB", str(p.tp), str(p.least_tp_that_fits())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine-node launch", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help="launch profile name (see --list)")
    what.add_argument("--list", action="store_true", help="list the profiles and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the command line instead of running it")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address the engine binds (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help="port the engine binds (default: SGLang 30000, vLLM 8000)")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(profile_table())
        return 0
    try:
        profile = get(args.profile)
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    argv_engine = command(profile, args.host, args.port)
    if args.dry_run:
        print(shlex.join(argv_engine))
        return 0
    sys.stdout.flush()
    try:
        os.execvp(argv_engine[0], argv_engine)  # returns only by raising
    except FileNotFoundError:
        print(f"engine-node launch: {argv_engine[0]!r} not found; "
              f"install the {profile.engine} engine on this node",
              file=sys.stderr)
        return 127

"""``engine-node`` / ``python -m engine_nodes``: ``sim`` runs simulated replicas, ``launch`` real ones,
``drain`` is a replica pod's preStop hook."""

from __future__ import annotations

import sys

USAGE = "usage: engine-node {sim,launch,drain} [options]   (engine-node <command> --help)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "sim":
        from engine_nodes.sim.cli import main as sim_main

        return sim_main(rest)
    if command == "launch":
        from engine_nodes.launch import main as launch_main

        return launch_main(rest)
    if command == "drain":
        from engine_nodes.drain import main as drain_main

        return drain_main(rest)
    print(USAGE, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())

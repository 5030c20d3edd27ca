"""``engine-node`` / ``python -m engine_nodes``: ``sim`` runs simulated replicas, ``launch`` real ones."""

from __future__ import annotations

import sys

USAGE = "usage: engine-node {sim,launch} [options]   (engine-node sim --help, engine-node launch --help)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command == "sim":
        from engine_nodes.sim.cli import main as sim_main

        return sim_main(rest)
    if command == "launch":
        from engine_nodes.launch import main as launch_main

        return launch_main(rest)
    print(USAGE, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())

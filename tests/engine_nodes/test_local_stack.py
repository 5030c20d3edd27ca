"""engine_nodes.local_stack: the ports tests and load tests start their processes on."""

from __future__ import annotations

import socket

from engine_nodes.local_stack import PORTS_FROM, _ephemeral_low, free_ports


def test_free_ports_are_a_free_block_below_the_kernels_ephemeral_range():
    for n in (1, 8):
        for _ in range(50):
            base = free_ports(n)
            assert PORTS_FROM <= base and base + n <= _ephemeral_low()
            held = []
            try:
                for port in range(base, base + n):
                    s = socket.socket()
                    held.append(s)
                    s.bind(("127.0.0.1", port))  # each port of the block was free
            finally:
                for s in held:
                    s.close()

"""Listening sockets on loopback: an IPv6 address is dual stack, for streams and datagrams alike."""

from __future__ import annotations

import socket

import pytest

from gateway import listeners


def test_a_stream_listener_on_ipv6_any_accepts_ipv4_and_ipv6_clients():
    sock = listeners.bind("::", 0, socket.SOCK_STREAM)
    sock.listen(4)
    port = sock.getsockname()[1]
    try:
        for address in ("127.0.0.1", "::1"):
            with socket.create_connection((address, port), timeout=2):
                conn, peer = sock.accept()
                conn.close()
            assert peer[0] in (address, f"::ffff:{address}")
    finally:
        sock.close()


def test_a_datagram_listener_on_ipv6_any_receives_from_ipv4_senders():
    sock = listeners.bind("::", 0, socket.SOCK_DGRAM)
    sock.settimeout(2)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"placement", ("127.0.0.1", sock.getsockname()[1]))
        assert sock.recvfrom(64)[0] == b"placement"
    finally:
        sock.close()


def test_workers_bind_one_port_each_with_reuse_port():
    first = listeners.bind("127.0.0.1", 0, socket.SOCK_STREAM, reuse_port=True)
    first.listen(4)
    port = first.getsockname()[1]
    try:
        with pytest.raises(OSError):  # without it, the port is taken
            listeners.bind("127.0.0.1", port, socket.SOCK_STREAM)
        second = listeners.bind("127.0.0.1", port, socket.SOCK_STREAM, reuse_port=True)
        assert second.getsockname()[1] == port
        second.close()
    finally:
        first.close()

"""Listening sockets, bound in one place: the public port, the admin port and gossip.

Why not ``loop.create_server(host=...)``: for an IPv6 address asyncio (and uvloop) set
``IPV6_V6ONLY``, so ``"::"`` would serve IPv6 clients only, and an IPv4 client of a dual-stack
cluster (a kubelet probe, a sidecar, a peer pod) would be refused. Here an IPv6 address is bound
dual stack, as Linux does by default: ``"::"`` serves both families on one socket, and an IPv4
client appears as ``::ffff:a.b.c.d``. An IPv4 address or a host name binds IPv4 only.
"""

from __future__ import annotations

import socket

from gateway.settings import is_ipv6


def bind(host: str, port: int, kind: socket.SocketKind, reuse_port: bool = False) -> socket.socket:
    """A socket of ``kind`` (``SOCK_STREAM`` or ``SOCK_DGRAM``) bound to ``host``:``port``; the loop
    that serves it calls ``listen``. ``reuse_port``: each worker process binds its own socket to one
    port and the kernel spreads connections over them."""
    sock = socket.socket(socket.AF_INET6 if is_ipv6(host) else socket.AF_INET, kind)
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if kind == socket.SOCK_STREAM:
            # A restarted gateway rebinds at once, past its old connections in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock

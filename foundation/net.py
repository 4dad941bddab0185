"""Small network helpers shared by the local services, the demo, the benchmarks and tests."""

from __future__ import annotations

import random
import socket

_LOWEST = 10_000  # below: well-known and registered services' usual ports


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (where outgoing connections take theirs)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may take it before
    the caller binds it; callers that start servers retry on a bind failure).

    Picked at random below the kernel's ephemeral range when there is room: a port from that
    range can be taken by any outgoing connection's local end between this pick and the
    caller's bind (CI saw a TorchServe port lost that way); below it only another listener can
    take it. Falls back to a port the kernel chooses."""
    low, high = _LOWEST, _ephemeral_low()
    for _ in range(50) if high - low > 1000 else ():
        port = random.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


__all__ = ["free_port", "port_open"]

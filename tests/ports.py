#!/usr/bin/env python3
"""Free loopback ports for the servers tests and benchmarks start.

Usage as a program: `tests/ports.py [N]` prints N distinct free ports (default 1), one per line.

A port from the kernel's ephemeral range (what binding port 0 gives) can become the source port
of any outgoing connection between the moment it is picked and the moment the server binds it,
and the server then fails with "Address already in use". So ports are picked below that range,
where connect() never takes one, and one process never hands out the same port twice.
"""

import pathlib
import random
import socket
import sys

_handed_out = set()


def _ephemeral_low():
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port():
    """A loopback port nobody listens on now, from below the ephemeral range when there is room."""
    low = _ephemeral_low()
    if low > 11000:
        for _ in range(500):
            port = random.randrange(10000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print("\n".join(str(free_port()) for _ in range(count)))

"""What an open client connection costs the sidecar while it waits: an app's keep-alive pool, or
a client that opens many connections and sends nothing, must not make the sidecar's memory grow
by tens of KiB a connection (up to `--max-connections`, 4096 by default)."""

import json
import re
import socket
import time

from conftest import DEFAULT_KEYS, Sidegate, gateway_yaml
from test_server_review import rss_kib

N = 1000
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()


def settled_rss(pid):
    """RSS once the sidecar has taken what it was sent (it no longer grows)."""
    last = rss_kib(pid)
    for _ in range(20):
        time.sleep(0.1)
        now = rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


def test_an_idle_connection_costs_the_sidecar_a_few_kib(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    socks = []
    try:
        pid = g.proc.pid
        # Warm: the first requests set up the upstream pool, the log writer, the metrics.
        warm = socket.create_connection(("127.0.0.1", g.port))
        socks.append(warm)
        request = (
            f"POST /openai/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{g.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY

        def ask(s):
            s.sendall(request)
            s.settimeout(10)
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = s.recv(65536)
                assert chunk, f"connection closed: {got[:300]!r}"
                got += chunk
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), got[:300]
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
            while len(body) < length:
                chunk = s.recv(65536)
                assert chunk, "connection closed mid-body"
                body += chunk

        for _ in range(20):
            ask(warm)
        before = settled_rss(pid)
        for _ in range(N):
            socks.append(socket.create_connection(("127.0.0.1", g.port)))
        # Each connection accepted and waiting for its first bytes.
        opened = settled_rss(pid)
        # One request each, one at a time (one upstream connection serves them all), then idle
        # keep-alive connections.
        for s in socks[1:]:
            ask(s)
        used = settled_rss(pid)
        never_used = (opened - before) / N
        after_one = (used - before) / N
        print(f"per connection: {never_used:.1f} KiB opened, {after_one:.1f} KiB after one request")
        # Was 33 KiB opened and ~43 KiB after a request: the connection's task held room for
        # the whole request pipeline's state twice over.
        assert never_used < 16, f"{never_used:.1f} KiB per connection that sent nothing"
        assert after_one < 30, f"{after_one:.1f} KiB per idle keep-alive connection"
    finally:
        for s in socks:
            s.close()
        g.stop()

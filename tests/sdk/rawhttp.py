"""Raw HTTP/1.1 on loopback sockets, for upstreams a test makes misbehave byte by byte: an
accept loop handing each connection to a thread of its own, and a reader of one request."""

import socket
import struct
import threading
import time


def content_length(head):
    """The Content-Length of a request head (bytes), 0 when it has none."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def read_request(conn, buf=b"", body=True):
    """One request off `conn`, after the bytes `buf` already read from it: `(head, body, rest)`,
    `rest` being what came after it; None when the connection ended first. With `body=False`
    its body is not waited for: `body` is what came with the head."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = content_length(head)
    while body and len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head, rest[:length], rest[length:]


class Listener:
    """A loopback listening socket: each connection goes to `handle(conn, index)` on a thread
    of its own, `index` counting the connections accepted before it."""

    def __init__(self, handle, backlog=64, rcvbuf=None):
        self.handle = handle
        self.accepted = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        if rcvbuf:
            # Inherited by the connections (a small window makes a large request wait).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                index = self.accepted
                self.accepted += 1
            threading.Thread(target=self.handle, args=(conn, index), daemon=True).start()

    def close(self):
        self.sock.close()


def cut_openai_stream(conn, _index):
    """A `Listener` handler: an OpenAI-format upstream that starts a 200 chat stream, sends one
    chunk (`first part`) and resets the connection."""
    if read_request(conn) is None:
        conn.close()
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    event = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
             b'"choices":[{"index":0,"delta":{"content":"first part"},"finish_reason":null}]}\n\n')
    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
    time.sleep(0.2)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()

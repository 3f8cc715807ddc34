"""Fixtures that run the real binaries: the mock provider and the sidegate sidecar.

Every process writes its log to $SIDEGATE_TEST_LOG_DIR (default: a temp dir), so that
`tests/scan-logs` can prove no provider key ever reaches a log line.
"""

import http.server
import json
import os
import pathlib
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from ports import free_port  # noqa: E402  (re-exported to the tests)
BIN_DIR = pathlib.Path(os.environ.get("SIDEGATE_BIN_DIR", ROOT / "target" / "debug"))
LOG_DIR = pathlib.Path(os.environ.get("SIDEGATE_TEST_LOG_DIR") or tempfile.mkdtemp(prefix="sidegate-logs-"))
LOG_DIR.mkdir(parents=True, exist_ok=True)

# Every test key contains this marker; no log line may (see tests/scan-logs).
KEY_MARKER = "sgtestkey"
OPENAI_KEY = f"sk-{KEY_MARKER}-openai-0001"
ANTHROPIC_KEY = f"sk-ant-{KEY_MARKER}-0001"
GATEWAY_TOKEN = f"gw-{KEY_MARKER}-token"

_counter = 0


def _log_file(name):
    global _counter
    _counter += 1
    return open(LOG_DIR / f"{name}-{os.getpid()}-{_counter}.log", "wb")


class RefusingPort:
    """A loopback port that refuses connections for as long as this object is open: a socket
    bound to it but not listening. Unlike a port closed again (`free_port`), it cannot be handed
    to another socket meanwhile, such as the gateway's own listener."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.sock.close()


@pytest.fixture
def refusing_port():
    """A dead upstream for the whole test: connections to `.port` / `.url` are refused."""
    p = RefusingPort()
    yield p
    p.close()


class FixedAnswerServer:
    """A loopback HTTP server answering POSTs (and GETs) with fixed JSON bodies, for upstreams the mock
    cannot play (a captive portal, an odd token endpoint): `body` with `status`, or with
    `then=[(status, body), ...]` the first request gets `body` and the following ones these in
    turn, the last repeated; `headers`: more response headers, `(name, value)` pairs; `content_type`
    of every answer."""

    def __init__(self, body: bytes, status=200, then=(), headers=(), content_type="application/json"):
        answers = [(status, body), *then]
        count = [0]
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.do_POST()

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    code, body = answers[min(count[0], len(answers) - 1)]
                    count[0] += 1
                self.send_response(code)
                self.send_header("content-type", content_type)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class StallingServer:
    """A loopback HTTP server stuck mid-answer: it reads a request head, sends a response head
    promising 1000 bytes and two of them, then sends nothing more and holds the connection."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"")
            except OSError:
                pass
            self.held.append(conn)

    def stop(self):
        self.stopped.set()
        self.thread.join(5)
        for c in self.held:
            c.close()
        self.sock.close()


def binary(name):
    path = BIN_DIR / name
    if not path.exists():
        pytest.fail(f"{path} not found: build it first (cargo build --workspace --bins)")
    return str(path)


class MockProvider:
    """The mock provider process (tests/mock-provider)."""

    def __init__(self, *args, listen="127.0.0.1:0", tls_dir=None):
        """With `tls_dir` it serves HTTPS, its identity kept there (`self.ca` is the CA to trust).
        Like the providers it answers 401 to requests without a key; custom-local's key
        header (`gateway_yaml`) counts as one."""
        self.log = _log_file("mock-provider")
        tls = ["--tls-dir", str(tls_dir)] if tls_dir else []
        self.proc = subprocess.Popen(
            [binary("mock-provider"), "--listen", listen, "--auth-header", "x-custom-key", *tls, *args],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        line = self.proc.stdout.readline().decode()
        m = re.match(r"listening on (\S+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"mock-provider did not start: {line!r}")
        self.addr = m.group(1)
        self.url = f"{'https' if tls_dir else 'http'}://{self.addr}"
        self.ca = pathlib.Path(tls_dir) / "ca.pem" if tls_dir else None
        self._http = httpx.Client(verify=ssl.create_default_context(cafile=self.ca) if tls_dir else True)

    def requests(self):
        return self._http.get(f"{self.url}/__mock/requests").json()

    def last(self):
        reqs = self.requests()
        assert reqs, "the mock provider received no request"
        return reqs[-1]

    def clear(self):
        self._http.delete(f"{self.url}/__mock/requests")

    def stats(self):
        return self._http.get(f"{self.url}/__mock/stats").json()

    def stop(self):
        self._http.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def wait_ready(admin, proc, timeout=15, logs=lambda: ""):
    """Returns once the sidegate `proc` answers 200 on `admin`/readyz; raises when it exits or
    is not ready within `timeout` seconds, with `logs()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidegate exited with {proc.returncode}: {logs()}")
        try:
            if httpx.get(f"{admin}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"sidegate not ready after {timeout}s: {logs()}")


def start_with_stderr_piped(mock, tmp_path, extra_args=(), env=None):
    """A sidegate logging payloads whose stderr is a pipe (`proc.stderr`) nobody reads yet, as a
    log collector that stopped draining it: `(proc, gateway url, admin url)` once ready."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for k, v in DEFAULT_KEYS.items():
        (keys / k).write_text(v + "\n")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(gateway_yaml(mock.url, extra_spec="  logging: {payloads: true}\n"))
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([binary("sidegate"), "--config", str(cfg), "--keys-dir", str(keys),
                             "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                             *extra_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, **(env or {})))
    wait_ready(f"http://127.0.0.1:{admin}", proc)
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"


def drain_stderr(proc, until, timeout=10):
    """Reads `proc.stderr` from now on, in a thread, until `until(bytes so far)` or `timeout`
    seconds: the bytes read by then."""
    buf = [b""]

    def drain():
        while chunk := proc.stderr.read1(1 << 20):
            buf[0] += chunk

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not until(buf[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return buf[0]


class Sidegate:
    """A sidegate process with its own config file and keys directory."""

    def __init__(self, workdir, config_text, keys=None, extra_args=(), wait_ready=True, relative_paths=False,
                 listen_ip="127.0.0.1", wrapper=()):
        """`listen_ip`: the gateway port's address (`self.url` still reaches it on 127.0.0.1).
        `wrapper`: a command the sidecar is started through (it must exec its arguments)."""
        self.relative_paths = relative_paths
        self.wrapper = list(wrapper)
        self.listen_ip = listen_ip
        self.dir = pathlib.Path(workdir)
        self.config = self.dir / "gateway.yaml"
        self.keys_dir = self.dir / "keys"
        self.keys_dir.mkdir(exist_ok=True)
        self.config.write_text(config_text)
        for name, value in (keys or {}).items():
            (self.keys_dir / name).write_text(value + "\n")
        self.port = free_port()
        self.admin_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.log_path = None
        self.proc = None
        self.start(extra_args, wait_ready)

    def start(self, extra_args=(), wait_ready=True):
        self.log = _log_file("sidegate")
        self.log_path = self.log.name
        env = dict(os.environ, RUST_LOG=os.environ.get("SIDEGATE_TEST_RUST_LOG", "debug"))
        # With relative_paths the files are named relative to the working directory.
        config, keys_dir = (("gateway.yaml", "keys") if self.relative_paths
                            else (str(self.config), str(self.keys_dir)))
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                binary("sidegate"),
                "--config", config,
                "--keys-dir", keys_dir,
                "--listen", f"{self.listen_ip}:{self.port}",
                "--admin", f"127.0.0.1:{self.admin_port}",
                *extra_args,
            ],
            stdout=self.log,
            stderr=self.log,
            env=env,
            cwd=self.dir,
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout=15):
        wait_ready(self.admin, self.proc, timeout, self.logs)

    def logs(self):
        self.log.flush()
        return pathlib.Path(self.log_path).read_text(errors="replace")

    def metrics(self):
        return httpx.get(f"{self.admin}/metrics").text

    def wait_log_line(self, log_id, timeout=5):
        """The access log line of the request `log_id` (`cf-aig-log-id`). Access log lines are
        flushed every 200 ms: wait for the line before asserting what the log does not hold."""
        text, json_ = f" request id={log_id} ", f'"message":"request","id":"{log_id}"'
        deadline = time.monotonic() + timeout
        while True:
            for line in self.logs().splitlines():
                if text in line or json_ in line:
                    return line
            assert time.monotonic() < deadline, f"no access log line for {log_id}"
            time.sleep(0.05)

    def wait_for_log(self, text, timeout=5):
        """The logs once they hold `text`: a line written as the answer goes out may reach the
        file a moment after the client has the answer."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs()
            if text in logs:
                return logs
            assert time.monotonic() < deadline, f"{text!r} not logged: {logs[-2000:]}"
            time.sleep(0.05)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def gateway_yaml(mock_url, *, auth=False, extra_spec="", name="main"):
    """A standalone gateway.yaml pointing the providers at the mock."""
    auth_line = "  authentication: {enabled: true}\n" if auth else ""
    return (
        "schemaVersion: 1\n"
        f"gateway: {{namespace: team-a, name: {name}}}\n"
        "spec:\n"
        f"{auth_line}"
        "  providers:\n"
        f"    openai: {{baseURL: '{mock_url}/v1'}}\n"
        f"    anthropic: {{baseURL: '{mock_url}'}}\n"
        f"    groq: {{baseURL: '{mock_url}/openai/v1'}}\n"
        f"    azure-openai: {{baseURL: '{mock_url}/openai/deployments/{{deployment}}'}}\n"
        f"    custom-local: {{baseURL: '{mock_url}/v1', authHeader: x-custom-key}}\n"
        f"{extra_spec}"
    )


def as_logged(text):
    """`text` as a text log line holds it inside a quoted field value (escaped like a JSON
    string: `"` as `\\"`)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def assert_refused_at_start(mock, tmp_path, extra_spec, *needles):
    """Starts a sidegate with `extra_spec` and checks that it refuses to start (exit code 2)
    with a log naming every needle (the bad field, the bad value), as the log writes it."""
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=extra_spec), DEFAULT_KEYS, wait_ready=False)
    try:
        assert g.proc.wait(10) == 2
        logs = g.logs()
        for needle in needles:
            assert as_logged(needle) in logs, f"{as_logged(needle)!r} not in: {logs}"
    finally:
        g.stop()


DEFAULT_KEYS = {
    "openai.default": OPENAI_KEY,
    "openai.team-b": f"sk-{KEY_MARKER}-openai-teamb",
    "anthropic.default": ANTHROPIC_KEY,
    "custom-local.default": f"{KEY_MARKER}-custom",
}


@pytest.fixture(scope="session")
def mock():
    m = MockProvider()
    yield m
    m.stop()


@pytest.fixture
def gateway(mock, tmp_path):
    """A sidegate with keys for openai, anthropic and a custom provider, no gateway auth."""
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


@pytest.fixture
def authed_gateway(mock, tmp_path):
    """A sidegate that requires cf-aig-authorization."""
    keys = dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN})
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=True), keys)
    mock.clear()
    yield g
    g.stop()

"""Operational surface of the sidecar as an SRE meets it: shutdown with idle h2c clients, the
latency histogram against the request counter, JSON logs under back-pressure, `--check` against
a start, what config errors repeat, and a config path that is a FIFO."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, binary, drain_stderr, free_port, gateway_yaml, start_with_stderr_piped
from test_connections import _h2_frame, _h2_read_frame, _hpack_literal

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def _sample(text, name):
    """The value of the sample written exactly as `name` (metric name and labels), or None."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# FAILS at bbc2db5: an idle h2c connection whose client does not answer the GOAWAY's PING holds
# the exit for the whole --shutdown-grace (server.rs serve_h2: Phase::Stopping only calls
# graceful_shutdown, which waits for the PING ack), then logs "in-flight requests did not finish".
def test_an_idle_h2c_connection_does_not_hold_the_shutdown_for_the_grace(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--shutdown-grace", "8"])
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        # One request answered in full, then the client sits idle and reads nothing more (as an
        # idle pooled connection of a synchronous HTTP/2 client does).
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0))
        headers = b"\x82\x86" + _hpack_literal(4, "/nope/x") + _hpack_literal(1, "localhost")  # GET, http
        s.sendall(_h2_frame(1, 0x5, 1, headers))  # END_STREAM | END_HEADERS
        while True:
            frame = _h2_read_frame(s)
            assert frame is not None, "closed before answering"
            kind, flags, stream, _ = frame
            if kind == 4 and not flags & 0x1:
                s.sendall(_h2_frame(4, 0x1, 0))  # SETTINGS ACK
            if stream == 1 and flags & 0x1:
                break
        time.sleep(0.3)
        signalled = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(20) == 0
        took = time.monotonic() - signalled
        # Nothing is in flight: like an idle HTTP/1.1 keep-alive connection, it must not hold
        # the exit (it took the whole 8 s grace).
        assert took < 3, f"exit took {took:.1f}s with only an idle h2c connection open"
        assert "did not finish in time" not in g.logs()
    finally:
        s.close()
        g.stop()


# FAILS at bbc2db5: requests the gateway answers itself (504 upstream timeout, 502, 401, 429...) are
# counted by Metrics::count_request (telemetry.rs:380, from proxy.rs:575) but never observed in
# sidegate_request_duration_seconds: the latency histogram is blind to timeouts.
def test_a_request_answered_504_after_its_timeout_is_in_the_duration_histogram(gateway):
    r = httpx.post(gateway.url + "/openai/chat/completions", json=CHAT, timeout=10,
                   headers={"cf-aig-request-timeout": "400", "x-mock-delay-ms": "1500"})
    assert r.status_code == 504, r.text
    ok = httpx.post(gateway.url + "/openai/chat/completions", json=CHAT, timeout=10)
    assert ok.status_code == 200
    text = gateway.metrics()
    assert _sample(text, 'sidegate_requests_total{provider="openai",status="504"}') == 1
    assert _sample(text, 'sidegate_requests_total{provider="openai",status="200"}') == 1
    # Both requests are timed: the histogram's count matches the counter, and its sum holds
    # the 0.4 s the timed-out one waited.
    assert _sample(text, 'sidegate_request_duration_seconds_count{provider="openai"}') == 2, text
    assert _sample(text, 'sidegate_request_duration_seconds_sum{provider="openai"}') >= 0.39, text


# FAILS at bbc2db5: with --log-format json the note on dropped lines is written as a text line
# ("<ts>  WARN N log lines dropped: ...", access_log.rs flush_sink), breaking "one JSON object per
# line" for the log pipeline exactly when it is already struggling.
def test_json_logs_stay_one_json_object_per_line_when_lines_are_dropped(mock, tmp_path):
    proc, url, _ = start_with_stderr_piped(mock, tmp_path, ["--log-format", "json"], env={"RUST_LOG": "warn"})
    try:
        # stderr is a pipe nobody reads: ~6 MiB of payload lines pass the 4 MiB bound.
        n = 160
        big = dict(CHAT, messages=[{"role": "user", "content": "x" * 40000}])
        with httpx.Client(timeout=10) as c:
            for _ in range(n):
                assert c.post(f"{url}/openai/v1/chat/completions", json=big).status_code == 200
        got = drain_stderr(proc, lambda got: got.count(b'"message":"request"') + sum(
            int(x) for x in re.findall(rb"(\d+) log lines dropped", got)) >= n)
        lines = [l for l in got.decode(errors="replace").split("\n")[:-1] if l]
        not_json = []
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                not_json.append(line[:160])
        assert "dropped" in got.decode(errors="replace"), "nothing was dropped: no line says so"
        assert not not_json, not_json
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


JUNK_CA = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


def _run(args, cwd, timeout=20):
    return subprocess.run([binary("sidegate"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# FAILS at bbc2db5: --check only parses the PEM (main.rs check -> read_certs) while a start also
# builds the root store from it (proxy::upstream_client), which refuses this certificate: --check
# says "valid" and exits 0 for a setup a start refuses with exit 2.
def test_check_refuses_an_upstream_ca_a_start_refuses(tmp_path):
    (tmp_path / "gateway.yaml").write_text(gateway_yaml("http://127.0.0.1:9"))
    (tmp_path / "ca.pem").write_text(JUNK_CA)
    args = ["--config", "gateway.yaml", "--upstream-ca", "ca.pem"]
    start = _run([*args, "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"], tmp_path)
    assert start.returncode == 2, start.stderr
    check = _run([*args, "--check"], tmp_path)
    assert check.returncode == 2, (check.stdout, check.stderr)
    assert "ca.pem" in check.stderr, check.stderr


# FAILS at bbc2db5: the start's error is "upstream TLS setup: invalid peer certificate: BadEncoding"
# (main.rs run: .context("upstream TLS setup")): it names neither --upstream-ca nor the file, and
# speaks of a peer certificate though no peer was contacted.
def test_a_start_refusing_an_upstream_ca_names_the_file(tmp_path):
    (tmp_path / "gateway.yaml").write_text(gateway_yaml("http://127.0.0.1:9"))
    (tmp_path / "extra-ca.pem").write_text(JUNK_CA)
    start = _run(["--config", "gateway.yaml", "--upstream-ca", "extra-ca.pem",
                  "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"], tmp_path)
    assert start.returncode == 2, start.stderr
    assert "extra-ca.pem" in start.stderr, start.stderr
    assert "panicked" not in start.stderr


# FAILS at bbc2db5: the refusal of an OTLP endpoint with user:password@ quotes the endpoint whole,
# password included (crds/src/policy.rs open_telemetry_problem: {:?} of o.endpoint), into the start
# log, every reload error and --check output, while baseURL and moderationURL errors redact it.
def test_an_otel_endpoint_with_credentials_is_refused_without_repeating_them(mock, tmp_path):
    secret = "otel-s3cr3t-pw"
    spec = f"  openTelemetry: {{endpoint: 'http://collector:{secret}@127.0.0.1:4318'}}\n"
    (tmp_path / "gateway.yaml").write_text(gateway_yaml(mock.url, extra_spec=spec))
    check = _run(["--config", "gateway.yaml", "--check"], tmp_path)
    assert check.returncode == 2, check.stdout
    assert "credentials" in check.stderr, check.stderr
    assert secret not in check.stdout + check.stderr, check.stderr
    # A running sidecar given it at reload: refused, and its log never quotes the password.
    live = tmp_path / "live"
    live.mkdir()
    g = Sidegate(live, gateway_yaml(mock.url), DEFAULT_KEYS)
    try:
        g.config.write_text(gateway_yaml(mock.url, extra_spec=spec))
        logs = g.wait_for_log("config reload rejected", timeout=10)
        assert "credentials" in logs
        assert secret not in logs, [l for l in logs.splitlines() if secret in l]
    finally:
        g.stop()


# FAILS at bbc2db5: a config path that is a FIFO with no writer blocks in File::open
# (config.rs read_config) forever: `--check` in CI hangs instead of saying what is wrong (and a start
# hangs before listening, with no log line and no admin port to probe).
def test_check_of_a_config_that_is_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "gateway.yaml"
    os.mkfifo(fifo)
    try:
        out = _run(["--config", str(fifo), "--check"], tmp_path, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("--check on a FIFO config still running after 10 s")
    assert out.returncode == 2, out.stderr
    assert str(fifo) in out.stderr


def test_a_sidecar_waiting_for_its_config_is_unready_and_exits_at_once_on_sigterm(tmp_path):
    # Confirmed correct: no config yet means 503 on /readyz and on requests (code 2105), counted
    # under provider "none"; SIGTERM then ends it at once with exit 0 (no grace to wait out).
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([binary("sidegate"), "--config", str(tmp_path / "absent.yaml"),
                             "--wait-for-config", "--listen", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert ready.status_code == 503
        assert httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=2).status_code == 200
        r = httpx.post(f"http://127.0.0.1:{port}/openai/chat/completions", json=CHAT, timeout=5)
        assert r.status_code == 503 and r.json()["error"][0]["code"] == 2105
        text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=2).text
        assert _sample(text, 'sidegate_requests_total{provider="none",status="503"}') == 1
        assert "sidegate_config_info{" not in text
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - signalled < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# FAILS at bbc2db5: keys.rs KeyStore::load stats every entry before looking at its name, and any
# error but NotFound (here ELOOP from a stray self-referencing link, not even a key name) fails the
# whole keys directory: at reload the rotated key beside it is never applied (the old one keeps
# being sent) and a start with it refuses to run, where other odd entries are skipped with a note.
def test_a_stray_looping_link_in_the_keys_directory_holds_back_no_key(mock, tmp_path):
    from conftest import KEY_MARKER, OPENAI_KEY
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    rotated = f"sk-{KEY_MARKER}-rotated-next-to-a-loop"
    try:
        os.symlink("stray", g.keys_dir / "stray")
        (g.keys_dir / "openai.default").write_text(rotated + "\n")

        def sent():
            mock.clear()
            r = httpx.post(g.url + "/openai/chat/completions", json=CHAT, timeout=10)
            return r.status_code, mock.last()["headers"].get("authorization")

        deadline = time.monotonic() + 8
        while sent() != (200, f"Bearer {rotated}"):
            assert time.monotonic() < deadline, (sent(), g.logs()[-600:])
            time.sleep(0.2)
        assert sent() != (200, f"Bearer {OPENAI_KEY}")
    finally:
        g.stop()
    check = _run(["--config", str(g.config), "--keys-dir", str(g.keys_dir), "--check"], tmp_path)
    assert check.returncode == 0, check.stderr
    assert "stray" in check.stdout, check.stdout


def _logfmt_after(line, message):
    """The `key=value` fields after `message` in a text log line, each value bare (no space, no
    quote) or quoted and escaped like a JSON string; fails on anything else."""
    rest = line.split(f" {message} ", 1)[1]
    dec = json.JSONDecoder()
    fields, i = {}, 0
    while i < len(rest):
        m = re.compile(r"([a-z_]+)=").match(rest, i)
        assert m, f"not a key=value pair at {rest[i:i + 50]!r} in {line!r}"
        key, i = m.group(1), m.end()
        if rest[i:i + 1] == '"':
            value, i = dec.raw_decode(rest, i)
        else:
            end = rest.find(" ", i)
            end = len(rest) if end < 0 else end
            value, i = rest[i:end], end
            assert '"' not in value, f"bare value with a quote: {value!r} in {line!r}"
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key] = value
        i += rest[i:i + 1] == " "
    return fields


# FAILS at bbc2db5: the text format (access_log.rs text_fields) writes Display values bare, spaces
# and quotes included, and the 2040 refusal quotes the client's cf-aig-byok-alias: the client's
# "status=200 ... id=01FAKE" become fields of the "request refused" line (before the real id), as
# the access line (text_value) was made to prevent.
def test_a_client_value_quoted_by_a_refusal_cannot_fake_fields_of_its_log_line(gateway, mock):
    r = httpx.post(gateway.url + "/openai/chat/completions", json=CHAT, timeout=10,
                   headers={"cf-aig-byok-alias": 'x" status=200 code=0 id=01FAKE'})
    assert r.status_code == 400 and r.json()["error"][0]["code"] == 2040
    log_id = r.headers["cf-aig-log-id"]
    gateway.wait_log_line(log_id)
    line = next(l for l in gateway.logs().splitlines() if " request refused " in l and log_id in l)
    fields = _logfmt_after(line, "request refused")
    assert fields["log_id"] == log_id and fields["status"] == "400" and fields["code"] == "2040", fields


# FAILS at bbc2db5: with stderr stuck (a log collector that stopped draining the pipe) SIGTERM never
# ends the sidecar: after the drain, main.rs calls access_log::flush(), which waits on the `writing`
# lock the flusher thread holds while blocked in write(2) on the full pipe (access_log.rs
# flush_sink); the process sleeps until SIGKILL, whatever --shutdown-grace says.
def test_sigterm_ends_the_sidecar_even_when_stderr_does_not_drain(mock, tmp_path):
    proc, url, admin = start_with_stderr_piped(mock, tmp_path, ["--shutdown-grace", "2"])
    try:
        # ~1 MiB of lines into a pipe nobody reads (it holds 64 KiB): the flusher blocks in write.
        big = dict(CHAT, messages=[{"role": "user", "content": "x" * 8000}])
        with httpx.Client(timeout=10) as c:
            for _ in range(60):
                assert c.post(f"{url}/openai/v1/chat/completions", json=big).status_code == 200
        time.sleep(0.5)
        assert httpx.get(f"{admin}/healthz", timeout=2).status_code == 200
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after SIGTERM (grace 2 s) with stderr not drained")
        assert time.monotonic() - signalled < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# FAILS at bbc2db5: commit 43d1ce1 put `const MAX_GRACE_SECS` (with its own doc line) between the
# doc comment of `struct Args` and the struct (main.rs:16-22): the comment now documents the const,
# and `--help` lost its long description (what the sidecar is, where to point an SDK).
def test_long_help_says_what_the_sidecar_is_and_where_to_point_an_sdk():
    out = subprocess.run([binary("sidegate"), "--help"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert "http://127.0.0.1:8787/openai" in out.stdout, out.stdout[:400]

"""Bad input gets a clear SPEC.md error (never a panic, never a hang)."""

import shutil
import socket
import subprocess
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, Sidegate, StallingServer, binary, free_port, gateway_yaml


def envelope_code(r):
    body = r.json()
    assert body["success"] is False and body["result"] == [] and body["messages"] == []
    return body["error"][0]["code"]


@pytest.mark.parametrize("path", ["/nope/chat/completions", "/v1/acct", "/compat/nope", "//x"])
def test_unknown_routes_are_404_2001(gateway, path):
    r = httpx.post(gateway.url + path, json={})
    assert r.status_code == 404
    assert envelope_code(r) == 2001


def test_missing_or_wrong_gateway_token_is_401_2009(authed_gateway, mock):
    url = authed_gateway.url + "/openai/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for headers in [{}, {"cf-aig-authorization": "Bearer wrong"}, {"cf-aig-authorization": GATEWAY_TOKEN}]:
        r = httpx.post(url, headers=headers, json=body)
        assert (r.status_code, envelope_code(r)) == (401, 2009), headers
    assert mock.requests() == []
    r = httpx.post(url, headers={"cf-aig-authorization": f"Bearer {GATEWAY_TOKEN}"}, json=body)
    assert r.status_code == 200


def test_malformed_json_goes_to_the_provider_whose_error_passes_through(gateway, mock):
    r = httpx.post(gateway.url + "/openai/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    direct = httpx.post(mock.url + "/v1/chat/completions", content=b"{not json",
                        headers={"content-type": "application/json", "authorization": "Bearer direct"})
    assert (r.status_code, r.content) == (direct.status_code, direct.content)
    assert r.status_code == 400


def test_huge_headers_are_refused_with_431(gateway):
    r = httpx.get(gateway.url + "/openai/models", headers={"x-big": "a" * 100_000})
    assert r.status_code == 431


def test_oversized_body_is_413_with_or_without_content_length(gateway, mock):
    big = b"x" * (10 * 1024 * 1024 + 1)
    r = httpx.post(gateway.url + "/openai/chat/completions", content=big)
    assert (r.status_code, envelope_code(r)) == (413, 2102)

    def chunks():
        for _ in range(11):
            yield b"y" * (1024 * 1024)

    r = httpx.post(gateway.url + "/openai/chat/completions", content=chunks())
    assert (r.status_code, envelope_code(r)) == (413, 2102)
    assert mock.requests() == []


def test_bad_request_timeout_header_is_400(gateway):
    r = httpx.post(gateway.url + "/openai/chat/completions", headers={"cf-aig-request-timeout": "soon"}, json={})
    assert (r.status_code, envelope_code(r)) == (400, 2100)


def test_unreachable_upstream_is_502_in_the_envelope(mock, tmp_path, refusing_port):
    dead = refusing_port.url
    g = Sidegate(tmp_path, gateway_yaml(dead))
    try:
        r = httpx.post(g.url + "/openai/chat/completions", json={})
        assert (r.status_code, envelope_code(r)) == (502, 2104)
    finally:
        g.stop()


def test_garbage_on_the_socket_does_not_kill_the_gateway(gateway):
    for junk in [b"\x00\xff\xfe garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /openai/x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"]:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
            s.sendall(junk)
            try:
                s.recv(1024)
            except OSError:
                pass
    assert httpx.get(gateway.admin + "/healthz").status_code == 200
    assert gateway.proc.poll() is None


def test_h2c_prior_knowledge_works(gateway, mock):
    curl = shutil.which("curl")
    if not curl:
        pytest.skip("curl not installed")
    out = subprocess.run(
        [curl, "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
         "-H", "content-type: application/json", "-d", '{"model":"m","messages":[{"role":"user","content":"h2"}]}',
         gateway.url + "/openai/chat/completions"],
        capture_output=True, text=True, timeout=20,
    )
    assert out.stdout == "2 200", out


@pytest.mark.parametrize(
    "config, message",
    [
        ("schemaVersion: 1\nspec: [unclosed\n", "is not valid"),
        ("schemaVersion: 7\n", "schemaVersion 7 is not supported"),
        ("schemaVersion: 1\nspec:\n  providers:\n    custom-x: {}\n", "custom providers need a baseURL"),
    ],
)
def test_invalid_config_at_start_exits_non_zero_with_a_clear_error(tmp_path, config, message):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config)
    out = subprocess.run(
        [binary("sidegate"), "--config", str(cfg), "--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=20,
    )
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


def test_missing_config_file_exits_non_zero(tmp_path):
    out = subprocess.run([binary("sidegate"), "--config", str(tmp_path / "absent.yaml")], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "absent.yaml" in out.stderr


def test_help_explains_every_flag():
    out = subprocess.run([binary("sidegate"), "--help"], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    for flag in ["--config", "--keys-dir", "--listen", "--admin", "--wait-for-config", "--log-format"]:
        assert flag in out.stdout


def test_check_says_whether_a_config_would_load_and_listens_nowhere(tmp_path, mock):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "openai.default").write_text("sk-check-key")
    good = tmp_path / "good.yaml"
    good.write_text(gateway_yaml(mock.url) + "keys:\n  openai: [default]\n  opneai: [default]\n")
    port = free_port()
    args = ["--keys-dir", str(keys), "--listen", f"127.0.0.1:{port}", "--check"]
    out = subprocess.run([binary("sidegate"), "--config", str(good), *args], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out
    assert "good.yaml: valid (gateway team-a/main, 1 stored key(s)" in out.stdout, out.stdout
    # A name in the keys index that is no provider is said, not silently kept.
    assert '"opneai", which is no provider of this gateway' in out.stdout, out.stdout
    assert "sk-check-key" not in out.stdout + out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(gateway_yaml(mock.url).replace("groq:", "grok-typo:"))
    out = subprocess.run([binary("sidegate"), "--config", str(bad), *args], capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    assert "invalid configuration" in out.stderr and "spec.providers.grok-typo: unknown provider" in out.stderr, out.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing listened there


def test_metrics_count_requests_by_provider_and_status_and_show_the_config_hash(gateway):
    httpx.post(gateway.url + "/openai/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "m"}]})
    httpx.post(gateway.url + "/openai/chat/completions", json={"model": "mock-status-400", "messages": []})
    httpx.post(gateway.url + "/nope/x", json={})
    m = gateway.metrics()
    assert 'sidegate_requests_total{provider="openai",status="200"} 1' in m
    assert 'sidegate_requests_total{provider="openai",status="400"} 1' in m
    assert 'sidegate_requests_total{provider="none",status="404"} 1' in m
    assert 'sidegate_config_info{hash="sha256:' in m and 'gateway="team-a/main"' in m
    assert httpx.get(gateway.admin + "/readyz").status_code == 200



def test_a_streamed_answer_that_stalls_is_cut_after_the_request_timeout(tmp_path):
    # Passed through as it comes (nothing held back): an upstream that goes silent mid-body is
    # cut after the request timeout, so the client and the connection are not held forever.
    stall = StallingServer()
    g = Sidegate(tmp_path, gateway_yaml(stall.url, extra_spec="  requestTimeout: 1500ms\n"), DEFAULT_KEYS)
    try:
        t0 = time.monotonic()
        with httpx.stream("POST", g.url + "/openai/chat/completions", json={"model": "m", "messages": []},
                          headers={"cf-aig-request-timeout": "200"}, timeout=30) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                r.read()
        took = time.monotonic() - t0
        assert 1.4 < took < 10, took
        deadline = time.monotonic() + 3
        while "outcome=upstream_error" not in g.logs():
            assert time.monotonic() < deadline, g.logs()
            time.sleep(0.05)
    finally:
        g.stop()
        stall.stop()

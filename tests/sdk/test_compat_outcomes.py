"""How /compat answers that go wrong are told apart from answers that went right: a stream cut
short is logged as an upstream error and never cached; an answer held back whole that the
client gets as a gateway error (502/504) is logged and counted with that status and carries
its `cf-aig-log-id`; a list of texts sent one text per upstream request costs memory in
proportion to the request, not to the number of texts times its size."""

import json
import pathlib
import socket
import threading
import time

import httpx
import pytest

from conftest import FixedAnswerServer, Sidegate, StallingServer
from test_compat import COMPAT_KEYS, compat_yaml

STREAMING_CACHE = "  cache: {enabled: true, streaming: true}\n"


class RawStreamServer:
    """A loopback upstream that answers every request with the same chunked `text/event-stream`
    body, cleanly terminated (`0\\r\\n\\r\\n`), whatever the stream says; counts the requests."""

    def __init__(self, events: bytes):
        events = [e + b"\n\n" for e in events.split(b"\n\n") if e]
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
        self.answer = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                       b"connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    while len(body) < length:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        body += chunk
                    self.requests += 1
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def stop(self):
        self.stopped.set()
        self.thread.join(5)
        self.sock.close()


ANTHROPIC_CUT = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_cut","type":"message",'
    b'"role":"assistant","model":"claude-haiku-4-5","content":[],"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Half an ans"}}\n\n'
)

OPENAI_CUT = (
    b'data: {"id":"chatcmpl-cut","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"role":"assistant","content":"Half an ans"},"finish_reason":null}]}\n\n'
)


def access_line(g, log_id):
    return g.wait_log_line(log_id)


def chat(model, stream, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "tell me"}], "stream": stream, **extra}


def post(g, body, path="/compat/chat/completions"):
    return httpx.post(g.url + path, json=body, timeout=30)


def test_an_anthropic_stream_cut_before_message_stop_is_an_upstream_error_and_not_cached(tmp_path):
    srv = RawStreamServer(ANTHROPIC_CUT)
    g = Sidegate(tmp_path, compat_yaml(srv.url) + STREAMING_CACHE, COMPAT_KEYS)
    try:
        body = chat("anthropic/claude-haiku-4-5", True)
        first = post(g, body)
        assert first.status_code == 200, first.text
        assert "Half an ans" in first.text
        assert "the anthropic stream ended before message_stop" in first.text
        assert "[DONE]" not in first.text
        line = access_line(g, first.headers["cf-aig-log-id"])
        assert "outcome=upstream_error" in line and "success=false" in line, line
        second = post(g, body)
        assert second.headers["cf-aig-cache-status"] == "MISS", second.text
        assert srv.requests == 2
    finally:
        g.stop()
        srv.stop()


@pytest.mark.parametrize("path, model, extra", [
    # The gateway asks openai for a usage chunk the client did not ask for (held out of its stream).
    ("/compat/chat/completions", "openai/gpt-4o-mini", {}),
    # Passed through as it comes.
    ("/compat/chat/completions", "custom-local/some-model", {}),
    ("/compat/chat/completions", "openai/gpt-4o-mini", {"stream_options": {"include_usage": True}}),
    # The providers' own routes.
    ("/openai/chat/completions", "gpt-4o-mini", {}),
    ("/custom-local/chat/completions", "some-model", {}),
])
def test_an_openai_format_stream_without_done_is_an_upstream_error_and_not_cached(tmp_path, path, model, extra):
    srv = RawStreamServer(OPENAI_CUT)
    g = Sidegate(tmp_path, compat_yaml(srv.url) + STREAMING_CACHE, COMPAT_KEYS)
    try:
        body = chat(model, True, **extra)
        first = post(g, body, path)
        assert first.status_code == 200 and "Half an ans" in first.text, first.text
        line = access_line(g, first.headers["cf-aig-log-id"])
        assert "outcome=upstream_error" in line and "success=false" in line, line
        second = post(g, body, path)
        assert second.headers["cf-aig-cache-status"] == "MISS", second.text
        assert srv.requests == 2
    finally:
        g.stop()
        srv.stop()


@pytest.mark.parametrize("path, model", [
    ("/compat/chat/completions", "custom-local/some-model"),
    ("/custom-local/chat/completions", "some-model"),
])
def test_a_whole_openai_format_stream_is_still_cached(tmp_path, path, model):
    srv = RawStreamServer(OPENAI_CUT + b"data: [DONE]\n\n")
    g = Sidegate(tmp_path, compat_yaml(srv.url) + STREAMING_CACHE, COMPAT_KEYS)
    try:
        body = chat(model, True)
        first = post(g, body, path)
        line = access_line(g, first.headers["cf-aig-log-id"])
        assert "outcome=complete" in line and "success=true" in line, line
        second = post(g, body, path)
        assert second.headers["cf-aig-cache-status"] == "HIT" and second.text == first.text
        assert srv.requests == 1
    finally:
        g.stop()
        srv.stop()


def requests_total(g, provider, status):
    needle = f'sidegate_requests_total{{provider="{provider}",status="{status}"}} '
    return sum(float(line.split()[-1]) for line in g.metrics().splitlines() if line.startswith(needle))


def log_lines_with(g, text, timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in g.logs().splitlines() if text in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_an_answer_that_cannot_be_translated_is_logged_and_counted_as_the_502_the_client_got(tmp_path):
    srv = FixedAnswerServer(b"<html>captive portal</html>")
    g = Sidegate(tmp_path, compat_yaml(srv.url), COMPAT_KEYS)
    try:
        r = post(g, chat("anthropic/claude-haiku-4-5", False))
        assert r.status_code == 502, r.text
        log_id = r.headers["cf-aig-log-id"]
        line = access_line(g, log_id)
        assert "status_code=502" in line and "success=false" in line, line
        assert "outcome=complete" not in line and "cost=" not in line, line
        assert (requests_total(g, "anthropic", 502), requests_total(g, "anthropic", 200)) == (1, 0)
        warned = log_lines_with(g, "untranslatable upstream response")
        assert warned and log_id in warned[0], warned
    finally:
        g.stop()
        srv.stop()


def test_an_answer_that_stalls_while_held_back_is_logged_as_the_504_the_client_got_with_its_log_id(tmp_path):
    stall = StallingServer()
    g = Sidegate(tmp_path, compat_yaml(stall.url) + "  requestTimeout: 1500ms\n", COMPAT_KEYS)
    try:
        r = post(g, chat("anthropic/claude-haiku-4-5", False))
        assert (r.status_code, r.json()["error"][0]["code"]) == (504, 2103), r.text
        log_id = r.headers["cf-aig-log-id"]
        line = access_line(g, log_id)
        assert "status_code=504" in line and "outcome=upstream_error" in line, line
        assert (requests_total(g, "anthropic", 504), requests_total(g, "anthropic", 200)) == (1, 0)
        warned = log_lines_with(g, "response not delivered")
        assert warned and log_id in warned[0], warned
    finally:
        g.stop()
        stall.stop()


def peak_rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_list_sent_one_text_per_request_does_not_copy_the_other_fields_into_every_part(mock, tmp_path):
    g = Sidegate(tmp_path, compat_yaml(mock.url), COMPAT_KEYS)
    try:
        mock.clear()
        before = peak_rss_kib(g.proc.pid)
        # 256 texts (the most sent one per request) and 2 MiB of a field Vertex has no place for.
        body = {"model": "google-vertex-ai/my-proj/us-central1/gemini-embedding-001",
                "input": [f"t{i}" for i in range(256)], "encoding_format": "float",
                "user": "u" * 1000, "junk": "j" * (2 << 20)}
        r = post(g, body, "/compat/embeddings")
        assert r.status_code == 200, r.text[:500]
        assert len(r.json()["data"]) == 256
        grown_mib = (peak_rss_kib(g.proc.pid) - before) / 1024
        # The request is 2 MiB: a copy of it per text was 512 MiB.
        assert grown_mib < 64, grown_mib
        sent = [json.loads(req["body"]) for req in mock.requests()]
        assert len(sent) == 256 and all("junk" not in s and "user" not in s for s in sent)
    finally:
        g.stop()


def test_titan_repeats_small_other_fields_in_every_part_and_refuses_large_ones(mock, tmp_path):
    g = Sidegate(tmp_path, compat_yaml(mock.url), COMPAT_KEYS)
    model = "aws-bedrock/us-east-1/amazon.titan-embed-text-v2:0"
    try:
        mock.clear()
        r = post(g, {"model": model, "input": ["a", "b", "c"], "normalize": True, "encoding_format": "float"},
                 "/compat/embeddings")
        assert r.status_code == 200, r.text
        sent = [json.loads(req["body"]) for req in mock.requests()]
        assert sorted(s["inputText"] for s in sent) == ["a", "b", "c"]
        assert all(s["normalize"] is True for s in sent), sent
        mock.clear()
        r = post(g, {"model": model, "input": ["a", "b", "c"], "junk": "j" * (64 << 10)}, "/compat/embeddings")
        assert r.status_code == 400, r.text
        assert "repeated" in r.json()["error"][0]["message"], r.text
        assert mock.requests() == []
        # One text is one request: its fields go as they are.
        r = post(g, {"model": model, "input": "a", "junk": "j" * (64 << 10)}, "/compat/embeddings")
        assert r.status_code == 200, r.text
    finally:
        g.stop()


def test_a_compat_request_left_while_its_answer_is_held_back_is_logged_once(tmp_path):
    # The answer is held back whole within its attempt (a break would be retried): the client
    # leaving then leaves before it had an answer, one `cancelled` 499 line naming the provider
    # and model it waited on, as when it leaves waiting for the head.
    stall = StallingServer()
    g = Sidegate(tmp_path, compat_yaml(stall.url), COMPAT_KEYS)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(g.url + "/compat/chat/completions", json=chat("anthropic/claude-haiku-4-5", False), timeout=1)
        assert log_lines_with(g, "outcome=cancelled"), "no line for the request"
        time.sleep(0.5)
        lines = [line for line in g.logs().splitlines() if " request id=" in line]
        assert len(lines) == 1, lines
        assert all(f in lines[0] for f in ("provider=anthropic", "status_code=499", "model=claude-haiku-4-5")), lines
        metrics = g.metrics()
        assert 'sidegate_requests_total{provider="anthropic",status="499"} 1' in metrics
        assert 'sidegate_requests_total{provider="anthropic",status="200"}' not in metrics
    finally:
        g.stop()
        stall.stop()


def test_perplexity_streams_end_without_done_and_are_whole(tmp_path):
    # Perplexity's OpenAI-format streams carry no `data: [DONE]`: that is their end, not a cut.
    srv = RawStreamServer(OPENAI_CUT)
    yaml = compat_yaml(srv.url).replace("  providers:\n", f"  providers:\n    perplexity-ai: {{baseURL: '{srv.url}'}}\n", 1)
    g = Sidegate(tmp_path, yaml + STREAMING_CACHE, COMPAT_KEYS)
    try:
        for path, model in (("/perplexity-ai/chat/completions", "sonar"), ("/compat/chat/completions", "perplexity-ai/sonar")):
            r = post(g, chat(model, True), path)
            assert r.status_code == 200 and "Half an ans" in r.text, r.text
            line = access_line(g, r.headers["cf-aig-log-id"])
            assert "outcome=complete" in line and "success=true" in line, line
    finally:
        g.stop()
        srv.stop()

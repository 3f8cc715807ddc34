"""Background Responses (`background: true`) are counted once, with the first poll that finds
them finished: the answer to the request that makes one says `"usage": null`, and the
response's usage comes with `GET responses/{id}` (or the cancellation) — answers a client asks
for again and again, and that a response made in the foreground has too.

The official `openai` SDK is the client; the upstream is a small loopback server speaking the
Responses API's wire format (the response object, its stream events, `?stream=true&
starting_after=N` to resume a stream), whose responses finish when the test says so
(test_background_review.py uses it too)."""

import http.server
import json
import pathlib
import threading
import time
import urllib.parse

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, Sidegate
from test_cost import metric, wait_line

MODEL = "o3-pro"
ANSWERING_MODEL = "o3-pro-2025-06-10"
USAGE = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0},
         "output_tokens": 5000, "output_tokens_details": {"reasoning_tokens": 4000},
         "total_tokens": 6000}
# o3-pro: $20 in, $80 out per million tokens.
COST = 1000 * 20e-6 + 5000 * 80e-6
CANCEL_USAGE = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 250, "output_tokens_details": {"reasoning_tokens": 250},
                "total_tokens": 1250}
CANCEL_COST = 1000 * 20e-6 + 250 * 80e-6
TERMINAL = ("completed", "failed", "incomplete", "cancelled")


class ResponsesUpstream:
    """A loopback Responses API: `POST .../responses` makes a response (finished at once in the
    foreground; `queued` in the background until `finish(id)`), `GET .../responses/{id}` reads it
    (as an event stream with `?stream=true`), `POST .../responses/{id}/cancel` cancels it (its
    usage then `cancel_usage`), `DELETE .../responses/{id}` deletes it. Ids in paths are
    percent-decoded, as real servers do. A background stream with `hold=True` in its body's
    metadata stops after `response.in_progress` until `release()`. `raw[id]`: a content type and bytes a GET of that id is answered with
    instead; `running_usage`: the usage object of a response not finished yet (OpenAI's is
    null)."""

    def __init__(self, cancel_usage=CANCEL_USAGE):
        self.responses = {}
        self.raw = {}
        self.running_usage = None
        self.cancel_usage = cancel_usage
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.count = 0
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).rstrip("/")
                if path.endswith("/responses"):
                    upstream._create(self, json.loads(body))
                elif path.endswith("/cancel"):
                    upstream._cancel(self, path.split("/")[-2])
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_DELETE(self):
                rid = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).rstrip("/").split("/")[-1]
                with upstream.lock:
                    gone = upstream.responses.pop(rid, None)
                if gone is None:
                    self._send(404, {"error": {"message": f"No response found with id '{rid}'.",
                                               "type": "invalid_request_error"}})
                else:
                    self._send(200, {"id": rid, "object": "response.deleted", "deleted": True})

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                rid = urllib.parse.unquote(url.path).rstrip("/").split("/")[-1]
                if rid in upstream.raw:
                    self._send_raw(200, *upstream.raw[rid])
                    return
                with upstream.lock:
                    r = upstream.responses.get(rid)
                    obj = upstream._object(r) if r else None
                if obj is None:
                    self._send(404, {"error": {"message": f"No response found with id '{rid}'.",
                                               "type": "invalid_request_error"}})
                elif query.get("stream") == ["true"]:
                    after = int(query.get("starting_after", ["-1"])[0])
                    self._events([e for e in upstream._events(obj) if e["sequence_number"] > after])
                else:
                    self._send(200, obj)

            def _send(self, status, obj):
                self._send_raw(status, "application/json", json.dumps(obj).encode())

            def _send_raw(self, status, content_type, data):
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _events(self, events, hold_after=None):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                try:
                    for e in events:
                        self.wfile.write(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()))
                        self.wfile.flush()
                        if e["type"] == hold_after:
                            upstream.gate.wait(20)
                except OSError:
                    pass
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _object(self, r):
        done = r["status"] in TERMINAL
        output = []
        if r["status"] == "completed":
            output = [{"type": "message", "id": "msg_" + r["id"], "status": "completed", "role": "assistant",
                       "content": [{"type": "output_text", "text": "The answer is 42.", "annotations": []}]}]
        return {"id": r["id"], "object": "response", "created_at": 1760000000, "status": r["status"],
                "background": r["background"], "error": None, "incomplete_details": None,
                "instructions": None, "max_output_tokens": None, "model": ANSWERING_MODEL,
                "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": "high", "summary": None}, "store": True, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "truncation": "disabled", "metadata": {},
                "usage": r["usage"] if done else self.running_usage}

    def _events(self, obj):
        """The stream of a response as it is now: created, in progress and, once it is
        finished, its text and completion."""
        early = dict(obj, status="queued", output=[], usage=None)
        events = [{"type": "response.created", "response": early},
                  {"type": "response.in_progress", "response": dict(early, status="in_progress")}]
        if obj["status"] == "completed":
            events += [{"type": "response.output_text.delta", "item_id": "msg_" + obj["id"], "output_index": 0,
                        "content_index": 0, "delta": "The answer is 42.", "logprobs": []},
                       {"type": "response.completed", "response": obj}]
        for i, e in enumerate(events):
            e["sequence_number"] = i
        return events

    def _create(self, h, body):
        with self.lock:
            self.count += 1
            rid = f"resp_{self.count:04d}{time.monotonic_ns() % 10**9:09d}"
            background = bool(body.get("background"))
            r = {"id": rid, "background": background, "usage": USAGE,
                 "status": "queued" if background else "completed"}
            self.responses[rid] = r
            obj = self._object(r)
        if not body.get("stream"):
            h._send(200, obj)
            return
        if not background:
            h._events(self._events(obj))
            return
        # A background stream: the response runs while the client reads (or not).
        hold = (body.get("metadata") or {}).get("hold") == "yes"
        events = self._events(dict(obj, status="completed", usage=USAGE))
        with self.lock:
            r["status"] = "in_progress"
        if hold:
            h._events(events, hold_after="response.in_progress")
        else:
            h._events(events)
        with self.lock:
            r["status"] = "completed"

    def _cancel(self, h, rid):
        with self.lock:
            r = self.responses.get(rid)
            if r is not None:
                r["status"], r["usage"] = "cancelled", self.cancel_usage
                obj = self._object(r)
        if r is None:
            h._send(404, {"error": {"message": "not found"}})
        else:
            h._send(200, obj)

    def finish(self, rid, status="completed"):
        with self.lock:
            self.responses[rid]["status"] = status

    def set_status(self, rid, status):
        self.finish(rid, status)

    def release(self):
        self.gate.set()

    def stop(self):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


def start_gateway(tmp_path, upstream_url, extra_spec=""):
    d = pathlib.Path(tmp_path) / f"gw-{time.monotonic_ns()}"
    d.mkdir()
    yaml = (
        "schemaVersion: 1\n"
        "gateway: {namespace: team-a, name: background}\n"
        "spec:\n"
        "  providers:\n"
        f"    openai: {{baseURL: '{upstream_url}/v1'}}\n"
        f"    azure-openai: {{baseURL: '{upstream_url}/openai/deployments/{{deployment}}'}}\n"
        f"    custom-local: {{baseURL: '{upstream_url}/v1', authHeader: x-custom-key}}\n"
        + extra_spec
    )
    keys = dict(DEFAULT_KEYS, **{"azure-openai.default": "sgtestkey-azure-background"})
    return Sidegate(d, yaml, keys, extra_args=["--log-format", "json"])


@pytest.fixture
def upstream():
    u = ResponsesUpstream()
    yield u
    u.stop()


@pytest.fixture
def made(tmp_path, upstream):
    """`made(extra_spec)`: a gateway in front of the upstream, and an SDK client through it."""
    gateways = []

    def make(extra_spec=""):
        g = start_gateway(tmp_path, upstream.url, extra_spec)
        gateways.append(g)
        client = openai.OpenAI(base_url=g.url + "/openai/v1", api_key="placeholder", max_retries=0)
        return g, client

    yield make
    for g in gateways:
        g.stop()


def create(g, client, **kw):
    """A response made through the SDK: the response and its access log line."""
    raw = client.responses.with_raw_response.create(model=MODEL, input="Prove it.", **kw)
    return raw.parse(), wait_line(g, raw.headers["cf-aig-log-id"])


def retrieve(g, client, rid):
    raw = client.responses.with_raw_response.retrieve(rid)
    return raw.parse(), wait_line(g, raw.headers["cf-aig-log-id"])


def counted(line):
    return line["tokens_in"], line["tokens_out"], line["cost"]


UNCOUNTED = (None, None, None)


def test_a_background_response_is_counted_once_with_its_first_finished_poll(made, upstream):
    g, client = made()
    resp, line = create(g, client, background=True)
    assert (resp.status, resp.background, resp.usage) == ("queued", True, None)
    assert counted(line) == UNCOUNTED, line
    # Polls while it runs count nothing.
    for status in ("queued", "in_progress"):
        upstream.set_status(resp.id, status)
        polled, line = retrieve(g, client, resp.id)
        assert polled.status == status and polled.usage is None
        assert counted(line) == UNCOUNTED, line
    upstream.finish(resp.id)
    polled, line = retrieve(g, client, resp.id)
    assert polled.status == "completed" and polled.usage.output_tokens == 5000
    assert (line["method"], line["path"]) == ("GET", f"v1/responses/{resp.id}")
    assert line["model"] == MODEL
    assert (line["tokens_in"], line["tokens_out"]) == (1000, 5000), line
    assert line["cost"] == pytest.approx(COST), line
    assert metric(g, 'sidegate_tokens_total{provider="openai",direction="output"}') == 5000
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(COST)
    # The same answer again, and again: counted already.
    for _ in range(3):
        polled, line = retrieve(g, client, resp.id)
        assert polled.usage.output_tokens == 5000
        assert counted(line) == UNCOUNTED, line
    assert metric(g, 'sidegate_tokens_total{provider="openai",direction="output"}') == 5000
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(COST)


def test_background_usage_spends_the_spend_limit(made, upstream):
    g, client = made("  spendLimit: {amount: '0.1', period: day}\n")
    resp, _ = create(g, client, background=True)
    # The answer that makes it has no usage: the limit is not reached yet, and not warned about.
    polled, line = retrieve(g, client, resp.id)
    assert polled.status == "queued" and counted(line) == UNCOUNTED
    upstream.finish(resp.id)
    _, line = retrieve(g, client, resp.id)
    assert line["cost"] == pytest.approx(COST) and COST > 0.1
    with pytest.raises(openai.RateLimitError) as e:
        client.responses.create(model=MODEL, input="more", background=True)
    assert e.value.status_code == 429
    assert e.value.response.json()["error"] == [
        {"code": 2041, "message": "spend limit exceeded: 0.1 USD per day reached"}]
    assert "reported no token counts" not in g.logs()


def test_a_background_response_counts_against_the_token_budget(made, upstream):
    g, client = made("  rateLimit: {limit: 1000, interval: 60s, tokensPerMinute: 5000}\n")
    resp, _ = create(g, client, background=True)
    upstream.finish(resp.id)
    retrieve(g, client, resp.id)
    r = httpx.get(f"{g.url}/openai/v1/responses/{resp.id}")
    assert r.status_code == 429 and r.json()["error"][0]["code"] == 2003, r.text


def test_a_response_made_in_the_foreground_is_not_counted_again_when_retrieved(made):
    g, client = made()
    resp, line = create(g, client)
    assert resp.status == "completed"
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    for _ in range(2):
        polled, line = retrieve(g, client, resp.id)
        assert polled.usage.output_tokens == 5000
        assert counted(line) == UNCOUNTED, line
    assert metric(g, 'sidegate_tokens_total{provider="openai",direction="output"}') == 5000


def test_a_cancelled_background_response_with_usage_is_counted_by_its_cancellation(made, upstream):
    g, client = made()
    resp, _ = create(g, client, background=True)
    upstream.set_status(resp.id, "in_progress")
    raw = client.responses.with_raw_response.cancel(resp.id)
    cancelled, line = raw.parse(), wait_line(g, raw.headers["cf-aig-log-id"])
    assert cancelled.status == "cancelled"
    assert (line["method"], line["path"]) == ("POST", f"v1/responses/{resp.id}/cancel")
    assert (line["tokens_in"], line["tokens_out"]) == (1000, 250), line
    assert line["cost"] == pytest.approx(CANCEL_COST), line
    _, line = retrieve(g, client, resp.id)
    assert counted(line) == UNCOUNTED, line


def test_a_failed_background_response_with_usage_is_counted(made, upstream):
    g, client = made()
    resp, _ = create(g, client, background=True)
    upstream.finish(resp.id, "failed")
    polled, line = retrieve(g, client, resp.id)
    assert polled.status == "failed"
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


def test_a_background_response_the_sidecar_did_not_see_made_is_not_counted(made, upstream):
    g, client = made()
    resp, _ = create(g, client, background=True)
    # A restarted sidecar remembers nothing of it.
    g.stop()
    g.start(["--log-format", "json"])
    upstream.finish(resp.id)
    polled, line = retrieve(g, client, resp.id)
    assert polled.status == "completed"
    assert counted(line) == UNCOUNTED, line
    # Nor does another gateway (another pod) it is polled through.
    other, other_client = made()
    resp, _ = create(g, client, background=True)
    upstream.finish(resp.id)
    _, line = retrieve(other, other_client, resp.id)
    assert counted(line) == UNCOUNTED, line
    # Its own gateway counts it.
    _, line = retrieve(g, client, resp.id)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


def test_a_streamed_background_response_is_counted_once_with_its_stream(made, upstream):
    g, client = made()
    stream = client.responses.create(model=MODEL, input="Prove it.", background=True, stream=True)
    events = list(stream)
    assert events[-1].type == "response.completed"
    rid = events[-1].response.id
    line = wait_line(g, stream.response.headers["cf-aig-log-id"])
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    polled, line = retrieve(g, client, rid)
    assert polled.status == "completed"
    assert counted(line) == UNCOUNTED, line


def test_a_background_response_followed_by_a_resumed_stream_is_counted_there_once(made, upstream):
    g, client = made()
    resp, _ = create(g, client, background=True)
    upstream.finish(resp.id)
    stream = client.responses.retrieve(resp.id, stream=True, starting_after=0)
    events = list(stream)
    assert [e.type for e in events][-1] == "response.completed"
    line = wait_line(g, stream.response.headers["cf-aig-log-id"])
    assert line["method"] == "GET"
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    stream = client.responses.retrieve(resp.id, stream=True, starting_after=0)
    list(stream)
    assert counted(wait_line(g, stream.response.headers["cf-aig-log-id"])) == UNCOUNTED


def test_a_background_stream_left_before_its_end_is_counted_by_the_poll_that_finds_it_done(made, upstream):
    g, client = made("  spendLimit: {amount: '10', period: day}\n")
    stream = client.responses.create(model=MODEL, input="Prove it.", background=True, stream=True,
                                     metadata={"hold": "yes"})
    for event in stream:
        if event.type == "response.in_progress":
            rid = event.response.id
            break
    stream.close()
    line = wait_line(g, stream.response.headers["cf-aig-log-id"])
    assert line["outcome"] == "cancelled" and counted(line) == UNCOUNTED, line
    upstream.release()
    upstream.finish(rid)
    resumed = client.responses.retrieve(rid, stream=True, starting_after=1)
    assert [e.type for e in resumed][-1] == "response.completed"
    line = wait_line(g, resumed.response.headers["cf-aig-log-id"])
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    _, line = retrieve(g, client, rid)
    assert counted(line) == UNCOUNTED, line


def test_an_azure_background_response_is_counted_by_its_deployments_price(made, upstream):
    g, _ = made("  pricing:\n    - {model: reasoner, inputPerMillion: '1', outputPerMillion: '2'}\n")
    base = f"{g.url}/azure-openai/res/reasoner"
    r = httpx.post(f"{base}/responses?api-version=2025-04-01-preview",
                   json={"model": "reasoner", "input": "Prove it.", "background": True})
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    rid = r.json()["id"]
    upstream.finish(rid)
    # The same id through another provider is not that response.
    other = httpx.get(f"{g.url}/openai/v1/responses/{rid}")
    assert counted(wait_line(g, other.headers["cf-aig-log-id"])) == UNCOUNTED
    polled = httpx.get(f"{base}/responses/{rid}?api-version=2025-04-01-preview")
    line = wait_line(g, polled.headers["cf-aig-log-id"])
    assert (line["provider"], line["model"]) == ("azure-openai", "reasoner")
    assert counted(line) == (1000, 5000, pytest.approx(1000 * 1e-6 + 5000 * 2e-6)), line


# --- What the sidecar remembers: sidegate_background_responses_pending ----------------------------

def pending(g):
    return metric(g, "sidegate_background_responses_pending")


def test_the_pending_gauge_counts_unfinished_background_responses_until_a_poll_finds_them_done(made, upstream):
    g, client = made()
    assert pending(g) == 0
    first, _ = create(g, client, background=True)
    second, _ = create(g, client, background=True)
    create(g, client)  # in the foreground: nothing to remember
    assert pending(g) == 2
    upstream.finish(first.id)
    retrieve(g, client, first.id)
    assert pending(g) == 1
    retrieve(g, client, second.id)  # still queued
    assert pending(g) == 1


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_a_background_response_finished_without_usage_is_forgotten(made, upstream, status):
    """A response that ended without a usage object (failed before the model ran, cancelled
    while queued) will never have one: remembering it until the 24 h bound only holds memory
    and pushes others out."""
    g, client = made()
    resp, _ = create(g, client, background=True)
    with upstream.lock:
        upstream.responses[resp.id]["usage"] = None
    upstream.finish(resp.id, status)
    polled, line = retrieve(g, client, resp.id)
    assert polled.status == status and polled.usage is None
    assert counted(line) == UNCOUNTED, line
    assert pending(g) == 0


def test_a_deleted_background_response_is_forgotten_and_a_refused_deletion_forgets_nothing(made, upstream):
    g, client = made()
    resp, _ = create(g, client, background=True)
    other, _ = create(g, client, background=True)
    assert pending(g) == 2
    deleted = client.responses.with_raw_response.delete(resp.id)
    line = wait_line(g, deleted.headers["cf-aig-log-id"])
    assert (line["method"], line["status_code"]) == ("DELETE", 200), line
    assert counted(line) == UNCOUNTED, line
    assert pending(g) == 1
    # The provider refuses to delete one it does not know: what is remembered stays.
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_unknown")
    assert pending(g) == 1
    # The other one is still counted by the poll that finds it finished.
    upstream.finish(other.id)
    _, line = retrieve(g, client, other.id)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    assert pending(g) == 0


"""Review of background Responses accounting (sidecar/src/background.rs, proxy.rs
`background_poll`, telemetry.rs `settle_background`); realtime accounting's review is
test_realtime_review.py.

The upstream is test_background_responses.py's loopback Responses API, which percent-decodes its
paths as real servers do, and can be told to answer a GET with raw bytes of the test's choosing."""

import json
import threading

import httpx
import pytest

from test_background_responses import COST, MODEL, UNCOUNTED, USAGE, ResponsesUpstream, counted
from test_background_responses import made  # noqa: F401  (a gateway in front of `upstream`, and an SDK client)
from test_cost import metric, wait_line


@pytest.fixture
def upstream():
    """The loopback Responses API, answering a cancellation with the response's whole usage."""
    u = ResponsesUpstream(cancel_usage=USAGE)
    yield u
    u.stop()


def line_of(g, r):
    return wait_line(g, r.headers["cf-aig-log-id"])


def create_raw(g, body: bytes, path="/openai/v1/responses"):
    """A create whose body goes as these bytes: the response id and the log line."""
    r = httpx.post(g.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()["id"], line_of(g, r)


def poll(g, rid, path="/openai/v1/responses/"):
    r = httpx.get(g.url + path + rid)
    assert r.status_code == 200, r.text
    return r, line_of(g, r)


def output_tokens(g):
    return metric(g, 'sidegate_tokens_total{provider="openai",direction="output"}')


# --- Which creates are remembered ---------------------------------------------------------------
#
# The providers read a request body with a JSON parser: `"backgr\u006fund"` is the key
# `background`, and of a key given twice the last counts (Python's json, serde_json::Value).
# cache.rs `keeps_state` reads the body that way (such a create is not cached); model names are
# read that way too (README: "escapes decoded, and the last one when the key repeats, as the
# providers' parsers read it"). A create the gateway does not recognise as a background one is
# never remembered, so its usage is never counted: an app under a spend limit would run
# background responses free of it.

# FAILS at 4c429f1: asks_background's byte search for `"background"` misses an escaped key: the response is not remembered, its usage never counted
def test_a_background_create_with_an_escaped_key_is_counted_by_its_poll(made, upstream):
    g, _ = made()
    rid, line = create_raw(g, b'{"model": "o3-pro", "input": "Prove it.", "backgr\\u006fund": true}')
    assert counted(line) == UNCOUNTED, line
    upstream.finish(rid)
    _, line = poll(g, rid)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


# FAILS at 4c429f1: asks_background deserialises into a struct, which refuses a repeated key (serde "duplicate field"): the last `true` is missed
def test_a_background_create_whose_key_repeats_is_counted_by_its_poll(made, upstream):
    g, _ = made()
    rid, _ = create_raw(g, b'{"model": "o3-pro", "input": "Prove it.", "background": false, "background": true}')
    upstream.finish(rid)
    _, line = poll(g, rid)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


# --- Which polls count ------------------------------------------------------------------------
#
# A path segment is percent-decoded by the provider (RFC 3986: `%5F` is `_`), so
# `responses/resp%5F...` reads the same response. polled_id compares the raw segment with the
# remembered id.

# FAILS at 4c429f1 (poll id): polled_id compares the raw, percent-encoded segment with the remembered id: the finished response is never counted
# FAILS at 4c429f1 (create path): is_create compares the raw last segment with "responses": a create on `respons%65s` is never remembered
@pytest.mark.parametrize("encoded", ["poll id", "create path"])
def test_percent_encoded_paths_do_not_escape_the_spend_limit(made, upstream, encoded):
    g, client = made("  spendLimit: {amount: '0.1', period: day}\n")
    create_path = "/openai/v1/respons%65s" if encoded == "create path" else "/openai/v1/responses"
    rid, _ = create_raw(g, json.dumps({"model": MODEL, "input": "Prove it.", "background": True}).encode(),
                        path=create_path)
    upstream.finish(rid)
    r, line = poll(g, rid.replace("_", "%5F") if encoded == "poll id" else rid)
    assert r.json()["status"] == "completed" and r.json()["usage"]["output_tokens"] == 5000
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    # COST > 0.1: the limit is spent.
    assert httpx.get(f"{g.url}/openai/v1/responses/{rid}").status_code == 429


def test_a_custom_providers_background_response_through_the_long_form_path_counts_once(made, upstream):
    g, _ = made("  pricing:\n    - {model: house-reasoner, inputPerMillion: '1', outputPerMillion: '2'}\n")
    base = f"{g.url}/v1/acct/background/custom-local/v1/responses"
    r = httpx.post(base, json={"model": "house-reasoner", "input": "Prove it.", "background": True})
    rid = r.json()["id"]
    assert r.json()["status"] == "queued" and counted(line_of(g, r)) == UNCOUNTED
    upstream.finish(rid)
    # Another provider's route to the same upstream is another provider's response.
    _, line = poll(g, rid)
    assert counted(line) == UNCOUNTED, line
    r = httpx.get(f"{base}/{rid}/")
    line = line_of(g, r)
    assert (line["provider"], line["model"]) == ("custom-local", "house-reasoner"), line
    assert counted(line) == (1000, 5000, pytest.approx(1000 * 1e-6 + 5000 * 2e-6)), line
    r = httpx.get(f"{g.url}/custom-local/v1/responses/{rid}")
    assert counted(line_of(g, r)) == UNCOUNTED


# An OpenAI-compatible server may answer a background create (`queued`) with a usage object of
# zeros rather than null. Watch::settle remembers an unfinished create only when its answer
# reported no tokens (`!tokens`): this one is settled AsAnswered (0 tokens counted) and forgotten,
# so the poll that finds it finished counts nothing. An unfinished response's usage is not its
# usage yet: the create should be deferred whatever its answer says of tokens.
# FAILS at 4c429f1: background.rs Watch::settle: an unfinished create whose answer carries a usage object (zeros) is not remembered, its final usage never counted
def test_a_queued_create_answered_with_zero_usage_is_still_counted_by_its_poll(made, upstream):
    g, _ = made()
    upstream.running_usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    r = httpx.post(f"{g.url}/custom-local/v1/responses",
                   json={"model": MODEL, "input": "Prove it.", "background": True})
    rid = r.json()["id"]
    assert r.json()["status"] == "queued"
    upstream.finish(rid)
    r = httpx.get(f"{g.url}/custom-local/v1/responses/{rid}")
    line = line_of(g, r)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


# --- The universal endpoint (`POST /`) -----------------------------------------------------------
#
# A universal step is a POST to a provider's endpoint (README "Universal endpoint"): a background
# create there is made as on the provider's route, and a cancellation can be sent there too.
# universal.rs `serve` neither watches a background create (Watch::create) nor treats a step's
# cancellation as a poll (its answer's usage is counted as any step's, and the remembered
# response is not claimed).

def universal(g, endpoint, query):
    r = httpx.post(g.url + "/", json=[{"provider": "openai", "endpoint": endpoint, "query": query}])
    assert r.status_code == 200, r.text
    return r, line_of(g, r)


# FAILS at 4c429f1: universal.rs serves a step's background create without Watch::create: not remembered, its usage is never counted
def test_a_background_create_through_the_universal_endpoint_is_counted_by_its_poll(made, upstream):
    g, _ = made()
    r, line = universal(g, "v1/responses", {"model": MODEL, "input": "Prove it.", "background": True})
    rid = r.json()["id"]
    assert r.json()["status"] == "queued" and counted(line) == UNCOUNTED, line
    upstream.finish(rid)
    _, line = poll(g, rid)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


# FAILS at 4c429f1: a universal step's cancellation counts its answer's usage (as any step's) without claiming the remembered response, and the next poll counts it again
def test_a_background_response_cancelled_through_the_universal_endpoint_is_counted_once(made, upstream):
    g, client = made()
    resp = client.responses.create(model=MODEL, input="Prove it.", background=True)
    r, cancel_line = universal(g, f"v1/responses/{resp.id}/cancel", {})
    assert r.json()["status"] == "cancelled"
    _, poll_line = poll(g, resp.id)
    lines = [cancel_line, poll_line]
    assert sum(line["tokens_out"] or 0 for line in lines) == 5000, lines
    assert output_tokens(g) == 5000


# --- Azure OpenAI -------------------------------------------------------------------------------

# A poll of a running background response counts nothing, as it should. But on Azure every
# request's record names the deployment as its model (proxy.rs `set_model`), and `finish`
# (telemetry.rs) warns under a spend limit, once per provider, for any answer with a model and no
# tokens that was not `deferred`: a poll settled NotCounted is such an answer, so the first poll of
# a running Azure background response logs "an answer reported no token counts" — a false warning
# that also uses up the one a really uncounted answer would give. (Any Azure GET did this before;
# background polling makes it routine. The OpenAI route's polls name no model and do not warn.)
# FAILS at 4c429f1: an Azure poll of a running background response warns "an answer reported no token counts" under a spend limit
def test_an_azure_poll_of_a_running_background_response_gives_no_uncounted_warning(made, upstream):
    g, _ = made("  spendLimit: {amount: '100', period: day}\n"
                "  pricing:\n    - {model: reasoner, inputPerMillion: '1', outputPerMillion: '2'}\n")
    base = f"{g.url}/azure-openai/res/reasoner/responses"
    r = httpx.post(f"{base}?api-version=2025-04-01-preview",
                   json={"model": "reasoner", "input": "Prove it.", "background": True})
    rid = r.json()["id"]
    assert r.json()["status"] == "queued"
    running = httpx.get(f"{base}/{rid}?api-version=2025-04-01-preview")
    assert running.json()["status"] == "queued"
    assert counted(line_of(g, running)) == UNCOUNTED
    upstream.finish(rid)
    done = httpx.get(f"{base}/{rid}?api-version=2025-04-01-preview")
    line = line_of(g, done)
    assert (line["model"], line["tokens_out"]) == ("reasoner", 5000), line
    assert "reported no token counts" not in g.logs()


# --- Pinned: what counts once, and what does not count ---------------------------------------------

def test_concurrent_polls_of_a_finished_response_count_it_once(made, upstream):
    g, client = made()
    resp = client.responses.create(model=MODEL, input="Prove it.", background=True)
    upstream.finish(resp.id)
    results = []

    def one():
        r = httpx.get(f"{g.url}/openai/v1/responses/{resp.id}")
        results.append(r)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(results) == 8 and all(r.status_code == 200 for r in results)
    lines = [line_of(g, r) for r in results]
    assert sorted(counted(line) for line in lines if line["tokens_out"]) == [(1000, 5000, pytest.approx(COST))], lines
    assert output_tokens(g) == 5000
    assert metric(g, 'sidegate_cost_usd_total{provider="openai"}') == pytest.approx(COST)


@pytest.mark.parametrize("status", ["incomplete", "cancelled"])
def test_an_incomplete_or_cancelled_response_found_by_a_poll_counts_once(made, upstream, status):
    g, client = made()
    resp = client.responses.create(model=MODEL, input="Prove it.", background=True)
    upstream.finish(resp.id, status)
    _, line = poll(g, resp.id)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line
    # Then cancelled through the gateway too (the upstream answers the object again): nothing.
    r = httpx.post(f"{g.url}/openai/v1/responses/{resp.id}/cancel")
    assert r.status_code == 200 and counted(line_of(g, r)) == UNCOUNTED
    assert output_tokens(g) == 5000


def test_the_create_requests_custom_cost_prices_the_poll_that_counts(made, upstream):
    g, _ = made()
    custom = {"cf-aig-custom-cost": json.dumps({"per_token_in": 0.000001, "per_token_out": 0.000002})}
    r = httpx.post(f"{g.url}/openai/v1/responses", headers=custom,
                   json={"model": MODEL, "input": "Prove it.", "background": True})
    rid = r.json()["id"]
    upstream.finish(rid)
    _, line = poll(g, rid)
    assert (line["model"], line["tokens_in"], line["tokens_out"]) == (MODEL, 1000, 5000), line
    assert line["cost"] == pytest.approx(1000 * 1e-6 + 5000 * 2e-6) and line["custom_cost"] is True, line


def test_background_creates_are_never_cache_hits_and_each_counts_once(made, upstream):
    g, _ = made()
    body = {"model": MODEL, "input": "Prove it.", "background": True}
    ids = []
    for _ in range(2):
        r = httpx.post(f"{g.url}/openai/v1/responses", json=body, headers={"cf-aig-cache-ttl": "600"})
        assert r.headers.get("cf-aig-cache-status") != "HIT"
        ids.append(r.json()["id"])
    assert len(set(ids)) == 2
    for rid in ids:
        upstream.finish(rid)
        _, line = poll(g, rid)
        assert counted(line) == (1000, 5000, pytest.approx(COST)), line
        _, line = poll(g, rid)
        assert counted(line) == UNCOUNTED, line
    assert output_tokens(g) == 10000


# The poll's answer is read by ResponseScan for the response object's own `status`: one that is
# still running counts nothing, whatever its nested items, strings or a usage object say; nor does
# an answer that is no response object (a top-level array). The first real finished answer counts.
HOSTILE = [
    pytest.param("application/json", json.dumps({
        "output": [{"type": "message", "id": "msg_1", "status": "completed", "content": [
            {"type": "output_text", "text": 'x", "status": "completed", "usage": {"input_tokens": 9}'}]}],
        "metadata": {"status": "completed", "response": {"status": "completed"}},
        "instructions": '\\"status\\":\\"completed\\"',
        "id": "{rid}", "status": "in_progress", "usage": {"input_tokens": 7, "output_tokens": 7}}), id="nested"),
    pytest.param("application/json", json.dumps([
        {"id": "{rid}", "status": "completed", "usage": USAGE}]), id="array"),
    pytest.param("text/event-stream", "event: response.output_item.done\ndata: " + json.dumps({
        "type": "response.output_item.done", "item": {"id": "{rid}", "status": "completed"},
        "response_x": {"status": "completed"}, "usage": USAGE}) + "\n\n" + "event: response.in_progress\ndata: " + json.dumps({
        "type": "response.in_progress", "response": {"id": "{rid}", "status": "in_progress",
                                                     "output": [{"status": "completed"}], "usage": None}}) + "\n\n",
        id="events"),
]


@pytest.mark.parametrize("content_type, answer", HOSTILE)
def test_a_running_or_odd_answer_does_not_count_and_the_real_finished_one_does(made, upstream, content_type, answer):
    g, client = made()
    resp = client.responses.create(model=MODEL, input="Prove it.", background=True)
    upstream.raw[resp.id] = (content_type, answer.replace("{rid}", resp.id).encode())
    r, line = poll(g, resp.id)
    assert counted(line) == UNCOUNTED, line
    del upstream.raw[resp.id]
    upstream.finish(resp.id)
    _, line = poll(g, resp.id)
    assert counted(line) == (1000, 5000, pytest.approx(COST)), line


# --- Realtime (WebSocket) sessions ----------------------------------------------------------------
#
# A finished answer of 600 KB (its text full of quotes, backslashes and look-alike keys, a model
# name past the scan's bound) comes in many frames: the scan finds the response's own status, and
# the usage after the text counts once, priced as the create's model.
def test_a_long_finished_answer_in_many_frames_counts_once(made, upstream):
    g, client = made()
    resp = client.responses.create(model=MODEL, input="Prove it.", background=True)
    text = ('"status": "in_progress", \\"usage\\": {"output_tokens": 1} {[ ' * 12000)
    answer = {"id": resp.id, "object": "response", "model": "m" * 300, "background": True,
              "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                          "content": [{"type": "output_text", "text": text, "annotations": []}]}],
              "status": "completed", "usage": USAGE}
    upstream.raw[resp.id] = ("application/json", json.dumps(answer).encode())
    r, line = poll(g, resp.id)
    assert len(r.content) > 600_000
    assert (line["model"],) + counted(line) == (MODEL, 1000, 5000, pytest.approx(COST)), line
    _, line = poll(g, resp.id)
    assert counted(line) == UNCOUNTED, line

"""DLP: profiles matched in requests (2029) and responses (2030), FLAG reported in cf-aig-dlp.

The mock answers "mock reply to: <prompt>", so a prompt carrying sensitive text makes the
response carry it too: response policies are tested with the same mock.
"""

import json
import time

import httpx
import openai

from conftest import DEFAULT_KEYS, Sidegate, StallingServer, assert_refused_at_start, gateway_yaml

CHAT = "/openai/chat/completions"
SSN = "123-45-6789"
CARD = "4111 1111 1111 1111"


def body(text, **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def dlp_gateway(mock, tmp_path, policies, extra=""):
    spec = "  dlp:\n    policies:\n" + "".join(f"      - {p}\n" for p in policies) + extra
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    mock.clear()
    return g


def test_a_blocked_request_never_reaches_the_provider(mock, tmp_path):
    g = dlp_gateway(mock, tmp_path, ["{id: no-ssn, action: BLOCK, check: [REQUEST], profiles: [us-ssn, credit-card]}"])
    try:
        r = httpx.post(g.url + CHAT, json=body(f"my ssn is {SSN}"))
        assert r.status_code == 400
        err = r.json()["error"][0]
        assert err["code"] == 2029
        assert 'policy "no-ssn"' in err["message"] and "us-ssn" in err["message"]
        assert SSN not in r.text, "the matched text is never echoed"
        assert mock.requests() == []
        # Clean prompts pass; invalid card numbers (Luhn) are not cards.
        clean = httpx.post(g.url + CHAT, json=body("4111 1111 1111 1112 is an order id"))
        assert clean.status_code == 200
        g.wait_log_line(clean.headers["cf-aig-log-id"])  # lines are flushed in order: all are out
        assert SSN not in g.logs()
    finally:
        g.stop()


def test_flagged_requests_go_through_with_cf_aig_dlp(mock, tmp_path):
    g = dlp_gateway(mock, tmp_path, ["{id: watch, action: FLAG, check: [REQUEST], profiles: [email]}"])
    try:
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        resp = client.chat.completions.with_raw_response.create(**body("mail jane@example.com"))
        assert resp.parse().choices[0].message.content == "mock reply to: mail jane@example.com"
        assert json.loads(resp.headers["cf-aig-dlp"]) == [{"policy": "watch", "profiles": ["email"], "check": "REQUEST"}]
        plain = client.chat.completions.with_raw_response.create(**body("hello"))
        assert "cf-aig-dlp" not in plain.headers
    finally:
        g.stop()


def test_a_response_that_matches_is_blocked_with_2030(mock, tmp_path):
    g = dlp_gateway(mock, tmp_path, ["{id: no-keys-out, action: BLOCK, check: [RESPONSE], profiles: [aws-keys]}"])
    try:
        r = httpx.post(g.url + CHAT, json=body("echo AKIAIOSFODNN7EXAMPLE"))
        assert r.status_code == 400
        assert r.json()["error"][0]["code"] == 2030
        assert "AKIA" not in r.text
        assert len(mock.requests()) == 1, "the request itself was allowed"
        assert httpx.post(g.url + CHAT, json=body("hello")).status_code == 200
    finally:
        g.stop()


def test_streams_are_checked_whole_before_delivery(mock, tmp_path):
    g = dlp_gateway(mock, tmp_path, [
        "{id: cards, action: BLOCK, check: [RESPONSE], profiles: [credit-card]}",
        "{id: mails, action: FLAG, check: [REQUEST, RESPONSE], profiles: [email]}",
    ])
    try:
        r = httpx.post(g.url + CHAT, json=body(f"card {CARD}", stream=True))
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2030)
        client = openai.OpenAI(base_url=g.url + "/openai", api_key="placeholder", max_retries=0)
        resp = client.chat.completions.with_raw_response.create(**body("write bob@example.org", stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        assert text == "mock reply to: write bob@example.org"
        flags = json.loads(resp.headers["cf-aig-dlp"])
        assert {f["check"] for f in flags} == {"REQUEST", "RESPONSE"}
    finally:
        g.stop()


def test_a_held_back_response_that_stalls_ends_in_a_504_not_a_hang(tmp_path):
    # Responses are held back whole for the check: an upstream that sends its head and then
    # nothing more must not hold the client until it gives up.
    stall = StallingServer()
    spec = "  dlp:\n    policies:\n      - {id: cards, action: BLOCK, check: [RESPONSE], profiles: [credit-card]}\n  requestTimeout: 1500ms\n"
    g = Sidegate(tmp_path, gateway_yaml(stall.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        t0 = time.monotonic()
        r = httpx.post(g.url + CHAT, json=body("hello"), timeout=30)
        took = time.monotonic() - t0
        assert (r.status_code, r.json()["error"][0]["code"]) == (504, 2103), r.text
        assert "stalled: no data for 1500 ms" in r.json()["error"][0]["message"]
        assert 1.4 < took < 10, took
        # Logged and counted as the client got it, under its log id (the "not delivered" line
        # comes before the access line: once that is written, so is it).
        log_id = r.headers["cf-aig-log-id"]
        line = g.wait_log_line(log_id)
        assert "response not delivered" in g.logs()
        assert " status_code=504 " in line and " outcome=upstream_error" in line, line
        assert 'sidegate_requests_total{provider="openai",status="504"} 1' in g.metrics()
        assert 'sidegate_requests_total{provider="openai",status="200"}' not in g.metrics()
    finally:
        g.stop()
        stall.stop()


def test_compat_and_private_keys_inside_json_strings(mock, tmp_path):
    g = dlp_gateway(mock, tmp_path, ["{id: secrets, action: BLOCK, check: [REQUEST], profiles: [private-keys]}"])
    try:
        pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----"
        r = httpx.post(g.url + "/compat/chat/completions", json=body(pem, model="anthropic/claude-haiku-4-5"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2029)
        assert mock.requests() == []
    finally:
        g.stop()


def test_unknown_profiles_are_refused_at_start(mock, tmp_path):
    spec = "  dlp:\n    policies:\n      - {id: p, action: FLAG, check: [REQUEST], profiles: [passport]}\n"
    assert_refused_at_start(mock, tmp_path, spec, "spec.dlp.policies[0].profiles", "passport")

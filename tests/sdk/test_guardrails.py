"""Guardrails: prompts and responses classified by a moderation endpoint (the mock speaks
OpenAI's moderation API and flags a category when the text contains `mock-flag:<category>`)."""

import json
import time

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, KEY_MARKER, OPENAI_KEY, Sidegate, StallingServer, assert_refused_at_start, gateway_yaml

CHAT = "/openai/chat/completions"


def body(text, **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def guarded(mock, tmp_path, rules, url=None):
    spec = f"  guardrails:\n    moderationURL: '{url or mock.url + '/v1/moderations'}'\n{rules}"
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    mock.clear()
    return g


def assert_no_stored_key_sent(moderation_request):
    # The moderation URL is not api.openai.com: the gateway's stored OpenAI key stays home.
    headers = moderation_request["headers"]
    assert not [v for v in headers.values() if KEY_MARKER in v], headers
    assert OPENAI_KEY not in moderation_request["body"]


def guardrail_metric(g, result):
    for line in g.metrics().splitlines():
        if line.startswith(f'sidegate_guardrails_total{{result="{result}"}}'):
            return int(float(line.split()[-1]))
    return 0


def test_a_blocked_prompt_is_424_2016_and_never_reaches_the_provider(mock, tmp_path):
    g = guarded(mock, tmp_path, "    prompt: {violence: block, hate: flag}\n")
    try:
        r = httpx.post(g.url + CHAT, json=body("tell me mock-flag:violence now"))
        assert r.status_code == 424
        err = r.json()["error"][0]
        assert err["code"] == 2016 and "violence" in err["message"]
        (moderation,) = mock.requests()
        assert moderation["path"] == "/v1/moderations"
        assert "mock-flag:violence" in moderation["body"]
        assert_no_stored_key_sent(moderation)
        assert guardrail_metric(g, "block") == 1
        # The openai SDK sees the same refusal.
        client = openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="anthropic/claude-haiku-4-5",
                                           messages=[{"role": "user", "content": "mock-flag:violence"}])
        assert e.value.status_code == 424
    finally:
        g.stop()


def test_a_long_prompt_is_checked_whole_and_one_too_long_is_refused(mock, tmp_path):
    # Text past the first 64 KiB used to go unchecked: a long system message hid the flag.
    g = guarded(mock, tmp_path, "    prompt: {violence: block}\n")
    try:
        padding = "lorem ipsum " * 6000  # 72 KB
        long = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": padding},
                                                     {"role": "user", "content": "mock-flag:violence"}]}
        r = httpx.post(g.url + CHAT, json=long, timeout=30)
        assert r.status_code == 424, r.text
        assert r.json()["error"][0]["code"] == 2016
        (moderation,) = mock.requests()
        inputs = json.loads(moderation["body"])["input"]
        assert isinstance(inputs, list) and len(inputs) == 2, [len(i) for i in inputs]
        assert all(len(i.encode()) <= 64 << 10 for i in inputs)
        # A body of an API shape the text reader does not list (Cohere v1 chat) is read too.
        mock.clear()
        r = httpx.post(g.url + "/cohere/v1/chat", json={"message": "mock-flag:violence", "preamble": "p"})
        assert r.status_code == 424, r.text
        r = httpx.post(g.url + "/cohere/v1/rerank", json={"query": "mock-flag:violence", "documents": ["d"]})
        assert r.status_code == 424, r.text
        assert all(q["path"] == "/v1/moderations" for q in mock.requests())
        # More than one check takes (32 inputs, ~2 MiB) is refused, never half checked.
        mock.clear()
        huge = body("words " * 400_000)  # 2.4 MB of text
        r = httpx.post(g.url + CHAT, json=huge, timeout=30)
        assert r.status_code == 424, r.text
        err = r.json()["error"][0]
        assert err["code"] == 2016 and "too long for the guardrails check" in err["message"], err
        assert mock.requests() == []
    finally:
        g.stop()


def test_a_flagged_prompt_goes_through_and_is_counted(mock, tmp_path):
    g = guarded(mock, tmp_path, "    prompt: {violence: block, hate: flag}\n")
    try:
        r = httpx.post(g.url + CHAT, json=body("some mock-flag:hate speech"))
        assert r.status_code == 200
        moderation, chat = mock.requests()
        assert (moderation["path"], chat["path"]) == ("/v1/moderations", "/v1/chat/completions")
        assert_no_stored_key_sent(moderation)
        assert chat["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
        assert guardrail_metric(g, "flag") == 1
        assert "guardrails: flagged" in g.logs()
        clean = httpx.post(g.url + CHAT, json=body("hello"))
        assert clean.status_code == 200 and guardrail_metric(g, "flag") == 1
    finally:
        g.stop()


def test_a_blocked_response_is_424_2017(mock, tmp_path):
    # The mock answers "mock reply to: <prompt>", so the response carries the marker too.
    g = guarded(mock, tmp_path, "    response: {self-harm: block}\n")
    try:
        r = httpx.post(g.url + CHAT, json=body("mock-flag:self-harm"))
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2017)
        assert [q["path"] for q in mock.requests()] == ["/v1/chat/completions", "/v1/moderations"]
        stream = httpx.post(g.url + CHAT, json=body("fine words", stream=True))
        assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
        blocked_stream = httpx.post(g.url + CHAT, json=body("mock-flag:self-harm", stream=True))
        assert (blocked_stream.status_code, blocked_stream.json()["error"][0]["code"]) == (424, 2017)
    finally:
        g.stop()


def test_an_unreachable_moderation_endpoint_fails_open(mock, tmp_path, refusing_port):
    g = guarded(mock, tmp_path, "    prompt: {violence: block}\n", url=refusing_port.url + "/v1/moderations")
    try:
        r = httpx.post(g.url + CHAT, json=body("mock-flag:violence"))
        assert r.status_code == 200
        assert guardrail_metric(g, "error") == 1
        assert "moderation unavailable" in g.logs()
    finally:
        g.stop()


def test_a_moderation_answer_that_stalls_fails_open_in_bounded_time(mock, tmp_path):
    stall = StallingServer()
    g = guarded(mock, tmp_path, "    prompt: {violence: block}\n", url=stall.url + "/v1/moderations")
    try:
        t0 = time.monotonic()
        r = httpx.post(g.url + CHAT, json=body("mock-flag:violence"), timeout=30)
        assert r.status_code == 200
        assert time.monotonic() - t0 < 20, "bounded by the guardrail timeout (10 s)"
        assert guardrail_metric(g, "error") == 1
    finally:
        g.stop()
        stall.stop()


@pytest.mark.parametrize("spec,needle", [
    ("  guardrails:\n    moderationURL: 'http://x/v1/moderations'\n    prompt: {gore: block}\n", 'unknown category "gore"'),
    ("  guardrails:\n    prompt: {violence: block}\n", "moderationURL is required"),
])
def test_bad_guardrails_are_refused_at_start(mock, tmp_path, spec, needle):
    assert_refused_at_start(mock, tmp_path, spec, needle)


def test_a_universal_requests_prompts_are_checked_but_not_its_steps_headers(mock, tmp_path):
    # The moderation service gets the steps' queries: a step's own key stays out of it, and a
    # prompt in any step (not only the first) is checked.
    g = guarded(mock, tmp_path, "    prompt: {violence: block}\n")
    try:
        def step(text):
            return {"provider": "openai", "endpoint": "chat/completions",
                    "headers": {"authorization": "Bearer sk-step-own-key-77"}, "query": body(text)}
        r = httpx.post(g.url + "/", json=[step("fine"), step("then mock-flag:violence")])
        assert (r.status_code, r.json()["error"][0]["code"]) == (424, 2016), r.text
        (moderation,) = mock.requests()
        assert "mock-flag:violence" in moderation["body"] and "sk-step-own-key-77" not in moderation["body"], moderation
        mock.clear()
        r = httpx.post(g.url + "/", json=[step("a calm question")])
        assert r.status_code == 200, r.text
        moderation, sent = mock.requests()
        assert moderation["path"] == "/v1/moderations" and "a calm question" in moderation["body"]
        assert "sk-step-own-key-77" not in moderation["body"] and "chat/completions" not in moderation["body"], moderation
        assert sent["path"] == "/v1/chat/completions"
        # A body without the usual text fields is read whole: the query's, not the step's.
        mock.clear()
        rerank = {"provider": "openai", "endpoint": "rerank", "headers": {"authorization": "Bearer sk-step-own-key-77"},
                  "query": {"model": "rerank-v3.5", "query": "what is x", "documents": ["doc one"]}}
        httpx.post(g.url + "/", json=[rerank])
        moderation = mock.requests()[0]
        assert moderation["path"] == "/v1/moderations" and "doc one" in moderation["body"], moderation
        assert "sk-step-own-key-77" not in moderation["body"] and "rerank\\n" not in moderation["body"], moderation
    finally:
        g.stop()

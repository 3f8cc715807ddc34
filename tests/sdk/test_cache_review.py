"""Review 157 of the response cache (sidecar/src/cache.rs, its use in proxy.rs; README "Response
cache", SPEC.md "Caching"): what may be answered from it, what two requests share an entry, how
big an entry may be, and the shared (Redis) cache failing while requests wait on it.

Each test that fails at 91770b5 says so in a comment above it; the others pin behaviour that
holds and was not tested yet. Loopback upstreams only; every process started here is stopped here.
"""

import http.server
import json
import pathlib
import shutil
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import DEFAULT_KEYS, FixedAnswerServer, Sidegate, gateway_yaml
from test_cache import CACHE_ON, cache_metric, numbered_server, post, reload_config
from test_redis import Redis, pod


def statuses(answers):
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    return [r.headers["cf-aig-cache-status"] for r in answers]


# --- Requests that make something the provider keeps ------------------------------------------

# README "Response cache": a POST "that makes or changes something the provider keeps" goes to
# the provider every time; the Responses API's `background: true` (fetched later by its id, so
# each request makes one) and turns in a `conversation` (a cached answer would leave the
# conversation without the turn) are never answered from the cache. The same holds of:
# - xAI's deferred chat completions (`"deferred": true`): the answer is a `request_id` whose
#   result "would be available to be requested exactly once within 24 hours"; a replayed id
#   was never submitted for this request, and its result is gone once the first client took it;
# - Cohere's v1 chat with `conversation_id` ("creates or resumes a persisted conversation"): a
#   replayed answer leaves the turn out of the conversation the provider keeps;
# - Perplexity's async chat completions (`POST /async/chat/completions`): each creates a job the
#   provider lists and keeps;
# - Workers AI's Batch API (`?queueRequest=true`): the submit queues a batch and answers its
#   `request_id`; a replayed one queued nothing for this request.
WAI = "/v1/acct-a/main/workers-ai/@cf/baai/bge-m3"
STATEFUL_CREATES = [
    ("grok", "", "/grok/v1/chat/completions",
     {"model": "grok-4", "messages": [{"role": "user", "content": "later please"}], "deferred": True},
     {"model": "grok-4", "messages": [{"role": "user", "content": "later please"}]}),
    ("cohere", "", "/cohere/v1/chat",
     {"model": "command-r", "message": "and then?", "conversation_id": "conv-review-157"},
     {"model": "command-r", "message": "and then?"}),
    ("perplexity-ai", "", "/perplexity-ai/async/chat/completions",
     {"request": {"model": "sonar-deep-research", "messages": [{"role": "user", "content": "research"}]}},
     None),
    ("workers-ai", "/client/v4/accounts/{account}/ai", WAI + "?queueRequest=true",
     {"requests": [{"query": "a story", "contexts": [{"text": "an orange cloud"}]}]},
     {"query": "a story", "contexts": [{"text": "an orange cloud"}]}),
]


# Failed at 91770b5 (mended since): xAI `deferred: true` creates, Cohere v1 chats in a `conversation_id`, Perplexity async jobs and Workers AI batch submits (`?queueRequest=true`) are answered from the cache (a replayed request_id / job, a turn missing from the conversation).
@pytest.mark.parametrize("provider, base, path, stateful, plain", STATEFUL_CREATES,
                         ids=["xai-deferred", "cohere-conversation", "perplexity-async", "workers-ai-batch"])
def test_a_create_of_provider_kept_state_is_never_answered_from_the_cache(mock, tmp_path, provider, base, path,
                                                                          stateful, plain):
    server = numbered_server()
    spec = f"    {provider}: {{baseURL: '{server.url}{base}'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        own = {"authorization": "Bearer client-key"}
        if plain is not None:
            # The route's plain inference requests are cached: the cache is on for them.
            plain_path = path.split("?")[0]
            assert statuses([post(g, plain_path, plain, own) for _ in range(2)]) == ["MISS", "HIT"]
        before = cache_metric(g, "hit")
        answers = [post(g, path, stateful, own) for _ in range(2)]
        got = [r.json()["n"] for r in answers]
        assert len(set(got)) == 2 and cache_metric(g, "hit") == before, \
            f"the second create was answered from the cache: {statuses(answers)}, answers {got}"
    finally:
        g.stop()
        server.stop()


# --- Answers that must not be stored --------------------------------------------------------------

OPENROUTER_FAILED = (b'{"id":"gen-1","object":"chat.completion","choices":[],'
                     b'"error":{"code":502,"message":"Provider returned error","metadata":{"provider_name":"X"}}}')
OPENROUTER_ANSWER = (b'{"id":"gen-2","object":"chat.completion","model":"openai/gpt-4o-mini","choices":[{"index":0,'
                     b'"finish_reason":"stop","message":{"role":"assistant","content":"fine now"}}]}')


# Failed at 91770b5 (mended since): a 200 whose whole (non-streamed) body is a failed answer (`"error"`, as OpenRouter sends once the model started) is stored and replayed for the TTL; only streams are checked for an error.
def test_a_failed_answer_sent_with_a_200_is_not_stored(mock, tmp_path):
    # OpenRouter: "Otherwise, the returned HTTP response status will be 200 and any error
    # occurred while the LLM is producing the output will be emitted in the response body or as
    # an SSE data event." README "Response cache" keeps a stream with an `{"error": ...}` chunk
    # out of the cache (one failed in band); the same failure in a whole body is no answer either.
    server = FixedAnswerServer(OPENROUTER_FAILED, then=[(200, OPENROUTER_ANSWER)])
    spec = f"    openrouter: {{baseURL: '{server.url}/api'}}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "flaky provider"}]}
        own = {"authorization": "Bearer sk-or-client"}
        failed, again = (post(g, "/openrouter/v1/chat/completions", body, own) for _ in range(2))
        assert failed.json()["error"]["code"] == 502
        assert again.json().get("error") is None, \
            f"the failure was replayed from the cache ({again.headers['cf-aig-cache-status']})"
    finally:
        g.stop()
        server.stop()


# Failed at 91770b5 (mended since): entries outlive a reload that points a provider at another upstream (the cache survives reloads and its key names the provider id, not where it goes): the old upstream's answers are served for their TTL, and nothing but a new maxSize empties the cache.
def test_a_provider_pointed_at_another_upstream_by_a_reload_is_not_answered_with_the_old_ones(mock, tmp_path):
    old = FixedAnswerServer(b'{"id":"a","object":"chat.completion","choices":[],"served_by":"the old model server"}')
    new = FixedAnswerServer(b'{"id":"b","object":"chat.completion","choices":[],"served_by":"the new model server"}')
    spec = "    custom-llm: {baseURL: '%s/v1'}\n" + CACHE_ON
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec % old.url), DEFAULT_KEYS)
    try:
        own = {"authorization": "Bearer client-key"}
        path = "/custom-llm/chat/completions"
        assert post(g, path, headers=own).json()["served_by"] == "the old model server"
        reload_config(g, gateway_yaml(mock.url, extra_spec=spec % new.url))
        # As README says of a long-form URL's account: "another account is another upstream",
        # whose answers the other must not get; another base URL is another upstream too.
        after = post(g, path, headers=own)
        assert after.json()["served_by"] == "the new model server", \
            f"answered by the old upstream ({after.headers['cf-aig-cache-status']})"
    finally:
        g.stop()
        old.stop()
        new.stop()


# --- Body normalisation -------------------------------------------------------------------------

def chat_with(raw_value):
    """A chat request, as bytes, whose JSON schema holds `raw_value` (a number as written)."""
    return (b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"pick a number"}],'
            b'"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":'
            b'{"type":"object","properties":{"n":{"type":"integer","enum":[' + raw_value + b']}}}}}}')


# Failed at 91770b5 (mended since): integers beyond 64 bits are normalised through f64 (serde_json without arbitrary_precision): two bodies that differ in such a number share one key, and the second gets the first's answer.
def test_bodies_that_differ_in_a_large_integer_never_share_an_entry(mock, tmp_path):
    server = numbered_server()
    g = Sidegate(tmp_path, gateway_yaml(server.url, extra_spec=CACHE_ON), DEFAULT_KEYS)
    try:
        headers = {"content-type": "application/json"}
        a = post(g, content=chat_with(b"18446744073709551616"), headers=headers)  # 2^64
        b = post(g, content=chat_with(b"18446744073709551617"), headers=headers)  # 2^64 + 1
        # SPEC "Caching": the key is a hash of the normalised body; normalising may make equal
        # documents one, never two different requests (a provider parsing integers exactly, as
        # Python's json does, sees two schemas).
        assert (a.json()["n"], b.json()["n"]) == (1, 2), f"cache status {statuses([a, b])}"
    finally:
        g.stop()
        server.stop()


def test_equal_documents_share_an_entry_and_different_numbers_do_not(mock, tmp_path):
    # Holds: unicode escapes and `\/` are read as the characters they stand for; integers up to
    # 64 bits are kept exactly (2^53 + 1 is not 2^53), and 1 and 1.0 stay apart (a provider may
    # take an integer field's 1.0 otherwise, or refuse it).
    server = numbered_server()
    g = Sidegate(tmp_path, gateway_yaml(server.url, extra_spec=CACHE_ON), DEFAULT_KEYS)
    try:
        h = {"content-type": "application/json"}

        def ask(raw):
            return post(g, content=raw, headers=h)

        escaped = ask(b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"caf\\u00e9 a\\/b"}]}')
        plain = ask('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"café a/b"}]}'.encode())
        assert statuses([escaped, plain]) == ["MISS", "HIT"]
        assert plain.json()["n"] == escaped.json()["n"]
        answers = [ask(chat_with(v)) for v in (b"9007199254740992", b"9007199254740993", b"1", b"1.0",
                                               b"9007199254740993")]
        assert statuses(answers) == ["MISS", "MISS", "MISS", "MISS", "HIT"]
    finally:
        g.stop()
        server.stop()


# --- How big an entry may be --------------------------------------------------------------------

FAKE_CPUS = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <string.h>
/* A 64-CPU machine, as std::thread::available_parallelism sees it. */
int sched_getaffinity(pid_t pid, size_t size, cpu_set_t *mask) {
    (void)pid;
    memset(mask, 0, size);
    for (int i = 0; i < 64 && (size_t)(i / 8) < size; i++) CPU_SET_S(i, size, mask);
    return 0;
}
"""


def sixty_four_cpus(tmp_path):
    """A command prefix that runs the sidecar as if on a 64-CPU node (no CPU limit)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the CPU-count shim")
    src, lib = tmp_path / "cpus.c", tmp_path / "cpus.so"
    src.write_text(FAKE_CPUS)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True, timeout=60)
    return ["env", f"LD_PRELOAD={lib}"]


def preloaded(g, lib_name):
    return lib_name in pathlib.Path(f"/proc/{g.proc.pid}/maps").read_text()


# Failed at 91770b5 (mended since): an entry is capped at one shard of the store (Store::new: max_entry = min(shard_capacity, maxSize/8)), and the shards multiply with the node's cores: on a 64-core node the default 16Mi cache stores nothing over 128 KiB, not the README's eighth (2 MiB).
def test_an_answer_under_an_eighth_of_max_size_is_stored_whatever_the_nodes_cpu_count(tmp_path):
    answer = json.dumps({"id": "chatcmpl-big", "object": "chat.completion", "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "z" * (300 << 10)}}]}).encode()
    server = FixedAnswerServer(answer)
    yaml = gateway_yaml(server.url, extra_spec="  cache: {enabled: true}\n")  # maxSize: 16Mi, the default
    made = []
    try:
        # On this machine's cores: a 300 KiB answer (under 2 MiB) is stored.
        (tmp_path / "here").mkdir()
        here = Sidegate(tmp_path / "here", yaml, DEFAULT_KEYS)
        made.append(here)
        assert statuses([post(here) for _ in range(2)]) == ["MISS", "HIT"]
        # The same config on a node with 64 cores (a sidecar without a CPU limit).
        (tmp_path / "big").mkdir()
        big = Sidegate(tmp_path / "big", yaml, DEFAULT_KEYS, wrapper=sixty_four_cpus(tmp_path))
        made.append(big)
        assert preloaded(big, "cpus.so"), "the CPU-count shim was not loaded"
        answers = [post(big) for _ in range(2)]
        assert answers[1].content == answer
        # README "Response cache": a body that "outgrows an eighth of maxSize is not stored";
        # this one is a seventh of that.
        assert statuses(answers) == ["MISS", "HIT"]
    finally:
        for g in made:
            g.stop()
        server.stop()


def slow_chunked_upstream(body, pieces, delay, first_delay=0.0):
    """A loopback upstream answering every POST with `body` as a chunked JSON 200 in `pieces`
    chunks, `delay` seconds apart, its head `first_delay` seconds after the request; `.calls`
    lists when each request came, `.url`, `.stop()`."""
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length") or 0))
            calls.append(time.monotonic())
            time.sleep(first_delay)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            step = -(-len(body) // pieces)
            try:
                for i in range(0, len(body), step):
                    piece = body[i:i + step]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    time.sleep(delay)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.calls = calls
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    server.stop = lambda: (server.shutdown(), server.server_close())
    return server


def test_identical_requests_waiting_on_an_answer_too_big_to_store_call_upstream_at_once(tmp_path):
    # Holds: a chunked answer (no length to refuse it by) that outgrows its entry is given up as
    # it streams, and the requests waiting for it go upstream then, not after 30 s.
    big = json.dumps({"id": "chatcmpl-c", "object": "chat.completion",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "q" * (20 << 10)}}]}).encode()
    up = slow_chunked_upstream(big, pieces=5, delay=0, first_delay=0.4)
    # maxSize 64Ki (the least): entries up to 8 KiB; this answer is 20 KiB.
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec="  cache: {enabled: true, maxSize: 64Ki}\n"), DEFAULT_KEYS)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(g), range(4)))
        took = time.monotonic() - started
        assert statuses(answers) == ["MISS"] * 4
        assert all(r.content == big for r in answers)
        assert len(up.calls) == 4 and took < 5, f"{len(up.calls)} upstream calls, {took:.1f} s"
    finally:
        g.stop()
        up.stop()


def test_requests_waiting_on_an_answer_whose_client_left_mid_body_go_upstream_then(tmp_path):
    # Holds: the first client hangs up after the answer's first bytes; its copy for the cache is
    # dropped, and the identical requests waiting for it go upstream then (each its own call),
    # rather than waiting out the 30 s or getting the cut-off answer.
    answer = json.dumps({"id": "chatcmpl-s", "object": "chat.completion", "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "w" * 4000}}]}).encode()
    up = slow_chunked_upstream(answer, pieces=10, delay=0.25)  # 2.5 s an answer
    g = Sidegate(tmp_path, gateway_yaml(up.url, extra_spec=CACHE_ON), DEFAULT_KEYS)
    try:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "left midway"}]}
        with httpx.stream("POST", g.url + "/openai/chat/completions", json=body, timeout=10) as first:
            assert first.headers["cf-aig-cache-status"] == "MISS"
            chunks = first.iter_raw()  # kept: a generator dropped closes the connection
            next(chunks)
            with ThreadPoolExecutor(3) as pool:
                started = time.monotonic()
                waiting = [pool.submit(post, g, "/openai/chat/completions", body) for _ in range(3)]
                time.sleep(0.3)  # they wait for the first answer now
                chunks.close()
                first.close()  # the first client leaves
                answers = [w.result() for w in waiting]
                took = time.monotonic() - started
        assert all(r.status_code == 200 and r.content == answer for r in answers)
        assert len(up.calls) == 4, f"{len(up.calls)} upstream calls"
        assert took < 6, f"the waiting requests were answered after {took:.1f} s"
        assert post(g, body=body).headers["cf-aig-cache-status"] == "HIT"
    finally:
        g.stop()
        up.stop()


# --- The shared (Redis) cache failing midway -----------------------------------------------------

def test_requests_waiting_on_an_entry_redis_stopped_answering_for_are_served_soon(mock, tmp_path):
    # Holds: Redis stops answering (SIGSTOP) while identical requests wait for the first one's
    # entry to be written: the write is given up within its bound, and every waiting request
    # is served (going upstream itself) within a few seconds, not after the 30 s wait.
    (tmp_path / "redis").mkdir()
    redis = Redis(tmp_path / "redis")
    spec = "  cache: {enabled: true, backend: redis, ttl: 10m}\n"
    g = pod(tmp_path, mock, redis.url, spec, "a")
    try:
        mock.clear()
        q = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"midway {uuid.uuid4()}"}]}
        slow = {"x-mock-delay-ms": "800"}
        # A first round trip: the connection to Redis is made.
        assert post(g, body={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "warm"}]}).status_code == 200
        with ThreadPoolExecutor(4) as pool:
            started = time.monotonic()
            leader = pool.submit(post, g, "/openai/chat/completions", q, slow)
            time.sleep(0.2)
            followers = [pool.submit(post, g, "/openai/chat/completions", q, slow) for _ in range(3)]
            time.sleep(0.2)  # all of them past their (missed) reads
            redis.proc.send_signal(signal.SIGSTOP)
            answers = [leader.result()] + [f.result() for f in followers]
            took = time.monotonic() - started
        assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
        assert all(r.json()["choices"][0]["message"]["content"] == "mock reply to: " + q["messages"][0]["content"]
                   for r in answers)
        assert took < 8, f"the waiting requests were served after {took:.1f} s"
        # None could be answered from Redis: each went upstream (and the warm-up request).
        assert len(mock.requests()) == 5
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        g.stop()
        redis.stop()

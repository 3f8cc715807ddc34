"""Review of dynamic routes' rate and budget nodes with `key`, `technique` and `scope` (commit
22d6c59): live repros against the binaries, with the official openai SDK where it fits, a mock
upstream and real redis-server processes on loopback.

Tests marked `FAILS at 22d6c59` show a bug and pass once it is fixed; the others pin behaviour
that was checked and found right."""

import json
import signal
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from conftest import DEFAULT_KEYS, Sidegate, binary, free_port, gateway_yaml
from route_yaml import route, routes
from test_redis import Redis, pod, redis_errors
from test_route_keys import client, route_counts, served, user

CHAT = "/compat/chat/completions"


def post(g, model, metadata=None, text="route me", headers=None, http=httpx):
    """A raw `/compat` request (no SDK retries), for status codes and headers."""
    h = {"cf-aig-metadata": json.dumps(metadata)} if metadata is not None else {}
    h.update(headers or {})
    return http.post(g.url + CHAT, json={"model": model, "messages": [{"role": "user", "content": text}]},
                     headers=h, timeout=30)


def start(tmp_path, mock, spec, **kw):
    return Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS, **kw)


# ---------------------------------------------------------------------------------------------
# Bugs


# FAILS at 22d6c59: in a fixed window, the 4096 values of the *last* interval still fill the
# node's map, so every new user of this interval shares the one overflow window (the 2nd is 429).
# Cause: sidecar/src/ratelimit.rs:220-232 (`Limiter::idle`) ignores `technique`: it keeps a
# window whose count is in the previous interval (line 229 calls it idle only if `c.count == 0`),
# which only a sliding window still weighs; `Keyed::window` (ratelimit.rs:338) sweeps with it once per
# interval, so a fixed node stays full for a whole extra interval (and in steady traffic half its
# slots hold users whose counts no longer matter). The README ("once 4096 values counted in the
# current or, for a sliding window, the previous interval") and the warning ("4096 values
# counting in this window") both say otherwise. Fix: for a fixed window, idle when
# `index > c.index || c.count == 0`.
def test_a_fixed_keyed_node_full_last_interval_gives_new_users_their_own_window_in_the_next(
        mock, tmp_path, monkeypatch):
    monkeypatch.setenv("SIDEGATE_TEST_RUST_LOG", "info")  # 4096 requests: keep the log small
    interval = 30
    spec = routes(route("r", f'type: rate, limit: "1", interval: {interval}s, key: metadata.user_id, '
                             'technique: fixed', fallback="e"))
    began = time.monotonic()
    g = start(tmp_path, mock, spec)
    ready = time.monotonic()
    try:
        clients = [httpx.Client() for _ in range(8)]
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(
                lambda i: post(g, "dynamic/r", user(f"u{i}"), http=clients[i % 8]).status_code, range(4096)))
        assert codes == [200] * 4096
        # All 4096 counted in the node's first window (its windows start when the config loads).
        assert time.monotonic() - began < interval - 2, "the machine was too slow to fill one window"
        # The map is full: the newcomers of this window share one.
        assert [post(g, "dynamic/r", user(f"late{i}")).status_code for i in range(2)] == [200, 429]
        # The next window: a fixed window forgets the last one's counts, old users pass again...
        time.sleep(max(0.0, ready + interval + 0.5 - time.monotonic()))
        assert post(g, "dynamic/r", user("u0")).status_code == 200
        # ...and so must new users, each in a window of their own (nothing of 4096 values counts
        # in this window).
        got = [post(g, "dynamic/r", user(f"new{i}")).status_code for i in range(3)]
        assert got == [200, 200, 200], got
        for c in clients:
            c.close()
    finally:
        g.stop()


# FAILS at 22d6c59: a keyed budget node loses the charge of a request that was in flight when
# another user's first request of a new window swept the node's map: the user keeps spending.
# Cause: a budget node counts nothing as the walk passes (`Window::room`, sidecar/src/routing.rs:
# 117), so a user whose first request of a window is in flight has a window with count 0, which
# `Limiter::idle` (sidecar/src/ratelimit.rs:220-232) calls idle; the sweep in `Keyed::window`
# (ratelimit.rs:338, `retain(|_, l| !l.idle(..))`) drops it from the map while the request's
# `BudgetCharge` (routing.rs:159, pushed at 493) still holds it, so the charge at the response's end goes to a
# window nobody reads again and the user's next request gets a fresh one. Long streams crossing
# a window boundary are the common case. Fix: keep windows still held
# (`Arc::strong_count(l) > 1`) in the sweep, or charge through the map by value.
def test_a_budget_charge_of_a_request_in_flight_survives_another_users_first_request(mock, tmp_path):
    spec = routes(route("b", 'type: budget, limit: "0.01", interval: 2s, key: metadata.team, '
                             'technique: sliding', fallback="e"))
    g = start(tmp_path, mock, spec)
    try:
        red, blue = {"team": "red"}, {"team": "blue"}
        # Red's request costs 1 USD (100 times the limit) and takes 4 s: it ends at least one
        # window after it passed the node.
        costly = {"cf-aig-custom-cost": json.dumps({"total_cost": 1.0}), "x-mock-delay-ms": "4000"}
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", post(g, "dynamic/b", red, headers=costly)))
        t.start()
        time.sleep(2.5)
        # Meanwhile, in a later window, another team's first request.
        assert post(g, "dynamic/b", blue).status_code == 200
        t.join(30)
        assert done["r"].status_code == 200
        time.sleep(0.3)
        # Red spent 100 times its limit a moment ago (a sliding window still weighs it fully).
        r = post(g, "dynamic/b", red)
        assert r.status_code == 429, f"red's 1 USD was never charged: {r.status_code}"
        assert r.json()["error"][0]["code"] == 2041
    finally:
        g.stop()


# FAILS at 22d6c59: a budget node in front of a model the price table does not know never fills
# and nothing says so: every request passes, silently unlimited (a spendLimit warns for the same
# model: "the model has no price, so its answers are not charged to the spend limit").
# Cause: the warning is given only under a spend limit/token budget: sidecar/src/telemetry.rs:
# 1053-1074 (`t.uncharged(..)` at 1073, inside `if let Some(t) = &self.tally`), while route budgets
# are charged just below (telemetry.rs:1076-1078) only `if let Some(usd) = charged`. Fix: warn
# likewise (once per model) when a response with route budgets has no cost, or at load for budget
# nodes whose reachable model nodes have no price.
def test_a_budget_node_over_a_model_without_a_price_says_it_cannot_charge_it(mock, tmp_path):
    spec = ("  routes:\n    - name: b\n      nodes:\n        - {id: s, type: start, next: cap}\n"
            "        - {id: cap, type: budget, limit: \"0.0000001\", interval: 1h, key: metadata.team, next: main, fallback: e}\n"
            "        - {id: main, type: model, provider: openai, model: my-finetune-xyz, next: e}\n"
            "        - {id: e, type: end}\n")
    g = start(tmp_path, mock, spec)
    try:
        assert [post(g, "dynamic/b", {"team": "red"}).status_code for _ in range(3)] == [200] * 3
        logs = g.wait_for_log("no price", timeout=3)
        assert "my-finetune-xyz" in logs
    finally:
        g.stop()


# FAILS at 22d6c59: two numeric user ids above 2^64 share one window (the second user is
# refused after the first one's request), though the README says values are compared "as the app
# sends them". Cause: the metadata is parsed with serde_json without arbitrary precision
# (sidecar/src/compat/mod.rs:962, and telemetry.rs:670), so such numbers become f64 and
# 18446744073709551616 and 18446744073709551617 print alike; the window is the digest of that
# text (ratelimit.rs:330, shared.rs:359). Fix: digest the value's text as sent (RawValue /
# `arbitrary_precision`), or refuse numbers that do not round-trip with 400/2100.
# Not mended (low severity; README says to send ids as strings): strict, it fails loudly once mended.
@pytest.mark.xfail(strict=True, reason="metadata numbers beyond 64 bits are parsed as f64")
def test_numeric_ids_beyond_64_bits_are_two_users(mock, tmp_path):
    g = start(tmp_path, mock, routes(route("r", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id',
                                             fallback="e")))
    try:
        def send(text):
            return httpx.post(g.url + CHAT, headers={"cf-aig-metadata": text}, timeout=30,
                              json={"model": "dynamic/r", "messages": [{"role": "user", "content": "hi"}]})
        assert send('{"user_id": 18446744073709551616}').status_code == 200
        assert send('{"user_id": 18446744073709551617}').status_code == 200
    finally:
        g.stop()


class SlowAcceptProxy:
    """A loopback TCP proxy to `port` that starts forwarding each connection `delay` seconds after
    accepting it: a Redis that takes that long to connect to (still well within sidegate's
    250 ms connect timeout)."""

    def __init__(self, port, delay):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port, self.target, self.delay = self.sock.getsockname()[1], port, delay
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        time.sleep(self.delay)
        u = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        u.settimeout(None)
        self.conns += [c, u]

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(c, u), daemon=True).start()
        pipe(u, c)

    def close(self):
        self.sock.close()
        for s in self.conns:
            s.close()


# FAILS at 22d6c59: with a healthy Redis, a burst of requests for one user on a pod that has not
# connected yet (just started: a rollout with traffic waiting) passes a global node uncounted:
# limit 5, 20 at once, 7 to 20 pass (on plain loopback too, now and then: the module's other
# test below warms the connection first to avoid it). Cause: `Shared::conn`
# (sidecar/src/shared.rs:165-174) answers "redis connection being made" to every request that
# comes while another one connects (`connecting.try_lock()`), without marking Redis down, and
# `count_in` (shared.rs:330-333) fails open on it (`Ok(None)`, Held::Nothing in routing.rs:112):
# no count, no limit. Fix: let those requests await the connection being made (bounded by the
# same timeout; fail open only if it fails), and/or connect when the config loads, before
# /readyz says ready.
def test_a_burst_while_the_pods_redis_connection_is_made_is_still_counted(mock, tmp_path):
    rd = Redis(tmp_path)
    proxy = SlowAcceptProxy(rd.port, 0.15)
    spec = routes(route("r", 'type: rate, limit: "5", interval: 1h, key: metadata.user_id, scope: global',
                        fallback="e"))
    g = pod(tmp_path, mock, f"redis://127.0.0.1:{proxy.port}/0", spec, "a")
    try:
        u = user(f"u-{uuid.uuid4().hex}")
        clients = [httpx.Client() for _ in range(20)]
        ready = threading.Barrier(20)

        def one(c):
            ready.wait(10)
            return post(g, "dynamic/r", u, http=c).status_code

        # 20 at once: the first starts the connection, the others come while it is made.
        with ThreadPoolExecutor(20) as pool:
            codes = list(pool.map(one, clients))
        for c in clients:
            c.close()
        assert sorted(codes) == [200] * 5 + [429] * 15, f"{codes.count(200)} passed a limit of 5"
        # The connection was made, well in time: the node counts from now on.
        v = user(f"v-{uuid.uuid4().hex}")
        assert [post(g, "dynamic/r", v).status_code for _ in range(6)] == [200] * 5 + [429]
    finally:
        g.stop()
        proxy.close()
        rd.stop()


# ---------------------------------------------------------------------------------------------
# Checked and found right


def test_parallel_requests_of_one_user_pass_exactly_the_limit_with_the_spec_envelope(mock, tmp_path):
    spec = routes(route("r", 'type: rate, limit: "5", interval: 1h, key: metadata.user_id, technique: sliding',
                        fallback="e"))
    g = start(tmp_path, mock, spec)
    try:
        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(lambda _: post(g, "dynamic/r", user("alice"),
                                                 headers={"x-mock-delay-ms": "200"}).status_code, range(30)))
        assert sorted(codes) == [200] * 5 + [429] * 25
        r = post(g, "dynamic/r", user("alice"))
        assert r.status_code == 429 and r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert body["success"] is False and body["result"] == [] and body["messages"] == []
        assert body["error"][0]["code"] == 2003 and "alice" not in body["error"][0]["message"]
        # 5 counted at once early in the window: the sliding estimate drops to 4 a fifth into the
        # next window, an hour and 12 minutes away.
        assert 4300 <= int(r.headers["retry-after"]) <= 4320, r.headers["retry-after"]
        # Through the SDK: a RateLimitError, another user untouched.
        with pytest.raises(openai.RateLimitError):
            served(g, "dynamic/r", user("alice"))
        assert served(g, "dynamic/r", user("bob")) == "gpt-4o"
    finally:
        g.stop()


def test_retries_and_a_fallback_target_count_one_request_once(mock, tmp_path):
    spec = ("  retries: {maxAttempts: 1, retryDelay: 0ms}\n  routes:\n    - name: r\n      nodes:\n"
            "        - {id: s, type: start, next: cap}\n"
            "        - {id: cap, type: rate, limit: \"2\", interval: 1h, key: metadata.user_id, next: main, fallback: e}\n"
            "        - {id: main, type: model, provider: openai, model: gpt-4o, retries: 2, next: backup}\n"
            "        - {id: backup, type: model, provider: openai, model: gpt-4o-mini, next: e}\n"
            "        - {id: e, type: end}\n")
    g = start(tmp_path, mock, spec)
    try:
        mock.clear()
        # Two failures then an answer from the same target (its retries)...
        r = post(g, "dynamic/r", user("a"), headers={"x-mock-fail-first": f"2;{uuid.uuid4()}"})
        assert (r.status_code, r.headers["cf-aig-model"], len(mock.requests())) == (200, "gpt-4o", 3)
        # ...or three failures and the backup target: one request each.
        r = post(g, "dynamic/r", user("b"), headers={"x-mock-fail-first": f"3;{uuid.uuid4()}"})
        assert (r.status_code, r.headers["cf-aig-model"]) == (200, "gpt-4o-mini")
        assert [post(g, "dynamic/r", user(u)).status_code for u in "aabb"] == [200, 429, 200, 429]
    finally:
        g.stop()


def test_streamed_answers_and_custom_costs_charge_a_keyed_budget_node(mock, tmp_path):
    spec = routes(route("b", 'type: budget, limit: "0.0001", interval: 1h, key: metadata.team'))
    g = start(tmp_path, mock, spec)
    try:
        def stream(team):
            s = client(g, {"team": team}).chat.completions.with_raw_response.create(
                model="dynamic/b", messages=[{"role": "user", "content": "route me by budget"}], stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices)
            assert text == "mock reply to: route me by budget"
            return s.headers["cf-aig-model"]

        got = []
        for _ in range(3):
            got.append(stream("red"))
            time.sleep(0.2)
        # Each streamed answer costs more than half the limit: two, then the fallback.
        assert got == ["gpt-4o", "gpt-4o", "gpt-4o-mini"], got
        # A custom cost above the model's price is what is charged.
        r = post(g, "dynamic/b", {"team": "blue"}, headers={"cf-aig-custom-cost": json.dumps({"total_cost": 1})})
        assert r.headers["cf-aig-model"] == "gpt-4o"
        time.sleep(0.2)
        assert served(g, "dynamic/b", {"team": "blue"}) == "gpt-4o-mini"
    finally:
        g.stop()


def test_identical_requests_at_once_count_once_for_the_user(mock, tmp_path):
    spec = routes(route("r", 'type: rate, limit: "2", interval: 1h, key: metadata.user_id')) \
        + "  cache: {enabled: true}\n"
    g = start(tmp_path, mock, spec)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: post(g, "dynamic/r", user("carol"), "same question",
                                                   headers={"x-mock-delay-ms": "300"}), range(4)))
        assert [r.headers["cf-aig-model"] for r in answers] == ["gpt-4o"] * 4
        assert sorted(r.headers["cf-aig-cache-status"] for r in answers) == ["HIT"] * 3 + ["MISS"]
        # One went upstream: carol has one more before the fallback.
        assert served(g, "dynamic/r", user("carol"), "another") == "gpt-4o"
        assert served(g, "dynamic/r", user("carol"), "and another") == "gpt-4o-mini"
    finally:
        g.stop()


@pytest.mark.parametrize("bad", ['{"user_id": {"id": 1}}', '{"user_id": [1]}', '{"user_id": null}'])
def test_a_nested_or_null_metadata_value_is_refused_before_any_count(mock, tmp_path, bad):
    g = start(tmp_path, mock, routes(route("r", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id',
                                           fallback="e")))
    try:
        r = httpx.post(g.url + CHAT, headers={"cf-aig-metadata": bad}, timeout=30,
                       json={"model": "dynamic/r", "messages": [{"role": "user", "content": "hi"}]})
        assert (r.status_code, r.json()["error"][0]["code"]) == (400, 2100)
        # Nothing was counted in the "no value" window.
        assert post(g, "dynamic/r").status_code == 200
    finally:
        g.stop()


def test_global_keyed_node_across_two_pods_passes_exactly_the_limit_at_once(mock, tmp_path):
    rd = Redis(tmp_path)
    spec = routes(route("r", 'type: rate, limit: "5", interval: 1h, key: metadata.user_id, scope: global, '
                             'technique: sliding', fallback="e"))
    a, b = pod(tmp_path, mock, rd.url, spec, "a"), pod(tmp_path, mock, rd.url, spec, "b")
    try:
        # Each pod's Redis connection made first (see the test above for what happens before).
        for g in (a, b):
            post(g, "dynamic/r", user(f"warm-{uuid.uuid4().hex}"))
        time.sleep(0.5)
        u = user(f"u-{uuid.uuid4().hex}")
        with ThreadPoolExecutor(40) as pool:
            codes = list(pool.map(lambda i: post((a, b)[i % 2], "dynamic/r", u,
                                                 headers={"x-mock-delay-ms": "100"}).status_code, range(40)))
        assert sorted(codes) == [200] * 5 + [429] * 35
    finally:
        a.stop()
        b.stop()
        rd.stop()


def test_a_global_nodes_retry_after_is_when_a_request_passes_again(mock, tmp_path):
    rd = Redis(tmp_path)
    spec = routes(route("r", 'type: rate, limit: "1", interval: 2s, key: metadata.user_id, scope: global',
                        fallback="e"))
    g = pod(tmp_path, mock, rd.url, spec, "a")
    try:
        u = user(f"u-{uuid.uuid4().hex}")
        for _ in range(4):
            r = post(g, "dynamic/r", u)
            if r.status_code == 429:
                break
        assert r.status_code == 429 and r.json()["error"][0]["code"] == 2003
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 2, wait
        time.sleep(wait)
        assert post(g, "dynamic/r", u).status_code == 200
    finally:
        g.stop()
        rd.stop()


def test_a_paused_redis_costs_a_walk_at_most_a_bounded_wait_and_the_pod_counts_meanwhile(mock, tmp_path):
    rd = Redis(tmp_path)
    spec = routes(route("r", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id, scope: global',
                        fallback="e"))
    g = pod(tmp_path, mock, rd.url, spec, "a")
    try:
        u, newcomer = user(f"u-{uuid.uuid4().hex}"), user(f"new-{uuid.uuid4().hex}")
        assert post(g, "dynamic/r", u).status_code == 200
        assert post(g, "dynamic/r", u).status_code == 429
        rd.proc.send_signal(signal.SIGSTOP)
        try:
            got = []
            for who in [u, u, newcomer, newcomer]:
                t = time.monotonic()
                got.append(post(g, "dynamic/r", who).status_code)
                assert time.monotonic() - t < 2.0
                time.sleep(0.3)
            # This pod's own count of each user, with the node's limit: never off.
            assert got == [429, 429, 200, 429], got
        finally:
            rd.proc.send_signal(signal.SIGCONT)
        # Once Redis answers again, the newcomer's request served meanwhile is counted there, once
        # (and the refused ones not at all, though Redis ran some of them late).
        deadline = time.monotonic() + 10
        while sorted(route_counts(rd).values()) != [1.0, 1.0]:
            assert time.monotonic() < deadline, f"the count kept never reached Redis: {route_counts(rd)}"
            time.sleep(0.3)
        time.sleep(1.5)
        assert sorted(route_counts(rd).values()) == [1.0, 1.0], route_counts(rd)
        assert redis_errors(g, "route_node") >= 1
    finally:
        g.stop()
        rd.stop()


CLOUDFLARE_SHAPED = [
    # Cloudflare's element: `interval` in seconds, `type: rate_limit`, `limitType`.
    ('type: rate, limit: "100", interval: 3600, key: metadata.user_id', 'invalid duration "3600"'),
    ('type: rate_limit, limit: "100", interval: 1h', "unknown variant `rate_limit`"),
    ('type: rate, limitType: count, limit: "100", interval: 1h', "unknown field `limitType`"),
    ('type: rate, limit: "1", interval: 1h, key: metadata.user.id', "must be metadata.<name>"),
]


@pytest.mark.parametrize("cap,why", CLOUDFLARE_SHAPED)
def test_cloudflare_shaped_limit_nodes_are_refused_by_check_naming_what_differs(mock, tmp_path, cap, why):
    config, keys = tmp_path / "check.yaml", tmp_path / "keys"
    config.write_text(gateway_yaml(mock.url, extra_spec=routes(route("r", cap))))
    keys.mkdir()
    out = subprocess.run([binary("sidegate"), "--config", str(config), "--keys-dir", str(keys),
                          "--listen", f"127.0.0.1:{free_port()}", "--check"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2 and why in out.stderr, out.stderr


def wait_reloaded(g, loaded, text):
    g.config.write_text(text)
    deadline = time.monotonic() + 15
    while g.logs().count("config loaded") == loaded:
        assert time.monotonic() < deadline, "the new config was not loaded"
        time.sleep(0.05)


def test_a_charge_in_flight_across_a_reload_of_the_limit_lands_in_the_kept_window(mock, tmp_path):
    spec = routes(route("b", 'type: budget, limit: "0.01", interval: 1h, key: metadata.team', fallback="e"))
    g = start(tmp_path, mock, spec)
    try:
        done = {}
        costly = {"cf-aig-custom-cost": json.dumps({"total_cost": 1.0}), "x-mock-delay-ms": "2000"}
        t = threading.Thread(target=lambda: done.setdefault("r", post(g, "dynamic/b", {"team": "red"}, headers=costly)))
        t.start()
        time.sleep(0.3)
        wait_reloaded(g, g.logs().count("config loaded"),
                      gateway_yaml(mock.url, extra_spec=spec.replace('"0.01"', '"0.02"')))
        t.join(30)
        assert done["r"].status_code == 200
        time.sleep(0.3)
        assert post(g, "dynamic/b", {"team": "red"}).status_code == 429
        assert post(g, "dynamic/b", {"team": "blue"}).status_code == 200
    finally:
        g.stop()


def test_a_stream_left_after_its_finish_reason_is_still_charged_to_the_users_budget(mock, tmp_path):
    # The mock's gpt-4o answer costs about $0.000055: one answer spends this limit.
    spec = routes(route("b", 'type: budget, limit: "0.00005", interval: 1h, key: metadata.team', fallback="e"))
    g = start(tmp_path, mock, spec)
    try:
        c = openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0,
                          default_headers={"cf-aig-metadata": json.dumps({"team": "red"}),
                                           "x-mock-chunk-delay-ms": "200"})
        s = c.chat.completions.with_raw_response.create(
            model="dynamic/b", messages=[{"role": "user", "content": "route me by budget"}], stream=True)
        for chunk in s.parse():
            if chunk.choices and chunk.choices[0].finish_reason:
                break
        s.http_response.close()
        deadline = time.monotonic() + 10
        while post(g, "dynamic/b", {"team": "red"}).status_code != 429:
            assert time.monotonic() < deadline, "the stream left after its content was never charged"
            time.sleep(0.3)
    finally:
        g.stop()


def test_a_global_nodes_counts_survive_a_reload_that_raises_its_limit(mock, tmp_path):
    rd = Redis(tmp_path)
    spec = routes(route("r", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id, scope: global'))
    g = pod(tmp_path, mock, rd.url, spec, "a")
    try:
        u = user(f"u-{uuid.uuid4().hex}")
        assert served(g, "dynamic/r", u) == "gpt-4o"
        assert served(g, "dynamic/r", u) == "gpt-4o-mini"
        wait_reloaded(g, g.logs().count("config loaded"),
                      gateway_yaml(mock.url, name="shared-gw",
                                   extra_spec="  redis: {}\n" + spec.replace('limit: "1"', 'limit: "2"')))
        assert [served(g, "dynamic/r", u) for _ in range(2)] == ["gpt-4o", "gpt-4o-mini"]
    finally:
        g.stop()
        rd.stop()

"""Rate and budget nodes of dynamic routes counted per value of a metadata field
(`key: metadata.<name>`), in fixed or sliding windows (`technique`), through the official openai
SDK: each user of an app gets the node's limit, not a share of one counter for all."""

import json
import re
import subprocess
import time
import uuid

import openai
import pytest

from conftest import DEFAULT_KEYS, Sidegate, assert_refused_at_start, binary, free_port, gateway_yaml
from route_yaml import route, routes
from test_redis import pod, redis  # noqa: F401  (module-scoped real redis-server fixture)


PER_USER = routes(route("per-user", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id'))


def client(g, metadata=None):
    headers = {"cf-aig-metadata": json.dumps(metadata)} if metadata is not None else {}
    return openai.OpenAI(base_url=g.url + "/compat", api_key="placeholder", max_retries=0,
                         default_headers=headers)


def answer(g, model, metadata=None, text="route me"):
    """The answer's headers."""
    r = client(g, metadata).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}])
    assert r.parse().choices[0].message.content == f"mock reply to: {text}"
    return r.headers


def served(g, model, metadata=None, text="route me"):
    """The model that answered (`cf-aig-model`)."""
    return answer(g, model, metadata, text)["cf-aig-model"]


def user(name):
    return {"user_id": name, "plan": "free"}


@pytest.fixture
def per_user(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=PER_USER), DEFAULT_KEYS)
    mock.clear()
    yield g
    g.stop()


def test_two_users_with_a_limit_of_one_each_pass_once_then_go_to_the_fallback(per_user, mock):
    order = ["alice", "bob", "alice", "bob"]
    got = [served(per_user, "dynamic/per-user", user(u)) for u in order]
    assert got == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"], got
    assert [json.loads(r["body"])["model"] for r in mock.requests()] == got


def test_one_users_requests_leave_anothers_count_alone(per_user):
    bob = [served(per_user, "dynamic/per-user", user("bob")) for _ in range(3)]
    assert bob == ["gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    assert served(per_user, "dynamic/per-user", user("alice")) == "gpt-4o"
    # The number 7 and the string "7" are two users, as the app sent them.
    assert served(per_user, "dynamic/per-user", user(7)) == "gpt-4o"
    assert served(per_user, "dynamic/per-user", user("7")) == "gpt-4o"


def test_requests_without_the_field_share_one_window_of_their_own(per_user):
    assert served(per_user, "dynamic/per-user") == "gpt-4o"
    assert served(per_user, "dynamic/per-user", {"plan": "free"}) == "gpt-4o-mini"
    assert served(per_user, "dynamic/per-user", user("alice")) == "gpt-4o"


def test_a_keyed_node_over_its_limit_leading_to_end_answers_429_per_user(mock, tmp_path):
    spec = routes(route("r", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id', fallback="e"))
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        assert served(g, "dynamic/r", user("alice")) == "gpt-4o"
        with pytest.raises(openai.RateLimitError) as refused:
            served(g, "dynamic/r", user("alice"))
        err = refused.value.response.json()["error"][0]
        assert err["code"] == 2003 and "for each value of metadata.user_id" in err["message"], err
        assert "alice" not in err["message"]
        assert served(g, "dynamic/r", user("bob")) == "gpt-4o"
    finally:
        g.stop()


def test_a_keyed_budget_node_charges_each_user_apart(mock, tmp_path):
    # gpt-4o's price makes the mock's answer cost more than half of $0.0001 and less than all.
    spec = routes(route("b", 'type: budget, limit: "0.0001", interval: 1h, key: metadata.team'))
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        team = lambda t: {"team": t}  # noqa: E731
        got = [served(g, "dynamic/b", team(t), "route me by budget")
               for t in ["red", "red", "blue", "red", "blue", "blue"]]
        assert got == ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"], got
    finally:
        g.stop()


def rate_limited(g, model, metadata):
    """Sends one request; the Retry-After of the node's 429, or None when it passed."""
    try:
        served(g, model, metadata)
        return None
    except openai.RateLimitError as e:
        return int(e.response.headers["retry-after"])


def test_a_sliding_node_still_counts_the_last_window_when_a_fixed_one_starts_afresh(mock, tmp_path):
    # Two nodes of 2 per 2 s loaded together, so their windows start together; each over its
    # limit answers 429 (fallback `end`).
    cap = 'type: rate, limit: "2", interval: 2s, key: metadata.user_id, technique: {}'
    spec = routes(route("fixed", cap.format("fixed"), fallback="e"),
                  route("sliding", cap.format("sliding"), fallback="e"))
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec=spec), DEFAULT_KEYS)
    try:
        u = user("carol")

        def fill(model):
            passed = 0
            while rate_limited(g, model, u) is None:
                passed += 1
                assert passed <= 4, "at most 2 per window (4 across a boundary)"

        def next_fixed_window():
            """Waits until the fixed node lets a request through again: a window just began."""
            fill("dynamic/fixed")
            deadline = time.monotonic() + 5
            while rate_limited(g, "dynamic/fixed", u) is not None:
                assert time.monotonic() < deadline, "the fixed window never started afresh"
                time.sleep(0.01)

        next_fixed_window()
        # Early in a window: the sliding node takes its 2 (and the fixed one its second).
        got = [rate_limited(g, "dynamic/sliding", u) for _ in range(3)]
        assert got[:2] == [None, None] and got[2] is not None, got
        assert rate_limited(g, "dynamic/fixed", u) is None
        next_fixed_window()
        # The fixed node starts afresh; the sliding one still weighs the 2 of the window that
        # just ended, almost wholly: refused, until half of this window has passed.
        retry = rate_limited(g, "dynamic/sliding", u)
        assert retry is not None and 1 <= retry <= 2, retry
        # Another user's sliding window is their own.
        assert rate_limited(g, "dynamic/sliding", user("dave")) is None
        time.sleep(retry)
        assert rate_limited(g, "dynamic/sliding", u) is None
    finally:
        g.stop()


def reload_with(g, mock, spec):
    loaded = g.logs().count("config loaded")
    g.config.write_text(gateway_yaml(mock.url, extra_spec=spec))
    deadline = time.monotonic() + 15
    while g.logs().count("config loaded") == loaded:
        assert time.monotonic() < deadline, "the new config was not loaded"
        time.sleep(0.05)


def test_a_reload_that_changes_only_the_limit_keeps_each_users_count(per_user, mock):
    assert served(per_user, "dynamic/per-user", user("alice")) == "gpt-4o"
    assert served(per_user, "dynamic/per-user", user("bob")) == "gpt-4o"
    reload_with(per_user, mock, PER_USER.replace('limit: "1"', 'limit: "2"'))
    # Each has one more request under the raised limit, not two.
    got = [served(per_user, "dynamic/per-user", user(u)) for u in ["alice", "alice", "bob", "bob"]]
    assert got == ["gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"], got
    # Counting by another field is a new set of windows.
    reload_with(per_user, mock, PER_USER.replace("metadata.user_id", "metadata.plan"))
    assert served(per_user, "dynamic/per-user", user("alice")) == "gpt-4o"


def redis_cli(redis, *args):  # noqa: F811
    out = subprocess.run(["redis-cli", "-u", redis.url, *args], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out
    return out.stdout.split()


def route_counts(redis):  # noqa: F811
    """The route windows in Redis (pods of the `shared-gw` gateway) and their counts."""
    keys = redis_cli(redis, "--scan", "--pattern", "sidegate:team-a/shared-gw:route:*")
    return {k: float(redis_cli(redis, "GET", k)[0]) for k in keys}


def wait_for(what, check, timeout=5):
    """Waits until `check()` holds: a pod writes to Redis in the background once an answer ends."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_global_keyed_node_counts_each_user_once_across_pods(mock, tmp_path, redis):  # noqa: F811
    spec = routes(route("per-user", 'type: rate, limit: "1", interval: 1h, key: metadata.user_id, scope: global'))
    a, b = pod(tmp_path, mock, redis.url, spec, "a"), pod(tmp_path, mock, redis.url, spec, "b")
    try:
        alice, bob = f"alice-{uuid.uuid4().hex}", f"bob-{uuid.uuid4().hex}"
        got = [served(g, "dynamic/per-user", user(u)) for g, u in [(a, alice), (b, alice), (b, bob), (a, bob)]]
        assert got == ["gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"], got
        # The windows are named by digests: no metadata value reaches the Redis key space.
        keys = redis_cli(redis, "--scan", "--pattern", "*")
        assert not [k for k in keys if "alice" in k or "bob" in k], keys
        route_keys = [k for k in keys if ":route:" in k]
        assert route_keys and all(
            re.fullmatch(r"sidegate:team-a/shared-gw:route:[0-9a-f]{64}:3600000:\d+", k) for k in route_keys), keys
    finally:
        a.stop()
        b.stop()


def test_a_global_node_gives_back_what_a_cache_hit_did_not_send(mock, tmp_path, redis):  # noqa: F811
    redis_cli(redis, "FLUSHALL")
    spec = routes(route("per-user", 'type: rate, limit: "2", interval: 1h, key: metadata.user_id, scope: global')) \
        + "  cache: {enabled: true}\n"
    g = pod(tmp_path, mock, redis.url, spec, "a")
    try:
        u = user(f"carol-{uuid.uuid4().hex}")
        assert served(g, "dynamic/per-user", u, "cache me") == "gpt-4o"
        hit = answer(g, "dynamic/per-user", u, "cache me")
        assert (hit["cf-aig-cache-status"], hit["cf-aig-model"]) == ("HIT", "gpt-4o")
        wait_for("the hit's count given back", lambda: sorted(route_counts(redis).values()) == [1.0])
        assert served(g, "dynamic/per-user", u, "not cached") == "gpt-4o"
        assert served(g, "dynamic/per-user", u, "over") == "gpt-4o-mini"
    finally:
        g.stop()


def test_a_global_keyed_budget_node_charges_each_team_across_pods(mock, tmp_path, redis):  # noqa: F811
    redis_cli(redis, "FLUSHALL")
    spec = routes(route("b", 'type: budget, limit: "0.0001", interval: 1h, key: metadata.team, scope: global'))
    a, b = pod(tmp_path, mock, redis.url, spec, "a"), pod(tmp_path, mock, redis.url, spec, "b")
    try:
        red, blue = {"team": f"red-{uuid.uuid4().hex}"}, {"team": f"blue-{uuid.uuid4().hex}"}
        got = []
        # Each answer costs more than half of $0.0001: two per team, then the fallback.
        for i, (g, team) in enumerate([(a, red), (b, red), (a, blue), (b, red), (a, blue), (b, blue)]):
            charged = sum(route_counts(redis).values())
            got.append(served(g, "dynamic/b", team, "route me by budget"))
            if got[-1] == "gpt-4o":
                wait_for("the charge written", lambda: sum(route_counts(redis).values()) > charged)
        assert got == ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o-mini"], got
    finally:
        a.stop()
        b.stop()


BAD = [
    ('type: rate, limit: "1", interval: 1h, key: user_id',
     'spec.routes[0].nodes[1].key must be metadata.<name> (a cf-aig-metadata field: letters, digits, _ or -), got "user_id"'),
    ('type: rate, limit: "1", interval: 1h, technique: bogus',
     "unknown variant `bogus`, expected one of fixed, sliding"),
    ('type: budget, limit: "1.00", interval: 1h, key: "metadata.user id"',
     'spec.routes[0].nodes[1].key must be metadata.<name>'),
    ('type: rate, limit: "1", interval: 1h, scope: global',
     "spec.routes[0].nodes[1].scope: global needs spec.redis (the node counts in Redis)"),
]


@pytest.mark.parametrize("cap,why", BAD)
def test_bad_keys_and_techniques_are_refused_by_check_and_at_start(mock, tmp_path, cap, why):
    spec = routes(route("r", cap))
    config, keys = tmp_path / "check.yaml", tmp_path / "check-keys"
    config.write_text(gateway_yaml(mock.url, extra_spec=spec))
    keys.mkdir()
    out = subprocess.run(
        [binary("sidegate"), "--config", str(config), "--keys-dir", str(keys),
         "--listen", f"127.0.0.1:{free_port()}", "--check"],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    assert "invalid configuration" in out.stderr and why in out.stderr, out.stderr
    assert_refused_at_start(mock, tmp_path, spec, why)

"""Live reload: kubelet-style symlink swaps and plain edits, under load, keeping the last good."""

import os
import re
import threading
import time

import httpx

import kubelet
from conftest import DEFAULT_KEYS, KEY_MARKER, OPENAI_KEY, Sidegate, gateway_yaml


def reload_count(g, result):
    m = re.search(rf'sidegate_config_reloads_total{{result="{result}"}} (\d+)', g.metrics())
    return int(m.group(1)) if m else 0


def wait_for(cond, timeout, what, every=0.01):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(every)


def test_rotating_a_key_by_symlink_swap_under_load_loses_no_request(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url))
    failures, done, sent, threads = [], threading.Event(), [0], []
    # What the load sends: "rotation-pending", then "rotation-seen" once the new key was seen.
    phase = ["rotation-pending"]

    def load():
        with httpx.Client(timeout=10) as c:
            while not done.is_set() and sent[0] < 20000:
                body = {"model": "m", "messages": [{"role": "user", "content": phase[0]}]}
                try:
                    r = c.post(g.url + "/openai/chat/completions", json=body)
                    if r.status_code != 200:
                        failures.append(r.status_code)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                sent[0] += 1

    def drain():
        """The mock's records since the last call (cleared each time, so each fetch stays small)."""
        reqs = mock.requests()
        mock.clear()
        return reqs

    new_key = f"sk-{KEY_MARKER}-openai-rotated"
    try:
        kubelet.write(g.keys_dir, DEFAULT_KEYS)
        wait_for(lambda: reload_count(g, "success") >= 1, 5, "initial keys not loaded")
        threads.extend(threading.Thread(target=load) for _ in range(4))
        for t in threads:
            t.start()
        wait_for(lambda: sent[0] >= 50, 10, "the load did not start", every=0.05)
        swapped_at = time.monotonic()
        kubelet.write(g.keys_dir, dict(DEFAULT_KEYS, **{"openai.default": new_key}))
        mock.clear()

        def new_key_seen():
            return any(q["headers"].get("authorization") == f"Bearer {new_key}" for q in drain())

        wait_for(new_key_seen, 5, "new key not in use within 5 s of the swap", every=0.05)
        took = time.monotonic() - swapped_at
        # Once one request went with the new key, every request started afterwards does too.
        phase[0] = "rotation-seen"
        after = []

        def enough_after():
            after.extend(q for q in drain() if "rotation-seen" in q["body"])
            return len(after) >= 50

        wait_for(enough_after, 10, "the load stopped after the swap", every=0.05)
    finally:
        done.set()
        for t in threads:
            t.join(15)
        g.stop()
    assert failures == [], f"{len(failures)} failed requests of {sent[0]}: {failures[:5]}"
    keys = {q["headers"].get("authorization") for q in after}
    assert keys == {f"Bearer {new_key}"}, f"requests after the rotation went with {keys}"
    print(f"key rotation: new key in use {took * 1000:.0f} ms after the swap; {sent[0]} requests, 0 failed")


def edit_key_and_wait(g, mock, new_key, timeout):
    """Writes `new_key` as openai.default in place and waits until requests carry it."""
    (g.keys_dir / "openai.default").write_text(new_key + "\n")

    def seen():
        httpx.post(g.url + "/openai/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "e"}]})
        return mock.last()["headers"]["authorization"] == f"Bearer {new_key}"

    wait_for(seen, timeout, f"edited key not used within {timeout} s")


def test_plain_file_edit_of_a_key_is_picked_up(gateway, mock):
    edit_key_and_wait(gateway, mock, f"sk-{KEY_MARKER}-edited", 2)


def test_files_named_by_relative_paths_are_watched_too(mock, tmp_path):
    # The watcher reports absolute paths: a relative --config/--keys-dir must still match them
    # (else only the 5 s poll would see the edit).
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, relative_paths=True)
    try:
        edit_key_and_wait(g, mock, f"sk-{KEY_MARKER}-relative", 2)
    finally:
        g.stop()


def test_without_a_file_watcher_the_poll_alone_picks_up_an_edit(mock, tmp_path):
    # In a user namespace allowed no inotify instance the watcher cannot start (as on a node out
    # of them): the sidecar says so and the 5 s poll alone must pick up an edit.
    no_inotify = ["unshare", "--user", "--map-root-user", "sh", "-c",
                  'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh"]
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, wrapper=no_inotify)
    try:
        wait_for(lambda: "file watching unavailable; polling only" in g.logs(), 5, g.logs())
        before = reload_count(g, "success")
        # A file replaced whole (renamed over, as kubelet's swap replaces them): the next poll.
        replaced = f"sk-{KEY_MARKER}-polled-whole"
        (tmp_path / "staged").write_text(replaced + "\n")
        os.replace(tmp_path / "staged", g.keys_dir / "openai.default")
        wait_for(lambda: key_used(g, mock) == f"Bearer {replaced}", 8, "a replaced key was not read within 8 s")
        # One written in place once two polls in a row found it unchanged (10 to 15 s): the
        # poll cannot see its writer close it (test_reload_review: a writer caught half-way).
        edit_key_and_wait(g, mock, f"sk-{KEY_MARKER}-polled", 18)
        assert reload_count(g, "success") == before + 2
    finally:
        g.stop()


def key_used(g, mock):
    httpx.post(g.url + "/openai/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "k"}]})
    return mock.last()["headers"]["authorization"]


def test_a_key_link_left_dangling_mid_swap_is_skipped_not_a_failed_reload(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    try:
        # A key removed by kubelet's swap (its link not yet cleaned up) next to a rotated one.
        (g.keys_dir / "openai.team-c").symlink_to(tmp_path / "gone")
        edit_key_and_wait(g, mock, f"sk-{KEY_MARKER}-next-to-dangling", 8)
        assert "openai.team-c: gone while loading" in g.logs()
        assert "config reload rejected" not in g.logs()
    finally:
        g.stop()


def test_invalid_config_at_reload_keeps_the_last_good_one(gateway, mock):
    good = gateway.config.read_text()
    before_err = reload_count(gateway, "error")
    gateway.config.write_text(good + "  cache: {enabled: true, ttl: 10s}\n")
    wait_for(lambda: reload_count(gateway, "error") > before_err, 3, "bad reload not counted")
    r = httpx.post(gateway.url + "/openai/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "still"}]})
    assert r.status_code == 200
    assert mock.last()["headers"]["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "keeping the last good config" in gateway.logs()
    before_ok = reload_count(gateway, "success")
    gateway.config.write_text(good.replace("name: main", "name: renamed"))
    wait_for(lambda: reload_count(gateway, "success") > before_ok, 3, "good config not reloaded")
    assert httpx.get(gateway.url + "/v1/a/renamed/openai/models").status_code == 200
    assert httpx.get(gateway.url + "/v1/a/main/openai/models").status_code == 404


def test_a_deleted_gateway_stops_serving_its_keys_until_it_comes_back(mock, tmp_path):
    # kubelet empties both volumes when the AIGateway (and so its ConfigMap and Secret) is
    # deleted: the keys must not go on serving from memory.
    g = Sidegate(tmp_path, gateway_yaml(mock.url))
    chat = {"model": "m", "messages": [{"role": "user", "content": "who serves"}]}
    try:
        kubelet.write(g.keys_dir, DEFAULT_KEYS)
        wait_for(lambda: reload_count(g, "success") >= 1, 5, "keys not loaded")
        text = g.config.read_text()
        # The config file alone gone is a bad edit: the last good config keeps serving.
        before = reload_count(g, "error")
        g.config.unlink()
        wait_for(lambda: reload_count(g, "error") > before, 8, "missing config not noticed")
        assert httpx.post(g.url + "/openai/chat/completions", json=chat).status_code == 200
        # Both gone: nothing serves, and the pod is not ready.
        kubelet.write(g.keys_dir, {})
        wait_for(lambda: _ready_status(g) == 503, 8, "still ready with its gateway gone")
        r = httpx.post(g.url + "/openai/chat/completions", json=chat)
        assert (r.status_code, r.json()["error"][0]["code"]) == (503, 2105)
        assert "the AIGateway was deleted?" in g.logs()
        # Created again: served again, with the new key.
        mock.clear()
        g.config.write_text(text)
        kubelet.write(g.keys_dir, dict(DEFAULT_KEYS, **{"openai.default": f"sk-{KEY_MARKER}-recreated"}))
        wait_for(lambda: _ready_status(g) == 200, 8, "not served again")
        assert httpx.post(g.url + "/openai/chat/completions", json=chat).status_code == 200
        assert mock.last()["headers"]["authorization"] == f"Bearer sk-{KEY_MARKER}-recreated"
    finally:
        g.stop()


def test_waits_unready_for_a_config_that_appears_later(mock, tmp_path):
    g = Sidegate(tmp_path, "schemaVersion: 1\nspec: [not yet\n", extra_args=["--wait-for-config"], wait_ready=False)
    try:
        wait_for(lambda: _ready_status(g) == 503, 10, "admin not serving")
        r = httpx.post(g.url + "/openai/models")
        assert (r.status_code, r.json()["error"][0]["code"]) == (503, 2105)
        g.config.write_text(gateway_yaml(mock.url))
        wait_for(lambda: _ready_status(g) == 200, 3, "never became ready")
    finally:
        g.stop()


def _ready_status(g):
    try:
        return httpx.get(g.admin + "/readyz", timeout=1).status_code
    except httpx.HTTPError:
        return None

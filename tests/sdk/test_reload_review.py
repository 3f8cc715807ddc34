"""Live reload reviewed at its edges: keys directories replaced or re-pointed, the reload gauges
while the config is refused, every listen-independent setting changed by a reload (both ways), a
request retrying across a key rotation, configs caught half-way (next to another change, and by
the poll alone), unreadable key files, a stop while the watcher waits, and byte order marks."""

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid

import httpx
import pytest

import kubelet
from conftest import DEFAULT_KEYS, GATEWAY_TOKEN, KEY_MARKER, OPENAI_KEY, Sidegate, gateway_yaml
from test_ops_logs_review import sample
from test_reload_edges import CHAT, TOKEN_HEADER, chat_status, key_used, reload_count, stays, wait_for

OK = "sidegate_config_last_reload_successful"
WHEN = "sidegate_config_last_reload_success_timestamp_seconds"


def write_keys(d, keys):
    d.mkdir()
    for name, value in keys.items():
        (d / name).write_text(value + "\n")


# --- the watched directories ----------------------------------------------------------------


# Failed at 263510d (mended since): a keys directory replaced (renamed over, or its symlink re-pointed as git-sync and secret agents do) is never watched again: every later edit waits for the 5 s poll
@pytest.mark.parametrize("how", ["symlink-repointed", "renamed-over"])
def test_a_replaced_keys_directory_is_watched_as_the_old_one_was(mock, tmp_path, how):
    if how == "symlink-repointed":
        write_keys(tmp_path / "keys-v1", DEFAULT_KEYS)
        (tmp_path / "keys").symlink_to("keys-v1")
    g = Sidegate(tmp_path, gateway_yaml(mock.url), None if how == "symlink-repointed" else DEFAULT_KEYS)
    swapped, edited = f"sk-{KEY_MARKER}-swapped-dir", f"sk-{KEY_MARKER}-edited-in-new-dir"
    try:
        assert key_used(g, mock) == (200, f"Bearer {OPENAI_KEY}")
        write_keys(tmp_path / "keys-v2", dict(DEFAULT_KEYS, **{"openai.default": swapped}))
        if how == "symlink-repointed":
            os.symlink("keys-v2", tmp_path / "keys.tmp")
            os.rename(tmp_path / "keys.tmp", tmp_path / "keys")
        else:
            os.rename(tmp_path / "keys", tmp_path / "keys-old")
            os.rename(tmp_path / "keys-v2", tmp_path / "keys")
        # The swap itself may take the poll (the directory's name is not watched).
        wait_for(lambda: key_used(g, mock) == (200, f"Bearer {swapped}"), 8, "the new directory was never read")
        # An edit in the directory now served is an edit like any other: seen as one in the
        # first directory is (test_live_reload gives that 2 s).
        (g.keys_dir / "openai.default").write_text(edited + "\n")
        wait_for(lambda: key_used(g, mock) == (200, f"Bearer {edited}"), 2,
                 "an edit in the replaced keys directory was not seen within 2 s (its watch is gone: the 5 s poll only)")
    finally:
        g.stop()


# --- what /metrics says while the config file is refused ------------------------------------


# Failed at 263510d (mended since): while gateway.yaml is refused, a key rotated around it bumps sidegate_config_last_reload_success_timestamp_seconds ("the last valid read") to now, though the config still cannot be read validly (reload.rs keys_around_last_good counts it a successful reload)
def test_a_key_applied_around_a_refused_config_is_no_valid_read(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), wait_ready=False)
    kubelet.write(g.keys_dir, DEFAULT_KEYS)
    g.wait_ready()
    rotated = f"sk-{KEY_MARKER}-around-refused"
    try:
        g.config.write_text(gateway_yaml(mock.url) + "  bogusField: 1\n")
        wait_for(lambda: sample(g, OK) == 0, 5, "the refused config did not read 0")
        last_valid = sample(g, WHEN)
        time.sleep(1.1)
        ok, errors = reload_count(g, "success"), reload_count(g, "error")
        kubelet.write(g.keys_dir, dict(DEFAULT_KEYS, **{"openai.default": rotated}))
        # Applied around the last good config, as README says ...
        wait_for(lambda: key_used(g, mock) == (200, f"Bearer {rotated}"), 5, "the rotated key is not sent")
        assert "config reload rejected" in g.logs()
        # ... but the config file is still refused: no valid read happened since.
        assert sample(g, OK) == 0
        assert sample(g, WHEN) == last_valid, "the last valid read moved though gateway.yaml is still refused"
        # One read, counted once: refused (README, sidegate_config_reloads_total).
        assert (reload_count(g, "success"), reload_count(g, "error")) == (ok, errors + 1)
    finally:
        g.stop()


# --- every listen-independent setting follows a reload, both ways ---------------------------

ROUTE = (
    "  routes:\n"
    "    - name: r\n"
    "      nodes:\n"
    "        - {id: s, type: start, next: m}\n"
    "        - {id: m, type: model, provider: openai, model: gpt-4o-mini, next: e}\n"
    "        - {id: e, type: end}\n"
)


def _post(g, path="/openai/chat/completions", body=None, headers=None):
    return httpx.post(g.url + path, json=body or CHAT, headers=headers or {}, timeout=10)


def _code(r):
    try:
        return (r.status_code, r.json()["error"][0]["code"])
    except (ValueError, KeyError, IndexError, TypeError):
        return (r.status_code, None)


def _logged(g, r, field):
    """Whether the access line of `r` is written (and holds `field`), waiting for the flush."""
    log_id = r.headers["cf-aig-log-id"]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for line in g.logs().splitlines():
            if f" request id={log_id} " in line:
                return field in line
        time.sleep(0.05)
    return False


def _probe_logging(g, mock):
    return not _logged(g, _post(g), "status_code=")


def _probe_payloads(g, mock):
    return _logged(g, _post(g), "request_body=")


def _probe_dlp(g, mock):
    body = {"model": "m", "messages": [{"role": "user", "content": "mail me at jane.doe@example.com"}]}
    return _code(_post(g, body=body)) == (400, 2029)


def _probe_body_limit(g, mock):
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 4096}]}
    return _post(g, body=body).status_code == 413


def _probe_retries(g, mock):
    return _post(g, headers={"x-mock-fail-first": f"1;{uuid.uuid4().hex}"}).status_code == 200


def _probe_rate_limit(g, mock):
    return [_post(g).status_code for _ in range(3)][-1] == 429


def _probe_cache(g, mock):
    body = {"model": "m", "messages": [{"role": "user", "content": f"cache {uuid.uuid4().hex}"}]}
    _post(g, body=body)
    return _post(g, body=body).headers.get("cf-aig-cache-status") == "HIT"


def _probe_timeout(g, mock):
    return _post(g, headers={"x-mock-delay-ms": "1500"}).status_code == 504


def _probe_route(g, mock):
    r = _post(g, "/compat/chat/completions", body={"model": "dynamic/r", "messages": CHAT["messages"]})
    return r.status_code == 200


def _probe_provider(g, mock):
    return _post(g, "/custom-added/v1/chat/completions").status_code == 200


SETTINGS = [
    ("logging off", "  logging: {enabled: false}\n", _probe_logging),
    ("payloads", "  logging: {payloads: true}\n", _probe_payloads),
    ("dlp", "  dlp:\n    policies:\n      - {id: pii, action: BLOCK, check: [REQUEST], profiles: [email]}\n", _probe_dlp),
    ("maxRequestBody", "  limits: {maxRequestBody: 2Ki}\n", _probe_body_limit),
    ("retries", "  retries: {maxAttempts: 2, retryDelay: 10ms, backoff: constant}\n", _probe_retries),
    ("rateLimit", "  rateLimit: {limit: 2, interval: 60s}\n", _probe_rate_limit),
    ("cache", "  cache: {enabled: true}\n", _probe_cache),
    ("requestTimeout", "  requestTimeout: 1s\n", _probe_timeout),
    ("routes", ROUTE, _probe_route),
    ("providers", None, _probe_provider),
]


def test_each_setting_changed_by_a_reload_applies_to_the_next_request_and_is_undone_by_the_next(mock, tmp_path):
    base = gateway_yaml(mock.url)
    added = base.replace("  providers:\n", f"  providers:\n    custom-added: {{baseURL: '{mock.url}/v1', authHeader: x-custom-key}}\n")
    g = Sidegate(tmp_path, base, dict(DEFAULT_KEYS, **{"custom-added.default": f"{KEY_MARKER}-added"}))
    wrong = []
    try:
        for name, spec, probe in SETTINGS:
            for text, want in [(added if spec is None else base + spec, True), (base, False)]:
                before = reload_count(g, "success")
                g.config.write_text(text)
                wait_for(lambda: reload_count(g, "success") > before, 5, f"{name}: reload not seen")
                if probe(g, mock) != want:
                    wrong.append(f"{name} {'set' if want else 'unset'} by a reload does not apply")
    finally:
        g.stop()
    assert wrong == []


# --- requests in flight across a rotation ---------------------------------------------------


def test_a_request_retrying_across_a_key_rotation_keeps_its_key_and_the_next_one_takes_the_new(mock, tmp_path):
    # DESIGN: in-flight requests finish on the snapshot they started with; an attempt after
    # the rotation is still the same request.
    g = Sidegate(tmp_path, gateway_yaml(mock.url), wait_ready=False)
    kubelet.write(g.keys_dir, DEFAULT_KEYS)
    g.wait_ready()
    rotated = f"sk-{KEY_MARKER}-mid-retry"
    tag = uuid.uuid4().hex
    answers = []
    retry = {"x-mock-fail-first": f"1;{tag};500", "cf-aig-max-attempts": "2", "cf-aig-retry-delay": "1500",
             "cf-aig-backoff": "constant"}
    t = threading.Thread(target=lambda: answers.append(_post(g, headers=retry)))
    try:
        wait_for(lambda: key_used(g, mock) == (200, f"Bearer {OPENAI_KEY}"), 5, "keys not loaded")
        before = reload_count(g, "success")
        mock.clear()
        t.start()
        wait_for(lambda: len(mock.requests()) >= 1, 5, "no first attempt")
        kubelet.write(g.keys_dir, dict(DEFAULT_KEYS, **{"openai.default": rotated}))
        wait_for(lambda: reload_count(g, "success") > before, 1, "the rotation was not loaded before the retry")
        t.join(10)
        attempts = [q["headers"].get("authorization") for q in mock.requests() if q["headers"].get("x-mock-fail-first")]
        assert answers and answers[0].status_code == 200
        assert attempts == [f"Bearer {OPENAI_KEY}"] * 2, attempts
        assert key_used(g, mock) == (200, f"Bearer {rotated}")
    finally:
        t.join(10)
        g.stop()


# --- writes caught half-way -----------------------------------------------------------------


# Failed at 263510d (mended since): a config written in place is loaded half-written when any other source changes meanwhile (here a key file written whole): the watcher's wait for the writer's close is dropped by the next event (reload.rs watch: `change = next`), and the half without `authentication` serves unauthenticated requests
def test_a_config_caught_half_written_is_not_installed_when_a_key_changes_meanwhile(mock, tmp_path):
    base = gateway_yaml(mock.url)
    full = base + "  authentication: {enabled: true}\n"
    g = Sidegate(tmp_path, full, dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN}))
    try:
        assert chat_status(g) == 401
        edited = full + "# edited\n"
        with open(g.config, "w") as f:
            f.write(edited[: len(base)])
            f.flush()
            time.sleep(0.2)
            (g.keys_dir / "openai.team-b").write_text(f"sk-{KEY_MARKER}-rotated-meanwhile\n")
            held = stays(lambda: chat_status(g) == 401, 0.8)
            f.write(edited[len(base):])
        assert held, "a half-written config was installed: requests without a token were served"
        wait_for(lambda: chat_status(g, TOKEN_HEADER) == 200 and chat_status(g) == 401, 5, "not back")
    finally:
        g.stop()


# Failed at 263510d (mended since): without a file watcher (the documented polling-only mode) the 5 s poll loads a config caught mid-write (it stats the file and reads it at once: no wait for the writer), so a half-written gateway.yaml is installed (README: "never half-written")
def test_the_poll_alone_does_not_install_a_config_caught_half_written(mock, tmp_path):
    no_inotify = ["unshare", "--user", "--map-root-user", "sh", "-c",
                  'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh"]
    base = gateway_yaml(mock.url)
    full = base + "  authentication: {enabled: true}\n"
    g = Sidegate(tmp_path, full, dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN}), wrapper=no_inotify)
    try:
        wait_for(lambda: "file watching unavailable; polling only" in g.logs(), 5, "the watcher is there")
        assert chat_status(g) == 401
        edited = full + "# edited\n"
        with open(g.config, "w") as f:
            f.write(edited[: len(base)])
            f.flush()
            # Longer than the poll's 5 s: it sees the file mid-write.
            held = stays(lambda: chat_status(g) == 401, 6.0, every=0.1)
            f.write(edited[len(base):])
        assert held, "a half-written config was installed by the poll: requests without a token were served"
    finally:
        g.stop()


# --- key files that cannot be read ----------------------------------------------------------


def _swap_data(d, files, unreadable=()):
    """kubelet's ..data swap of `d` (already projected by `kubelet.write`, the same names) to a
    new timestamped directory holding `files`, those named in `unreadable` with mode 000."""
    stamp = d / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    stamp.chmod(0o755)
    for name, text in files.items():
        (stamp / name).write_text(text)
        (stamp / name).chmod(0 if name in unreadable else 0o644)
    os.symlink(stamp.name, d / "..data_tmp")
    os.rename(d / "..data_tmp", d / "..data")
    return stamp


def test_an_unreadable_key_file_keeps_the_last_good_keys_says_so_and_is_read_again_once_readable(mock):
    # As kubelet would leave it with a wrong defaultMode/fsGroup: the sidecar runs as another user
    # than the files' owner. Its chmod inside the timestamped directory is no event the watcher
    # sees: only the reading again of sources that could not be read picks it up.
    work = tempfile.mkdtemp(prefix="sidegate-r171-")
    os.chmod(work, 0o755)
    g = Sidegate(work, gateway_yaml(mock.url), wait_ready=False,
                 wrapper=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    rotated = f"sk-{KEY_MARKER}-behind-unreadable"
    try:
        kubelet.write(g.keys_dir, DEFAULT_KEYS)
        for p in [g.keys_dir, *g.keys_dir.iterdir()]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        g.wait_ready()
        wait_for(lambda: key_used(g, mock) == (200, f"Bearer {OPENAI_KEY}"), 5, "keys not loaded")
        files = {k: v + "\n" for k, v in dict(DEFAULT_KEYS, **{"openai.default": rotated}).items()}
        stamp = _swap_data(g.keys_dir, files, unreadable={"openai.team-b"})
        g.wait_for_log("could not be read")
        logs = g.logs()
        assert "openai.team-b" in logs and "Permission denied" in logs, logs[-800:]
        assert sample(g, OK) == 0
        # The load failed: the last good keys serve on, the rotation with them (README).
        assert key_used(g, mock) == (200, f"Bearer {OPENAI_KEY}")
        time.sleep(1.0)
        (stamp / "openai.team-b").chmod(0o644)
        wait_for(lambda: key_used(g, mock) == (200, f"Bearer {rotated}"), 8,
                 "the keys were not read again once the file could be read")
        assert sample(g, OK) == 1
        assert KEY_MARKER not in g.logs()
    finally:
        g.stop()
        shutil.rmtree(work, ignore_errors=True)


# --- a stop while a reload waits ------------------------------------------------------------


def test_sigterm_while_the_watcher_waits_for_a_writer_exits_at_once(mock, tmp_path):
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS)
    try:
        with open(g.config, "w") as f:
            f.write(gateway_yaml(mock.url)[:60])
            f.flush()
            time.sleep(0.3)
            stopped = time.monotonic()
            g.proc.send_signal(signal.SIGTERM)
            code = g.proc.wait(10)
            took = time.monotonic() - stopped
            f.write(gateway_yaml(mock.url)[60:])
        assert code == 0 and took < 3, (code, took)
        assert "panicked" not in g.logs()
    finally:
        g.stop()


# --- what a key file holds ------------------------------------------------------------------


# Failed at 263510d (mended since): a key or tokens file saved with a UTF-8 byte order mark (PowerShell 5's `Out-File -Encoding utf8`, which also writes the CRLF that is trimmed) keeps the BOM: it is sent to the provider as part of the key (`Bearer \ufeffsk-...`), and the first token never matches, with no warning (keys.rs KeyStore::load trims whitespace only)
@pytest.mark.parametrize("file", ["key", "token"])
def test_a_byte_order_mark_written_with_a_key_or_token_is_not_part_of_it(mock, tmp_path, file):
    g = Sidegate(tmp_path, gateway_yaml(mock.url, auth=True), dict(DEFAULT_KEYS, **{"authentication.tokens": GATEWAY_TOKEN}))
    bom_key = f"sk-{KEY_MARKER}-after-bom"
    try:
        before = reload_count(g, "success")
        if file == "key":
            (g.keys_dir / "openai.default").write_bytes(f"\ufeff{bom_key}\r\n".encode())
        else:
            (g.keys_dir / "authentication.tokens").write_bytes(f"\ufeff{GATEWAY_TOKEN}\r\n".encode())
        wait_for(lambda: reload_count(g, "success") > before, 5, "the edit was not loaded")
        mock.clear()
        r = _post(g, headers=TOKEN_HEADER)
        if file == "token":
            assert _code(r) != (401, 2009), "the token written after a BOM is refused"
        else:
            sent = mock.last()["headers"]["authorization"]
            assert sent == f"Bearer {bom_key}", f"the key is sent as {sent!r}"
    finally:
        g.stop()

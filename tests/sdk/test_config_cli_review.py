"""Review of gateway.yaml validation and the sidecar's command line as an operator meets them:
schema versions, type errors and what their messages say, YAML features (anchors, merge keys,
multiple documents, alias bombs, deep nesting), null blocks, the 1 MiB bound, huge sizes, secrets
in misplaced fields, the commented example, and flags, ports and the --upstream-ca file at start.

Every config is checked through the binary (`--check`, or a start); nothing here reads the
sources' types directly.
"""

import os
import pathlib
import signal
import socket
import subprocess
import time

import httpx
import pytest

from conftest import DEFAULT_KEYS, Sidegate, binary, free_port, gateway_yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def check_text(tmp_path, text, *extra, name="gateway.yaml", timeout=20):
    """`sidegate --check` of `text` written as a config file (bytes taken as they are)."""
    cfg = tmp_path / name
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text)
    return subprocess.run([binary("sidegate"), "--config", str(cfg), "--check", *extra],
                          capture_output=True, text=True, timeout=timeout)


def sidegate(*args, timeout=20, cwd=None):
    return subprocess.run([binary("sidegate"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# --- schemaVersion ---------------------------------------------------------------------------


# At 7822da8: the file is parsed whole as version 1 (deny_unknown_fields) before
# schemaVersion is compared (config.rs load_with): a version-2 file with anything version 1 does
# not know, as a newer operator renders during a rolling upgrade, is refused as "unknown field
# `secrets`" and the ConfigError::SchemaVersion message meant for it is never seen.
@pytest.mark.parametrize("body", [
    "secrets: {}\n",
    "spec:\n  cache: {enabled: true, evictionPolicy: lfu}\n",
    "spec:\n  requestTimeout: 1.5s\n",
], ids=["new-top-level-field", "new-nested-field", "new-value-form"])
# Failed at 7822da8 (mended since): a schemaVersion 2 file is refused for a field or value v1 does not know, never as an unsupported version
def test_a_newer_schema_version_is_refused_for_its_version_not_for_its_fields(tmp_path, body):
    r = check_text(tmp_path, "schemaVersion: 2\n" + body)
    assert r.returncode == 2, r.stdout
    assert "schemaVersion 2 is not supported" in r.stderr, r.stderr


# --- what parse errors say ---------------------------------------------------------------


def _alias_bomb(levels=7):
    """A spec field whose value is an alias bomb: 10^levels strings from a few hundred bytes."""
    out = ["schemaVersion: 1", "spec:", "  bogus:", '    x0: &a0 ["l","l","l","l","l","l","l","l","l","l"]']
    for i in range(1, levels):
        out.append(f"    x{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(out) + "\n"


# At 7822da8: parse_yaml (config.rs) formats serde-saphyr errors with its default formatter,
# which the crate documents as developer-oriented ("recommendations on how to adjust settings and
# API calls ... should not be user-facing; use UserMessageFormatter"): the operator is told to
# "set DuplicateKeyPolicy in Options", to "use from_str_multiple", to "use Option<String>", or
# shown a Debug struct ("budget breached: Nodes { nodes: 250001 }").
@pytest.mark.parametrize("text,leak", [
    ("schemaVersion: 1\nspec:\n  requestTimeout: 30s\n  requestTimeout: 1s\n", "DuplicateKeyPolicy"),
    ("schemaVersion: 1\n---\nschemaVersion: 1\n", "from_str_multiple"),
    ("schemaVersion: 1\nspec:\n  null: x\n", "Option<String>"),
    (_alias_bomb(), "Nodes {"),
], ids=["duplicate-key", "two-documents", "null-key", "alias-bomb"])
# Failed at 7822da8 (mended since): YAML errors tell the operator to change serde-saphyr options/API calls or print a Debug struct
def test_parse_errors_speak_to_the_operator_not_of_the_librarys_api(tmp_path, text, leak):
    r = check_text(tmp_path, text)
    assert r.returncode == 2, r.stdout
    assert " line " in r.stderr, r.stderr
    assert leak not in r.stderr, r.stderr


# At 7822da8: ByteSize's Deserialize (crds/src/units.rs) goes through `#[serde(untagged)]
# enum Raw`, so a size that is neither a u64 nor a string says "data did not match any variant of
# untagged enum Raw": a Rust type name, and not what a size is (a duration says its forms).
@pytest.mark.parametrize("value", ["-1", "1e6", "10.5", "18446744073709551616"])
# Failed at 7822da8 (mended since): a non-size value of a ByteSize field says "data did not match any variant of untagged enum Raw"
def test_a_size_of_the_wrong_form_says_what_a_size_is(tmp_path, value):
    r = check_text(tmp_path, f"schemaVersion: 1\nspec:\n  limits: {{maxRequestBody: {value}}}\n")
    assert r.returncode == 2, r.stdout
    assert "untagged enum" not in r.stderr, r.stderr
    assert "Ki, Mi, Gi" in r.stderr, r.stderr


# At 7822da8: a value of the wrong type is refused as "invalid u32 at line 3, column 26":
# it names a Rust type, not the field (STYLE.md and config.rs promise errors naming the bad field),
# where validation's own messages do name it (spec.retries.maxAttempts must be between ...).
@pytest.mark.parametrize("spec,field", [
    ("retries: {maxAttempts: three}", "maxAttempts"),
    ("rateLimit: {limit: -5, interval: 60s}", "limit"),
    ("logging: {payloads: maybe}", "payloads"),
])
# Failed at 7822da8 (mended since): a wrong-typed value is refused as "invalid u32"/"invalid boolean" without naming its field
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(tmp_path, spec, field):
    r = check_text(tmp_path, f"schemaVersion: 1\nspec:\n  {spec}\n")
    assert r.returncode == 2, r.stdout
    assert "line 3" in r.stderr, r.stderr
    assert field in r.stderr, r.stderr


# At 7822da8: refuse_unknown_spec_fields (config.rs) finds the field in a serde_json::Value
# of the file, which has no positions: the one parse error without its line and column (a typo
# one level down says "at line 4, column 11").
# Failed at 7822da8 (mended since): an unknown field directly under spec is refused without its line and column
def test_an_unknown_spec_field_is_refused_with_its_line(tmp_path):
    r = check_text(tmp_path, "schemaVersion: 1\ngateway: {name: main}\nspec:\n  requestTimeout: 30s\n"
                             "  authentification: {enabled: true}\n")
    assert r.returncode == 2, r.stdout
    assert "unknown field `authentification`" in r.stderr, r.stderr
    assert "line 5" in r.stderr, r.stderr


# --- null blocks -------------------------------------------------------------------------


# At 7822da8: a block key left with nothing under it (every setting commented out) is a YAML
# null, and GatewayConfig/GatewayPolicy take `#[serde(default)]` for a missing field only: refused
# with "expected mapping start at line 26, column 12". examples/gateway.yaml itself gets there when
# its one provider, custom-ollama, is commented out like the lines above it.
@pytest.mark.parametrize("case", ["spec", "providers", "example-without-ollama"])
# Failed at 7822da8 (mended since): a block key whose settings are all commented out (YAML null) is refused: "expected mapping start"
def test_a_block_whose_settings_are_all_commented_out_loads(tmp_path, case):
    if case == "spec":
        text = "schemaVersion: 1\ngateway: {name: main}\nspec:\n  # requestTimeout: 30s\n"
    elif case == "providers":
        text = "schemaVersion: 1\nspec:\n  requestTimeout: 30s\n  providers:\n    # openai: {baseURL: https://api.openai.com/v1}\n"
    else:
        src = (ROOT / "examples" / "gateway.yaml").read_text()
        ollama = "    custom-ollama:\n      baseURL: http://127.0.0.1:11434/v1\n      format: openai\n"
        assert ollama in src
        text = src.replace(ollama, "".join("    # " + line[4:] + "\n" for line in ollama.splitlines()))
    r = check_text(tmp_path, text)
    assert r.returncode == 0, r.stderr


def test_every_commented_setting_of_the_example_loads_once_uncommented(tmp_path):
    # Passes: the example's commented lines are valid as written.
    src = (ROOT / "examples" / "gateway.yaml").read_text()
    for commented in ["  # pricing:", "  #   - {model", "  # spendLimit:", "    # openai:",
                      "    # azure-openai:", "      # authHeader:"]:
        assert commented in src, commented
        src = src.replace(commented, commented.replace("# ", "", 1))
    r = check_text(tmp_path, src)
    assert r.returncode == 0, r.stderr


# --- YAML features ---------------------------------------------------------------------


def test_alias_bombs_and_deep_nesting_are_refused_quickly(tmp_path):
    # Passes: serde-saphyr's budgets bound what aliases expand to (nodes, scalar bytes) in both
    # parses of the file (typed, and the spec field check), and its recursion limit the nesting.
    big = "A" * 600_000
    cases = {
        "nodes": _alias_bomb(7),
        "scalar-bytes": f'schemaVersion: 1\nkeys:\n  openai: [&s "{big}"' + ", *s" * 25_000 + "]\n",
        "nested-in-spec": f'schemaVersion: 1\nspec:\n  bogus:\n    s: &s "{big}"\n    l1: &l1 [' +
                          ",".join(["*s"] * 10) + "]\n" + "".join(
                              f"    l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(2, 6)),
        "deep": "schemaVersion: 1\nspec:\n  bogus: " + "[" * 5000 + "]" * 5000 + "\n",
    }
    for name, text in cases.items():
        assert len(text) <= 1 << 20, name
        started = time.monotonic()
        r = check_text(tmp_path, text, name=f"{name}.yaml", timeout=30)
        took = time.monotonic() - started
        assert r.returncode == 2, (name, r.stdout)
        assert "panicked" not in r.stderr, (name, r.stderr)
        assert took < 10, f"{name}: {took:.1f}s"


def test_anchors_and_merge_keys_apply_as_yaml_says(mock, tmp_path, refusing_port):
    # Passes: a merge key's own keys win over the merged mapping's, and an alias is the anchored
    # value: groq reaches the mock through the baseURL written beside `<<`, not openai's.
    text = ("schemaVersion: 1\ngateway: {name: main}\nspec:\n"
            f"  retries: &r {{maxAttempts: 1}}\n"
            "  providers:\n"
            f"    openai: &dead {{baseURL: '{refusing_port.url}/v1'}}\n"
            "    groq:\n      <<: *dead\n"
            f"      baseURL: '{mock.url}/openai/v1'\n")
    g = Sidegate(tmp_path, text, DEFAULT_KEYS)
    try:
        # No groq key is stored: the application's own key goes through.
        r = httpx.post(g.url + "/groq/chat/completions", json=CHAT, timeout=10,
                       headers={"authorization": "Bearer app-own-groq-key"})
        assert r.status_code == 200, r.text
        assert mock.last()["path"] == "/openai/v1/chat/completions"
        r = httpx.post(g.url + "/openai/chat/completions", json=CHAT, timeout=10)
        assert r.status_code == 502 and r.json()["error"][0]["code"] == 2104, r.text
    finally:
        g.stop()


@pytest.mark.parametrize("value,ok", [
    ("500ms", True), ("30s", True), ("5m", True), ("1h", True), ("7d", True),
    ("1.5s", False), ("30S", False), ("1m30s", False), ('"-1s"', False), ("30", False),
    ("18446744073709551616ms", False), ("5min", False), ("0s", False),
])
def test_durations_in_each_documented_unit(tmp_path, value, ok):
    # Passes: the README's forms load; others are refused naming the field's line and the forms.
    r = check_text(tmp_path, f"schemaVersion: 1\nspec:\n  requestTimeout: {value}\n")
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    if not ok:
        assert "requestTimeout" in r.stderr or ("line 3" in r.stderr and "ms, s, m, h or d" in r.stderr), r.stderr


def test_a_config_file_is_read_up_to_1_mib(tmp_path):
    # Passes: a file of exactly 1 MiB loads; one byte more is refused naming the bound.
    head = "schemaVersion: 1\n"
    pad = (1 << 20) - len(head) - 1
    r = check_text(tmp_path, head + "#" * pad + "\n", name="full.yaml")
    assert r.returncode == 0, r.stderr
    r = check_text(tmp_path, head + "#" * (pad + 1) + "\n", name="over.yaml")
    assert r.returncode == 2 and "larger than 1 MiB" in r.stderr, r.stderr


def test_secrets_written_in_the_wrong_place_are_not_repeated(tmp_path):
    # Passes: values refused by type or as unknown fields are named by field and line only.
    secret = "sk-proj-REVIEWs3cr3t"
    for text in [
        f"schemaVersion: 1\nkeys:\n  openai: {secret}\n",
        f"schemaVersion: 1\nkeys:\n  openai: {{default: {secret}}}\n",
        f"schemaVersion: 1\nspec:\n  authentication: {{enabled: true, tokens: [{secret}]}}\n",
        f"schemaVersion: 1\nspec:\n  redis: {{url: 'redis://:{secret}@127.0.0.1:6379/0'}}\n",
        f"schemaVersion: 1\nspec:\n  providers:\n    openai: {{apiKey: {secret}}}\n",
        f"schemaVersion: 1\nspec:\n  providers:\n    openai: {secret}\n",
    ]:
        r = check_text(tmp_path, text)
        assert r.returncode == 2, text
        assert "REVIEWs3cr3t" not in r.stdout + r.stderr, r.stderr
    keys = tmp_path / "keys"
    keys.mkdir()
    for url in [f"redis://:{secret}@127.0.0.1:notaport/0", f"http://u:{secret}@127.0.0.1:6379/0"]:
        (keys / "redis.url").write_text(url)
        r = check_text(tmp_path, "schemaVersion: 1\ngateway: {name: main}\nspec:\n  redis: {}\n",
                       "--keys-dir", str(keys))
        assert r.returncode == 2 and "redis.url" in r.stderr, r.stderr
        assert "REVIEWs3cr3t" not in r.stdout + r.stderr, r.stderr


# --- provider base URLs --------------------------------------------------------------------


# At 7822da8: base_url_problem (crds/src/validation.rs) accepts any of the four
# placeholders in any provider's baseURL, but only azure-openai ({resource}, {deployment}),
# aws-bedrock and google-vertex-ai ({region}) and workers-ai ({account}) fill them: openai's
# requests go upstream to the literal path "/{deployment}/v1/chat/completions".
# Failed at 7822da8 (mended since): openai's baseURL with {deployment} loads, and the literal placeholder is sent upstream
def test_a_base_url_placeholder_its_provider_never_fills_is_refused_at_load(tmp_path):
    r = check_text(tmp_path, "schemaVersion: 1\nspec:\n  providers:\n"
                             "    openai: {baseURL: 'https://gw.example.com/{deployment}/v1'}\n")
    assert r.returncode == 2, r.stdout
    assert "spec.providers.openai" in r.stderr and "{deployment}" in r.stderr, r.stderr


# --- sizes -----------------------------------------------------------------------------


# At 7822da8: hold_whole (sidecar/src/body.rs) reserves a body's declared Content-Length
# up front, bounded only by maxRequestBody, which has no upper bound (a 9-digit `Gi` is valid in
# an AIGateway too): one request declaring 500 TB aborts the sidecar ("memory allocation of
# 500000000000000 bytes failed", SIGABRT), cutting every stream of the pod.
# Failed at 7822da8 (mended since): maxRequestBody 999999999Gi + Content-Length 500 TB aborted the sidecar (allocation failure, SIGABRT)
# Mended both ways: maxRequestBody is at most 1Gi (refused at load, and by the operator), and a
# declared length is allocated up front only up to 8 MiB (the rest as bytes arrive), so a body
# declaring nearly 1Gi within the largest limit takes no gigabyte of address space either.
def _vm_size_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1])
    raise AssertionError("no VmSize")


def test_a_huge_declared_body_does_not_abort_the_sidecar(mock, tmp_path):
    r = check_text(tmp_path, "schemaVersion: 1\nspec:\n  limits: {maxRequestBody: 999999999Gi}\n")
    assert r.returncode == 2, r.stdout
    assert "spec.limits.maxRequestBody" in r.stderr and "at most 1Gi" in r.stderr, r.stderr
    g = Sidegate(tmp_path, gateway_yaml(mock.url, extra_spec="  limits: {maxRequestBody: 1Gi}\n"),
                 DEFAULT_KEYS)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    try:
        before = _vm_size_kib(g.proc.pid)
        s.sendall(b"POST /openai/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                  b"content-type: application/json\r\ncontent-length: 1000000000\r\n\r\n{\"model\":")
        time.sleep(0.3)
        s.sendall(b'"gpt-4o-mini",')
        time.sleep(1)
        assert g.proc.poll() is None, f"the sidecar died ({g.proc.returncode}): {g.logs()[-400:]}"
        grown = _vm_size_kib(g.proc.pid) - before
        assert grown < 256 << 10, f"address space grew by {grown} KiB for 23 bytes of a body"
        assert httpx.get(g.admin + "/healthz", timeout=2).status_code == 200
    finally:
        s.close()
        g.stop()


# --- the command line ------------------------------------------------------------------


def test_version_unknown_flags_and_bad_values(tmp_path):
    # Passes: --version prints the version (exit 0); an unknown flag or a bad value is named with
    # the accepted range, exit 2, before anything else runs.
    v = sidegate("--version")
    assert v.returncode == 0 and v.stdout.startswith("sidegate ") and v.stdout.split()[1][0].isdigit(), v
    (tmp_path / "gateway.yaml").write_text("schemaVersion: 1\n")
    for args, needle in [
        (["--bogus"], "'--bogus'"),
        (["--threads", "0"], "1..=64"),
        (["--client-timeout", "0"], "1..=3600"),
        (["--max-connections", "0"], "1..=1000000"),
        (["--shutdown-delay", "3601"], "0..=3600"),
        (["--listen", "localhost:8787"], "--listen"),
        (["--log-format", "yaml"], "text, json"),
    ]:
        r = sidegate("--config", "gateway.yaml", *args, "--check", cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)
    r = sidegate("--check", cwd=tmp_path)
    assert r.returncode == 2 and "--config" in r.stderr, r.stderr


def test_a_port_in_use_is_named_and_exits_2(tmp_path):
    # Passes: another listener on --listen or --admin is said, naming the address, and the
    # sidecar exits 2 at once instead of running without one of its ports.
    (tmp_path / "gateway.yaml").write_text("schemaVersion: 1\n")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = f"127.0.0.1:{held.getsockname()[1]}"
    try:
        for args in (["--listen", taken, "--admin", f"127.0.0.1:{free_port()}"],
                     ["--listen", f"127.0.0.1:{free_port()}", "--admin", taken]):
            r = sidegate("--config", "gateway.yaml", *args, cwd=tmp_path, timeout=10)
            assert r.returncode == 2, r.stderr
            assert taken in r.stderr and "in use" in r.stderr, r.stderr
    finally:
        held.close()


# At 7822da8: with --listen and --admin the same address the second bind fails and
# server::bind says "another process listens there (in a pod, another of its containers)": the
# only listener there is the sidecar's own gateway port; the two flags are never compared.
# Failed at 7822da8 (mended since): --listen and --admin on one address: the error blamed "another process"
def test_the_same_address_for_listen_and_admin_is_not_blamed_on_another_process(tmp_path):
    (tmp_path / "gateway.yaml").write_text("schemaVersion: 1\n")
    addr = f"127.0.0.1:{free_port()}"
    r = sidegate("--config", "gateway.yaml", "--listen", addr, "--admin", addr, cwd=tmp_path, timeout=10)
    assert r.returncode == 2, r.stderr
    assert "another process" not in r.stderr, r.stderr
    assert addr in r.stderr, r.stderr


# At 7822da8: read_certs (main.rs) opens the --upstream-ca path as it is (pem_file_iter):
# a FIFO with no writer blocks --check (and a start, before it listens) forever, as the config
# FIFO did before read_config checked for a regular file; /dev/zero is read until memory runs out.
# Failed at 7822da8 (mended since): --check (and a start) with a FIFO as --upstream-ca blocks forever
def test_check_of_an_upstream_ca_that_is_a_fifo_does_not_hang(tmp_path):
    (tmp_path / "gateway.yaml").write_text("schemaVersion: 1\n")
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    try:
        r = sidegate("--config", "gateway.yaml", "--upstream-ca", str(fifo), "--check", cwd=tmp_path, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("--check with a FIFO as --upstream-ca still running after 10 s")
    assert r.returncode == 2 and "--upstream-ca" in r.stderr, r.stderr
    # Nor is a device read until memory runs out.
    r = sidegate("--config", "gateway.yaml", "--upstream-ca", "/dev/zero", "--check", cwd=tmp_path, timeout=10)
    assert r.returncode == 2 and "--upstream-ca" in r.stderr and "not a regular file" in r.stderr, r.stderr


def test_a_single_sigint_drains_and_exits_0(mock, tmp_path):
    # Passes: Ctrl-C once is the drain SIGTERM starts (in-flight stream finished), then exit 0.
    g = Sidegate(tmp_path, gateway_yaml(mock.url), DEFAULT_KEYS, extra_args=["--shutdown-grace", "10"])
    try:
        body = dict(CHAT, stream=True)
        with httpx.stream("POST", g.url + "/openai/chat/completions", json=body, timeout=20,
                          headers={"x-mock-chunk-delay-ms": "200"}) as r:
            chunks = r.iter_raw()
            received = next(chunks)
            g.proc.send_signal(signal.SIGINT)
            received += b"".join(chunks)
        assert b"data: [DONE]" in received
        assert g.proc.wait(10) == 0
        assert "signal received" in g.logs() and "SIGINT" in g.logs()
    finally:
        g.stop()

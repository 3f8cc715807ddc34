#!/usr/bin/env bash
# The standalone sidecar demo (./demo.sh --standalone): no cloud keys, no cluster. Builds the sidecar and a local mock provider,
# starts the sidecar from examples/demo-gateway.yaml, and sends it real requests, printing the
# responses and the gateway's response headers. Cleans up everything it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/e2e/demo-output.sh
source tests/e2e/demo-output.sh

say "building sidegate and the mock provider (first build takes a few minutes)"
cargo build --quiet -p sidegate -p sidegate-mock-provider
bin=target/debug
work=$(mktemp -d /tmp/sidegate-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# two_ports: prints two distinct free loopback ports from below the ephemeral range (tests/ports.py).
two_ports() { python3 tests/ports.py 2 | paste -sd " "; }

say "starting a mock LLM provider (OpenAI and Anthropic wire formats) on loopback"
"$bin/mock-provider" --listen 127.0.0.1:0 >"$work/mock.out" 2>"$work/mock.log" &
pids+=($!)
for _ in $(seq 50); do grep -q listening "$work/mock.out" && break; sleep 0.1; done
mock=http://$(awk '/listening on/{print $3}' "$work/mock.out")
echo "mock provider at $mock"

say "keys directory: one file per key, <provider>.<alias> (as mounted from the operator's Secret)"
mkdir -p "$work/keys"
echo "sk-demo-openai-default" >"$work/keys/openai.default"
echo "sk-demo-openai-team-b" >"$work/keys/openai.team-b"
echo "sk-ant-demo-default" >"$work/keys/anthropic.default"
echo "demo-gateway-token" >"$work/keys/authentication.tokens"
ls "$work/keys"
sed "s#MOCK_URL#$mock#g" examples/demo-gateway.yaml >"$work/gateway.yaml"

read -r port admin < <(two_ports)
say "starting sidegate on 127.0.0.1:$port (admin 127.0.0.1:$admin)"
"$bin/sidegate" --config "$work/gateway.yaml" --keys-dir "$work/keys" \
  --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" 2>"$work/sidegate.log" &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
gw=http://127.0.0.1:$port
auth=(-H "cf-aig-authorization: Bearer demo-gateway-token")
json=(-H "content-type: application/json")
received() { curl -s "$mock/__mock/requests" | python3 -c '
import json, sys
r = json.load(sys.stdin)[-1]
h = r["headers"]
key = h.get("authorization") or h.get("x-api-key") or ""
fwd = [k for k in h if k.startswith("cf-aig-")]
print("   provider received", r["method"], r["path"], "with key", key[:10] + "…" + key[-8:] + ";", "cf-aig-* headers forwarded:", fwd)'; }

say "OpenAI chat completion through the gateway (the app sends a placeholder key; the gateway injects the stored one)"
run curl -s -i "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" -H "authorization: Bearer placeholder" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello sidegate"}]}'
received

say "Anthropic message, Cloudflare long-form URL"
run curl -s -i "$gw/v1/my-account/demo/anthropic/v1/messages" "${auth[@]}" "${json[@]}" \
  -d '{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi Claude"}]}'
received

say "streaming (SSE passes through as the provider sends it)"
run curl -s -N "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" \
  -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream three words"}]}'

say "BYOK alias: cf-aig-byok-alias picks another stored key"
run curl -s -o /dev/null -w 'status %{http_code}\n' "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" \
  -H "cf-aig-byok-alias: team-b" -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"b"}]}'
received

say "errors made by the gateway use the Cloudflare envelope"
run curl -s -i "$gw/openai/chat/completions" "${json[@]}" -d '{}'
run curl -s "$gw/openai/chat/completions" "${auth[@]}" -H "cf-aig-byok-alias: nobody" "${json[@]}" -d '{}'
say "provider errors pass through unchanged"
run curl -s -i "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" \
  -d '{"model":"mock-status-429","messages":[{"role":"user","content":"x"}]}'

say "key rotation, live: kubelet-style atomic swap of the keys directory"
echo "sk-demo-openai-ROTATED" >"$work/keys/openai.default.new" && mv "$work/keys/openai.default.new" "$work/keys/openai.default"
sleep 0.3
curl -s -o /dev/null "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" -d '{"model":"m","messages":[{"role":"user","content":"r"}]}'
received

say "metrics on the admin port"
curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^sidegate_(requests_total|config_reloads_total|config_info)'

say "sidegate's log (note: no key appears)"
tail -n 8 "$work/sidegate.log"
echo
echo "demo done; stopping the mock provider and sidegate."

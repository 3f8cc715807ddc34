#!/usr/bin/env bash
# sidegate demo: the whole system on one machine, no cloud keys, no container engine.
#
#   a real Kubernetes control plane (kube-apiserver, etcd, kube-controller-manager from
#   tests/cluster, on loopback) -> the CRDs -> sidegate-operator -> the sample ProviderKeys and
#   AIGateway of examples/kubernetes/ -> the operator renders ConfigMap + Secret -> a stand-in
#   kubelet (tests/e2e/kubelet-sync) projects them into directories exactly as kubelet does ->
#   the sidegate sidecar serves real requests to a local mock provider -> a key rotated in the
#   Secret reaches the provider without a restart.
#
# The injection webhook is real too: the apiserver calls it for an annotated pod, and the sidecar
# runs with the args of the container it injected. Prints what a user should see, and stops
# everything it started (also on Ctrl-C).
#   ./demo.sh                 the whole system
#   ./demo.sh --standalone    just the sidecar from a YAML file (no Kubernetes)
#   ./demo.sh --node          a local cluster with a real node (kubelet + containerd; needs
#                             root), the chart installed from the local images, left running
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)
case ${1:-} in
  '' | --standalone | --node) ;;
  -h | --help)
    sed -n '14,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "demo.sh: unknown argument: $1 (one of --standalone, --node, or none; --help)" >&2
    exit 2
    ;;
esac
[[ ${1:-} == --standalone ]] && exec tests/e2e/standalone-demo.sh
if [[ ${1:-} == --node ]]; then
  echo "building the static binaries the images carry (tests/e2e/static-binaries), then the node" >&2
  tests/e2e/static-binaries >&2
  tests/cluster/build >/dev/null
  tests/node/build >/dev/null
  exec tests/node/local-cluster
fi
# shellcheck source=tests/e2e/demo-output.sh
source tests/e2e/demo-output.sh

work=$(mktemp -d /tmp/sidegate-demo.XXXXXX)
pids=()
cluster_dir=
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -z $cluster_dir && -s $work/kubeconfig.path ]]; then
    cluster_dir=$(dirname "$(cat "$work/kubeconfig.path")")
  fi
  if [[ -n $cluster_dir ]]; then tests/cluster/down "$cluster_dir" >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # tries command...: retries for 30 s
  local i
  for ((i = 0; i < 150; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

say "1/9 building sidegate, sidegate-operator and the mock provider (first build: several minutes)"
cargo build -p sidegate -p sidegate-operator -p sidegate-mock-provider 2>&1 |
  grep -E --line-buffered '^ *(Compiling|Finished|error|warning: unused)' | sed -u 's/^ */   /' || true
bin=$root/target/debug
for b in sidegate sidegate-operator mock-provider; do [[ -x $bin/$b ]] || die "cargo build did not produce $b"; done

say "2/9 starting a Kubernetes control plane on loopback (tests/cluster; first run builds it from Go modules, ~10-25 min)"
# up prints the kubeconfig path; written to a file so that cleanup finds the cluster even when
# a signal arrives before this script has read it.
tests/cluster/up >"$work/kubeconfig.path" 2> >(sed -u 's/^/   /' >&2) || die "the control plane did not start"
kubeconfig=$(cat "$work/kubeconfig.path")
cluster_dir=$(dirname "$kubeconfig")
# shellcheck source=/dev/null
source "$cluster_dir/env" # KUBECONFIG, and PATH with the test bed's kubectl first
run kubectl get --raw /version

say "3/9 installing the CRDs (AIGateway, ProviderKey)"
run kubectl apply --server-side -f charts/sidegate/crds/
kubectl wait --for=condition=Established --timeout=30s crd/aigateways.sidegate.dev crd/providerkeys.sidegate.dev >/dev/null
kubectl create namespace sidegate-system >/dev/null
kubectl create namespace team-a >/dev/null

say "4/9 starting sidegate-operator: controllers, and the injection webhook registered with the apiserver"
op_admin=$(free_port) webhook_port=$(free_port)
# The chart's MutatingWebhookConfiguration, pointed at the operator on loopback (in a cluster it
# names the webhook Service). The operator fills in caBundle itself (self-managed certificates).
helm template sidegate charts/sidegate --namespace sidegate-system --show-only templates/mutatingwebhook.yaml |
  kubectl create --dry-run=client -o json -f - |
  python3 -c '
import json, sys
c = json.load(sys.stdin)
c["metadata"]["name"] = "sidegate-demo"
c["webhooks"][0]["clientConfig"] = {"url": "https://127.0.0.1:" + sys.argv[1] + "/mutate"}
print(json.dumps(c))' "$webhook_port" >"$work/webhook.json"
run kubectl apply -f "$work/webhook.json"
"$bin/sidegate-operator" run --admin-addr "127.0.0.1:$op_admin" --leader-elect=false \
  --webhook=true --webhook-bind 127.0.0.1 --webhook-port "$webhook_port" --cert-mode self-managed \
  --webhook-config-name sidegate-demo --webhook-extra-name 127.0.0.1 \
  --sidecar-image ghcr.io/sidegate/sidegate:0.1.0 >"$work/operator.log" 2>&1 &
pids+=($!)
wait_for curl -sf "http://127.0.0.1:$op_admin/readyz" || { tail "$work/operator.log"; die "operator not ready"; }
has_ca() { [[ -n $(kubectl get mutatingwebhookconfiguration sidegate-demo -o jsonpath='{.webhooks[0].clientConfig.caBundle}') ]]; }
wait_for has_ca || { tail "$work/operator.log"; die "the operator did not patch caBundle"; }
note "operator ready (admin 127.0.0.1:$op_admin); webhook on https://127.0.0.1:$webhook_port, caBundle patched by the operator"

say "5/9 starting a mock LLM provider (OpenAI and Anthropic wire formats) on loopback"
"$bin/mock-provider" --listen 127.0.0.1:0 >"$work/mock.out" 2>"$work/mock.log" &
pids+=($!)
wait_for grep -q listening "$work/mock.out" || die "mock provider did not start"
mock=http://$(awk '/listening on/{print $3}' "$work/mock.out")
note "mock provider at $mock"

say "6/9 applying the sample ProviderKeys and AIGateway from examples/kubernetes/"
run kubectl apply -f examples/kubernetes/providerkeys.yaml
sed "s#MOCK_URL#$mock#g" examples/kubernetes/aigateway.yaml >"$work/aigateway.yaml"
note "(examples/kubernetes/aigateway.yaml with MOCK_URL -> $mock)"
run kubectl apply -f "$work/aigateway.yaml"
kubectl -n team-a wait --for=condition=Ready --timeout=60s aigateway/main >/dev/null ||
  { kubectl -n team-a get aigw main -o yaml; tail -20 "$work/operator.log"; die "AIGateway not Ready"; }
run kubectl -n team-a get aigw
printf '$ kubectl -n team-a get aigw main -o jsonpath={.status.conditions}\n'
kubectl -n team-a get aigw main -o json | python3 -c '
import json, sys
for c in json.load(sys.stdin)["status"]["conditions"]:
    print("   %-15s %-6s %-14s %s" % (c["type"], c["status"], c["reason"], c.get("message", "")))'
echo
run kubectl -n team-a get configmap,secret -l app.kubernetes.io/managed-by=sidegate-operator

say "7/9 a pod annotated sidegate.dev/gateway=main: the apiserver calls the webhook, which adds the sidecar"
cat >"$work/pod.yaml" <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: app
  namespace: team-a
  annotations:
    sidegate.dev/gateway: main
spec:
  containers:
    - name: app
      image: python:3.13-slim
      command: ["python", "-c", "from openai import OpenAI; print(OpenAI().models.list())"]
EOF
run kubectl apply -f "$work/pod.yaml"
kubectl -n team-a get pod app -o json >"$work/pod.json"
python3 - "$work/pod.json" <<'EOF' || die "the pod was not injected (see the operator log)"
import json, sys
pod = json.load(open(sys.argv[1]))
side = [c for c in pod["spec"].get("initContainers", []) if c["name"] == "sidegate"]
if not side:
    sys.exit(1)
c = side[0]
print("   pod team-a/app as stored by the apiserver:")
print("   annotation sidegate.dev/injected:", pod["metadata"]["annotations"].get("sidegate.dev/injected"))
print("   initContainers[sidegate]: image", c["image"], "| restartPolicy", c.get("restartPolicy"), "(native sidecar)")
print("     args:", " ".join(c["args"]))
print("     mounts:", ", ".join(m["mountPath"] for m in c["volumeMounts"]), "| runAsNonRoot", c["securityContext"].get("runAsNonRoot"),
      "| readOnlyRootFilesystem", c["securityContext"].get("readOnlyRootFilesystem"))
print("   volumes:", ", ".join(v["name"] + " <- " + (v.get("configMap") or v.get("secret"))
      .get("name", (v.get("secret") or {}).get("secretName", "")) for v in pod["spec"]["volumes"] if v["name"].startswith("sidegate")))
app = pod["spec"]["containers"][0]
print("   containers[app] env:", ", ".join(e["name"] + "=" + e.get("value", "") for e in app.get("env", [])))
EOF
echo
note "No kubelet runs pods here, so this script plays kubelet for the sidecar: it projects the"
note "pod's volumes (tests/e2e/kubelet-sync, kubelet's atomic ..data swap) and runs the injected"
note "container's args, with /etc/sidegate mapped to a temp dir and the ports to free loopback ones."
mkdir -p "$work/pod"
tests/e2e/kubelet-sync --namespace team-a --gateway main "$work/pod/config" "$work/pod/keys" \
  >"$work/kubelet.log" 2>&1 &
pids+=($!)
wait_for test -e "$work/pod/keys/openai.default" || die "kubelet-sync did not project the volumes"
run ls -la "$work/pod/keys"
port=$(free_port) admin=$(free_port)
mapfile -t sidecar_args < <(python3 -c '
import json, sys
pod = json.load(open(sys.argv[1]))
c = next(c for c in pod["spec"]["initContainers"] if c["name"] == "sidegate")
for a in c["args"]:
    a = "text" if a == "json" else a  # --log-format: readable here
    print(a.replace("/etc/sidegate", sys.argv[2]).replace("127.0.0.1:8787", "127.0.0.1:" + sys.argv[3])
           .replace("[::]:8788", "127.0.0.1:" + sys.argv[4]))' \
  "$work/pod.json" "$work/pod" "$port" "$admin")
printf '$ sidegate'; printf ' %s' "${sidecar_args[@]}"; echo
"$bin/sidegate" "${sidecar_args[@]}" 2>"$work/sidegate.log" &
pids+=($!)
wait_for curl -sf "http://127.0.0.1:$admin/readyz" || { tail "$work/sidegate.log"; die "sidecar not ready"; }
note "sidecar ready on 127.0.0.1:$port (in the pod: 127.0.0.1:8787, the app's OPENAI_BASE_URL)"

gw=http://127.0.0.1:$port
auth=(-H "cf-aig-authorization: Bearer demo-gateway-token")
json=(-H "content-type: application/json")
received() { curl -s "$mock/__mock/requests" | python3 -c '
import json, sys
r = json.load(sys.stdin)[-1]
h = r["headers"]
key = h.get("authorization") or h.get("x-api-key") or ""
print("   provider received", r["method"], r["path"], "with key", repr(key.removeprefix("Bearer ")) + ";",
      "cf-aig-* forwarded:", [k for k in h if k.startswith("cf-aig-")])'; }
chat() { curl -s -o /dev/null -w '   status %{http_code}\n' "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" "$@" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'; }

say "8/9 real requests through the sidecar"
note "OpenAI chat completion: the app sends a placeholder key; the gateway injects the one from Secret llm-keys"
run curl -s -i "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" -H "authorization: Bearer sidegate-managed" \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello from team-a"}]}'
received
note "Anthropic Messages, Cloudflare long-form URL (gateway id = the AIGateway's name)"
run curl -s -i "$gw/v1/acct/main/anthropic/v1/messages" "${auth[@]}" "${json[@]}" \
  -d '{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi Claude"}]}'
received
note "BYOK alias: ProviderKey openai-team-b, chosen with cf-aig-byok-alias"
chat -H "cf-aig-byok-alias: team-b"
received
note "no gateway token: the gateway answers in Cloudflare's envelope"
run curl -s "$gw/openai/chat/completions" "${json[@]}" -d '{}'
note "response cache: turn on spec.cache; the operator re-renders, the stand-in kubelet projects, the sidecar reloads"
run kubectl -n team-a patch aigw main --type merge -p '{"spec":{"cache":{"enabled":true,"ttl":"5m"}}}'
cache_on() {
  curl -s -D - -o /dev/null "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" -H 'cf-aig-skip-cache: true' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"is the cache on?"}]}' | grep -qi '^cf-aig-cache-status:'
}
wait_for cache_on || die "the sidecar never loaded the config with the cache on"
note "the same question twice: the provider answers the first (MISS), the sidecar's memory the second (HIT)"
question='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"What is a sidecar?"}]}'
for _ in 1 2; do
  curl -s -D - -o /dev/null "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" -d "$question" |
    grep -i -E '^(HTTP/|cf-aig-cache-status|cf-aig-log-id)' | tr -d '\r' | sed 's/^/   /'
done
asked=$(curl -s "$mock/__mock/requests" | python3 -c '
import json, sys
print(sum("What is a sidecar?" in (r.get("body") or "") for r in json.load(sys.stdin)))')
echo "   the provider saw $asked request(s) for the 2 answers (cache HIT)"
[[ $asked == 1 ]] || die "expected the second answer from the cache"
run kubectl -n team-a patch aigw main --type json -p '[{"op":"remove","path":"/spec/cache"}]'

say "9/9 rotating a key: patch Secret llm-keys; operator re-renders, kubelet projects, sidecar reloads"
hash_before=$(kubectl -n team-a get aigw main -o jsonpath='{.status.configHash}')
started=$(date +%s.%N)
run kubectl -n team-a patch secret llm-keys --type merge -p '{"stringData":{"openai":"sk-demo-openai-v2-ROTATED"}}'
rotated() {
  curl -s -o /dev/null "$gw/openai/chat/completions" "${auth[@]}" "${json[@]}" -H 'cf-aig-skip-cache: true' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"after rotation"}]}'
  curl -s "$mock/__mock/requests" | grep -q 'v2-ROTATED'
}
wait_for rotated || die "the rotated key never reached the provider"
note "the provider saw the new key $(python3 -c "import time; print(f'{time.time() - $started:.1f}')") s after the patch, no restart:"
received
hash_after=$(kubectl -n team-a get aigw main -o jsonpath='{.status.configHash}')
note "configHash ${hash_before:7:12}… -> ${hash_after:7:12}…"
run kubectl -n team-a get aigw
kubectl -n team-a get events --field-selector involvedObject.kind=AIGateway \
  -o custom-columns=REASON:.reason,MESSAGE:.message 2>/dev/null | sed 's/^/   /' | tail -5 || true
echo
printf '$ curl -s 127.0.0.1:%s/metrics | grep ...\n' "$admin"
curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^sidegate_(requests_total|config_reloads_total|config_info)' | sed 's/^/   /'

say "logs (no provider key appears in them)"
note "operator:"; tail -n 4 "$work/operator.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | sed 's/^/   /'
note "kubelet-sync:"; sed 's/^/   /' "$work/kubelet.log" | tail -n 4
note "sidecar:"; tail -n 4 "$work/sidegate.log" | cut -c1-200 | sed 's/^/   /'
for secret in sk-demo-openai-v1 sk-demo-openai-v2-ROTATED sk-demo-openai-team-b sk-ant-demo-v1; do
  if grep -q -- "$secret" "$work"/*.log; then die "key $secret found in a log"; fi
done
echo
echo "demo done: stopping the sidecar, kubelet-sync, mock provider, operator and the control plane."

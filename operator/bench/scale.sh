#!/usr/bin/env bash
# Scale check of sidegate-operator: 200 AIGateways x 5 ProviderKeys.
#
#   tests/cluster/with-cluster operator/bench/scale.sh
#
# Creates 10 namespaces x 20 gateways; each gateway selects its own 5 ProviderKeys (label gw=<name>)
# backed by one Secret with 5 keys (1000 ProviderKeys, 200 Secrets). Everything is created first,
# then the operator (release build, no leader election) is started and timed until every gateway
# reports Ready=True; then all 200 key Secrets are rotated and timed until every gateway's keys
# Secret holds the new value. Reports converge times, operator RSS (now and peak) and the writes
# it made in a 20 s steady state afterwards (expected 0). Not a timed test: prints figures.
set -euo pipefail

NAMESPACES=${NAMESPACES:-10}
GATEWAYS_PER_NS=${GATEWAYS_PER_NS:-20}
KEYS_PER_GATEWAY=${KEYS_PER_GATEWAY:-5}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${KUBECONFIG:?run under tests/cluster/with-cluster (KUBECONFIG not set)}"
log() { printf '[scale] %s\n' "$*" >&2; }

BIN=${OPERATOR_BIN:-}
if [[ -z $BIN ]]; then
  log "building sidegate-operator (release)"
  (cd "$ROOT" && cargo build --release -q -p sidegate-operator)
  BIN=$ROOT/target/release/sidegate-operator
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sidegate-scale.XXXXXX")
OP_PID=
cleanup() {
  [[ -n $OP_PID ]] && kill "$OP_PID" 2>/dev/null && wait "$OP_PID" 2>/dev/null || true
  for ((n = 0; n < NAMESPACES; n++)); do kubectl delete namespace "scale-$n" --wait=false >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

kubectl apply --server-side --force-conflicts -f "$ROOT/crds/manifests/" >/dev/null
kubectl wait --for condition=established --timeout=60s crd/aigateways.sidegate.dev crd/providerkeys.sidegate.dev >/dev/null

total=$((NAMESPACES * GATEWAYS_PER_NS))
log "creating $total gateways, $((total * KEYS_PER_GATEWAY)) ProviderKeys, $total Secrets"
providers=(openai anthropic groq mistral deepseek grok cohere openrouter)
for ((n = 0; n < NAMESPACES; n++)); do
  f=$WORK/ns-$n.yaml
  printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: scale-%d}\n' "$n" >"$f"
  for ((g = 0; g < GATEWAYS_PER_NS; g++)); do
    gw=gw-$g
    {
      printf -- '---\napiVersion: v1\nkind: Secret\nmetadata: {name: keys-%s, namespace: scale-%d}\nstringData:\n' "$gw" "$n"
      for ((k = 0; k < KEYS_PER_GATEWAY; k++)); do printf '  k%d: sk-v1-%d-%s-%d\n' "$k" "$n" "$gw" "$k"; done
      for ((k = 0; k < KEYS_PER_GATEWAY; k++)); do
        p=${providers[$((k % ${#providers[@]}))]}
        printf -- '---\napiVersion: sidegate.dev/v1alpha1\nkind: ProviderKey\nmetadata: {name: %s-k%d, namespace: scale-%d, labels: {gw: %s}}\n' "$gw" "$k" "$n" "$gw"
        printf 'spec: {provider: %s, alias: a%d, secretRef: {name: keys-%s, key: k%d}}\n' "$p" "$k" "$gw" "$k"
      done
      printf -- '---\napiVersion: sidegate.dev/v1alpha1\nkind: AIGateway\nmetadata: {name: %s, namespace: scale-%d}\n' "$gw" "$n"
      printf 'spec:\n  providerKeySelector: {matchLabels: {gw: %s}}\n  cache: {enabled: true, ttl: 5m}\n  rateLimit: {limit: 100, interval: 60s}\n' "$gw"
    } >>"$f"
  done
  kubectl apply --server-side -f "$f" >/dev/null
done

ready_count() {
  kubectl get aigateways -A -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$' || true
}
wait_all() { # $1: what, $2: command printing a count
  local start=$SECONDS
  while :; do
    local c
    c=$($2)
    [[ $c -ge $total ]] && break
    ((SECONDS - start > 600)) && { log "timeout: $c/$total $1"; exit 1; }
    sleep 0.5
  done
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log "starting the operator"
t0=$(date +%s.%N)
RUST_LOG=warn "$BIN" run --leader-elect=false --admin-addr "127.0.0.1:$port" --concurrency "${CONCURRENCY:-8}" >"$WORK/operator.log" 2>&1 &
OP_PID=$!
wait_all "gateways Ready" ready_count
t1=$(date +%s.%N)
converge=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$OP_PID/status")
log "converged: $total gateways Ready in ${converge}s; operator RSS $((rss_kib / 1024)) MiB"

rotated_count() {
  local c=0 n
  for ((n = 0; n < NAMESPACES; n++)); do
    c=$((c + $(kubectl get secrets -n "scale-$n" -l app.kubernetes.io/managed-by=sidegate-operator \
      -o jsonpath='{range .items[*]}{.data.openai\.a0}{"\n"}{end}' | base64 -d -i 2>/dev/null | grep -o 'sk-v2' | wc -l)))
  done
  echo "$c"
}
log "rotating all $total key Secrets"
t2=$(date +%s.%N)
for ((n = 0; n < NAMESPACES; n++)); do
  for ((g = 0; g < GATEWAYS_PER_NS; g++)); do
    printf -- '---\napiVersion: v1\nkind: Secret\nmetadata: {name: keys-gw-%d, namespace: scale-%d}\nstringData: {k0: sk-v2-%d-%d}\n' "$g" "$n" "$n" "$g"
  done
done >"$WORK/rotate.yaml"
kubectl apply --server-side --force-conflicts --field-manager=rotation -f "$WORK/rotate.yaml" >/dev/null
wait_all "keys rotated" rotated_count
t3=$(date +%s.%N)
rotate=$(python3 -c "print(f'{$t3 - $t2:.1f}')")
log "rotation: all $total gateways re-rendered in ${rotate}s (from the first Secret write)"

metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m {s += $2} END {print s + 0}'; }
w0=$(metric 'sidegate_operator_writes_total')
sleep 20
w1=$(metric 'sidegate_operator_writes_total')
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$OP_PID/status")
hwm_kib=$(awk '/VmHWM/ {print $2}' "/proc/$OP_PID/status")
reconciles=$(metric 'sidegate_operator_reconciles_total\\{controller="aigateway",result="ok"')
errors=$(metric 'sidegate_operator_reconcile_errors_total')
cat <<REPORT
scale: $total AIGateways x $KEYS_PER_GATEWAY ProviderKeys ($((total * KEYS_PER_GATEWAY)) keys, $total Secrets), concurrency ${CONCURRENCY:-8}
  converge (operator start -> all Ready):   ${converge} s
  rotate all key Secrets -> all re-rendered: ${rotate} s
  operator RSS now / peak:                   $((rss_kib / 1024)) MiB / $((hwm_kib / 1024)) MiB
  aigateway reconciles ok / errors:          $reconciles / $errors
  writes in 20 s of steady state:            $((${w1%.*} - ${w0%.*}))
REPORT

#!/usr/bin/env bash
# End to end on a kind cluster, for machines with Docker (it cannot run on the project's CI
# machines, which have no container engine; there ./test.sh runs tests/chart/run, the static
# binary test and the operator/sidecar suites against a real kube-apiserver instead).
#
#   1. creates kind cluster $KIND_CLUSTER (default sidegate-e2e)
#   2. builds the sidegate, sidegate-operator and mock-provider images (images/Dockerfile) and
#      loads them into the cluster
#   3. helm install charts/sidegate (self-managed webhook certificates)
#   4. deploys the mock provider, the sample ProviderKeys/AIGateway of examples/kubernetes/
#      pointed at it, and a client pod annotated sidegate.dev/gateway=main
#   5. checks the injected sidecar (native sidecar, env), a request from the client pod through
#      127.0.0.1:8787 with the stored key injected, a cache HIT
#      (it does not yet: skipped, said so), and a rotated key reaching the provider
#   6. deletes the cluster (KEEP_CLUSTER=1 keeps it)
#
# Needs: docker (or DOCKER=podman), kind, kubectl, helm (v3.8+ or v4).
#   tests/e2e/kind.sh
#   KEEP_CLUSTER=1 KIND_NODE_IMAGE=kindest/node:v1.34.0 tests/e2e/kind.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cluster=${KIND_CLUSTER:-sidegate-e2e}
docker=${DOCKER:-docker}
tag=e2e-$(git rev-parse --short HEAD 2>/dev/null || echo dev)
ns=team-a
say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

for tool in "$docker" kind kubectl helm; do
  command -v "$tool" >/dev/null || fail "$tool not found: this script needs Docker, kind, kubectl and helm (see README)"
done
"$docker" info >/dev/null 2>&1 || fail "$docker is installed but not running"

created=false
cleanup() {
  local status=$?
  if [[ $status -ne 0 ]] && $created; then
    echo "--- diagnostics"
    kubectl -n sidegate-system logs deploy/sidegate-operator --tail=40 2>/dev/null || true
    kubectl -n "$ns" get pods,aigw -o wide 2>/dev/null || true
    kubectl -n "$ns" logs client -c sidegate --tail=40 2>/dev/null || true
  fi
  if $created && [[ -z ${KEEP_CLUSTER:-} ]]; then
    kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
  fi
  exit "$status"
}
trap cleanup EXIT

say "1. kind cluster $cluster"
kind_args=(--name "$cluster" --wait 120s)
[[ -n ${KIND_NODE_IMAGE:-} ]] && kind_args+=(--image "$KIND_NODE_IMAGE")
kind create cluster "${kind_args[@]}"
created=true
kubectl config use-context "kind-$cluster" >/dev/null

say "2. images (tag $tag)"
for target in sidegate sidegate-operator mock-provider; do
  "$docker" build -f images/Dockerfile --target "$target" \
    --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "sidegate.local/$target:$tag" .
  kind load docker-image --name "$cluster" "sidegate.local/$target:$tag"
done

say "3. helm install charts/sidegate"
helm install sidegate charts/sidegate --namespace sidegate-system --create-namespace \
  --set image.repository=sidegate.local/sidegate-operator --set image.tag="$tag" \
  --set image.pullPolicy=Never \
  --set sidecar.image.repository=sidegate.local/sidegate --set sidecar.image.tag="$tag" \
  --set sidecar.image.pullPolicy=Never \
  --wait --timeout 180s
kubectl -n sidegate-system rollout status deploy/sidegate-operator --timeout=120s
# Self-managed certificates: the operator patches caBundle once it has made its certificate.
for _ in $(seq 60); do
  ca=$(kubectl get mutatingwebhookconfiguration sidegate-sidegate-system -o jsonpath='{.webhooks[0].clientConfig.caBundle}')
  [[ -n $ca ]] && break
  sleep 1
done
[[ -n $ca ]] || fail "caBundle never patched by the operator"

say "4. mock provider, sample gateway, annotated client pod"
kubectl create namespace "$ns"
kubectl -n "$ns" apply -f - <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: mock}
spec:
  replicas: 1
  selector: {matchLabels: {app: mock}}
  template:
    metadata: {labels: {app: mock}}
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containers:
        - name: mock
          image: sidegate.local/mock-provider:$tag
          imagePullPolicy: Never
          args: ["--listen", "0.0.0.0:8080", "--threads", "2"]
          ports: [{containerPort: 8080}]
          readinessProbe: {httpGet: {path: /__mock/stats, port: 8080}}
---
apiVersion: v1
kind: Service
metadata: {name: mock}
spec:
  selector: {app: mock}
  ports: [{port: 8080, targetPort: 8080}]
EOF
kubectl -n "$ns" rollout status deploy/mock --timeout=120s
kubectl apply -f examples/kubernetes/providerkeys.yaml
sed "s#MOCK_URL#http://mock.$ns.svc:8080#g" examples/kubernetes/aigateway.yaml | kubectl apply -f -
kubectl -n "$ns" wait --for=condition=Ready --timeout=60s aigateway/main
kubectl -n "$ns" get aigw
kubectl -n "$ns" apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: client
  annotations: {sidegate.dev/gateway: main}
spec:
  containers:
    - name: app
      image: curlimages/curl:8.11.1
      command: ["sleep", "3600"]
EOF
kubectl -n "$ns" wait --for=condition=Ready --timeout=180s pod/client

say "5. checks"
injected=$(kubectl -n "$ns" get pod client -o jsonpath='{.spec.initContainers[?(@.name=="sidegate")].restartPolicy}')
[[ $injected == Always ]] || fail "no native sidecar 'sidegate' injected into pod client"
base=$(kubectl -n "$ns" exec client -c app -- printenv OPENAI_BASE_URL)
echo "injected: native sidecar; app env OPENAI_BASE_URL=$base"
mock_requests() { kubectl -n "$ns" exec client -c app -- curl -s "http://mock.$ns.svc:8080/__mock/requests"; }
chat() {
  kubectl -n "$ns" exec client -c app -- curl -s -D - -o /dev/null "$base/chat/completions" \
    -H 'cf-aig-authorization: Bearer demo-gateway-token' -H 'content-type: application/json' "$@" \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello from kind"}]}'
}
headers=$(chat)
grep -q '^HTTP/1.1 200' <<<"$headers" || fail "request through the sidecar: $headers"
grep -qi '^cf-aig-log-id:' <<<"$headers" || fail "no cf-aig-log-id header: $headers"
grep -q 'Bearer sk-demo-openai-v1' <<<"$(mock_requests)" || fail "the provider did not receive the stored key"
echo "request through the injected sidecar: 200, stored key injected"

kubectl -n "$ns" patch aigw main --type merge -p '{"spec":{"cache":{"enabled":true,"ttl":"5m"}}}'
# kubelet refreshes ConfigMap volumes on its sync period (about a minute).
deadline=$(($(date +%s) + 150))
until grep -qi '^cf-aig-cache-status:' <<<"$(chat)"; do
  (($(date +%s) < deadline)) || fail "the sidecar never loaded the config with the cache on"
  sleep 5
done
grep -qi '^cf-aig-cache-status: HIT' <<<"$(chat)" || fail "an identical request was no cache HIT"
echo "cache: HIT on an identical request"
kubectl -n "$ns" patch aigw main --type json -p '[{"op":"remove","path":"/spec/cache"}]'

kubectl -n "$ns" patch secret llm-keys --type merge -p '{"stringData":{"openai":"sk-demo-openai-v2-ROTATED"}}'
start=$(date +%s)
# kubelet refreshes Secret volumes on its sync period (about a minute, plus its cache TTL).
until chat -H 'cf-aig-skip-cache: true' >/dev/null && grep -q 'sk-demo-openai-v2-ROTATED' <<<"$(mock_requests)"; do
  (( $(date +%s) - start < 180 )) || fail "the rotated key did not reach the provider within 180 s"
  sleep 5
done
echo "key rotation: the provider received the new key $(( $(date +%s) - start )) s after the Secret changed, pod not restarted"
restarts=$(kubectl -n "$ns" get pod client -o jsonpath='{.status.initContainerStatuses[?(@.name=="sidegate")].restartCount}')
[[ ${restarts:-0} == 0 ]] || fail "the sidecar restarted $restarts times"

say "kind end-to-end passed"

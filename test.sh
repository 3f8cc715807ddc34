#!/usr/bin/env bash
# The whole sidegate test suite (README: "Run the tests"). On a fresh machine it installs and
# builds what the tests need: Debian packages, a Python venv with the official openai and
# anthropic SDKs, and the Go-built Kubernetes control plane (cached in ~/.cache/sidegate).
#
#   ./test.sh            everything
#   SKIP_LINT=1 ./test.sh   skip fmt/clippy (local iteration)
set -euo pipefail
cd "$(dirname "$0")"
root=$(pwd)
export SIDEGATE_CACHE=${SIDEGATE_CACHE:-$HOME/.cache/sidegate}
export SIDEGATE_TEST_LOG_DIR=${SIDEGATE_TEST_LOG_DIR:-$(mktemp -d /tmp/sidegate-test-logs.XXXXXX)}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
step() { printf '\n=== %s\n' "$*"; }
started=$(date +%s)
# A clean clone gains nothing from incremental compilation, and its files were 3.5 GB of the
# debug target.
[ -n "${CI:-}" ] && export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
# The suite needs ~10 GB on a fresh clone (debug and static builds ~6 GB, the Go build of the
# control plane ~5 GB while it runs); a full disk otherwise shows up as a compiler error.
disk() { df -Pk "$root" | awk 'NR==2 { printf "%.1f GB free on %s", $4 / 1048576, $6 }'; }
free_kb=$(df -Pk "$root" | awk 'NR==2 { print $4 }')
if [ "$free_kb" -lt $((10 * 1024 * 1024)) ]; then
  echo "warning: only $(disk); the suite needs ~10 GB (cargo clean frees the build output)" >&2
fi

step "system packages"
need=()
for pair in curl:curl openssl:openssl python3:python3 ss:iproute2 file:file shellcheck:shellcheck redis-server:redis-server; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml) # tests/chart/run
command -v valgrind >/dev/null || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ -z "${SKIP_LINT:-}" ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
fi

step "build ($(disk))"
cargo build --workspace --bins --tests --quiet

step "the sidecar links no Kubernetes client (DESIGN.md: small binary, fast start)"
linked=$(cargo tree -p sidegate -e normal,build --prefix none | grep -E '^(kube|kube-[a-z-]+|k8s-openapi) ' || true)
if [ -n "$linked" ]; then
  echo "sidegate depends on: $linked" >&2
  exit 1
fi

step "control plane (kube-apiserver, etcd, kube-controller-manager, kubectl, helm from Go modules)"
tests/cluster/build >/dev/null

step "Rust tests (unit, and integration against the real control plane)"
tests/cluster/with-cluster cargo test --workspace --quiet 2>&1 | tee "$SIDEGATE_TEST_LOG_DIR/cargo-test.log"

step "Python SDK tests (openai, anthropic) against the sidecar"
venv=$(tests/setup-venv)
(cd tests/sdk && "$venv/bin/pytest" -q --timeout 120 -p no:cacheprovider) 2>&1 | tee "$SIDEGATE_TEST_LOG_DIR/pytest.log"

step "Helm chart: lint, golden output, schema errors, install on the real apiserver, operator with the chart's args"
tests/chart/run 2>&1 | tee "$SIDEGATE_TEST_LOG_DIR/chart.log"

step "container image binaries: static build (crt-static), file/ldd, the static sidecar serving a request"
tests/e2e/static-binaries 2>&1 | tee "$SIDEGATE_TEST_LOG_DIR/static-binaries.log"

step "real node (kubelet + containerd + runc): the chart, the injected native sidecar, a Job, key rotation, gateway deletion"
need=()
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || need+=(containernetworking-plugins)
file -b /bin/busybox 2>/dev/null | grep -q 'statically linked' || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
shellcheck -x tests/cluster/build tests/cluster/up tests/cluster/down tests/cluster/with-cluster \
  tests/node/build tests/node/images tests/node/e2e tests/node/local-cluster
tests/node/build >/dev/null # containerd 2.x from its Go module (cached like the control plane)
tests/node/e2e 2>&1 | tee "$SIDEGATE_TEST_LOG_DIR/node-e2e.log"

step "demo (README's first command) runs end to end"
./demo.sh >"$SIDEGATE_TEST_LOG_DIR/demo.log" 2>&1 || { tail -40 "$SIDEGATE_TEST_LOG_DIR/demo.log"; exit 1; }
grep -E 'cache HIT|provider saw the new key|demo done' "$SIDEGATE_TEST_LOG_DIR/demo.log"
shellcheck -x demo.sh images/build-static tests/chart/run tests/e2e/kind.sh tests/e2e/static-binaries tests/e2e/standalone-demo.sh

step "no key in any log"
tests/scan-logs "$SIDEGATE_TEST_LOG_DIR"

step "performance regression guard (callgrind instructions per request, not wall time)"
bench/callgrind-guard

echo
echo "all tests passed in $(( $(date +%s) - started )) s; $(disk), target/ $(du -sh target 2>/dev/null | cut -f1)"

#!/usr/bin/env bash
# Review checks of charts/sidegate (no cluster, no cargo): helm template/lint with the project's
# helm, the Rust sources read as text. Prints PASS/FAIL per check; exits 1 if any check fails.
#
#   tests/chart/review_test.sh            (HELM=/path/to/helm to use another helm binary)
#
# Checks marked "FAILS at 2425c57" describe problems found in review at that commit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
chart=$root/charts/sidegate
HELM=${HELM:-${SIDEGATE_CACHE:-$HOME/.cache/sidegate}/k8s-v1.37.2/bin/helm}
[[ -x $HELM ]] || { echo "error: helm not found at $HELM (run tests/cluster/build, or set HELM)" >&2; exit 2; }
work=$(mktemp -d /tmp/sidegate-chart-review.XXXXXX)
trap 'rm -rf "$work"' EXIT
ns=sidegate-system
failures=0

render() { "$HELM" template sidegate "$chart" --namespace "$ns" "$@"; }
# check NAME FUNCTION [ARG...]: PASS if FUNCTION succeeds, else FAIL with its output. The function
# runs in an asynchronous subshell, so that set -e stops it at its first failing command (set -e
# is ignored inside an `if` condition).
check() {
  local name=$1 pid
  shift
  ( set -e; "$@" ) >"$work/out" 2>&1 &
  pid=$!
  if wait "$pid"; then
    printf 'PASS: %s\n' "$name"
  else
    printf 'FAIL: %s\n' "$name"
    sed 's/^/      /' "$work/out" | head -15
    failures=$((failures + 1))
  fi
}
# refused FIELD HELM-ARG...: helm template refuses the values, naming FIELD.
refused() {
  local want=$1 out
  shift
  if out=$(render "$@" 2>&1); then
    echo "helm template $* rendered; expected a refusal naming '$want'"
    return 1
  fi
  grep -qF -- "$want" <<<"$out" || { echo "refused without naming '$want': $out"; return 1; }
}
# py FILE CODE...: runs python with the rendered documents of FILE as `docs` and `by_kind`.
py() {
  local file=$1
  shift
  python3 - "$file" "$@" <<PY
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
def by_kind(kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
def deploy():
    return by_kind("Deployment")[0]
def pod():
    return deploy()["spec"]["template"]["spec"]
$(cat)
PY
}

render >"$work/default.yaml"
render -f "$here/values-full.yaml" >"$work/full.yaml"
render -f "$here/values-namespaced.yaml" >"$work/namespaced.yaml"
render --set webhook.certMode=cert-manager >"$work/cert-manager.yaml"

# ---------------------------------------------------------------- verified correct (PASS)

lint() {
  "$HELM" lint --strict --quiet "$chart" || return 1
  "$HELM" lint --strict --quiet "$chart" -f "$here/values-full.yaml" || return 1
}
check "helm lint --strict (default, values-full)" lint

hardening() {
  local f
  for f in default full namespaced cert-manager; do
    py "$work/$f.yaml" <<'PY' || { echo "($f values)"; return 1; }
p = pod()
sc = p["securityContext"]
assert sc.get("runAsNonRoot") is True, sc
assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, sc
assert sc.get("runAsUser", 1) != 0, sc
assert not p.get("hostNetwork") and not p.get("hostPID") and not p.get("hostIPC"), p
for c in p["containers"]:
    csc = c["securityContext"]
    assert csc.get("readOnlyRootFilesystem") is True, csc
    assert csc.get("allowPrivilegeEscalation") is False, csc
    assert csc.get("capabilities", {}).get("drop") == ["ALL"], csc
    assert not csc.get("capabilities", {}).get("add"), csc
    assert not csc.get("privileged"), csc
    r = c["resources"]
    assert {"cpu", "memory"} <= set(r["requests"]) and "memory" in r["limits"], r
PY
  done
}
check "operator pods: non-root, RuntimeDefault seccomp, read-only root FS, no escalation, ALL caps dropped, requests and memory limit" hardening

probes() {
  local f
  for f in default full; do
    py "$work/$f.yaml" <<'PY'
c = pod()["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
admin = [a for a in c["args"] if a.startswith("--admin-addr=")][0].rsplit(":", 1)[1]
assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}, c["livenessProbe"]
assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}, c["readinessProbe"]
assert str(ports["admin"]) == admin, (ports, admin)
wh = [a for a in c["args"] if a.startswith("--webhook-port=")]
if wh:
    assert str(ports["webhook"]) == wh[0].split("=", 1)[1], (ports, wh)
    svc = [s for s in by_kind("Service") if s["spec"]["ports"][0]["name"] == "webhook"][0]
    assert svc["spec"]["ports"][0] == {"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}, svc
    hook = by_kind("MutatingWebhookConfiguration")[0]["webhooks"][0]["clientConfig"]["service"]
    assert hook["name"] == svc["metadata"]["name"] and hook["port"] == 443 and hook["path"] == "/mutate", hook
PY
  done
  render --set operator.adminPort=9000 --set webhook.port=10443 >"$work/ports.yaml" || return 1
  py "$work/ports.yaml" <<'PY'
c = pod()["containers"][0]
assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"admin": 9000, "webhook": 10443}, c["ports"]
assert "--admin-addr=[::]:9000" in c["args"] and "--webhook-port=10443" in c["args"], c["args"]
PY
}
check "probes hit /healthz and /readyz on the admin port the operator binds; webhook Service 443 -> the port it serves" probes

webhook_config() {
  render --namespace ops --set 'webhook.excludeNamespaces={monitoring}' >"$work/ops.yaml"
  py "$work/ops.yaml" <<'PY'
w = by_kind("MutatingWebhookConfiguration")[0]["webhooks"][0]
assert w["failurePolicy"] == "Ignore" and w["timeoutSeconds"] == 5, w
assert w["sideEffects"] == "None" and w["admissionReviewVersions"] == ["v1"], w
assert w["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}], w["rules"]
exprs = w["namespaceSelector"]["matchExpressions"]
notin = [e for e in exprs if e["operator"] == "NotIn" and e["key"] == "kubernetes.io/metadata.name"][0]["values"]
assert {"kube-system", "ops", "monitoring"} <= set(notin), notin
assert "sidegate.dev/gateway" in w["matchConditions"][0]["expression"], w["matchConditions"]
args = pod()["containers"][0]["args"]
assert "--exclude-namespace=monitoring" in args, args
assert any(e["name"] == "POD_NAMESPACE" for e in pod()["containers"][0]["env"]), "POD_NAMESPACE (the operator's namespace, excluded by the operator too)"
hash_env = [e for e in pod()["containers"][0]["env"] if e["name"] == "POD_TEMPLATE_HASH"]
assert [e["valueFrom"]["fieldRef"]["fieldPath"] for e in hash_env] == ["metadata.labels['pod-template-hash']"], hash_env
PY
}
check "webhook: Ignore, 5 s, no side effects, Pod CREATE only, annotated pods only, kube-system + release ns + excludeNamespaces excluded" webhook_config

# The rules the operator's kube calls need (operator/src: Api::<..> get/list/watch/patch/create/
# replace, watcher(), Controller::owns/watches, events::Recorder, lease.rs, webhook/certs.rs).
rbac_exact() {
  py "$work/default.yaml" <<'PY'
want = {
    ("sidegate.dev", "aigateways"): {"get", "list", "watch"},
    ("sidegate.dev", "providerkeys"): {"get", "list", "watch"},
    ("sidegate.dev", "aigateways/status"): {"patch"},
    ("sidegate.dev", "providerkeys/status"): {"patch"},
    ("sidegate.dev", "aigateways/finalizers"): {"update"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): {"get", "patch"},
}
got = {}
for r in by_kind("ClusterRole")[0]["rules"]:
    for g in r["apiGroups"]:
        for res in r["resources"]:
            got.setdefault((g, res), set()).update(r["verbs"])
assert got == want, {"extra": {k: v - want.get(k, set()) for k, v in got.items() if v - want.get(k, set())},
                     "missing": {k: v - got.get(k, set()) for k, v in want.items() if v - got.get(k, set())}}
mwc = [r for r in by_kind("ClusterRole")[0]["rules"] if r["resources"] == ["mutatingwebhookconfigurations"]][0]
assert mwc["resourceNames"] == [by_kind("MutatingWebhookConfiguration")[0]["metadata"]["name"]], mwc
# The leader Lease (lease.rs: get_opt, create, replace): get/update by name, create on its own
# (a create is authorized before the object has a name); delete of the Lease and the certificate
# Secret by name only (OwnerReferencesPermissionEnforcement asks it of an update that sets their
# owner; no Secrets delete cluster-wide); the operator's Deployment, read by name (owner.rs),
# which owns the Lease and the certificate Secret; the replica's own ReplicaSet (revision.rs:
# whose certificate settings are newer), a name the Deployment makes, found from the
# downward API's pod-template-hash: no pods of the release namespace.
role = by_kind("Role")[0]["rules"]
args = pod()["containers"][0]["args"]
lease = [a for a in args if a.startswith("--lease-name=")][0].split("=", 1)[1]
cert = [a for a in args if a.startswith("--webhook-secret=")][0].split("=", 1)[1]
owner = [a for a in args if a.startswith("--owner-deployment=")][0].split("=", 1)[1]
assert owner == deploy()["metadata"]["name"], (owner, deploy()["metadata"]["name"])
assert [(r["apiGroups"], r["resources"], sorted(r["verbs"]), r.get("resourceNames")) for r in role] == [
    (["coordination.k8s.io"], ["leases"], ["get", "update"], [lease]),
    (["coordination.k8s.io"], ["leases"], ["create"], None),
    (["coordination.k8s.io"], ["leases"], ["delete"], [lease]),
    ([""], ["secrets"], ["delete"], [cert]),
    (["apps"], ["deployments"], ["get"], [owner]),
    (["apps"], ["replicasets"], ["get"], None)], role
for d in docs:
    for r in d.get("rules", []):
        assert "*" not in r["verbs"] + r["resources"] + r["apiGroups"], r
PY
}
check "RBAC (cluster mode): exactly the verbs the operator's API calls need, no wildcards, webhook config by name" rbac_exact

namespaced() {
  py "$work/namespaced.yaml" <<'PY'
cr = by_kind("ClusterRole")
assert len(cr) == 1 and [r["resources"] for r in cr[0]["rules"]] == [["mutatingwebhookconfigurations"]], cr
assert cr[0]["rules"][0].get("resourceNames"), cr
roles = sorted(r["metadata"]["namespace"] for r in by_kind("Role"))
assert roles == ["sidegate-system", "team-b", "team-c"], roles
rel = [r for r in by_kind("Role") if r["metadata"]["namespace"] == "sidegate-system"][0]["rules"]
for r in rel:
    if r["resources"] == ["secrets"] and set(r["verbs"]) & {"get", "list", "watch", "patch", "delete"}:
        assert r.get("resourceNames") and "list" not in r["verbs"] and "watch" not in r["verbs"], r
args = pod()["containers"][0]["args"]
assert [a for a in args if a.startswith("--watch-namespace")] == ["--watch-namespace=team-b", "--watch-namespace=team-c"], args
exprs = by_kind("MutatingWebhookConfiguration")[0]["webhooks"][0]["namespaceSelector"]["matchExpressions"]
assert {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-b", "team-c"]} in exprs, exprs
PY
  render -f "$here/values-namespaced.yaml" --set webhook.certMode=cert-manager >"$work/ns-cm.yaml"
  py "$work/ns-cm.yaml" <<'PY'
assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding"), "cluster-scoped RBAC with cert-manager + watchNamespaces"
PY
}
check "watchNamespaces: Roles only there (+ release ns), cluster-wide only the webhook config by name, webhook narrowed" namespaced

flags() {
  python3 - "$root/operator/src/main.rs" "$root/operator/src/webhook/mod.rs" >"$work/flags.txt" <<'PY'
import re, sys
flags = set()
for path, struct in ((sys.argv[1], "struct RunArgs"), (sys.argv[2], "struct WebhookArgs")):
    src = open(path).read()
    body = src[src.index(struct):]
    body = body[: body.index("\n}\n")]
    attrs = ""
    for line in body.splitlines()[1:]:
        s = line.strip()
        if s.startswith("///") or not s:
            continue
        m = re.match(r"(pub\s+)?(\w+)\s*:", s)
        if m and not s.startswith("#"):
            if "#[arg(" in attrs:
                long = re.search(r'\blong\s*=\s*"([^"]+)"', attrs)
                if long:
                    flags.add(long.group(1))
                elif re.search(r"\blong\b", attrs):
                    flags.add(m.group(2).replace("_", "-"))
                flags.update(re.findall(r'visible_alias\s*=\s*"([^"]+)"', attrs))
            attrs = ""
        else:
            attrs += " " + s
print("\n".join(sorted(flags)))
PY
  grep -qx 'admin-addr' "$work/flags.txt" && grep -qx 'sidecar-run-as-user' "$work/flags.txt" ||
    { echo "could not parse the operator's flags: $(paste -sd' ' "$work/flags.txt")"; return 1; }
  local f a name bad=""
  render --set leaderElection.enabled=false --set replicaCount=1 --set webhook.enabled=false >"$work/minimal.yaml"
  for f in default full namespaced cert-manager minimal; do
    while read -r a; do
      [[ $a == run ]] && continue
      name=${a%%=*}
      grep -qx -- "${name#--}" "$work/flags.txt" || bad+=" $f:$name"
    done < <(py "$work/$f.yaml" <<<'print("\n".join(pod()["containers"][0]["args"]))')
  done
  [[ -z $bad ]] || { echo "flags not defined by sidegate-operator run:$bad"; return 1; }
}
check "every flag the chart passes is one sidegate-operator run defines (RunArgs, WebhookArgs)" flags

sidecar_spec() {
  local src=$root/operator/src/webhook/inject.rs
  python3 - "$src" <<'PY'
import re, sys
src = open(sys.argv[1]).read()
body = src[src.index("pub fn sidecar_container("):]
body = body[: body.index("\n}\n")]
need = [
    r'"--listen"\.into\(\),\s*format!\("127\.0\.0\.1:\{\}", sidecar\.port\)',
    r"run_as_non_root: Some\(true\)",
    r"read_only_root_filesystem: Some\(true\)",
    r"allow_privilege_escalation: Some\(false\)",
    r"privileged: Some\(false\)",
    r'drop: Some\(vec!\["ALL"\.into\(\)\]\)',
    r'type_: "RuntimeDefault"\.into\(\)',
    r'startup_probe: Some\(probe\("/healthz"',
    r'readiness_probe: Some\(probe\("/readyz"',
    r"port: IntOrString::Int\(admin_port\)",
    r"read_only: Some\(true\)",
]
missing = [n for n in need if not re.search(n, body)]
assert not missing, f"sidecar_container lacks: {missing}"
assert "add:" not in body and "host_" not in body, "sidecar adds capabilities or host namespaces"
# Keys only through the Secret volume: no env var of the sidecar carries a key value.
assert "secret_key_ref" not in src, "the injected spec reads a Secret into an env var"
PY
}
check "injected sidecar (inject.rs): app port on 127.0.0.1, non-root, RO root FS, ALL dropped, RuntimeDefault, probes on admin port, keys via read-only Secret volume" sidecar_spec

selectors_stable() {
  local f
  render --set replicaCount=1 --set leaderElection.enabled=false --set podLabels.team=x >"$work/other.yaml"
  for f in default full namespaced cert-manager other; do
    py "$work/$f.yaml" <<'PY'
print(sorted(deploy()["spec"]["selector"]["matchLabels"].items()),
      sorted(s["metadata"]["name"] + str(sorted(s["spec"]["selector"].items())) for s in by_kind("Service") if s["metadata"]["name"].endswith("metrics")))
PY
  done | sort -u >"$work/selectors.txt"
  [[ $(wc -l <"$work/selectors.txt") == 1 ]] || { cat "$work/selectors.txt"; return 1; }
}
check "helm upgrade with other values keeps the Deployment's (immutable) selector and the Services' selectors" selectors_stable

schema_basics() {
  local rc=0
  refused "/sidecar/securityContext/runAsUser" --set sidecar.securityContext.runAsUser=0 || rc=1
  refused "/podSecurityContext/runAsUser" --set podSecurityContext.runAsUser=0 || rc=1
  refused "/webhook/port" --set webhook.port=443 || rc=1
  refused "/operator/shutdownDrainSeconds" --set operator.shutdownDrainSeconds=61 || rc=1
  refused "/webhook/timeoutSeconds" --set webhook.timeoutSeconds=31 || rc=1
  refused "/watchNamespaces/0" --set 'watchNamespaces={Team}' || rc=1
  return $rc
}
check "schema: root uid, privileged ports, out-of-range drain/timeout, bad namespace names refused, field named" schema_basics

readme() {
  local cr
  cr=$(py "$work/default.yaml" <<<'print(by_kind("ClusterRole")[0]["metadata"]["name"])')
  sed -n '/^## Install on a cluster (Helm)/,/^## /p' "$root/README.md" >"$work/readme.md"
  grep -qF 'helm install sidegate charts/sidegate --namespace sidegate-system --create-namespace' "$work/readme.md"
  grep -qF "$cr" "$work/readme.md" || { echo "README names no ClusterRole $cr"; return 1; }
  grep -qF 'failurePolicy:' "$work/readme.md" || { echo "README: no failurePolicy"; return 1; }
  grep -qF 'Ignore' "$work/readme.md" || { echo "README: failurePolicy not Ignore"; return 1; }
  [[ -d $root/examples/kubernetes ]] || { echo "README: examples/kubernetes/ missing"; return 1; }
}
check "README 'Install on a cluster (Helm)' matches the chart (command, ClusterRole name, failurePolicy)" readme

# ---------------------------------------------------------------- problems found (FAIL at 2425c57)

# FAILS at 2425c57: the schema accepts podDisruptionBudget.minAvailable >= replicaCount (or
# "100%"), a PDB that allows no voluntary eviction: every `kubectl drain` of a node running an
# operator pod hangs forever.
pdb_min() {
  local rc=0
  refused "minAvailable" --set replicaCount=2 --set podDisruptionBudget.minAvailable=2 || rc=1
  refused "minAvailable" --set podDisruptionBudget.minAvailable=100% || rc=1
  return $rc
}
check "PDB: minAvailable that blocks every eviction (>= replicaCount, 100%) refused by the schema" pdb_min

# FAILS at 2425c57: no unhealthyPodEvictionPolicy: with the default IfHealthyBudget, replicas that
# are all crash-looping or unready (a bad upgrade, an apiserver outage at start) block node drains.
pdb_unhealthy() {
  py "$work/default.yaml" <<'PY'
spec = by_kind("PodDisruptionBudget")[0]["spec"]
assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow", spec
PY
}
check "PDB: unhealthyPodEvictionPolicy AlwaysAllow (unready replicas never block a drain)" pdb_unhealthy

# FAILS at 2425c57: webhook.port equal to operator.adminPort renders two containerPorts with one
# number; the operator then fails to bind the second listener (EADDRINUSE) and crash-loops.
port_clash() {
  local rc=0
  refused "port" --set webhook.port=8080 || rc=1
  refused "port" --set operator.adminPort=9443 || rc=1
  return $rc
}
check "schema refuses webhook.port == operator.adminPort" port_clash

# FAILS at 2425c57: resource names are not validated. sidecar.resources.limits.memroy renders and
# installs, then the operator refuses SIDEGATE_SIDECAR_RESOURCES at start (only cpu, memory,
# ephemeral-storage) and crash-loops; resources.limits.memroy makes the apiserver refuse the
# Deployment (not a standard resource name).
resource_names() {
  local rc=0
  refused "/sidecar/resources/limits" --set sidecar.resources.limits.memroy=1Gi || rc=1
  refused "/resources/requests" --set resources.requests.cpus=100m || rc=1
  return $rc
}
check "schema refuses unknown resource names (sidecar.resources, resources)" resource_names

# FAILS at 2425c57: namespaceSelectorExpressions In/NotIn without values (or Exists with values)
# pass the schema; the apiserver then refuses the MutatingWebhookConfiguration at install.
selector_exprs() {
  local rc=0
  refused "/webhook/namespaceSelectorExpressions/0" \
    --set 'webhook.namespaceSelectorExpressions[0].key=team' --set 'webhook.namespaceSelectorExpressions[0].operator=In' || rc=1
  refused "/webhook/namespaceSelectorExpressions/0" --set 'webhook.namespaceSelectorExpressions[0].key=team' \
    --set 'webhook.namespaceSelectorExpressions[0].operator=Exists' --set 'webhook.namespaceSelectorExpressions[0].values={a}' || rc=1
  return $rc
}
check "schema: namespaceSelectorExpressions values required for In/NotIn, forbidden for Exists/DoesNotExist" selector_exprs

# FAILS at 2425c57: objectSelector.matchExpressions items only require key/operator: any operator
# string renders, and the apiserver refuses the webhook configuration.
object_selector() {
  refused "/webhook/objectSelector/matchExpressions/0" \
    --set 'webhook.objectSelector.matchExpressions[0].key=a' --set 'webhook.objectSelector.matchExpressions[0].operator=Bogus'
}
check "schema: objectSelector.matchExpressions operator is In/NotIn/Exists/DoesNotExist" object_selector

# FAILS at 2425c57: serviceMonitor.interval/scrapeTimeout are free strings; the ServiceMonitor CRD
# refuses "thirty" at install.
servicemonitor_durations() {
  local rc=0
  refused "/serviceMonitor/interval" --set serviceMonitor.enabled=true --set serviceMonitor.interval=thirty || rc=1
  refused "/serviceMonitor/scrapeTimeout" --set serviceMonitor.enabled=true --set-string serviceMonitor.scrapeTimeout=10 || rc=1
  return $rc
}
check "schema: serviceMonitor interval/scrapeTimeout are Prometheus durations" servicemonitor_durations

# FAILS at 2425c57: podLabels may name a selector label: the pod template then carries the key
# twice (YAML duplicate key) and, last one winning, no longer matches the Deployment's selector.
pod_labels() {
  refused "podLabels" --set 'podLabels.app\.kubernetes\.io/component=worker'
}
check "podLabels cannot override the selector labels (app.kubernetes.io/name, instance, component)" pod_labels

# FAILS at 2425c57: the Lease rule has no resourceNames, so the operator may get/update every
# Lease of the release namespace (other controllers' leader elections there), not only its own.
lease_scoped() {
  py "$work/default.yaml" <<'PY'
name = [a for a in pod()["containers"][0]["args"] if a.startswith("--lease-name=")][0].split("=", 1)[1]
for r in by_kind("Role")[0]["rules"]:
    if r["resources"] == ["leases"]:
        verbs = set(r["verbs"])
        if verbs & {"get", "update", "patch", "delete"}:
            assert r.get("resourceNames") == [name], f"lease rule without resourceNames [{name}]: {r}"
PY
}
check "RBAC: get/update/delete of the leader Lease by name only (create alone unrestricted)" lease_scoped

# The webhook port of the NetworkPolicy: open to every source by default (the apiserver's source
# is not selectable in most clusters), only from networkPolicy.webhookFrom when set; metrics only
# from metricsFrom either way.
network_policy() {
  render --set networkPolicy.enabled=true >"$work/np-open.yaml"
  render --set networkPolicy.enabled=true --set 'networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/24' >"$work/np-narrow.yaml"
  py "$work/np-open.yaml" <<'PY'
rules = by_kind("NetworkPolicy")[0]["spec"]["ingress"]
assert rules == [{"ports": [{"port": "webhook", "protocol": "TCP"}]}], rules
PY
  py "$work/np-narrow.yaml" <<'PY'
rules = by_kind("NetworkPolicy")[0]["spec"]["ingress"]
assert rules == [{"from": [{"ipBlock": {"cidr": "10.0.0.0/24"}}], "ports": [{"port": "webhook", "protocol": "TCP"}]}], rules
PY
}
check "NetworkPolicy: webhook port from anywhere unless networkPolicy.webhookFrom names its callers" network_policy

# Self-managed certificate lifetime: the operator takes 1 to 3650 days, as the schema (it raised
# 1 to 2 silently before).
cert_validity() {
  local rc=0
  render --set webhook.selfManaged.validityDays=1 --show-only templates/deployment.yaml | grep -q -- '- --cert-validity-days=1$' || rc=1
  refused "/webhook/selfManaged/validityDays" --set webhook.selfManaged.validityDays=0 || rc=1
  refused "/webhook/selfManaged/validityDays" --set webhook.selfManaged.validityDays=3651 || rc=1
  grep -q 'range(CERT_VALIDITY_DAYS)' "$root/operator/src/webhook/mod.rs" || { echo "--cert-validity-days not range-checked"; rc=1; }
  grep -q 'pub const CERT_VALIDITY_DAYS: std::ops::RangeInclusive<u64> = 1..=3650;' "$root/operator/src/webhook/mod.rs" ||
    { echo "operator range is not 1..=3650"; rc=1; }
  return $rc
}
check "webhook.selfManaged.validityDays 1-3650, passed as is and checked by the operator with the same range" cert_validity

# FAILS at 2425c57: timeoutSeconds 1-3 accepted, but the webhook gives its lookups 3 s
# (LOOKUP_TIMEOUT in operator/src/webhook/mod.rs) and ignores the apiserver's ?timeout=: the
# apiserver gives up first (fail open, or with failurePolicy Fail the pod is refused).
webhook_timeout() {
  refused "/webhook/timeoutSeconds" --set webhook.timeoutSeconds=2
}
check "schema: webhook.timeoutSeconds leaves room for the webhook's 3 s lookups" webhook_timeout

# FAILS at 2425c57: replicaCount 2 (the default) with leaderElection.enabled=false is refused as
# "at '/leaderElection/enabled': value must be true": the message does not say why (replicaCount).
leader_message() {
  refused "replicaCount" --set leaderElection.enabled=false
}
check "leaderElection.enabled=false with replicaCount 2: the refusal names replicaCount" leader_message

# FAILS at 2425c57: both certificate modes use Secret <fullname>-webhook-cert. After `helm upgrade
# --set webhook.certMode=cert-manager` the new pods mount the operator's self-signed certificate
# (not the one the injected caBundle trusts) until cert-manager re-issues it, while the old
# replicas' self-managed loop may rewrite it: injection fails open for that window.
cert_secret_names() {
  local a b
  a=$(py "$work/default.yaml" <<<'print([x for x in pod()["containers"][0]["args"] if x.startswith("--webhook-secret=")][0].split("=",1)[1])')
  b=$(py "$work/cert-manager.yaml" <<<'print(by_kind("Certificate", "sidegate-webhook")[0]["spec"]["secretName"])')
  [[ $a != "$b" ]] || { echo "self-managed and cert-manager both use Secret $a"; return 1; }
}
check "self-managed and cert-manager certificates live in different Secrets (mode switch on upgrade)" cert_secret_names

echo
if ((failures)); then
  echo "review checks: $failures failed"
  exit 1
fi
echo "review checks: all passed"

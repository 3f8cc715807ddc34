# shellcheck shell=bash
# A real node for the test control plane: sourced by tests/cluster/up when run with --node, after
# the control plane is ready; `node_up` uses up's DIR, BIN, PKI, KUBECTL, KUBECONFIG_FILE,
# API_PORT and its helpers (start, wait_for, signed, kubeconfig, log).
#
#   kube-scheduler      (tests/cluster/build, k8s.io/kubernetes v1.37.2), loopback
#   containerd 2.x      (tests/node/build), config/root/state/socket under DIR/node/containerd,
#                       CRI with cgroupfs and runc (Debian), snapshotter overlayfs (native when
#                       overlay mounts fail, or SIDEGATE_NODE_SNAPSHOTTER=native), sandbox image
#                       sidegate.local/pause:dev
#   pod network         Debian's CNI bridge + host-local plugins on bridge sidegate0,
#                       10.244.0.0/24; the node's address is the bridge's 10.244.0.1
#   api-relay           the `kubernetes` Service's ClusterIP 10.0.0.1:443 -> the apiserver on
#                       127.0.0.1 (no kube-proxy runs; see tests/node/api-relay)
#   kubelet             (tests/cluster/build) for a cgroup v1 container: cgroupfs, failCgroupV1
#                       false, swap allowed, no allocatable enforcement, eviction off, pods'
#                       cgroups under /sidegate-<id>, syncFrequency 5s (so a Secret update
#                       reaches a pod's volume within ~5-10 s instead of ~1-2 min)
#
# One node at a time per machine (bridge name, pod subnet and 10.0.0.1 are fixed): node_up waits
# for /tmp/sidegate-node.lock, which every node process inherits, so it is free again once
# tests/cluster/down (node_down below) has stopped them all.

NODE_NAME=sidegate-node
NODE_BRIDGE=sidegate0
NODE_IP=10.244.0.1
NODE_POD_SUBNET=10.244.0.0/24
NODE_SERVICE_IP=10.0.0.1 # first IP of up's --service-cluster-ip-range: the kubernetes Service
NODE_LOCK=${SIDEGATE_NODE_LOCK:-/tmp/sidegate-node.lock}
NODE_LOCK_WAIT=${SIDEGATE_NODE_LOCK_WAIT:-900}
NODE_READY_TIMEOUT=${SIDEGATE_NODE_READY_TIMEOUT:-180}

node_up() {
  local here node t_node
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  node=$DIR/node
  t_node=$SECONDS
  mkdir -p "$node"/{containerd,cni/net.d,cni/ipam,kubelet,pod-logs,images}

  [[ $(id -u) == 0 ]] || { log "error: --node needs root (kubelet, containerd, runc, the bridge)"; return 1; }
  local b
  command -v runc >/dev/null || { log "error: runc not found (apt-get install runc)"; return 1; }
  local cni_bin=/usr/lib/cni
  for b in bridge host-local loopback; do
    [[ -x $cni_bin/$b ]] || { log "error: $cni_bin/$b missing (apt-get install containernetworking-plugins)"; return 1; }
  done
  [[ -x $BIN/kubelet && -x $BIN/kube-scheduler ]] || { log "error: kubelet/kube-scheduler missing in $BIN"; return 1; }
  local CTD_BIN
  CTD_BIN=$("$here/build") || { log "error: tests/node/build failed"; return 1; }

  # --- one node per machine ----------------------------------------------------------------------
  exec 8>>"$NODE_LOCK"
  if ! flock -n 8; then
    log "another test node holds $NODE_LOCK; waiting up to ${NODE_LOCK_WAIT}s"
    flock -w "$NODE_LOCK_WAIT" 8 || {
      log "error: $NODE_LOCK still held after ${NODE_LOCK_WAIT}s by another node's processes;" \
        "stop it with tests/cluster/down DIR (nodes: $(ls -d "${TMPDIR:-/tmp}"/sidegate-cluster.*/node 2>/dev/null | tr '\n' ' '))"
      return 1
    }
  fi
  if ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    # We hold the lock, so no live node owns it: left by a node that was killed.
    log "removing stale bridge $NODE_BRIDGE (left by a node that was killed)"
    ip link del "$NODE_BRIDGE"
  fi
  echo "$NODE_BRIDGE" >"$node/bridge" # ours now: node_down deletes it

  # Paths outside DIR that kubelet, containerd's shims and CNI hard-code (device-plugin socket,
  # /var/log/containers symlinks, CNI's result cache, shim sockets): the ones made now are
  # removed again by node_down when empty.
  local p
  for p in /var/lib/kubelet /var/lib/kubelet/device-plugins /var/log/containers /var/lib/cni \
    /var/lib/cni/results /run/containerd /run/containerd/s; do
    [[ -e $p ]] || echo "$p" >>"$node/created-paths"
  done

  # --- bridge: the node's address, and the kubernetes Service's ClusterIP ---------------------------
  ip link add "$NODE_BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$NODE_BRIDGE"
  ip addr add "$NODE_SERVICE_IP/32" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  log "bridge $NODE_BRIDGE: $NODE_IP/24 (node), $NODE_SERVICE_IP (kubernetes Service)"

  # --- pod cgroups: their own root (in every v1 hierarchy, or the v2 tree) -------------------------
  local cg_root=/sidegate-${DIR##*.} h old
  echo "$cg_root" >"$node/cgroup-root"
  for h in $(node_cgroup_hierarchies --with-unified); do
    # Empty roots of killed nodes whose dir is gone (rmdir fails on a cgroup still in use).
    for old in "$h"/sidegate-*/; do
      old=${old%/}
      [[ -d $old && ! -d ${TMPDIR:-/tmp}/sidegate-cluster.${old##*/sidegate-} ]] || continue
      find "$old" -depth -type d -exec rmdir {} + 2>/dev/null && log "removed stale cgroup $old"
    done
  done
  for h in $(node_cgroup_hierarchies); do
    mkdir -p "$h$cg_root"
    if [[ -f $h/cpuset.cpus && ! -f $h/cgroup.controllers ]]; then # v1 cpuset: a child starts empty
      cat "$h/cpuset.cpus" >"$h$cg_root/cpuset.cpus"
      cat "$h/cpuset.mems" >"$h$cg_root/cpuset.mems"
    fi
  done

  # --- certificates ------------------------------------------------------------------------------
  signed kubelet-client ca "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  signed kubelet-serving ca "/O=system:nodes/CN=system:node:$NODE_NAME" serverAuth "IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME"
  signed scheduler ca "/CN=system:kube-scheduler" clientAuth
  chmod 600 "$PKI"/*.key
  kubeconfig "$node/kubelet.kubeconfig" "system:node:$NODE_NAME" kubelet-client
  kubeconfig "$node/scheduler.kubeconfig" system:kube-scheduler scheduler

  local ports SCHED_PORT KUBELET_PORT KUBELET_HEALTHZ_PORT
  ports=$(python3 -c '
import socket
socks = []
for _ in range(3):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))')
  read -r SCHED_PORT KUBELET_PORT KUBELET_HEALTHZ_PORT <<<"$ports"

  # --- api-relay, kube-scheduler -------------------------------------------------------------------
  start api-relay python3 "$here/api-relay" "$NODE_SERVICE_IP:443" "127.0.0.1:$API_PORT"
  wait_for api-relay "api-relay on $NODE_SERVICE_IP:443" grep -q listening "$DIR/logs/api-relay.log"
  start kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$node/scheduler.kubeconfig" \
    --authentication-kubeconfig="$node/scheduler.kubeconfig" \
    --authorization-kubeconfig="$node/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" \
    --leader-elect=false --profiling=false

  # --- containerd ----------------------------------------------------------------------------------
  local ctd=$node/containerd snapshotter=${SIDEGATE_NODE_SNAPSHOTTER:-overlayfs}
  mkdir -p "$ctd"/{root,state,opt,runc}
  if [[ $snapshotter == overlayfs ]] && ! node_overlay_works "$ctd"; then
    snapshotter=native
    log "overlay mounts fail here; containerd uses the native snapshotter"
  fi
  echo "$snapshotter" >"$node/snapshotter"
  cat >"$node/cni/net.d/10-sidegate.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sidegate-node",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$NODE_POD_SUBNET", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$node/cni/ipam"
      }
    }
  ]
}
EOF
  cat >"$ctd/config.toml" <<EOF
version = 3
root = '$ctd/root'
state = '$ctd/state'
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.tracing.processor.v1.otlp', 'io.containerd.internal.v1.tracing']

[grpc]
  address = '$ctd/containerd.sock'
[ttrpc]
  address = '$ctd/containerd.sock.ttrpc'
[debug]
  address = ''
[metrics]
  address = ''

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = '$ctd/opt'
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = '$snapshotter'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = 'sidegate.local/pause:dev'
  [plugins.'io.containerd.cri.v1.runtime']
    disable_apparmor = true
    # No CAP_SYS_RESOURCE in this container: runc cannot lower oom_score_adj (kubelet asks -998
    # for sandboxes), so containerd clamps it to its own value instead.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '$(command -v runc)'
          Root = '$ctd/runc'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['$cni_bin']
      conf_dir = '$node/cni/net.d'
      use_internal_loopback = true
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'
  [plugins.'io.containerd.transfer.v1.local']
    [[plugins.'io.containerd.transfer.v1.local'.unpack_config]]
      platform = 'linux/amd64'
      snapshotter = '$snapshotter'
EOF
  start containerd "$CTD_BIN/containerd" --config "$ctd/config.toml"
  wait_for containerd "containerd on $ctd/containerd.sock" \
    "$CTD_BIN/ctr" --address "$ctd/containerd.sock" version

  # --- images: the sandbox (pause) image at least --------------------------------------------------
  local images=${SIDEGATE_NODE_IMAGES:-}
  if [[ -z $images ]]; then
    images=$node/images
    "$here/images" --pause-only "$images" || { log "error: tests/node/images --pause-only failed"; return 1; }
  fi
  local t
  for t in "$images"/*.tar; do
    "$CTD_BIN/ctr" --address "$ctd/containerd.sock" -n k8s.io images import --snapshotter "$snapshotter" "$t" \
      >>"$DIR/logs/ctr-import.log" 2>&1 || { log "error: ctr images import $t failed (logs/ctr-import.log)"; return 1; }
  done
  log "imported into containerd: $("$CTD_BIN/ctr" --address "$ctd/containerd.sock" -n k8s.io images ls -q | grep -v '@sha256' | tr '\n' ' ')"

  # --- kubelet -------------------------------------------------------------------------------------
  cat >"$node/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://$ctd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: $cg_root
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
enforceNodeAllocatable: []
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
localStorageCapacityIsolation: false
syncFrequency: 5s
fileCheckFrequency: 20s
nodeStatusUpdateFrequency: 5s
podLogsDir: $node/pod-logs
volumePluginDir: $node/kubelet/volume-plugins
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
maxPods: 50
serializeImagePulls: false
rotateCertificates: false
serverTLSBootstrap: false
protectKernelDefaults: false
shutdownGracePeriod: 0s
EOF
  start kubelet "$BIN/kubelet" \
    --config="$node/kubelet.yaml" \
    --kubeconfig="$node/kubelet.kubeconfig" \
    --root-dir="$node/kubelet" \
    --hostname-override="$NODE_NAME" \
    --node-ip="$NODE_IP" \
    --v=2
  local saved=$READY_TIMEOUT
  READY_TIMEOUT=$NODE_READY_TIMEOUT
  wait_for kubelet "node $NODE_NAME Ready" \
    "$KUBECTL" --kubeconfig="$KUBECONFIG_FILE" wait --for=condition=Ready --timeout=2s "node/$NODE_NAME"
  READY_TIMEOUT=$saved

  cat >>"$DIR/env" <<ENV
export SIDEGATE_NODE='$NODE_NAME'
export SIDEGATE_NODE_IP='$NODE_IP'
export CONTAINERD_ADDRESS='$ctd/containerd.sock'
export CONTAINERD_NAMESPACE=k8s.io
export SIDEGATE_NODE_SNAPSHOTTER_USED='$snapshotter' # for ctr images import --snapshotter
export PATH='$CTD_BIN':"\$PATH"
ENV
  log "node $NODE_NAME Ready in $((SECONDS - t_node)) s (containerd $("$CTD_BIN/containerd" --version | cut -d' ' -f3), runc $(runc --version | head -1 | cut -d' ' -f3), snapshotter $snapshotter)"
}

# overlayfs works here: a real overlay mount of two temp dirs (containerd's overlayfs snapshotter
# needs it; inside some containers it is refused).
node_overlay_works() {
  local t=$1/overlay-probe ok=1
  mkdir -p "$t"/{lower,upper,work,merged}
  if mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work" "$t/merged" 2>/dev/null; then
    umount "$t/merged"
    ok=0
  fi
  rm -rf "$t"
  return "$ok"
}

# --- teardown (sourced by tests/cluster/down; uses its log, stop and same_process) -------------
# Stops the node as a cluster would be drained: the scheduler first (so nothing is rescheduled),
# every pod force-deleted through the apiserver so kubelet itself stops their containers and
# tears their network down (CNI DEL), then kubelet and containerd by pid. Whatever is left after
# that (a container task, a shim, a process in the pods' cgroups, a mount under DIR) is stopped or
# unmounted by what DIR names, never by a process name. Removes the pods' cgroups, the bridge and
# CNI's cache files of this network.
node_down() {
  local node=$DIR/node ctd=$DIR/node/containerd t0=$SECONDS
  [[ -d $node ]] || return 0
  local ctr
  ctr=$(ls "${SIDEGATE_CACHE:-$HOME/.cache/sidegate}"/containerd-*/bin/ctr 2>/dev/null | head -1)
  local kubectl=${SIDEGATE_CLUSTER_BIN:-}
  stop kube-scheduler
  if [[ -f $DIR/kubeconfig ]] && kubectl=$(node_kubectl) && pid_alive kubelet &&
    "$kubectl" --kubeconfig="$DIR/kubeconfig" --request-timeout=5s get --raw=/readyz >/dev/null 2>&1; then
    "$kubectl" --kubeconfig="$DIR/kubeconfig" --request-timeout=10s delete pods --all --all-namespaces \
      --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 45))
    while ((SECONDS < deadline)) && node_has_sandboxes "$ctr"; do sleep 0.5; done
    node_has_sandboxes "$ctr" && log "kubelet did not stop every pod within 45 s; stopping the rest with ctr"
  fi
  stop kubelet
  if [[ -n $ctr && -S $ctd/containerd.sock ]] && pid_alive containerd; then
    local id
    for id in $("$ctr" --address "$ctd/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
      "$ctr" --address "$ctd/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    sleep 0.5
    for id in $("$ctr" --address "$ctd/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
      "$ctr" --address "$ctd/containerd.sock" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true
    done
  fi
  stop containerd
  # Processes left in the pods' cgroups (a container whose shim died), then shims serving our
  # socket: found by the cgroup path and the socket path under DIR, both ours alone.
  local cg_root pids p f
  cg_root=$(cat "$node/cgroup-root" 2>/dev/null || true)
  local h
  if [[ -n $cg_root ]]; then
    pids=$(for h in $(node_cgroup_hierarchies); do
      [[ -d $h$cg_root ]] || continue
      find "$h$cg_root" -name cgroup.procs -exec cat {} + 2>/dev/null || true
    done | sort -un)
    for p in $pids; do kill -KILL "$p" 2>/dev/null && log "killed leftover container process $p"; done
  fi
  for f in /proc/[0-9]*/cmdline; do
    p=${f#/proc/}
    p=${p%/cmdline}
    if tr '\0' ' ' 2>/dev/null <"$f" | grep -qF -- "-address $ctd/containerd.sock"; then
      kill -KILL "$p" 2>/dev/null && log "killed leftover shim $p"
    fi
  done
  sleep 0.3
  # Mounts under DIR (container rootfs overlays, pod volumes, network namespaces), deepest first.
  local m left=0
  for _ in 1 2 3; do
    left=0
    while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || left=$((left + 1))
    done < <(awk -v d="$DIR/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    ((left == 0)) && break
    sleep 0.5
  done
  ((left == 0)) || log "warning: $left mounts under $DIR could not be unmounted"
  if [[ -n $cg_root ]]; then
    for h in $(node_cgroup_hierarchies --with-unified); do
      [[ -d $h$cg_root ]] || continue
      find "$h$cg_root" -depth -type d -exec rmdir {} + 2>/dev/null ||
        log "warning: could not remove cgroup $h$cg_root"
    done
  fi
  if [[ -f $node/bridge ]] && ip link show "$(cat "$node/bridge")" >/dev/null 2>&1; then
    ip link del "$(cat "$node/bridge")" && log "deleted bridge $(cat "$node/bridge")"
  fi
  rm -f /var/lib/cni/results/sidegate-node-* 2>/dev/null || true
  for f in /var/log/containers/*.log; do
    [[ -L $f && $(readlink "$f") == "$DIR/"* ]] && rm -f "$f"
  done
  if [[ -f $node/created-paths ]]; then
    if grep -qx /var/lib/kubelet/device-plugins "$node/created-paths"; then
      [[ -S /var/lib/kubelet/device-plugins/kubelet.sock ]] && rm -f /var/lib/kubelet/device-plugins/kubelet.sock
    fi
    # Sockets of shims that were killed (not stopped) stay in /run/containerd/s; all of them are
    # this node's when it made the directory.
    if grep -qx /run/containerd/s "$node/created-paths"; then
      find /run/containerd/s -maxdepth 1 -type s -delete 2>/dev/null || true
    fi
    sort -r "$node/created-paths" | while read -r p; do rmdir "$p" 2>/dev/null || true; done
  fi
  log "node stopped and cleaned up in $((SECONDS - t0)) s"
}

node_kubectl() {
  local k=${SIDEGATE_CLUSTER_BIN:-${SIDEGATE_CACHE:-$HOME/.cache/sidegate}/k8s-v1.37.2/bin}/kubectl
  [[ -x $k ]] && echo "$k"
}

node_has_sandboxes() { # ctr
  [[ -n $1 && -S $DIR/node/containerd/containerd.sock ]] || return 1
  [[ -n $("$1" --address "$DIR/node/containerd/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null) ]]
}

# The cgroup hierarchies pods' cgroups go in: every v1 hierarchy under /sys/fs/cgroup (not the
# hybrid layout's cgroup2 at unified/, where runc mirrors the paths: --with-unified adds it, for
# cleanup), or /sys/fs/cgroup itself on a cgroup v2 host (v2 is not what this machine has, and
# is untested here).
node_cgroup_hierarchies() {
  if [[ ${1:-} == --with-unified && -d /sys/fs/cgroup/unified ]] &&
    [[ $(stat -fc %T /sys/fs/cgroup/unified) == cgroup2fs && $(stat -fc %T /sys/fs/cgroup) != cgroup2fs ]]; then
    echo /sys/fs/cgroup/unified
  fi
  if [[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]]; then
    echo /sys/fs/cgroup
    return
  fi
  local h
  for h in /sys/fs/cgroup/*/; do
    h=${h%/}
    [[ $h == */unified || -L $h ]] && continue
    [[ $(stat -fc %T "$h") == cgroupfs ]] && echo "$h"
  done
}

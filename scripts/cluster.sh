#!/usr/bin/env bash
# A Kubernetes cluster of N nodes (2 by default) made of upstream parts, on this machine, for
# Ignis' end-to-end tests and a user's first try:
#
#   scripts/cluster.sh up [--nodes N]   start the cluster (builds the components on first use);
#                                       N also from IGNIS_CLUSTER_NODES
#   scripts/cluster.sh install-ignis    build the images, load them into every node, `helm
#                                       install` the chart, wait for the controller and agents
#   scripts/cluster.sh exec NODE -- CMD run CMD in node NODE's network namespace
#   scripts/cluster.sh kubeconfig       print the admin kubeconfig's path (last line)
#   scripts/cluster.sh down             remove everything `up` and the cluster made; idempotent
#
# IGNIS_CLUSTER_INSTANCE=K (1-9) gives every name, directory and address of another cluster
# (scripts/cluster-defaults.sh), so several can run side by side, one per work tree.
#
# Parts: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy built
# from k8s.io/kubernetes, etcd from go.etcd.io/etcd, Helm from helm.sh/helm (scripts/tools.sh);
# containerd 1.6, runc and the CNI plugins from Debian; the pause image compiled here from the
# kubernetes module's own build/pause/linux/pause.c. A PKI is generated per cluster; the
# apiserver authorizes with Node,RBAC and admits with NodeRestriction, and writes an audit log.
#
# Nodes: each node is a network namespace of its own ($NETNS for the first, $NETNS-<i> for the
# others) holding its kubelet (own --root-dir, own cgroupRoot /ignis-cluster/<node>, so no
# kubelet ever manages another's pod cgroups), its containerd (own root, state dir and socket),
# its kube-proxy, and a CNI bridge with a pod range of its own (host-local IPAM). The nodes'
# namespaces hang off one host bridge by a veth each, on a /24; every namespace (and the host)
# routes every other node's pod range to that node. The control plane (etcd, apiserver,
# controller-manager, scheduler) and the image registry run in the first node's namespace.
# Nothing is forwarded or NATed on the host: the nodes reach each other and the host, nothing
# beyond. containerd's of the user's is never touched. Everything on disk lives under $DIR and
# $RUN. The kubelet sets a few kernel sysctls (vm.overcommit_memory, kernel.panic,
# kernel.panic_on_oops) as on any node; `up` records them and `down` restores them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

source "$root/scripts/cluster-defaults.sh"
NODES_N="${IGNIS_CLUSTER_NODES:-2}"
HOST_IP="$NET.1"
NODE_IP="$NET.2"
CLUSTER_POD_CIDR="$POD_NET.0.0/16"
API_SERVICE_IP="${SERVICE_CIDR%.*/*}.1"
# An image registry on the first node's address (plain HTTP, basic auth), for guests from OCI
# images: the host pushes to it over the bridge, the agents pull from it (listed as insecure).
REGISTRY="$NODE_IP:5000"
REGISTRY_USER="ignis"
PAUSE_IMAGE="localhost/ignis-cluster/pause:3.10.1"
RELEASE="${IGNIS_RELEASE:-ignis}"
RELEASE_NS="${IGNIS_RELEASE_NAMESPACE:-ignis-system}"
CNI_NETWORK="ignis-cluster"
# A lost node is NotReady after this long (upstream default 40 s): the node-loss e2e test waits
# for it before the out-of-service taint lets the pod GC force-delete the node's pods.
NODE_GRACE="${IGNIS_CLUSTER_NODE_GRACE:-20s}"
# How long each wait may take; generous for a loaded 2-core machine, never unbounded.
WAIT="${IGNIS_CLUSTER_WAIT:-180}"

# The nodes `up` made, one name a line (read by every other subcommand).
NODES_FILE="$DIR/nodes.list"

say() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

need() {
  local missing=() c
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run scripts/setup.sh (Debian packages containerd runc containernetworking-plugins umoci skopeo debootstrap conntrack curl openssl)"
}

# ----- nodes ---------------------------------------------------------------------------------

# Node i (1-based): its name, namespace, address, host-side veth, pod range and directories.
node_name() { if (($1 == 1)); then echo "$NODE"; else echo "$NODE-$1"; fi; }
node_netns() { if (($1 == 1)); then echo "$NETNS"; else echo "$NETNS-$1"; fi; }
node_ip() { echo "$NET.$(($1 + 1))"; }
node_veth() { echo "$VETH_PREFIX$(($1 - 1))"; }
node_pod_cidr() { echo "$POD_NET.$(($1 - 1)).0/24"; }
node_dir() { echo "$DIR/nodes/$(node_name "$1")"; }
node_run() { echo "$RUN/nodes/$(node_name "$1")"; }
node_ctr_sock() { echo "$(node_run "$1")/containerd/containerd.sock"; }

# The indices of the nodes `up` made (from $NODES_FILE), or 1..N before that.
node_indices() {
  local n=0
  [ -f "$NODES_FILE" ] && n="$(grep -c . "$NODES_FILE" || true)"
  ((n > 0)) || n="$NODES_N"
  seq 1 "$n"
}

# The index of node NAME, or failure.
node_index() {
  local i
  for i in $(node_indices); do
    [ "$(node_name "$i")" = "$1" ] && { echo "$i"; return 0; }
  done
  return 1
}

# Run a command inside node i's network namespace, in the host's mount namespace (so the
# kubelet's and containerd's mounts are the same ones, and `down` can find them).
in_node() { local i="$1"; shift; nsenter --net="/run/netns/$(node_netns "$i")" -- "$@"; }
# The control plane's namespace: the first node's.
in_ns() { in_node 1 "$@"; }

kube_bin() { echo "$(bash "$root/scripts/tools.sh" bindir kube)/$1"; }
kubectl_admin() { "$(kube_bin kubectl)" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# ----- processes -----------------------------------------------------------------------------

# start NAME NODE_INDEX PROGRAM ARGS...: a daemon in node NODE_INDEX's namespace, its own
# session, output to a log.
start() {
  local name="$1" i="$2"; shift 2
  mkdir -p "$DIR/logs" "$RUN/pids"
  nsenter --net="/run/netns/$(node_netns "$i")" -- setsid "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 &
  echo $! >"$RUN/pids/$name.pid"
}

alive() { local p; p="$(cat "$RUN/pids/$1.pid" 2>/dev/null)" && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
# wait_for WHAT NAME COMMAND...: poll COMMAND until it succeeds; fail with NAME's log if NAME
# died or the deadline passed.
wait_for() {
  local what="$1" name="$2"; shift 2
  local deadline=$((SECONDS + WAIT))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$name" ] && ! alive "$name"; then
      tail -n 30 "$DIR/logs/$name.log" >&2 || true
      die "$name exited while waiting for $what (log: $DIR/logs/$name.log)"
    fi
    if ((SECONDS >= deadline)); then
      [ -z "$name" ] || tail -n 30 "$DIR/logs/$name.log" >&2 || true
      die "timed out after ${WAIT}s waiting for $what"
    fi
    sleep 1
  done
}

# ----- PKI -----------------------------------------------------------------------------------

# cert NAME CN O EKU SANS: a key and a certificate signed by the cluster CA.
cert() {
  local name="$1" cn="$2" org="$3" eku="$4" sans="$5" pki="$DIR/pki"
  local subj="/CN=$cn"
  [ -z "$org" ] || subj="/O=$org/CN=$cn"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$subj" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -z "$sans" ] || echo "subjectAltName=$sans"
  } >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 365 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
  chmod 600 "$pki/$name.key"
}

make_pki() {
  local pki="$DIR/pki"
  if [ ! -f "$pki/.complete" ]; then
    rm -rf "$pki"
    mkdir -p "$pki"
    chmod 700 "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -sha256 \
      -subj "/CN=ignis-cluster-ca" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    cert apiserver kube-apiserver "" serverAuth \
      "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert apiserver-kubelet-client kube-apiserver-kubelet-client "" clientAuth ""
    cert admin kubernetes-admin system:masters clientAuth ""
    cert controller-manager system:kube-controller-manager "" clientAuth ""
    cert scheduler system:kube-scheduler "" clientAuth ""
    cert kube-proxy system:kube-proxy "" clientAuth ""
    openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null |
      openssl pkcs8 -topk8 -nocrypt -out "$pki/sa.key"
    openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    chmod 600 "$pki/sa.key"
    touch "$pki/.complete"
  fi
  local i n
  for i in $(node_indices); do
    n="$(node_name "$i")"
    [ -f "$pki/kubelet-serving-$n.crt" ] && continue
    # The Node authorizer and NodeRestriction know a kubelet by exactly this identity.
    cert "kubelet-client-$n" "system:node:$n" system:nodes clientAuth ""
    cert "kubelet-serving-$n" "$n" "" serverAuth "IP:$(node_ip "$i"),DNS:$n"
  done
}

# kubeconfig FILE SERVER CERT_NAME: a kubeconfig for a client certificate of the PKI.
kubeconfig() {
  local file="$1" server="$2" name="$3" pki="$DIR/pki"
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ignis-cluster
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$pki/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 "$pki/$name.crt")
    client-key-data: $(base64 -w0 "$pki/$name.key")
contexts:
- name: ignis-cluster
  context: { cluster: ignis-cluster, user: $name }
current-context: ignis-cluster
EOF
  chmod 600 "$file"
}

# ----- configuration files -------------------------------------------------------------------

# write_cluster_configs and write_node_configs: the control plane's and each node's files.
# shellcheck source=scripts/cluster-configs.sh
. "$root/scripts/cluster-configs.sh"

# ----- the pause image -----------------------------------------------------------------------

# The sandbox image, built from the kubernetes module's own pause.c (nothing can be pulled).
pause_image() {
  local out="$DIR/images/pause.tar"
  [ -f "$out" ] && { echo "$out"; return; }
  local src ver work cc
  ver="$(bash "$root/scripts/tools.sh" version kube)"
  src="$(cd "$root/scripts/tools/kube" && GOFLAGS=-mod=mod go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
  [ -f "$src" ] || die "pause.c not found at $src (scripts/tools.sh build kube downloads it)"
  work="$(mktemp -d)"
  cc=gcc
  command -v musl-gcc >/dev/null && cc=musl-gcc
  "$cc" -Os -static -DVERSION="v3.10.1-ignis-$ver" -o "$work/pause" "$src"
  strip "$work/pause"
  (
    cd "$work"
    umoci init --layout oci >/dev/null
    umoci new --image oci:pause >/dev/null
    umoci insert --image oci:pause pause /pause >/dev/null
    umoci config --image oci:pause --config.entrypoint /pause --config.user 65535:65535 \
      --architecture amd64 --os linux >/dev/null
  )
  mkdir -p "$DIR/images"
  skopeo copy --quiet "oci:$work/oci:pause" "docker-archive:$out.tmp:$PAUSE_IMAGE" >/dev/null
  mv "$out.tmp" "$out"
  rm -rf "$work"
  echo "$out"
}

ctr_node() { local i="$1"; shift; ctr --address "$(node_ctr_sock "$i")" --namespace k8s.io "$@"; }

# ----- up ------------------------------------------------------------------------------------

# The host's end: one bridge with the host's address on the nodes' /24.
bridge_up() {
  if ! ip link show "$HOST_BRIDGE" >/dev/null 2>&1; then
    ip link add "$HOST_BRIDGE" type bridge
    ip addr add "$HOST_IP/24" dev "$HOST_BRIDGE"
  fi
  ip link set "$HOST_BRIDGE" up
}

# Node i's namespace, joined to the host bridge by a veth (eth0 inside).
node_netns_up() {
  local i="$1" ns veth
  ns="$(node_netns "$i")"
  veth="$(node_veth "$i")"
  [ -e "/run/netns/$ns" ] || ip netns add "$ns"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$HOST_BRIDGE" up
    in_node "$i" ip addr add "$(node_ip "$i")/24" dev eth0
    in_node "$i" ip link set eth0 up
    in_node "$i" ip link set lo up
    # Components look for a default route to pick their address; nothing is forwarded or
    # NATed on the host, so a node still reaches nothing beyond the host and the other nodes.
    in_node "$i" ip route add default via "$HOST_IP"
  fi
}

# Every node's pod range routed to that node, in every other node and on the host.
pod_routes() {
  local i j
  for j in $(node_indices); do
    ip route replace "$(node_pod_cidr "$j")" via "$(node_ip "$j")" dev "$HOST_BRIDGE"
    for i in $(node_indices); do
      ((i == j)) || in_node "$i" ip route replace "$(node_pod_cidr "$j")" via "$(node_ip "$j")" dev eth0
    done
  done
}

# The cluster's own cgroup and one per node below it, in every hierarchy (a v1 cpuset one with
# its parent's CPUs and memory nodes, without which it takes no process).
make_cgroup() {
  local h f i path
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -f "${h}cgroup.procs" ] || continue
    for path in "$CGROUP" $(for i in $(node_indices); do echo "$CGROUP/$(node_name "$i")"; done); do
      mkdir -p "$h$path"
      for f in cpuset.cpus cpuset.mems; do
        if [ -f "$h$path/$f" ] && [ -z "$(tr -d '[:space:]' <"$h$path/$f")" ]; then
          cat "$(dirname "$h$path")/$f" >"$h$path/$f"
        fi
      done
    done
  done
}

record_sysctls() {
  [ -f "$DIR/sysctl.saved" ] && return
  local k
  for k in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
           kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do
    echo "$k=$(sysctl -n "$k")"
  done >"$DIR/sysctl.saved"
}

# Node i's containerd, started (not waited for).
start_containerd() {
  local i="$1" n
  n="$(node_name "$i")"
  alive "containerd-$n" || start "containerd-$n" "$i" containerd --config "$(node_dir "$i")/config/containerd.toml"
}

# Node i's kubelet and kube-proxy, started (not waited for).
start_node_agents() {
  local i="$1" n cfg kube
  n="$(node_name "$i")"
  cfg="$(node_dir "$i")/config"
  kube="$(bash "$root/scripts/tools.sh" bindir kube)"
  if ! alive "kubelet-$n"; then
    start "kubelet-$n" "$i" "$kube/kubelet" --config="$cfg/kubelet.yaml" \
      --kubeconfig="$cfg/kubelet.kubeconfig" --root-dir="$(node_dir "$i")/kubelet" \
      --hostname-override="$n" --node-ip="$(node_ip "$i")"
  fi
  alive "kube-proxy-$n" || start "kube-proxy-$n" "$i" "$kube/kube-proxy" --config="$cfg/kube-proxy.yaml"
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, containerd, kubelet)"
  while (($#)); do
    case "$1" in
      --nodes) NODES_N="${2:-}"; shift 2 ;;
      --nodes=*) NODES_N="${1#--nodes=}"; shift ;;
      *) die "up: unknown argument $1 (usage: up [--nodes N])" ;;
    esac
  done
  [[ "$NODES_N" =~ ^[1-9][0-9]?$ ]] && ((NODES_N <= 50)) || die "--nodes wants 1..50, not '$NODES_N'"
  need ip nsenter setsid openssl containerd ctr runc umoci skopeo curl go iptables conntrack \
    docker-registry htpasswd
  [ -x /usr/lib/cni/bridge ] || die "CNI plugins missing in /usr/lib/cni: apt-get install containernetworking-plugins"
  local t0=$SECONDS
  bash "$root/scripts/tools.sh" build kube etcd
  local kube etcd_bin
  kube="$(bash "$root/scripts/tools.sh" bindir kube)"
  etcd_bin="$(bash "$root/scripts/tools.sh" bindir etcd)/etcd"

  mkdir -p "$DIR" "$RUN"
  chmod 700 "$DIR"
  if [ -f "$NODES_FILE" ]; then
    local had
    had="$(grep -c . "$NODES_FILE" || true)"
    ((had == NODES_N)) || die "the cluster is up with $had node(s), not $NODES_N: run down first"
  else
    local i
    for i in $(seq 1 "$NODES_N"); do node_name "$i"; done >"$NODES_FILE"
  fi
  # The agents' state dir below is mounted with Bidirectional propagation, which needs a shared
  # mount under it; the host's / is private here, so $DIR becomes a shared mount of its own.
  if ! mountpoint -q "$DIR"; then
    mount --bind "$DIR" "$DIR"
  fi
  mount --make-rshared "$DIR"
  record_sysctls
  make_cgroup
  bridge_up
  local i
  for i in $(node_indices); do node_netns_up "$i"; done
  pod_routes
  make_pki
  write_cluster_configs
  for i in $(node_indices); do write_node_configs "$i"; done
  # containerd first on every node: it starts while the control plane does.
  for i in $(node_indices); do start_containerd "$i"; done

  if ! alive etcd; then
    start etcd 1 "$etcd_bin" --name "$NODE" --data-dir "$DIR/etcd" \
      --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
      --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
      --initial-cluster "$NODE=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381
  fi
  wait_for "etcd" etcd in_ns curl -sf http://127.0.0.1:2381/health

  local pki="$DIR/pki" cfg="$DIR/config"
  if ! alive kube-apiserver; then
    start kube-apiserver 1 "$kube/kube-apiserver" \
      --etcd-servers=http://127.0.0.1:2379 \
      --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port=6443 \
      --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
      --client-ca-file="$pki/ca.crt" \
      --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
      --allow-privileged=true --profiling=false \
      --service-cluster-ip-range="$SERVICE_CIDR" \
      --service-account-issuer=https://kubernetes.default.svc.cluster.local \
      --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
      --kubelet-client-certificate="$pki/apiserver-kubelet-client.crt" \
      --kubelet-client-key="$pki/apiserver-kubelet-client.key" \
      --kubelet-certificate-authority="$pki/ca.crt" \
      --kubelet-preferred-address-types=InternalIP \
      --audit-policy-file="$cfg/audit-policy.yaml" --audit-log-path="$DIR/audit.log" \
      --audit-log-maxsize=200 --audit-log-maxbackup=1
  fi
  wait_for "kube-apiserver /readyz" kube-apiserver kubectl_admin get --raw /readyz
  # The apiserver reaches kubelets (logs, exec) as this user; the kubelet asks the apiserver.
  kubectl_admin create clusterrolebinding ignis-cluster:apiserver-kubelet-client \
    --clusterrole=system:kubelet-api-admin --user=kube-apiserver-kubelet-client \
    --dry-run=client -o yaml | kubectl_admin apply -f - >/dev/null

  if ! alive kube-controller-manager; then
    start kube-controller-manager 1 "$kube/kube-controller-manager" \
      --kubeconfig="$cfg/controller-manager.kubeconfig" \
      --authentication-kubeconfig="$cfg/controller-manager.kubeconfig" \
      --authorization-kubeconfig="$cfg/controller-manager.kubeconfig" \
      --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
      --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
      --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
      --allocate-node-cidrs=false --service-cluster-ip-range="$SERVICE_CIDR" \
      --node-monitor-grace-period="$NODE_GRACE"
  fi
  if ! alive kube-scheduler; then
    start kube-scheduler 1 "$kube/kube-scheduler" \
      --kubeconfig="$cfg/scheduler.kubeconfig" \
      --authentication-kubeconfig="$cfg/scheduler.kubeconfig" \
      --authorization-kubeconfig="$cfg/scheduler.kubeconfig" \
      --bind-address=127.0.0.1 --leader-elect=false
  fi
  wait_for "kube-controller-manager /healthz" kube-controller-manager \
    in_ns curl -skf https://127.0.0.1:10257/healthz
  wait_for "kube-scheduler /healthz" kube-scheduler in_ns curl -skf https://127.0.0.1:10259/healthz

  local pause n
  pause="$(pause_image)"
  for i in $(node_indices); do
    n="$(node_name "$i")"
    wait_for "containerd of $n" "containerd-$n" ctr_node "$i" version
    ctr_node "$i" images ls -q | grep -qx "$PAUSE_IMAGE" || ctr_node "$i" images import "$pause" >/dev/null
    start_node_agents "$i"
  done
  ln -sfn "kubelet-$NODE.log" "$DIR/logs/kubelet.log"
  for i in $(node_indices); do
    n="$(node_name "$i")"
    wait_for "node $n to register" "kubelet-$n" kubectl_admin get node "$n"
    wait_for "node $n to be Ready" "kubelet-$n" \
      kubectl_admin wait --for=condition=Ready "node/$n" --timeout=5s
    wait_for "kube-proxy /healthz on $n" "kube-proxy-$n" in_node "$i" curl -sf http://127.0.0.1:10256/healthz
  done
  start_registry
  write_env
  say "$(node_indices | wc -l) node(s) Ready $((SECONDS - t0)) s after up ($(kubectl_admin version -o json |
    sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1), etcd $(bash "$root/scripts/tools.sh" version etcd))"
  say "export KUBECONFIG=$KUBECONFIG_ADMIN"
}


# Debian's docker-registry in the first node's namespace with a login of its own (the password
# is made per cluster and kept beside the kubeconfig).
start_registry() {
  local dir="$DIR/registry"
  mkdir -p "$dir/storage"
  [ -s "$dir/password" ] || openssl rand -hex 16 >"$dir/password"
  htpasswd -Bbn "$REGISTRY_USER" "$(cat "$dir/password")" >"$dir/htpasswd" 2>/dev/null
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: $REGISTRY
auth:
  htpasswd:
    realm: ignis-cluster
    path: $dir/htpasswd
EOF
  alive registry || start registry 1 docker-registry serve "$dir/config.yml"
  # 401 without a login is the answer that says it is up.
  wait_for "the image registry on $REGISTRY" registry \
    sh -c "curl -s -o /dev/null -w '%{http_code}' http://$REGISTRY/v2/ | grep -qx 401"
}

# The agent's state directory of node NAME on the host (the chart's agent.stateDirPerNode).
agent_state_dir() { echo "$DIR/ignis/nodes/$1"; }

# Facts the cluster-only end-to-end tests need (e2e/src/upstream.rs reads this file). NETNS,
# NODE, NODE_IP and AGENT_STATE_DIR are the first node's; NODES lists every node, and
# NODE_<i>_* (i from 1) describe each.
write_env() {
  local i n names=()
  for i in $(node_indices); do names+=("$(node_name "$i")"); done
  {
    cat <<EOF
KUBECONFIG=$KUBECONFIG_ADMIN
NETNS=$NETNS
NODE=$NODE
NODE_IP=$NODE_IP
AUDIT_LOG=$DIR/audit.log
HELM=$(bash "$root/scripts/tools.sh" bindir helm)/helm
KUBECTL=$(kube_bin kubectl)
CHART=$root/charts/ignis
RELEASE=$RELEASE
RELEASE_NAMESPACE=$RELEASE_NS
AGENT_STATE_DIR=$(agent_state_dir "$NODE")
VALUES=$DIR/ignis-values.yaml
REGISTRY=$REGISTRY
REGISTRY_CREDS=$REGISTRY_USER:$(cat "$DIR/registry/password" 2>/dev/null)
CLUSTER_SH=$root/scripts/cluster.sh
NODE_GRACE=$NODE_GRACE
NODES=${names[*]}
EOF
    for i in $(node_indices); do
      n="$(node_name "$i")"
      echo "NODE_${i}_NAME=$n"
      echo "NODE_${i}_IP=$(node_ip "$i")"
      echo "NODE_${i}_NETNS=$(node_netns "$i")"
      echo "NODE_${i}_POD_CIDR=$(node_pod_cidr "$i")"
      echo "NODE_${i}_AGENT_STATE_DIR=$(agent_state_dir "$n")"
      echo "NODE_${i}_CGROUP=/$CGROUP/$n"
    done
  } >"$DIR/cluster.env"
}

# ----- install-ignis -------------------------------------------------------------------------

cmd_install_ignis() {
  [ "$(id -u)" = 0 ] || die "needs root"
  if ! { [ -f "$KUBECONFIG_ADMIN" ] && kubectl_admin get --raw /readyz >/dev/null 2>&1; }; then
    die "the cluster is not up: run scripts/cluster.sh up first"
  fi
  local t0=$SECONDS
  bash "$root/scripts/tools.sh" build helm
  local helm
  helm="$(bash "$root/scripts/tools.sh" bindir helm)/helm"

  # The images, built with no container daemon, loaded into every node's containerd.
  "$root/scripts/build-images.sh"
  # shellcheck disable=SC1091
  . "$root/target/images/images.env"
  local image i
  for i in $(node_indices); do
    for image in "$root/target/images/controller.tar" "$root/target/images/agent.tar"; do
      say "loading $(basename "$image") into $(node_name "$i")'s containerd"
      ctr_node "$i" images import "$image" >/dev/null
    done
  done
  # Several nodes share this machine: each agent keeps its state in a directory of its own
  # (agent.stateDirPerNode), so no agent ever finds another node's VMMs by their paths. The
  # demo guest that samples and tests name, /var/lib/ignis/guest, is the first node's (the
  # same files on every node of one machine).
  mkdir -p "$DIR/ignis/nodes"
  ln -sfn "nodes/$NODE/guest" "$DIR/ignis/guest"

  # The chart's values for this cluster: the images just loaded (never pulled), VM state
  # under the cluster's directory so `down` removes it, each node's VMMs under its own cgroup
  # ($(IGNIS_NODE_NAME) is expanded by the kubelet in the agent's arguments).
  cat >"$DIR/ignis-values.yaml" <<EOF
controller:
  image: { repository: $IGNIS_CONTROLLER_REPOSITORY, tag: "$IGNIS_IMAGE_TAG", pullPolicy: Never }
  # VM pods, the chart's default: every MicroVM a pod kube-scheduler places.
  # IGNIS_CLUSTER_VM_PODS=false installs the controller placing VMs itself instead.
  vmPods: { enabled: ${IGNIS_CLUSTER_VM_PODS:-true} }
agent:
  image: { repository: $IGNIS_AGENT_REPOSITORY, tag: "$IGNIS_IMAGE_TAG", pullPolicy: Never }
  stateDir: $DIR/ignis
  stateDirPerNode: true
  vmmCgroup: $CGROUP/\$(IGNIS_NODE_NAME)/ignis-vms
  allowTcg: true  # no KVM on the test machines; TCG is not a security boundary
  # The demo guest every node's samples and tests name (the agent's default is its own
  # state dir's guest/, which is nodes/<node>/guest here).
  allowedPathDirs: [/var/lib/ignis/guest]
  images: { insecureRegistries: ["$REGISTRY"] }
EOF
  write_env
  say "helm upgrade --install $RELEASE charts/ignis -n $RELEASE_NS"
  "$helm" upgrade --install "$RELEASE" "$root/charts/ignis" --namespace "$RELEASE_NS" \
    --create-namespace --kubeconfig "$KUBECONFIG_ADMIN" -f "$DIR/ignis-values.yaml" \
    --wait --timeout "${WAIT}s"
  kubectl_admin -n "$RELEASE_NS" rollout status deployment/ignis-controller --timeout="${WAIT}s"
  kubectl_admin -n "$RELEASE_NS" rollout status daemonset/ignis-agent --timeout="${WAIT}s"
  say "Ignis installed and Ready $((SECONDS - t0)) s after install-ignis"
}

# ----- exec, stop-node -----------------------------------------------------------------------

cmd_exec() {
  local name="${1:-}"
  [ -n "$name" ] && [ "${2:-}" = "--" ] && [ -n "${3:-}" ] ||
    die "usage: scripts/cluster.sh exec NODE -- CMD [ARGS...]"
  shift 2
  [ -f "$NODES_FILE" ] || die "no cluster: run scripts/cluster.sh up first"
  local i
  i="$(node_index "$name")" || die "no node $name (nodes: $(tr '\n' ' ' <"$NODES_FILE"))"
  exec nsenter --net="/run/netns/$(node_netns "$i")" -- "$@"
}

# The network namespaces of node i's pod sandboxes, from its containerd's own records. A
# container removed between the listing and its `info` (a pod terminating) is skipped: under
# pipefail its failed `info` would otherwise fail the caller silently.
sandbox_netns_of() {
  local i="$1" c
  [ -S "$(node_ctr_sock "$i")" ] && ctr_node "$i" version >/dev/null 2>&1 || return 0
  for c in $(ctr_node "$i" containers ls -q 2>/dev/null); do
    ctr_node "$i" containers info "$c" 2>/dev/null |
      sed -n 's#.*"path": "\(/var/run/netns/cni-[^"]*\|/run/netns/cni-[^"]*\)".*#\1#p' || true
  done
}

# Every process in node i's cgroups (its pods' and its VMMs'), from any hierarchy.
node_cgroup_pids() {
  local i="$1" h
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -d "$h$CGROUP/$(node_name "$i")" ] || continue
    find "$h$CGROUP/$(node_name "$i")" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -u
}

# Power node NAME off, as far as the cluster can tell: its kubelet, kube-proxy and containerd
# stop, and every process of its pods (and the VMMs its agent started) is killed. Its Node
# object stays; the controller-manager marks it NotReady after the node grace period. `down`
# still cleans up after it.
cmd_stop_node() {
  local name="${1:-}" i n
  [ -n "$name" ] || die "usage: scripts/cluster.sh stop-node NODE"
  [ -f "$NODES_FILE" ] || die "no cluster: run scripts/cluster.sh up first"
  i="$(node_index "$name")" || die "no node $name"
  n="$(node_name "$i")"
  sandbox_netns_of "$i" >>"$(node_dir "$i")/sandbox-netns"
  local pids=() p
  for p in "kubelet-$n" "kube-proxy-$n" "containerd-$n"; do
    [ -f "$RUN/pids/$p.pid" ] && pids+=("$(cat "$RUN/pids/$p.pid")")
  done
  mapfile -t -O "${#pids[@]}" pids < <(pgrep -f -- "-address $(node_ctr_sock "$i")" 2>/dev/null || true)
  mapfile -t -O "${#pids[@]}" pids < <(node_cgroup_pids "$i")
  ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
  # Whatever raced with the kill (a container starting): once more.
  mapfile -t pids < <(node_cgroup_pids "$i")
  ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
  say "node $n stopped (kubelet, kube-proxy, containerd and every process of its pods killed)"
}

# ----- down ----------------------------------------------------------------------------------

# Every node namespace of this cluster: those `up` recorded, and any other named like them.
all_node_netns() {
  local i
  { for i in $(node_indices); do node_netns "$i"; done
    ip netns list 2>/dev/null | awk '{ print $1 }' | grep -E "^$NETNS(-([2-9]|[1-9][0-9]+))?\$" || true
  } | sort -u
}

# Kill every process of the cluster: the daemons, the containers' shims and processes, and the
# VMMs the agents started (in the nodes' namespaces or in their cgroups). Shim sockets they
# leave are removed.
kill_all() {
  local pids=() p sockets=() ns i shims=()
  for ns in $(all_node_netns); do
    [ -e "/run/netns/$ns" ] && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
  done
  for p in "$RUN"/pids/*.pid; do
    [ -f "$p" ] && pids+=("$(cat "$p")")
  done
  for i in $(node_indices); do
    mapfile -t -O "${#pids[@]}" pids < <(node_cgroup_pids "$i")
    # Shims started by a node's containerd name its socket on their command line.
    mapfile -t -O "${#shims[@]}" shims < <(pgrep -f -- "-address $(node_ctr_sock "$i")" 2>/dev/null || true)
  done
  pids+=("${shims[@]}")
  ((${#pids[@]})) || return 0
  # The shims' own sockets (under /run/containerd/s/), found through their open sockets.
  for p in "${shims[@]}"; do
    local inode
    for inode in $(find "/proc/$p/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n'); do
      sockets+=("$(awk -v i="$inode" '$7 == i && $8 ~ /^\/run\/containerd\/s\// { print $8 }' /proc/net/unix)")
    done
  done
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + 15)) left
  while ((SECONDS < deadline)); do
    left=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left=1; done
    ((left)) || break
    sleep 0.5
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  # A second sweep: anything that entered a namespace or cgroup while we were stopping it.
  pids=()
  for ns in $(all_node_netns); do
    [ -e "/run/netns/$ns" ] && mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
  done
  for i in $(node_indices); do mapfile -t -O "${#pids[@]}" pids < <(node_cgroup_pids "$i"); done
  ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
  for p in "${sockets[@]}"; do [ -z "$p" ] || rm -f "$p"; done
}

# Unmount everything under a path, deepest first.
unmount_under() {
  local path="$1" m
  local mounts
  mounts="$(awk -v p="$path" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r -u)"
  for m in $mounts; do
    m="$(printf '%b' "$m")"
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "needs root"
  # The pod sandboxes' network namespaces (bind mounts under /run/netns), from each
  # containerd's own records while it still runs (and those stop-node saved), so only this
  # cluster's are removed.
  local sandbox_netns=() i
  for i in $(node_indices); do
    mapfile -t -O "${#sandbox_netns[@]}" sandbox_netns < <(sandbox_netns_of "$i")
    [ -f "$(node_dir "$i")/sandbox-netns" ] &&
      mapfile -t -O "${#sandbox_netns[@]}" sandbox_netns <"$(node_dir "$i")/sandbox-netns"
  done
  kill_all
  local n
  for n in "${sandbox_netns[@]}"; do
    [ -n "$n" ] || continue
    umount "$n" 2>/dev/null || umount -l "$n" 2>/dev/null || true
    rm -f "$n"
  done
  # Deleting a namespace takes every interface, route and iptables/nft rule made in it
  # (kube-proxy's, the kubelet's, the CNI bridge's, the agent's bridge, taps and NAT table);
  # deleting the host bridge takes the host's routes to the pod ranges.
  local ns
  for ns in $(all_node_netns); do
    ip netns delete "$ns" 2>/dev/null || true
  done
  for i in $(node_indices); do ip link delete "$(node_veth "$i")" 2>/dev/null || true; done
  ip link delete "$HOST_BRIDGE" 2>/dev/null || true
  unmount_under "$RUN"
  unmount_under "$DIR"
  # The cluster's cgroups: the kubelets' pods and the agents' VMMs (empty once all is killed).
  local h
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    if [ -d "$h$CGROUP" ]; then
      find "$h$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null || true
    fi
  done
  # libcni's result cache (in /var/lib/cni whatever the configuration): this network's entries
  # and the loopback ones of this cluster's pod sandboxes; then the directories, if that
  # emptied them. The same for containerd's shim socket directory.
  rm -f /var/lib/cni/results/"$CNI_NETWORK"-* 2>/dev/null || true
  local sandbox
  for sandbox in "$DIR"/nodes/*/containerd/io.containerd.grpc.v1.cri/sandboxes/*/; do
    [ -d "$sandbox" ] || continue
    rm -f /var/lib/cni/results/cni-loopback-"$(basename "$sandbox")"-* 2>/dev/null || true
  done
  rmdir /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd 2>/dev/null || true
  # The kubelets' /var/log/containers links into this cluster's pod logs.
  if [ -d /var/log/containers ]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$DIR/*" -delete 2>/dev/null || true
  fi
  if [ -f "$DIR/sysctl.saved" ]; then
    sysctl -q -p "$DIR/sysctl.saved" >/dev/null 2>&1 || true
  fi
  rm -rf "$RUN"
  if [ -d "$DIR" ]; then
    rm -rf "$DIR" 2>/dev/null || { unmount_under "$DIR"; rm -rf "$DIR"; }
  fi
  say "down: nothing of the cluster is left"
}

cmd="${1:-}"
[ "$#" = 0 ] || shift
case "$cmd" in
  up) cmd_up "$@" ;;
  install-ignis) cmd_install_ignis ;;
  exec) cmd_exec "$@" ;;
  stop-node) cmd_stop_node "$@" ;;
  kubeconfig)
    [ -f "$KUBECONFIG_ADMIN" ] || die "no cluster: run scripts/cluster.sh up first"
    echo "$KUBECONFIG_ADMIN"
    ;;
  down) cmd_down ;;
  *) die "usage: scripts/cluster.sh up [--nodes N] | install-ignis | exec NODE -- CMD | stop-node NODE | kubeconfig | down" ;;
esac

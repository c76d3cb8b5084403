#!/usr/bin/env bash
# A one-node Kubernetes cluster made of upstream parts, on this machine, for Ignis' end-to-end
# tests and a user's first try:
#
#   scripts/cluster.sh up              start the cluster (builds the components on first use)
#   scripts/cluster.sh install-ignis   build the images, load them, `helm install` the chart,
#                                      wait for the controller and agent pods to be Ready
#   scripts/cluster.sh kubeconfig      print the admin kubeconfig's path (last line)
#   scripts/cluster.sh down            remove everything `up` and the cluster made; idempotent
#
# Parts: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy built
# from k8s.io/kubernetes, etcd from go.etcd.io/etcd, Helm from helm.sh/helm (scripts/tools.sh);
# containerd 1.6, runc and the CNI plugins from Debian; the pause image compiled here from the
# kubernetes module's own build/pause/linux/pause.c. A PKI is generated per cluster; the
# apiserver authorizes with Node,RBAC and admits with NodeRestriction, and writes an audit log.
#
# Isolation: every process runs in the network namespace $NETNS (made here) and listens only
# there; the host reaches the apiserver through one veth pair on a /30. containerd gets its own
# root, state dir and socket, so a containerd of the user's is never touched. Everything on
# disk lives under $DIR and $RUN. The kubelet sets a few kernel sysctls (vm.overcommit_memory,
# kernel.panic, kernel.panic_on_oops) as on any node; `up` records them and `down` restores them.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

DIR="${IGNIS_CLUSTER_DIR:-/var/lib/ignis-cluster}"
RUN="${IGNIS_CLUSTER_RUN:-/run/ignis-cluster}"
NETNS="${IGNIS_CLUSTER_NETNS:-ignis-cluster}"
NODE="${IGNIS_CLUSTER_NODE:-ignis-node}"
# The /30 between the host and the namespace, the pod network and the service network: ranges
# nothing else on the machine routes.
NET="${IGNIS_CLUSTER_NET:-10.213.0}"
HOST_IP="$NET.1"
NODE_IP="$NET.2"
POD_CIDR="${IGNIS_CLUSTER_POD_CIDR:-10.214.0.0/24}"
SERVICE_CIDR="${IGNIS_CLUSTER_SERVICE_CIDR:-10.215.0.0/24}"
API_SERVICE_IP="${SERVICE_CIDR%.*/*}.1"
# An image registry on the node's address (plain HTTP, basic auth), for guests from OCI images:
# the host pushes to it through the veth, the agent pulls from it (listed as insecure).
REGISTRY="$NODE_IP:5000"
REGISTRY_USER="ignis"
HOST_VETH="ignis-cl0"
PAUSE_IMAGE="localhost/ignis-cluster/pause:3.10.1"
RELEASE="${IGNIS_RELEASE:-ignis}"
RELEASE_NS="${IGNIS_RELEASE_NAMESPACE:-ignis-system}"
CNI_NETWORK="ignis-cluster"
# The cgroup (in every hierarchy) the pods and the VMMs of this cluster live under.
CGROUP="ignis-cluster"
# How long each wait may take; generous for a loaded 2-core machine, never unbounded.
WAIT="${IGNIS_CLUSTER_WAIT:-180}"

KUBECONFIG_ADMIN="$DIR/admin.kubeconfig"
CTR_SOCK="$RUN/containerd/containerd.sock"

say() { echo "cluster: $*" >&2; }
die() { echo "cluster: error: $*" >&2; exit 1; }

need() {
  local missing=() c
  for c in "$@"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run scripts/setup.sh (Debian packages containerd runc containernetworking-plugins umoci skopeo debootstrap conntrack curl openssl)"
}

# Run a command inside the cluster's network namespace, in the host's mount namespace (so the
# kubelet's and containerd's mounts are the same ones, and `down` can find them).
in_ns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

kube_bin() { echo "$(bash "$root/scripts/tools.sh" bindir kube)/$1"; }
kubectl_admin() { "$(kube_bin kubectl)" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# ----- processes -----------------------------------------------------------------------------

# start NAME PROGRAM ARGS...: a daemon in the namespace, its own session, output to a log.
start() {
  local name="$1"; shift
  mkdir -p "$DIR/logs" "$RUN/pids"
  nsenter --net="/run/netns/$NETNS" -- setsid "$@" </dev/null >>"$DIR/logs/$name.log" 2>&1 &
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
  [ -f "$pki/.complete" ] && return
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
  # The Node authorizer and NodeRestriction know a kubelet by exactly this identity.
  cert kubelet-client "system:node:$NODE" system:nodes clientAuth ""
  cert kubelet-serving "$NODE" "" serverAuth "IP:$NODE_IP,DNS:$NODE"
  openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null |
    openssl pkcs8 -topk8 -nocrypt -out "$pki/sa.key"
  openssl ec -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  chmod 600 "$pki/sa.key"
  touch "$pki/.complete"
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

write_configs() {
  local cfg="$DIR/config"
  mkdir -p "$cfg" "$DIR/cni/net.d" "$DIR/cni/ipam" "$DIR/pod-logs" "$DIR/kubelet" \
    "$DIR/containerd" "$RUN/containerd" "$RUN/runc"
  kubeconfig "$KUBECONFIG_ADMIN" "https://$NODE_IP:6443" admin
  kubeconfig "$cfg/controller-manager.kubeconfig" "https://127.0.0.1:6443" controller-manager
  kubeconfig "$cfg/scheduler.kubeconfig" "https://127.0.0.1:6443" scheduler
  kubeconfig "$cfg/kube-proxy.kubeconfig" "https://127.0.0.1:6443" kube-proxy
  kubeconfig "$cfg/kubelet.kubeconfig" "https://127.0.0.1:6443" kubelet-client

  # Metadata of every request (who, what, the response code): enough to prove that nothing a
  # component does is refused by RBAC, without logging Secret contents.
  cat >"$cfg/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
EOF

  # Pod sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE; where this shell
  # lacks it (some sandboxed CI machines), containerd is told to clamp scores to its own.
  local restrict_oom=false
  (( (0x$(awk '/^CapEff/ { print $2 }' /proc/self/status) >> 24) & 1 )) || restrict_oom=true
  cat >"$cfg/containerd.toml" <<EOF
version = 2
root = "$DIR/containerd"
state = "$RUN/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$CTR_SOCK"
[ttrpc]
  address = "$CTR_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  restrict_oom_score_adj = $restrict_oom
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        Root = "$RUN/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
EOF

  cat >"$DIR/cni/net.d/10-$CNI_NETWORK.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$DIR/cni/ipam",
        "ranges": [[{ "subnet": "$POD_CIDR" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
EOF

  cat >"$cfg/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $DIR/pki/ca.crt }
authorization: { mode: Webhook }
tlsCertFile: $DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving.key
containerRuntimeEndpoint: unix://$CTR_SOCK
# This machine runs cgroup v1 (hybrid) without systemd: the cgroupfs driver, and the explicit
# allowance Kubernetes 1.31+ asks for to run on cgroup v1.
cgroupDriver: cgroupfs
failCgroupV1: false
# Pods under a cgroup of this cluster's own (in every hierarchy), so down removes exactly
# what it made, even on a machine that is a node of another cluster too.
cgroupRoot: /$CGROUP
failSwapOn: false
podLogsDir: $DIR/pod-logs
volumePluginDir: $DIR/kubelet/volume-plugins
clusterDomain: cluster.local
registerNode: true
# Images cannot be pulled here, so they must never be garbage-collected; and the disk is shared
# with other work (a percentage of a big shared disk says little), so evict only when it is
# really full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: { memory.available: 100Mi, nodefs.available: 512Mi, imagefs.available: 512Mi }
serializeImagePulls: false
EOF

  cat >"$cfg/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: { kubeconfig: $cfg/kube-proxy.kubeconfig }
hostnameOverride: $NODE
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: iptables
clusterCIDR: $POD_CIDR
# Leave the host-wide conntrack table size and timeouts alone.
conntrack: { maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s }
EOF
}

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

ctr_() { ctr --address "$CTR_SOCK" --namespace k8s.io "$@"; }

# ----- up ------------------------------------------------------------------------------------

netns_up() {
  if [ ! -e "/run/netns/$NETNS" ]; then
    ip netns add "$NETNS"
  fi
  if ! ip link show "$HOST_VETH" >/dev/null 2>&1; then
    ip link add "$HOST_VETH" type veth peer name eth0 netns "$NETNS"
    ip addr add "$HOST_IP/30" dev "$HOST_VETH"
    ip link set "$HOST_VETH" up
    in_ns ip addr add "$NODE_IP/30" dev eth0
    in_ns ip link set eth0 up
    in_ns ip link set lo up
    # Components look for a default route to pick their address; nothing is forwarded or
    # NATed on the host, so the namespace still reaches nothing beyond the host's end.
    in_ns ip route add default via "$HOST_IP"
  fi
}

# The cluster's own cgroup in every hierarchy (a v1 cpuset one with its parent's CPUs and
# memory nodes, without which it takes no process).
make_cgroup() {
  local h f
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
    [ -f "${h}cgroup.procs" ] || continue
    mkdir -p "$h$CGROUP"
    for f in cpuset.cpus cpuset.mems; do
      if [ -f "$h$CGROUP/$f" ] && [ -z "$(tr -d '[:space:]' <"$h$CGROUP/$f")" ]; then
        cat "$h$f" >"$h$CGROUP/$f"
      fi
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

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespace, containerd, kubelet)"
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
  # The agent's state dir below is mounted with Bidirectional propagation, which needs a shared
  # mount under it; the host's / is private here, so $DIR becomes a shared mount of its own.
  if ! mountpoint -q "$DIR"; then
    mount --bind "$DIR" "$DIR"
  fi
  mount --make-rshared "$DIR"
  record_sysctls
  make_cgroup
  netns_up
  make_pki
  write_configs

  if ! alive etcd; then
    start etcd "$etcd_bin" --name "$NODE" --data-dir "$DIR/etcd" \
      --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
      --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
      --initial-cluster "$NODE=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381
  fi
  wait_for "etcd" etcd in_ns curl -sf http://127.0.0.1:2381/health

  local pki="$DIR/pki" cfg="$DIR/config"
  if ! alive kube-apiserver; then
    start kube-apiserver "$kube/kube-apiserver" \
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
    start kube-controller-manager "$kube/kube-controller-manager" \
      --kubeconfig="$cfg/controller-manager.kubeconfig" \
      --authentication-kubeconfig="$cfg/controller-manager.kubeconfig" \
      --authorization-kubeconfig="$cfg/controller-manager.kubeconfig" \
      --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
      --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
      --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key" \
      --allocate-node-cidrs=false --service-cluster-ip-range="$SERVICE_CIDR"
  fi
  if ! alive kube-scheduler; then
    start kube-scheduler "$kube/kube-scheduler" \
      --kubeconfig="$cfg/scheduler.kubeconfig" \
      --authentication-kubeconfig="$cfg/scheduler.kubeconfig" \
      --authorization-kubeconfig="$cfg/scheduler.kubeconfig" \
      --bind-address=127.0.0.1 --leader-elect=false
  fi
  wait_for "kube-controller-manager /healthz" kube-controller-manager \
    in_ns curl -skf https://127.0.0.1:10257/healthz
  wait_for "kube-scheduler /healthz" kube-scheduler in_ns curl -skf https://127.0.0.1:10259/healthz

  if ! alive containerd; then
    start containerd containerd --config "$cfg/containerd.toml"
  fi
  wait_for "containerd" containerd ctr_ version
  local pause
  pause="$(pause_image)"
  ctr_ images ls -q | grep -qx "$PAUSE_IMAGE" || ctr_ images import "$pause" >/dev/null

  if ! alive kubelet; then
    start kubelet "$kube/kubelet" --config="$cfg/kubelet.yaml" \
      --kubeconfig="$cfg/kubelet.kubeconfig" --root-dir="$DIR/kubelet" \
      --hostname-override="$NODE" --node-ip="$NODE_IP"
  fi
  if ! alive kube-proxy; then
    start kube-proxy "$kube/kube-proxy" --config="$cfg/kube-proxy.yaml"
  fi
  wait_for "node $NODE to register" kubelet kubectl_admin get node "$NODE"
  wait_for "node $NODE to be Ready" kubelet \
    kubectl_admin wait --for=condition=Ready "node/$NODE" --timeout=5s
  wait_for "kube-proxy /healthz" kube-proxy in_ns curl -sf http://127.0.0.1:10256/healthz
  start_registry
  write_env
  say "node $NODE Ready $((SECONDS - t0)) s after up ($(kubectl_admin version -o json |
    sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1), etcd $(bash "$root/scripts/tools.sh" version etcd))"
  say "export KUBECONFIG=$KUBECONFIG_ADMIN"
}

# Debian's docker-registry in the namespace with a login of its own (the password is made per
# cluster and kept beside the kubeconfig).
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
  alive registry || start registry docker-registry serve "$dir/config.yml"
  # 401 without a login is the answer that says it is up.
  wait_for "the image registry on $REGISTRY" registry \
    sh -c "curl -s -o /dev/null -w '%{http_code}' http://$REGISTRY/v2/ | grep -qx 401"
}

# Facts the cluster-only end-to-end tests need (e2e/tests/cluster.rs reads this file).
write_env() {
  cat >"$DIR/cluster.env" <<EOF
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
AGENT_STATE_DIR=$DIR/ignis
VALUES=$DIR/ignis-values.yaml
REGISTRY=$REGISTRY
REGISTRY_CREDS=$REGISTRY_USER:$(cat "$DIR/registry/password" 2>/dev/null)
EOF
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

  # The images, built with no container daemon, loaded into the cluster's containerd.
  "$root/scripts/build-images.sh"
  # shellcheck disable=SC1091
  . "$root/target/images/images.env"
  local image
  for image in "$root/target/images/controller.tar" "$root/target/images/agent.tar"; do
    say "loading $(basename "$image") into the cluster's containerd"
    ctr_ images import "$image" >/dev/null
  done

  # The chart's values for this cluster: the images just loaded (never pulled), VM state
  # under the cluster's directory so `down` removes it.
  cat >"$DIR/ignis-values.yaml" <<EOF
controller:
  image: { repository: $IGNIS_CONTROLLER_REPOSITORY, tag: "$IGNIS_IMAGE_TAG", pullPolicy: Never }
agent:
  image: { repository: $IGNIS_AGENT_REPOSITORY, tag: "$IGNIS_IMAGE_TAG", pullPolicy: Never }
  stateDir: $DIR/ignis
  vmmCgroup: $CGROUP/ignis-vms
  allowTcg: true  # no KVM on the test machines; TCG is not a security boundary
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

# ----- down ----------------------------------------------------------------------------------

# Kill every process of the cluster: the daemons, the containers' shims and processes, and the
# VMMs the agent started (all live in the namespace). Shim sockets they leave are removed.
kill_all() {
  local pids=() p sockets=()
  if [ -e "/run/netns/$NETNS" ]; then
    mapfile -t pids < <(ip netns pids "$NETNS" 2>/dev/null || true)
  fi
  for p in "$RUN"/pids/*.pid; do
    [ -f "$p" ] && pids+=("$(cat "$p")")
  done
  # Shims started by this containerd name its socket on their command line.
  for p in $(pgrep -f -- "-address $CTR_SOCK" 2>/dev/null || true); do pids+=("$p"); done
  ((${#pids[@]})) || return 0
  # The shims' own sockets (under /run/containerd/s/), found through their open sockets.
  for p in $(pgrep -f -- "-address $CTR_SOCK" 2>/dev/null || true); do
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
  # A second sweep: anything that entered the namespace while we were stopping it.
  if [ -e "/run/netns/$NETNS" ]; then
    mapfile -t pids < <(ip netns pids "$NETNS" 2>/dev/null || true)
    ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
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
  # The pod sandboxes' network namespaces (bind mounts under /run/netns), from containerd's
  # own records while it still runs, so only this cluster's are removed.
  local sandbox_netns=()
  if [ -S "$CTR_SOCK" ] && ctr_ version >/dev/null 2>&1; then
    local c
    for c in $(ctr_ containers ls -q 2>/dev/null); do
      mapfile -t -O "${#sandbox_netns[@]}" sandbox_netns < <(ctr_ containers info "$c" 2>/dev/null |
        sed -n 's#.*"path": "\(/var/run/netns/cni-[^"]*\|/run/netns/cni-[^"]*\)".*#\1#p')
    done
  fi
  kill_all
  local n
  for n in "${sandbox_netns[@]}"; do
    umount "$n" 2>/dev/null || umount -l "$n" 2>/dev/null || true
    rm -f "$n"
  done
  # Deleting the namespace takes every interface, route and iptables/nft rule made in it
  # (kube-proxy's, the kubelet's, the CNI bridge's, the agent's bridge, taps and NAT table).
  if [ -e "/run/netns/$NETNS" ]; then
    ip netns delete "$NETNS" 2>/dev/null || true
  fi
  ip link delete "$HOST_VETH" 2>/dev/null || true
  unmount_under "$RUN"
  unmount_under "$DIR"
  # The cluster's cgroups: the kubelet's pods and the agent's VMMs (empty once all is killed).
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
  for sandbox in "$DIR"/containerd/io.containerd.grpc.v1.cri/sandboxes/*/; do
    [ -d "$sandbox" ] || continue
    rm -f /var/lib/cni/results/cni-loopback-"$(basename "$sandbox")"-* 2>/dev/null || true
  done
  rmdir /var/lib/cni/results /var/lib/cni /run/containerd/s /run/containerd 2>/dev/null || true
  # The kubelet's /var/log/containers links into this cluster's pod logs.
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
case "$cmd" in
  up) cmd_up ;;
  install-ignis) cmd_install_ignis ;;
  kubeconfig)
    [ -f "$KUBECONFIG_ADMIN" ] || die "no cluster: run scripts/cluster.sh up first"
    echo "$KUBECONFIG_ADMIN"
    ;;
  down) cmd_down ;;
  *) die "usage: scripts/cluster.sh up | install-ignis | kubeconfig | down" ;;
esac

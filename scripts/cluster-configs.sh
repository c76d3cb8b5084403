# Sourced by scripts/cluster.sh: the configuration files of the cluster (kubeconfigs, audit
# policy) and of each node (containerd, CNI, kubelet, kube-proxy). Uses cluster.sh's settings
# and helpers (node_name, node_dir, kubeconfig, ...).

# What the control plane needs, once per cluster.
write_cluster_configs() {
  local cfg="$DIR/config"
  mkdir -p "$cfg"
  kubeconfig "$KUBECONFIG_ADMIN" "https://$NODE_IP:6443" admin
  kubeconfig "$cfg/controller-manager.kubeconfig" "https://127.0.0.1:6443" controller-manager
  kubeconfig "$cfg/scheduler.kubeconfig" "https://127.0.0.1:6443" scheduler
  kubeconfig "$cfg/kube-proxy.kubeconfig" "https://$NODE_IP:6443" kube-proxy

  # Metadata of every request (who, what, the response code): enough to prove that nothing a
  # component does is refused by RBAC, without logging Secret contents.
  cat >"$cfg/audit-policy.yaml" <<'EOT'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
EOT
}

# Node i's containerd, CNI, kubelet and kube-proxy configuration, under its own directory.
write_node_configs() {
  local i="$1" n ip nd nr sock cfg
  n="$(node_name "$i")"
  ip="$(node_ip "$i")"
  nd="$(node_dir "$i")"
  nr="$(node_run "$i")"
  sock="$(node_ctr_sock "$i")"
  cfg="$nd/config"
  mkdir -p "$cfg" "$nd/cni/net.d" "$nd/cni/ipam" "$nd/pod-logs" "$nd/kubelet" \
    "$nd/containerd" "$nr/containerd" "$nr/runc"
  kubeconfig "$cfg/kubelet.kubeconfig" "https://$NODE_IP:6443" "kubelet-client-$n"

  # Pod sandboxes ask for oom_score_adj -998, which needs CAP_SYS_RESOURCE; where this shell
  # lacks it (some sandboxed CI machines), containerd is told to clamp scores to its own.
  local restrict_oom=false
  (( (0x$(awk '/^CapEff/ { print $2 }' /proc/self/status) >> 24) & 1 )) || restrict_oom=true
  cat >"$cfg/containerd.toml" <<EOT
version = 2
root = "$nd/containerd"
state = "$nr/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$nd/containerd/opt"
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
        Root = "$nr/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni/net.d"
EOT

  cat >"$nd/cni/net.d/10-$CNI_NETWORK.conflist" <<EOT
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
        "dataDir": "$nd/cni/ipam",
        "ranges": [[{ "subnet": "$(node_pod_cidr "$i")" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    }
  ]
}
EOT

  cat >"$cfg/kubelet.yaml" <<EOT
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: { enabled: false }
  webhook: { enabled: true }
  x509: { clientCAFile: $DIR/pki/ca.crt }
authorization: { mode: Webhook }
tlsCertFile: $DIR/pki/kubelet-serving-$n.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving-$n.key
containerRuntimeEndpoint: unix://$sock
# This machine runs cgroup v1 (hybrid) without systemd: the cgroupfs driver, and the explicit
# allowance Kubernetes 1.31+ asks for to run on cgroup v1.
cgroupDriver: cgroupfs
failCgroupV1: false
# Pods under a cgroup of this node's own (in every hierarchy): two kubelets on one machine
# never manage each other's pod cgroups, and down removes exactly what the cluster made.
cgroupRoot: /$CGROUP/$n
failSwapOn: false
podLogsDir: $nd/pod-logs
volumePluginDir: $nd/kubelet/volume-plugins
clusterDomain: cluster.local
registerNode: true
# Images cannot be pulled here, so they must never be garbage-collected; and the disk is shared
# with other work (a percentage of a big shared disk says little), so evict only when it is
# really full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: { memory.available: 100Mi, nodefs.available: 512Mi, imagefs.available: 512Mi }
serializeImagePulls: false
EOT

  cat >"$cfg/kube-proxy.yaml" <<EOT
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: { kubeconfig: $DIR/config/kube-proxy.kubeconfig }
hostnameOverride: $n
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: iptables
clusterCIDR: $CLUSTER_POD_CIDR
# Leave the host-wide conntrack table size and timeouts alone.
conntrack: { maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s }
EOT
}

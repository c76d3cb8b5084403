# shellcheck shell=bash
# Where a test cluster lives: sourced by scripts/cluster.sh and scripts/flux.sh, so both name the
# same directories, namespaces and addresses. Every value may be set on its own
# (IGNIS_CLUSTER_DIR, …); IGNIS_CLUSTER_INSTANCE=K (1–9) moves all of them at once, so several
# clusters can run side by side on one machine (for example one per work tree).
INSTANCE="${IGNIS_CLUSTER_INSTANCE:-}"
if [ -n "$INSTANCE" ]; then
  case "$INSTANCE" in [1-9]) ;; *) echo "IGNIS_CLUSTER_INSTANCE must be 1-9, not $INSTANCE" >&2; exit 2 ;; esac
  sfx="-$INSTANCE"
else
  sfx=""
fi
DIR="${IGNIS_CLUSTER_DIR:-/var/lib/ignis-cluster$sfx}"
RUN="${IGNIS_CLUSTER_RUN:-/run/ignis-cluster$sfx}"
# Node i>1 of a cluster is "$NETNS-<i>", so an instance's name must never look like that of
# another's node ("ignis-cluster-2" is the default cluster's second node).
if [ -n "$INSTANCE" ]; then netns="ignis-c$INSTANCE"; else netns="ignis-cluster"; fi
NETNS="${IGNIS_CLUSTER_NETNS:-$netns}"
NODE="${IGNIS_CLUSTER_NODE:-ignis${INSTANCE:+$INSTANCE}-node}"
# The /24 the host and the nodes share, the nodes' pod ranges (node i gets <POD_NET>.<i-1>.0/24
# of <POD_NET>.0.0/16) and the service network: ranges nothing else on the machine routes.
if [ -n "$INSTANCE" ]; then net="10.216.$INSTANCE"; else net="10.213.0"; fi
NET="${IGNIS_CLUSTER_NET:-$net}"
POD_NET="${IGNIS_CLUSTER_POD_NET:-10.$((214 + ${INSTANCE:-0} * 3))}"
SERVICE_CIDR="${IGNIS_CLUSTER_SERVICE_CIDR:-10.215.${INSTANCE:-0}.0/24}"
HOST_BRIDGE="${IGNIS_CLUSTER_BRIDGE:-ignis-clbr$sfx}"
# The host-side veth of node i is <VETH_PREFIX><i-1>.
VETH_PREFIX="ignis-cl${INSTANCE:+$INSTANCE-}"
# The cgroup (in every hierarchy) the pods and the VMMs of this cluster live under; node <n>'s
# are under $CGROUP/<n>.
CGROUP="ignis-cluster$sfx"
KUBECONFIG_ADMIN="$DIR/admin.kubeconfig"
unset sfx net netns

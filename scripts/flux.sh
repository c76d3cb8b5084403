#!/usr/bin/env bash
# Flux on the upstream test cluster (scripts/cluster.sh): source-controller and
# kustomize-controller built from their Go modules (scripts/tools.sh build flux), their own
# CRDs, and a git server, so a MicroVM can be driven by commits alone.
#
#   scripts/flux.sh up      install the CRDs, start the controllers and the git server, create
#                           the GitRepository and Kustomization that sync the repository
#   scripts/flux.sh env     print the environment the e2e test reads (after `up`)
#   scripts/flux.sh down    stop them and delete what `up` created; idempotent
#
# Everything runs as processes in the cluster's network namespace, with the admin kubeconfig
# (no image is pulled, so none is needed): the controllers talk to the apiserver at the node's
# address, source-controller serves its artifacts there (kustomize-controller fetches them), and
# `git http-backend` behind scripts/git-http.py serves the bare repository
# http://NODE:8418/ignis.git, which takes anonymous pushes from the host. State lives under the
# cluster's directories, so `scripts/cluster.sh down` removes it too.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

source "$root/scripts/cluster-defaults.sh"
NODE_IP="$NET.2"
FLUX_DIR="$DIR/flux"
NS=flux-system
GIT_PORT=8418
STORAGE_PORT=9090
REPO_URL="http://$NODE_IP:$GIT_PORT/ignis.git"
# How often Flux looks at the repository and re-applies; short, so a push shows in seconds.
INTERVAL="${IGNIS_FLUX_INTERVAL:-5s}"
# The Kustomization's health-check timeout: a MicroVM that never gets Ready fails it after this.
TIMEOUT="${IGNIS_FLUX_TIMEOUT:-3m}"
WAIT=120

say() { echo "flux: $*" >&2; }
die() { echo "flux: error: $*" >&2; exit 1; }

kubectl_() { "$(bash "$root/scripts/tools.sh" bindir kube)/kubectl" --kubeconfig "$KUBECONFIG_ADMIN" "$@"; }

# start NAME ENV... -- PROGRAM ARGS...: a daemon in the cluster's namespace, output to a log.
start() {
  local name="$1"; shift
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  mkdir -p "$FLUX_DIR/logs" "$RUN/pids"
  nsenter --net="/run/netns/$NETNS" -- env "${envs[@]}" setsid "$@" </dev/null \
    >>"$FLUX_DIR/logs/$name.log" 2>&1 &
  echo $! >"$RUN/pids/flux-$name.pid"
}

alive() { local p; p="$(cat "$RUN/pids/flux-$1.pid" 2>/dev/null)" && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

wait_for() {
  local what="$1" name="$2"; shift 2
  local deadline=$((SECONDS + WAIT))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$name" ] && ! alive "$name"; then
      tail -n 30 "$FLUX_DIR/logs/$name.log" >&2 || true
      die "$name exited while waiting for $what"
    fi
    ((SECONDS < deadline)) || die "timed out after ${WAIT}s waiting for $what"
    sleep 1
  done
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root"
  kubectl_ get --raw /readyz >/dev/null 2>&1 || die "the cluster is not up: scripts/cluster.sh up"
  local t0=$SECONDS bin
  bash "$root/scripts/tools.sh" build flux
  bin="$(bash "$root/scripts/tools.sh" bindir flux)"
  mkdir -p "$FLUX_DIR/storage" "$FLUX_DIR/git"

  kubectl_ apply --server-side -f "$bin/crds/" >/dev/null
  kubectl_ wait --for condition=established --timeout=60s -f "$bin/crds/" >/dev/null
  kubectl_ create namespace "$NS" --dry-run=client -o yaml | kubectl_ apply -f - >/dev/null

  # The repository: bare, pushable over HTTP, with a first commit so the source is Ready.
  local repo="$FLUX_DIR/git/ignis.git"
  if [ ! -d "$repo" ]; then
    git init -q --bare -b main "$repo"
    git -C "$repo" config http.receivepack true
    local seed
    seed="$(mktemp -d)"
    git -C "$seed" init -q -b main
    printf '# MicroVMs synced by Flux (scripts/flux.sh)\n' >"$seed/README.md"
    git -C "$seed" add README.md
    git -C "$seed" -c user.name=ignis -c user.email=ignis@localhost commit -q -m "empty"
    git -C "$seed" push -q "$repo" main
    rm -rf "$seed"
  fi
  alive git || start git -- python3 "$root/scripts/git-http.py" "$NODE_IP" "$GIT_PORT" "$FLUX_DIR/git"
  wait_for "the git server" git git ls-remote "$REPO_URL"

  local common=(KUBECONFIG="$KUBECONFIG_ADMIN" RUNTIME_NAMESPACE="$NS" HOME="$FLUX_DIR")
  alive source-controller || start source-controller "${common[@]}" -- "$bin/source-controller" \
    --storage-path="$FLUX_DIR/storage" --storage-addr="$NODE_IP:$STORAGE_PORT" \
    --storage-adv-addr="$NODE_IP:$STORAGE_PORT" --metrics-addr=127.0.0.1:18080 \
    --health-addr=127.0.0.1:19440 --enable-leader-election=false --events-addr= \
    --log-level=info
  alive kustomize-controller || start kustomize-controller "${common[@]}" -- \
    "$bin/kustomize-controller" --metrics-addr=127.0.0.1:18081 --health-addr=127.0.0.1:19441 \
    --enable-leader-election=false --events-addr= --log-level=info
  wait_for "source-controller's health" source-controller \
    nsenter --net="/run/netns/$NETNS" -- curl -fsS http://127.0.0.1:19440/readyz
  wait_for "kustomize-controller's health" kustomize-controller \
    nsenter --net="/run/netns/$NETNS" -- curl -fsS http://127.0.0.1:19441/readyz

  kubectl_ apply -f - >/dev/null <<YAML
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata:
  name: ignis
  namespace: $NS
spec:
  url: $REPO_URL
  ref: { branch: main }
  interval: $INTERVAL
  timeout: 30s
---
apiVersion: kustomize.toolkit.fluxcd.io/v1
kind: Kustomization
metadata:
  name: ignis
  namespace: $NS
spec:
  sourceRef: { kind: GitRepository, name: ignis }
  path: ./
  targetNamespace: default
  interval: $INTERVAL
  retryInterval: $INTERVAL
  prune: true
  wait: true
  timeout: $TIMEOUT
YAML
  wait_for "the GitRepository to be Ready" "" \
    kubectl_ -n "$NS" wait --for=condition=Ready --timeout=5s gitrepository/ignis
  wait_for "the Kustomization to be Ready" "" \
    kubectl_ -n "$NS" wait --for=condition=Ready --timeout=5s kustomization/ignis
  say "up in $((SECONDS - t0)) s: repository $REPO_URL, Kustomization $NS/ignis (wait, prune)"
  cmd_env
}

cmd_env() {
  echo "IGNIS_E2E_FLUX_REPO=$REPO_URL"
  echo "IGNIS_E2E_FLUX_KUSTOMIZATION=$NS/ignis"
}

cmd_down() {
  [ "$(id -u)" = 0 ] || die "needs root"
  if [ -f "$KUBECONFIG_ADMIN" ] && kubectl_ get --raw /readyz >/dev/null 2>&1; then
    # Deleted while the controllers run, so their finalizers prune what the Kustomization
    # applied (the MicroVMs) and nothing is left held by a finalizer no one serves.
    kubectl_ -n "$NS" delete kustomization/ignis gitrepository/ignis --ignore-not-found \
      --wait=true --timeout=60s >/dev/null 2>&1 || true
  fi
  local name p
  for name in kustomize-controller source-controller git; do
    p="$(cat "$RUN/pids/flux-$name.pid" 2>/dev/null)" || continue
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
    rm -f "$RUN/pids/flux-$name.pid"
  done
  if [ -f "$KUBECONFIG_ADMIN" ] && kubectl_ get --raw /readyz >/dev/null 2>&1; then
    kubectl_ delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
    local bin
    bin="$(bash "$root/scripts/tools.sh" bindir flux)"
    [ -d "$bin/crds" ] && kubectl_ delete -f "$bin/crds/" --ignore-not-found >/dev/null 2>&1 || true
  fi
  rm -rf "$FLUX_DIR"
  say "down"
}

case "${1:-}" in
  up) cmd_up ;;
  env) cmd_env ;;
  down) cmd_down ;;
  *) die "usage: scripts/flux.sh up | env | down" ;;
esac

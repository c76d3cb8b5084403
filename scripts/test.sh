#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, integration tests with real QEMU
# guests, end-to-end tests with kubectl against `ignis dev`, a short soak, then the same
# end-to-end tests (plus the cluster-only ones) against an upstream two-node Kubernetes
# cluster with Ignis installed by Helm (scripts/cluster.sh), every MicroVM in a VM pod, and the
# cluster-only suites (e2e/tests/{cluster,gitops,attacks,vm_pods}.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

# Every test whose prerequisite (QEMU, root, a tool, the cluster) is missing fails instead of
# skipping: a green run means everything ran.
export IGNIS_REQUIRE_ALL=1

stage() { echo "== test: $* ($(date -u +%H:%M:%S), ${SECONDS}s in)"; }

stage "setup"
./scripts/setup.sh
# Upstream Kubernetes, etcd and Helm from their Go modules (cached by version; the first
# build on 2 cores is the long part of a fresh run; Flux is for the GitOps stage).
stage "upstream tools"
./scripts/tools.sh build kube etcd helm flux
# Its kubectl (the cluster's version) is the one every e2e test runs.
PATH="$(./scripts/tools.sh bindir kube):$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p ignis-e2e --all-targets --features cluster -- -D warnings
./scripts/check-packaging.sh
cargo build --bin ignis
# --all-targets: unit, integration and e2e tests (there are no doctests). The e2e suite runs
# against `ignis dev` here; the cluster-only tests are not built without the `cluster` feature.
stage "tests against ignis dev"
cargo test --workspace --all-targets -- --test-threads 2
# A short soak of failure loops on `ignis dev` with the real QEMU: fails when an fd, thread,
# process, tap, state dir or API object is left over once the workload is removed
# (docs/benchmarks.md, "Soak"; `--duration 30m` for the long setting).
stage "soak"
./target/debug/ignis bench --results-dir "$(mktemp -d)" soak

# The same e2e suite, unchanged, against an upstream cluster: up → install-ignis → e2e → down,
# down also when something fails (after printing what the cluster looked like).
cluster_down() {
  local status=$?
  local kubeconfig
  kubeconfig="$(./scripts/cluster.sh kubeconfig 2>/dev/null | tail -n 1)" || true
  if ((status != 0)) && [ -n "$kubeconfig" ]; then
    echo "== test: failed ($status); the cluster's state:"
    local kubectl_=("$(./scripts/tools.sh bindir kube)/kubectl" --kubeconfig "$kubeconfig")
    "${kubectl_[@]}" get nodes,pods -A -o wide || true
    "${kubectl_[@]}" get events -A --sort-by=.lastTimestamp | tail -40 || true
    "${kubectl_[@]}" -n ignis-system logs -l app.kubernetes.io/name=ignis-controller --tail=60 --prefix || true
    "${kubectl_[@]}" -n ignis-system logs -l app.kubernetes.io/name=ignis-agent --tail=60 --prefix || true
    local log
    for log in "$(dirname "$kubeconfig")"/logs/kubelet-*.log; do
      [ -f "$log" ] && { echo "-- $log"; tail -n 20 "$log"; }
    done
    true
  fi
  ./scripts/cluster.sh down || true
  exit "$status"
}
trap cluster_down EXIT
stage "cluster up"
./scripts/cluster.sh up
stage "install-ignis"
./scripts/cluster.sh install-ignis
IGNIS_E2E_KUBECONFIG="$(./scripts/cluster.sh kubeconfig | tail -n 1)"
IGNIS_E2E_CLUSTER_ENV="$(dirname "$IGNIS_E2E_KUBECONFIG")/cluster.env"
export IGNIS_E2E_KUBECONFIG IGNIS_E2E_CLUSTER_ENV
# network.rs and the control-plane restart need `ignis dev` (on a cluster, cluster.rs restarts
# the agent and the controller, and vm_pods.rs reaches guests through Services).
stage "e2e against the upstream cluster"
cargo test -p ignis-e2e --test e2e --test images -- --test-threads 2 \
  --skip restart_keeps_state_and_readopts_the_vm
stage "cluster-only e2e"
cargo test -p ignis-e2e --features cluster --test cluster -- --nocapture
# GitOps on the same cluster (docs/gitops.md): Flux's source-controller and kustomize-controller
# built from their Go modules (cached by version; the cold build is long), a git server, then
# the Flux e2e driven by git pushes and Helm 4's --wait=watcher. A missing piece fails.
stage_gitops() {
  stage "gitops: Flux on the cluster"
  ./scripts/tools.sh build flux
  local flux_env
  flux_env="$(./scripts/flux.sh up)"
  eval "$flux_env"
  export IGNIS_E2E_FLUX_REPO IGNIS_E2E_FLUX_KUSTOMIZATION
  cargo test -p ignis-e2e --features cluster --test gitops -- --nocapture --test-threads 1
  ./scripts/flux.sh down
}
stage_gitops
# Issue #19's attacks as a tenant ServiceAccount, with the node-side checks (no VMM opened a
# named file, nothing written outside the image cache, confined VMMs); ~30 s.
stage_attacks() {
  stage "attack suite"
  cargo test -p ignis-e2e --features cluster --test attacks -- --nocapture
}
stage_attacks
# Issue #19: each agent serves its own certificate, issued through a CSR only for its node,
# and a managed CA rotation reissues them (~5 min, the kubelet's Secret refreshes).
stage "agent serving certificates (CSR)"
cargo test -p ignis-e2e --features cluster --test agent_csr -- --nocapture
# The cluster bench with suspend and resume, small, so it does not rot (docs/benchmarks.md,
# "cluster", for the N=20 run).
stage "cluster bench"
./target/debug/ignis bench --results-dir "$(mktemp -d)" cluster --count 3 --suspend \
  --kubeconfig "$IGNIS_E2E_KUBECONFIG" --bare-guest-dir "$(dirname "$IGNIS_E2E_KUBECONFIG")/ignis/guest"
# Warm pools on the cluster, small (docs/benchmarks.md, "pool", for the larger run).
./target/debug/ignis bench --results-dir "$(mktemp -d)" pool --cluster \
  --kubeconfig "$IGNIS_E2E_KUBECONFIG" --cold 1 --pool-size 2 --claims 2 --refill 2 --idle-window 2s
# Last: it stops a node for good (the node-loss phase).
stage "VM pods e2e"
cargo test -p ignis-e2e --features cluster --test vm_pods -- --nocapture
stage "done"

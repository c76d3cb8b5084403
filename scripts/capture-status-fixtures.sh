#!/usr/bin/env bash
# Captures MicroVM objects from a real `ignis dev` run, one per phase and failure reason the
# controller produces, into tests/fixtures/status/<case>.yaml: the inputs of
# tests/kstatus_verdicts.rs (kstatus's own code) and tests/argocd_health.rs (our Argo CD Lua),
# whose expected verdicts are the table in docs/gitops.md. Run it again after a change to the
# conditions the controller writes, then review the diff and the table.
#
#   scripts/capture-status-fixtures.sh        (needs target/debug/ignis, QEMU, the kube tools)
#
# Takes about 4 minutes: the boot-timeout cases wait out the agent's 60 s boot deadline.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ignis="${IGNIS_BIN:-$root/target/debug/ignis}"
kubectl="$("$root/scripts/tools.sh" bindir kube)/kubectl"
out="$root/tests/fixtures/status"
[ -x "$ignis" ] || { echo "capture: build $ignis first (cargo build)" >&2; exit 1; }
[ -x "$kubectl" ] || { echo "capture: no kubectl: scripts/tools.sh build kube" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$ignis" dev --data-dir "$work/data" --api-port 0 --health-addr 127.0.0.1:0 >"$work/dev.log" 2>&1 &
pids+=($!)
export KUBECONFIG="$work/data/kubeconfig"
for _ in $(seq 600); do
  [ -f "$KUBECONFIG" ] && "$kubectl" get mvm >/dev/null 2>&1 && break
  sleep 0.1
done
"$kubectl" get mvm >/dev/null || { cat "$work/dev.log" >&2; exit 1; }
guest="$work/data/guest"

# A registry that accepts connections and never answers: a pull from it stays in progress.
python3 -c '
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.getsockname()[1], flush=True)
held = []
while True:
    c, _ = s.accept(); held.append(c)
' >"$work/silent.port" &
pids+=($!)
for _ in $(seq 50); do [ -s "$work/silent.port" ] && break; sleep 0.1; done
silent="127.0.0.1:$(cat "$work/silent.port")"

# vm NAME [runPolicy] [extra cmdline] [readiness marker] [extra spec lines]
vm() {
  local name="$1" policy="${2:-Always}" cmdline="${3:-}" marker="${4:-ignis: ready}" extra="${5:-}"
  cat <<YAML
apiVersion: ignis.dev/v1alpha1
kind: MicroVM
metadata:
  name: $name
spec:
  runPolicy: $policy
  resources:
    memory: 256Mi
  kernel:
    path: $guest/vmlinuz
    cmdline: "console=ttyS0 panic=-1 quiet $cmdline"
  initrd:
    path: $guest/initrd.cpio
  readiness:
    consoleMarker: "$marker"
$extra
YAML
}

# The MicroVM's phase/Ready reason/Stalled status/deletion mark, for matching.
state() {
  "$kubectl" get mvm "$1" -o jsonpath='{.status.phase}/{.status.conditions[?(@.type=="Ready")].reason}/{.status.conditions[?(@.type=="Stalled")].status}/{.metadata.deletionTimestamp}' 2>/dev/null || true
}

# capture CASE NAME PATTERN TIMEOUT_S [optional]: save the object once its state matches the
# glob; an optional case that never matches is reported and skipped.
capture() {
  local case="$1" name="$2" pattern="$3" limit="$4" optional="${5:-}" s=""
  local deadline=$((SECONDS + limit))
  while ((SECONDS < deadline)); do
    s="$(state "$name")"
    # shellcheck disable=SC2053
    if [[ "$s" == $pattern ]]; then
      "$kubectl" get mvm "$name" -o yaml >"$out/$case.yaml"
      echo "capture: $case ($s)"
      return
    fi
    sleep 0.05
  done
  echo "capture: $case: $name never matched '$pattern' within ${limit}s (last: $s)" >&2
  [ -n "$optional" ] && return
  tail -20 "$work/dev.log" >&2
  exit 1
}

apply() { "$kubectl" apply -f - >/dev/null; }

mkdir -p "$out"
rm -f "$out"/*.yaml

# The boot deadline cases first: they take longest, and everything else runs meanwhile.
vm boot-timeout-retried Always "" "never printed" | apply
vm boot-timeout-once Once "" "never printed" | apply

vm starting | apply
capture starting starting 'Starting/Starting/False/' 60
capture ready starting 'Running/GuestReady/False/' 120

# Suspending a ready VM (spec.suspend): Suspending while its memory is saved, then Suspended.
vm suspended | apply
capture suspended-ready suspended 'Running/GuestReady/False/' 120 optional
rm -f "$out/suspended-ready.yaml"
"$kubectl" patch mvm suspended --type merge -p '{"spec":{"suspend":true}}' >/dev/null
capture suspending suspended 'Suspending/Suspending/False/' 30 optional
capture suspended suspended 'Suspended//False/' 60

vm unschedulable Always "" "ignis: ready" "  nodeSelector:
    ignis.dev/no-such-label: \"x\"" | apply
capture unschedulable-waiting unschedulable 'Pending/Pending/False/' 10
capture unschedulable-stalled unschedulable 'Pending/Unschedulable/True/' 40

vm ready-to-delete | apply
vm halted Halted | apply
capture halted halted 'Stopped//False/' 60

vm missing-kernel | sed "s#path: $guest/vmlinuz#path: /nonexistent/vmlinuz#" | apply
capture missing-kernel missing-kernel 'Failed/*/True/' 60

vm succeeded Once "ignis.exit=success" | apply
capture succeeded succeeded 'Succeeded//False/' 120

vm failed-once Once "ignis.exit=failure" | apply
capture failed-once failed-once 'Failed/*/True/' 120

vm crash-loop Always "ignis.exit=failure" | apply
capture crash-loop crash-loop 'Starting/GuestPanic/False/' 120

cat <<YAML | apply
apiVersion: ignis.dev/v1alpha1
kind: MicroVM
metadata:
  name: pulling
spec:
  resources:
    memory: 256Mi
  kernel:
    image: $silent/ignis/kernel:1
YAML
capture pulling pulling 'Starting/PullingImage/False/' 60

cat <<YAML | apply
apiVersion: ignis.dev/v1alpha1
kind: MicroVM
metadata:
  name: pull-failed
spec:
  resources:
    memory: 256Mi
  kernel:
    image: 127.0.0.1:1/ignis/kernel:1
YAML
capture pull-failed pull-failed 'Starting/Registry*/False/' 60

# Halting a running VM: Stopping while the guest shuts down, then Stopped.
"$kubectl" patch mvm starting --type merge -p '{"spec":{"runPolicy":"Halted"}}' >/dev/null
# The demo guest powers off within a poll or two, so Stopping may be missed.
capture stopping starting 'Stopping/Stopping/False/' 30 optional
capture halted-after-running starting 'Stopped//False/' 60

# Deleting: the finalizer holds the object while the VM stops (a second or so for the demo
# guest, so the object is read whole and kept if it carries the deletion mark).
"$kubectl" delete mvm ready-to-delete --wait=false >/dev/null
for _ in $(seq 100); do
  "$kubectl" get mvm ready-to-delete -o yaml >"$work/deleting.yaml" 2>/dev/null || break
  if grep -q '^  deletionTimestamp:' "$work/deleting.yaml"; then
    mv "$work/deleting.yaml" "$out/terminating.yaml"
    echo "capture: terminating"
    break
  fi
done
[ -f "$out/terminating.yaml" ] || echo "capture: terminating: missed the deletion window" >&2

# A run that missed its deadline shows BootTimeout only during a crash-loop back-off; a run
# that lasted the whole deadline restarts at once (Starting), so this one may not be seen.
capture boot-timeout-retried boot-timeout-retried 'Starting/BootTimeout/False/' 150 optional
capture boot-timeout-once boot-timeout-once 'Failed/BootTimeout/True/' 150
echo "capture: done: $(ls "$out" | wc -l) fixtures in $out"

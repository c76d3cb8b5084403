#!/usr/bin/env bash
# Builds the upstream programs our real-cluster tests need from their official Go modules, at the
# versions pinned in scripts/tools/<tool>/go.mod, and caches them by version:
#   kube: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
#         kubectl (k8s.io/kubernetes; kubectl so the tests' client matches the cluster)
#   etcd: etcd (go.etcd.io/etcd/server/v3; Kubernetes 1.34 wants etcd 3.6, Debian 12 has 3.4)
#   helm: helm (helm.sh/helm/v4)
#   flux: source-controller and kustomize-controller (github.com/fluxcd/...; only on request)
#   kstatus: our verdict printer over sigs.k8s.io/cli-utils (scripts/tools/kstatus/main.go;
#         only on request; its cache key also hashes the program, so an edit rebuilds it)
#
#   scripts/tools.sh build [kube|etcd|helm|flux|kstatus ...]  build what is not cached yet
#                                                   (default: kube etcd helm)
#   scripts/tools.sh bindir TOOL                    print the cache directory of that tool
#   scripts/tools.sh version TOOL                   print the pinned version
#
# Cache: ${IGNIS_CACHE:-$HOME/.cache/ignis}/<tool>/<version>/, written atomically (a build
# that dies leaves no half-filled directory), so a second run builds nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${IGNIS_CACHE:-$HOME/.cache/ignis}"

die() { echo "tools: $*" >&2; exit 1; }

# The version of the tool's main module, read from its go.mod so there is one place to bump it.
version() {
  local mod
  case "$1" in
    kube) mod=k8s.io/kubernetes ;;
    etcd) mod=go.etcd.io/etcd/server/v3 ;;
    helm) mod=helm.sh/helm/v4 ;;
    flux) mod=github.com/fluxcd/kustomize-controller ;;
    kstatus) mod=sigs.k8s.io/cli-utils ;;
    *) die "unknown tool '$1' (kube, etcd, helm, flux or kstatus)" ;;
  esac
  awk -v m="$mod" '$1 == m || ($1 == "require" && $2 == m) { print ($1 == "require" ? $3 : $2); exit }' \
    "$root/scripts/tools/$1/go.mod"
}

bindir() {
  local suffix=""
  if [ "$1" = kstatus ]; then
    suffix="-$(cat "$root/scripts/tools/kstatus/main.go" "$root/scripts/tools/kstatus/go.sum" | sha256sum | cut -c1-12)"
  fi
  echo "$cache/$1/$(version "$1")$suffix"
}

# The programs each tool's build produces; a cache entry missing one of them is rebuilt, so
# adding a program here is enough to have it built on the next run.
binaries() {
  case "$1" in
    kube) echo kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl ;;
    etcd) echo etcd ;;
    helm) echo helm ;;
    flux) echo source-controller kustomize-controller ;;
    kstatus) echo kstatus ;;
  esac
}

cached() {
  local dir b
  dir="$(bindir "$1")"
  [ -f "$dir/.complete" ] || return 1
  for b in $(binaries "$1"); do [ -x "$dir/$b" ] || return 1; done
  [ "$1" != flux ] || [ -d "$dir/crds" ] || return 1
}

build_one() {
  local tool="$1" ver dir tmp start
  ver="$(version "$tool")"
  [ -n "$ver" ] || die "no version pinned in scripts/tools/$tool/go.mod"
  dir="$(bindir "$tool")"
  if cached "$tool"; then
    echo "tools: $tool $ver cached in $dir" >&2
    return
  fi
  command -v go >/dev/null || die "the Go toolchain is missing: install Go >= 1.26 (https://go.dev/doc/install)"
  mkdir -p "$cache/$tool"
  tmp="$(mktemp -d "$cache/$tool/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' RETURN
  start=$(date +%s)
  echo "tools: building $tool $ver (cold on 2 shared cores, modules downloaded too: kube ~8 min, helm ~3 min, etcd ~1 min, flux ~6 min: 413 CPU-seconds)" >&2
  local -a pkgs ldflags
  case "$tool" in
    kube)
      local minor="${ver#v1.}"; minor="${minor%%.*}"
      local pkg
      for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=("-X $pkg.gitVersion=$ver" "-X $pkg.gitMajor=1" "-X $pkg.gitMinor=$minor"
                  "-X $pkg.gitTreeState=clean" "-X $pkg.buildDate=1970-01-01T00:00:00Z")
      done
      for pkg in $(binaries kube); do pkgs+=("k8s.io/kubernetes/cmd/$pkg"); done
      ;;
    etcd)
      pkgs=(go.etcd.io/etcd/server/v3)
      ;;
    helm)
      ldflags+=("-X helm.sh/helm/v4/internal/version.version=$ver")
      pkgs=(helm.sh/helm/v4/cmd/helm)
      ;;
    flux)
      pkgs=(github.com/fluxcd/source-controller github.com/fluxcd/kustomize-controller)
      ;;
    kstatus)
      pkgs=(.)
      ;;
  esac
  (
    cd "$root/scripts/tools/$tool"
    export CGO_ENABLED=0 GOFLAGS=-mod=mod
    if [ "$tool" = etcd ] || [ "$tool" = kstatus ]; then
      go build -trimpath -ldflags "-s -w ${ldflags[*]:-}" -o "$tmp/$tool" "${pkgs[@]}"
    else
      go build -trimpath -ldflags "-s -w ${ldflags[*]:-}" -o "$tmp/" "${pkgs[@]}"
    fi
    if [ "$tool" = flux ]; then
      # The controllers' own CRDs, from the same module versions, for scripts/flux.sh.
      mkdir -p "$tmp/crds"
      for pkg in "${pkgs[@]}"; do
        cp "$(go list -m -f '{{.Dir}}' "$pkg")"/config/crd/bases/*.yaml "$tmp/crds/"
      done
    fi
  ) || die "building $tool $ver failed (see the go output above)"
  echo "$ver" >"$tmp/.complete"
  rm -rf "$dir"
  mv "$tmp" "$dir"
  echo "tools: built $tool $ver in $(( $(date +%s) - start )) s into $dir" >&2
}

cmd="${1:-build}"
shift || true
case "$cmd" in
  build)
    (($#)) || set -- kube etcd helm
    for tool in "$@"; do build_one "$tool"; done
    ;;
  bindir) [ $# -eq 1 ] || die "usage: tools.sh bindir TOOL"; version "$1" >/dev/null; bindir "$1" ;;
  version) [ $# -eq 1 ] || die "usage: tools.sh version kube|etcd|helm"; version "$1" ;;
  *) die "usage: tools.sh build [kube|etcd|helm|flux|kstatus ...] | bindir TOOL | version TOOL" ;;
esac

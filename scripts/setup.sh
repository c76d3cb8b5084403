#!/usr/bin/env bash
# Installs everything Ignis needs to build, run and test on Debian 12: QEMU, a guest kernel,
# busybox for the demo initramfs, the CNI plugins and iproute2 for networking, the image,
# DHCP and cloud-init tools (scripts/setup-images.sh), the Rust pieces (musl target for the
# static binary, rustfmt, clippy), and what the upstream test cluster (scripts/cluster.sh)
# and the daemonless image build (scripts/build-images.sh) need: containerd, runc, conntrack,
# curl, openssl, debootstrap, umoci, skopeo. The Go toolchain (for scripts/tools.sh) is not a
# Debian 12 package of the right version: it is checked. Safe to run again.
set -euo pipefail

packages=(qemu-system-x86 linux-image-cloud-amd64 busybox-static containernetworking-plugins
          iproute2 nftables iptables kmod procps musl-tools
          containerd runc conntrack curl openssl util-linux debootstrap umoci skopeo lua5.1)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Guests from OCI registries, dnsmasq for DHCP, NoCloud drives, and the image tests' registry.
"$(dirname "$0")/setup-images.sh"

if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup target list --installed | grep -q x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
fi
command -v kubectl >/dev/null || echo "setup: warning: kubectl not found; the e2e tests need it" >&2
command -v go >/dev/null ||
  echo "setup: warning: the Go toolchain (>= 1.26) is missing; scripts/tools.sh needs it to build Kubernetes for the cluster tests (https://go.dev/doc/install)" >&2
echo "setup: ready ($(qemu-system-x86_64 --version | head -1); kernel $(ls /boot/vmlinuz-* | tail -1))"

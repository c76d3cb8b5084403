#!/usr/bin/env bash
# Debian packages for guests from OCI registries, DHCP and cloud-init (issue #12), installed
# on top of setup.sh's: qemu-img for copy-on-write disks, dnsmasq (binary only, no service) for
# DHCP on the NAT bridge, genisoimage for NoCloud drives; and for the tests and the test guest:
# Debian's docker-registry, skopeo, htpasswd, debootstrap. Safe to run again.
set -euo pipefail

packages=(qemu-utils dnsmasq-base genisoimage e2fsprogs
          docker-registry skopeo apache2-utils debootstrap busybox-static)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-images: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # policy-rc.d 101: the registry package must not start a node-wide service on :5000; the
  # tests start their own registries on loopback.
  policy=/usr/sbin/policy-rc.d
  added_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    added_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { [ -n "$added_policy" ] && $SUDO rm -f "$policy"; exit 1; }
  [ -n "$added_policy" ] && $SUDO rm -f "$policy"
  # Nor at the next boot, where systemd runs.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    $SUDO systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
  fi
fi
for tool in qemu-img dnsmasq genisoimage isoinfo mkfs.ext4 docker-registry skopeo htpasswd debootstrap; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null \
    || { echo "setup-images: $tool is missing after install" >&2; exit 1; }
done
echo "setup-images: ready (qemu-img, dnsmasq, genisoimage, docker-registry, skopeo, debootstrap)"

#!/usr/bin/env bash
# The test guest of issue #12, as three OCI images in one OCI layout:
#   kernel  /boot/vmlinuz      the host's Debian cloud kernel
#   initrd  /boot/initrd.img   static busybox + the kernel's virtio/isofs modules; mounts
#                              root= and switches to it
#   rootfs  a Debian bookworm made by debootstrap (minbase + busybox), whose /sbin/init
#           configures eth0 from the kernel's standard ip= parameter or by DHCP (udhcpc),
#           reads the cloud-init NoCloud drive (label cidata: meta-data's local-hostname, and
#           user-data run when it is a script), serves HTTP on port 80 and prints
#           "ignis-guest: ready".
# The output is cached by content (this script, the kernel version, busybox): CI builds it once.
#
#   scripts/build-test-guest.sh build            print the layout directory (build if needed)
#   scripts/build-test-guest.sh push REGISTRY    push ignis-test/{kernel,initrd,rootfs}:latest
#                                                (plain HTTP; IGNIS_REGISTRY_CREDS=user:pass)
set -euo pipefail

SUITE=bookworm
MIRROR=${IGNIS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE_ROOT=${IGNIS_CACHE:-${HOME:-/root}/.cache/ignis}/test-guest

die() { echo "build-test-guest: $*" >&2; exit 1; }
for tool in debootstrap skopeo cpio gzip sha256sum modprobe tar; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" >/dev/null \
    || die "$tool is missing: run scripts/setup-images.sh"
done
export PATH="$PATH:/usr/sbin:/sbin"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap)"

kver=$(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V | tail -1)
[ -n "$kver" ] || die "no /boot/vmlinuz-* (install linux-image-cloud-amd64)"
busybox=$(command -v busybox || true)
[ -n "$busybox" ] && file_is_static=$(LC_ALL=C ldd "$busybox" 2>&1 | grep -c "not a dynamic" || true)
[ "${file_is_static:-0}" -ge 1 ] || die "a static busybox is needed (install busybox-static)"

key=$( { cat "$0"; echo "$kver"; sha256sum "$busybox" "/boot/vmlinuz-$kver"; echo "$SUITE"; } \
       | sha256sum | cut -c1-16)
out="$CACHE_ROOT/$key"

# The guest's /sbin/init (rootfs).
guest_init() {
cat <<'EOF'
#!/bin/sh
# ignis test guest: network from ip= or DHCP, NoCloud user-data, HTTP on :80.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /run /tmp /mnt/cidata /srv/www
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
log() { echo "ignis-guest: $*" > /dev/console; }
log "init on $(uname -r)"
ip link set lo up

param() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -1; }
ipconf=$(param ip)
case "$ipconf" in
  ""|dhcp|on|any|both)
    ip link set eth0 up
    if busybox udhcpc -i eth0 -t 10 -T 1 -n -q -s /etc/ignis/udhcpc.script >/dev/null 2>&1; then
      log "network: dhcp $(ip -4 -o addr show eth0 | awk '{print $4}')"
    else
      log "network: dhcp failed"
    fi ;;
  *)
    # ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>
    IFS=: read -r client server gw mask host dev auto dns0 dns1 <<IP
$ipconf
IP
    dev=${dev:-eth0}
    ip link set "$dev" up
    busybox ifconfig "$dev" "$client" netmask "${mask:-255.255.255.0}" up
    [ -n "$gw" ] && ip route add default via "$gw"
    [ -n "$dns0" ] && echo "nameserver $dns0" > /etc/resolv.conf
    [ -n "$host" ] && hostname "$host"
    log "network: ip= $client/$mask via ${gw:-none}" ;;
esac

# NoCloud: the drive labelled cidata.
for dev in /dev/vd? /dev/sr?; do
  [ -b "$dev" ] || continue
  [ "$(blkid -o value -s LABEL "$dev" 2>/dev/null)" = cidata ] || continue
  mount -t iso9660 -o ro "$dev" /mnt/cidata || continue
  name=$(sed -n 's/^local-hostname: *//p' /mnt/cidata/meta-data | tr -d "\"'")
  [ -n "$name" ] && hostname "$name"
  iid=$(sed -n 's/^instance-id: *//p' /mnt/cidata/meta-data | tr -d "\"'")
  log "nocloud: instance $iid hostname $(hostname) from $dev"
  if head -c 2 /mnt/cidata/user-data | grep -q '^#!'; then
    cp /mnt/cidata/user-data /run/user-data && chmod +x /run/user-data
    /run/user-data > /run/user-data.log 2>&1
    log "user-data ran: exit $?"
  fi
  break
done

echo "hello from $(hostname)" > /srv/www/index.html
[ -f /run/user-data.log ] && cp /run/user-data.log /srv/www/user-data.log
busybox httpd -p 80 -h /srv/www
log "ready"
echo "ignis: ready" > /dev/console
while :; do sleep 3600; done
EOF
}

udhcpc_script() {
cat <<'EOF'
#!/bin/sh
# udhcpc events: configure the lease (busybox's documented environment).
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    busybox ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    [ -n "$hostname" ] && hostname "$hostname" ;;
esac
exit 0
EOF
}

initrd_init() {
cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do insmod "/modules/$m" 2>/dev/null; done
root=/dev/vda
for p in $(cat /proc/cmdline); do case "$p" in root=*) root=${p#root=} ;; esac; done
i=0; while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
mount -t ext4 "$root" /newroot || { echo "initrd: cannot mount $root"; sleep 5; poweroff -f; }
umount /proc /sys; mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
EOF
}

# Append one image (one gzip layer) to the OCI layout $1 under tag $2, from directory $3.
oci_add() {
  local layout=$1 tag=$2 tree=$3 tmp
  tmp=$(mktemp -d)
  tar --numeric-owner --xattrs -C "$tree" -cf "$tmp/layer.tar" .
  local diff_id; diff_id=$(sha256sum "$tmp/layer.tar" | cut -d' ' -f1)
  gzip -n -1 "$tmp/layer.tar"
  local layer; layer=$(sha256sum "$tmp/layer.tar.gz" | cut -d' ' -f1)
  local lsize; lsize=$(stat -c %s "$tmp/layer.tar.gz")
  mv "$tmp/layer.tar.gz" "$layout/blobs/sha256/$layer"
  printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$diff_id" > "$tmp/config.json"
  local config; config=$(sha256sum "$tmp/config.json" | cut -d' ' -f1)
  local csize; csize=$(stat -c %s "$tmp/config.json")
  mv "$tmp/config.json" "$layout/blobs/sha256/$config"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' \
    "$config" "$csize" "$layer" "$lsize" > "$tmp/manifest.json"
  local manifest; manifest=$(sha256sum "$tmp/manifest.json" | cut -d' ' -f1)
  local msize; msize=$(stat -c %s "$tmp/manifest.json")
  mv "$tmp/manifest.json" "$layout/blobs/sha256/$manifest"
  echo "{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$manifest\",\"size\":$msize,\"annotations\":{\"org.opencontainers.image.ref.name\":\"$tag\"}}" \
    >> "$layout/.manifests"
  rm -rf "$tmp"
}

build() {
  work=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  local started=$SECONDS
  local layout="$work/oci"
  mkdir -p "$layout/blobs/sha256"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"

  # kernel
  mkdir -p "$work/kernel/boot"
  cp "/boot/vmlinuz-$kver" "$work/kernel/boot/vmlinuz"
  oci_add "$layout" kernel "$work/kernel"

  # initrd
  local ird="$work/initrd-tree"
  mkdir -p "$ird"/{bin,dev,proc,sys,modules,newroot}
  cp "$busybox" "$ird/bin/busybox"
  : > "$ird/modules.order"
  for m in virtio_mmio virtio_blk virtio_net isofs; do
    modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$ird/modules/"
    basename "$ko" >> "$ird/modules.order"
  done
  initrd_init > "$ird/init"; chmod 755 "$ird/init"
  mkdir -p "$work/initrd/boot"
  (cd "$ird" && find . | cpio --quiet -o -H newc | gzip -9 > "$work/initrd/boot/initrd.img")
  oci_add "$layout" initrd "$work/initrd"

  # rootfs
  local deb_started=$SECONDS
  debootstrap --variant=minbase --include=busybox,iproute2 "$SUITE" "$work/rootfs" "$MIRROR" \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  local deb_secs=$((SECONDS - deb_started))
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  guest_init > "$work/rootfs/sbin/init.ignis"
  rm -f "$work/rootfs/sbin/init"
  mv "$work/rootfs/sbin/init.ignis" "$work/rootfs/sbin/init"
  chmod 755 "$work/rootfs/sbin/init"
  mkdir -p "$work/rootfs/etc/ignis"
  udhcpc_script > "$work/rootfs/etc/ignis/udhcpc.script"
  chmod 755 "$work/rootfs/etc/ignis/udhcpc.script"
  echo "ignis-test-guest" > "$work/rootfs/etc/hostname"
  oci_add "$layout" rootfs "$work/rootfs"

  { echo '{"schemaVersion":2,"manifests":['; paste -sd, "$layout/.manifests"; echo ']}'; } \
    > "$layout/index.json"
  rm -f "$layout/.manifests"
  du -sb "$work/rootfs" | cut -f1 > "$layout/rootfs-bytes"
  echo "debootstrap_seconds=$deb_secs total_seconds=$((SECONDS - started))" > "$layout/build-times"
  rm -rf "$out"
  mv "$layout" "$out"
  # Builds of older versions of this script or another kernel are not used any more.
  find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d ! -name "$key" ! -name '.*' -exec rm -rf {} +
  echo "build-test-guest: built in $((SECONDS - started)) s (debootstrap $deb_secs s): $out" >&2
}

cmd=${1:-build}
case "$cmd" in
  build)
    mkdir -p "$CACHE_ROOT"
    if [ ! -f "$out/index.json" ]; then
      exec 9>"$CACHE_ROOT/.lock"
      flock -w 1800 9 || die "another build holds $CACHE_ROOT/.lock"
      [ -f "$out/index.json" ] || build
    fi
    echo "$out" ;;
  push)
    registry=${2:?usage: build-test-guest.sh push REGISTRY}
    layout=$("$0" build)
    creds=()
    [ -n "${IGNIS_REGISTRY_CREDS:-}" ] && creds=(--dest-creds "$IGNIS_REGISTRY_CREDS")
    for tag in kernel initrd rootfs; do
      skopeo copy --quiet --insecure-policy --dest-tls-verify=false "${creds[@]}" \
        "oci:$layout:$tag" "docker://$registry/ignis-test/$tag:latest"
    done ;;
  *) die "usage: build-test-guest.sh build | push REGISTRY" ;;
esac

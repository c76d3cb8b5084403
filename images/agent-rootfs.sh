#!/bin/sh
# Turns a minimal Debian 12 root into the agent image's root: QEMU (the `microvm` machine and
# its firmware), busybox-static and the guest kernel with its modules (the demo guest's
# initramfs is built from them at agent start), nftables (guest NAT), iproute2 (the VM pod's
# tap, made with its owner by `ip tuntap`), and what guests from OCI
# images need (scripts/setup-images.sh installs the same on a host): qemu-img for per-VM
# copy-on-write disks, mkfs.ext4 for filesystem images, dnsmasq for DHCP on the NAT bridge,
# genisoimage for cloud-init NoCloud drives, and the CA certificates registries over HTTPS are
# checked against (without them the image client cannot be built at all). Run as root inside
# that root: by images/agent.Containerfile (Docker, Buildah) and by scripts/build-images.sh
# (in a debootstrap chroot), so both give the same image.
set -eu
export DEBIAN_FRONTEND=noninteractive

cat >/etc/apt/sources.list <<'SOURCES'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SOURCES
rm -f /etc/apt/sources.list.d/debian.sources
# No services start inside an image build.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
# The kernel package builds an initramfs on install; the agent never boots this kernel's
# initramfs (it makes the demo guest's own), so that minute of work is skipped.
dpkg-divert --local --rename --add /usr/sbin/update-initramfs >/dev/null
ln -sf /bin/true /usr/sbin/update-initramfs

apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  qemu-system-x86 busybox-static linux-image-cloud-amd64 nftables iproute2 \
  qemu-utils e2fsprogs dnsmasq-base genisoimage ca-certificates >/dev/null

rm -f /usr/sbin/update-initramfs
dpkg-divert --local --rename --remove /usr/sbin/update-initramfs >/dev/null
rm -f /usr/sbin/policy-rc.d /boot/initrd.img-*
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
  /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* /tmp/*

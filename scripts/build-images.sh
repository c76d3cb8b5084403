#!/usr/bin/env bash
# Builds Ignis' two container images with no container daemon and no registry:
#   controller: the static (musl) `ignis` binary alone          (images/controller.Containerfile)
#   agent:      the same binary on Debian 12 with QEMU, busybox-static, the guest kernel,
#               nftables, qemu-img, dnsmasq, genisoimage, mkfs.ext4 (images/agent.Containerfile)
# The agent's Debian root is made by debootstrap plus images/agent-rootfs.sh (the script the
# Containerfile runs too) and cached by that script's hash, so a rebuild only adds the binary.
#
# Output in target/images/:
#   oci/             an OCI layout with tags `controller` and `agent` (push it with skopeo)
#   controller.tar   docker-archive tarballs, named REPOSITORY/ignis-{controller,agent}:TAG,
#   agent.tar        for `ctr images import`, `docker load` or `podman load`
#   images.env       the names and the tag, for scripts
#
# Environment: IGNIS_IMAGE_REPOSITORY (default ghcr.io/ignis-dev), IGNIS_IMAGE_TAG (default
# VERSION-<hash of the binary and the base>), IGNIS_DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${IGNIS_CACHE:-$HOME/.cache/ignis}/images"
cargo_target="${CARGO_TARGET_DIR:-$root/target}"
out="$root/target/images"
repository="${IGNIS_IMAGE_REPOSITORY:-ghcr.io/ignis-dev}"
mirror="${IGNIS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
target=x86_64-unknown-linux-musl

say() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, file ownership inside the image)"
missing=()
for c in cargo musl-gcc umoci skopeo debootstrap sha256sum; do
  command -v "$c" >/dev/null || missing+=("$c")
done
((${#missing[@]} == 0)) || die "missing ${missing[*]}: run scripts/setup.sh"
t0=$SECONDS

# 1. The agent's base: Debian 12 root + QEMU & co, as an OCI layout of one layer, cached.
base_key="$(cat "$root/images/agent-rootfs.sh" "$0" | sha256sum | cut -c1-16)"
base="$cache/agent-base-$base_key"
if [ ! -f "$base/.complete" ]; then
  t1=$SECONDS
  say "building the agent's Debian base (debootstrap bookworm + images/agent-rootfs.sh)"
  mkdir -p "$cache"
  work="$(mktemp -d "$cache/.agent-base.XXXXXX")"
  rootfs="$work/rootfs"
  cleanup() {
    for m in proc sys dev/pts dev; do
      mountpoint -q "$rootfs/$m" 2>/dev/null && umount -l "$rootfs/$m"
    done
    rm -rf "$work"
  }
  trap cleanup EXIT
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  cp "$root/images/agent-rootfs.sh" "$rootfs/tmp/agent-rootfs.sh"
  mount -t proc proc "$rootfs/proc"
  mkdir -p "$rootfs/dev/pts"
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$rootfs/dev/pts"
  chroot "$rootfs" /bin/sh /tmp/agent-rootfs.sh
  umount "$rootfs/dev/pts" "$rootfs/proc"
  rm -f "$rootfs/etc/resolv.conf"
  (
    cd "$work"
    umoci init --layout oci >/dev/null
    umoci new --image oci:base >/dev/null
    umoci insert --image oci:base --history.created_by "debootstrap bookworm + images/agent-rootfs.sh" \
      rootfs / >/dev/null
  )
  rm -rf "$rootfs"
  echo "$base_key" >"$work/.complete"
  rm -rf "$base"
  mv "$work" "$base"
  trap - EXIT
  say "agent base built in $((SECONDS - t1)) s into $base"
fi

# 2. The static binary both images run.
t2=$SECONDS
say "building the static ignis binary (release, $target)"
(cd "$root" && CC_x86_64_unknown_linux_musl=musl-gcc nice -n 10 \
  cargo build --quiet --release --target "$target" --bin ignis)
binary="$cargo_target/$target/release/ignis"
say "binary ready in $((SECONDS - t2)) s ($(du -h "$binary" | cut -f1))"

# 3. Both images.
bin_hash="$(sha256sum "$binary" | cut -c1-64)"
version="$("$binary" version | awk '{print $2}')"
tag="${IGNIS_IMAGE_TAG:-$version-$(printf '%s %s' "$bin_hash" "$base_key" | sha256sum | cut -c1-12)}"
controller_repo="$repository/ignis-controller"
agent_repo="$repository/ignis-agent"

mkdir -p "$out"
rm -rf "$out/oci.tmp"
# Blobs are content-addressed: hard links make the copy of the base free.
cp -al "$base/oci" "$out/oci.tmp"
# ...but umoci rewrites the index in place, and the cached base must not change.
rm "$out/oci.tmp/index.json"
cp "$base/oci/index.json" "$out/oci.tmp/index.json"
(
  cd "$out"
  stage="$(mktemp -d)"
  install -m 0755 "$binary" "$stage/ignis"
  umoci insert --image oci.tmp:base --tag agent --history.created_by "COPY ignis" \
    "$stage/ignis" /usr/local/bin/ignis >/dev/null
  umoci config --image oci.tmp:agent --config.entrypoint /usr/local/bin/ignis \
    --config.cmd agent --config.label "org.opencontainers.image.version=$tag" >/dev/null
  umoci new --image oci.tmp:controller >/dev/null
  umoci insert --image oci.tmp:controller --history.created_by "COPY ignis" \
    "$stage/ignis" /usr/local/bin/ignis >/dev/null
  umoci config --image oci.tmp:controller --config.entrypoint /usr/local/bin/ignis \
    --config.cmd controller --config.user 65532:65532 \
    --config.label "org.opencontainers.image.version=$tag" >/dev/null
  umoci rm --image oci.tmp:base >/dev/null
  umoci gc --layout oci.tmp >/dev/null
  rm -rf "$stage" oci
  mv oci.tmp oci
)
for name in controller agent; do
  repo="$controller_repo"
  [ "$name" = agent ] && repo="$agent_repo"
  rm -f "$out/$name.tar"
  skopeo copy --quiet "oci:$out/oci:$name" "docker-archive:$out/$name.tar:$repo:$tag"
done
cat >"$out/images.env" <<EOF
IGNIS_IMAGE_TAG=$tag
IGNIS_CONTROLLER_REPOSITORY=$controller_repo
IGNIS_AGENT_REPOSITORY=$agent_repo
IGNIS_CONTROLLER_IMAGE=$controller_repo:$tag
IGNIS_AGENT_IMAGE=$agent_repo:$tag
EOF
say "built $controller_repo:$tag ($(du -h "$out/controller.tar" | cut -f1)) and $agent_repo:$tag ($(du -h "$out/agent.tar" | cut -f1)) in $((SECONDS - t0)) s"
say "push: skopeo copy oci:$out/oci:agent docker://REGISTRY/ignis-agent:$tag (same for controller)"

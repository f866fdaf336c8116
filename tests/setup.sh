#!/usr/bin/env bash
# Installs what Towalink's tests and demo need on a fresh Debian machine:
# - BIRD 2 (its parser checks every rendered configuration; nodes run it), git (the
#   configuration directory is a repository), iproute2, ping, iperf3 and unshare (the network
#   tier), Prometheus (it scrapes `tlm serve`'s metrics in tier 2), Chromium (headless, the
#   web UI's tier-2 test), Ansible (`ansible-core`: `tlm ansible` in tiers 1 and 2), OpenSSH's
#   server (the nodes' management sshd) and systemd-analyze (unit files are verified);
# - for node images and their tier: the syslinux installer and MBR code, systemd-boot's EFI
#   loader, qemu (x86_64 and aarch64, with OVMF for UEFI) and qemu-img, debugfs, mksquashfs,
#   cpio, depmod, curl, gpgv (tests/assets.sh prepares the test assets with them);
# - the Rust targets of node binaries (static musl) and the aarch64 C compiler ring needs.
# Rust itself comes from rustup; this script does not install it.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have bird || need+=(bird2)
have git || need+=(git)
have ip || need+=(iproute2)
have ping || need+=(iputils-ping)
have iperf3 || need+=(iperf3)
have prometheus || need+=(prometheus)
have chromium || need+=(chromium)
have ansible || need+=(ansible-core)
have unshare || need+=(util-linux)
have systemd-analyze || need+=(systemd)
have dpkg-deb || need+=(dpkg)
have syslinux || need+=(syslinux)
[ -e /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux-common)
[ -e /usr/lib/systemd/boot/efi/systemd-bootx64.efi ] || need+=(systemd-boot-efi)
have mcopy || need+=(mtools)
have qemu-system-x86_64 || need+=(qemu-system-x86)
have qemu-system-aarch64 || need+=(qemu-system-arm)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
have debugfs || need+=(e2fsprogs)
have mksquashfs || need+=(squashfs-tools)
have cpio || need+=(cpio)
[ -x /sbin/depmod ] || have depmod || need+=(kmod)
have curl || need+=(curl)
have gpgv || need+=(gpgv)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
have xz || need+=(xz-utils)
have zstd || need+=(zstd)
have aarch64-linux-gnu-gcc || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  # qemu-system-* from Debian want Debian's qemu-utils; a newer one from elsewhere would be
  # removed, so it is named in the same command (at the version qemu-system-x86 comes with).
  if printf '%s\n' "${need[@]}" | grep -q '^qemu-system'; then
    $sudo apt-get update -qq
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
    need+=("qemu-utils=$v")
  fi
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    --allow-downgrades "${need[@]}" >/dev/null
fi
# OpenSSH's server (tier 2: each node's management sshd, reached by `tlm ansible`), installed
# without starting the distribution's own sshd on this machine (policy-rc.d says no).
if [ ! -x /usr/sbin/sshd ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing openssh-server (not started)" >&2
  policy=""
  [ -e /usr/sbin/policy-rc.d ] || {
    policy=/usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 0755 "$policy"
  }
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    openssh-server openssh-client >/dev/null
  # Nor at this machine's next boot: the tests run sshd themselves.
  $sudo systemctl disable --quiet ssh.service ssh.socket 2>/dev/null || true
  [ -z "$policy" ] || { $sudo rm -f "$policy"; trap - EXIT; }
fi
command -v cargo >/dev/null 2>&1 || {
  echo "setup: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
}
targets=$(rustup target list --installed 2>/dev/null || true)
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
  grep -qx "$t" <<<"$targets" || rustup target add "$t" >&2
done
# The style checks in run-all.sh.
components=$(rustup component list --installed 2>/dev/null || true)
for c in clippy rustfmt; do
  grep -q "^$c" <<<"$components" || rustup component add "$c" >&2
done
bird --version >&2

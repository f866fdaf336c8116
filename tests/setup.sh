#!/usr/bin/env bash
# Installs what Towalink's tests and demo need on a fresh Debian machine: BIRD 2 (its parser
# checks every rendered configuration; nodes run it), git (the configuration directory is a
# repository), iproute2, ping, iperf3 and unshare (the network tier). Rust comes from rustup;
# this script does not install it.
set -euo pipefail

need=()
command -v bird >/dev/null 2>&1 || need+=(bird2)
command -v git >/dev/null 2>&1 || need+=(git)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null 2>&1 || {
  echo "setup: cargo not found: install Rust with rustup (https://rustup.rs)" >&2
  exit 1
}
bird --version >&2

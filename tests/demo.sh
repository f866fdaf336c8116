#!/usr/bin/env bash
# The main job on built-in defaults: build `tlm`, create a three-site installation in a fresh
# directory (default target/demo-towalink, or $1), commit it, and show what a user looks at:
# the nodes, the WireGuard links, where attributes come from, and a rendered, BIRD-checked
# bird.conf; then build the x86_64 images of every node (Alpine files and the package mirror
# from the test assets, tests/assets.sh: no internet needed), inspect one, and print the line
# that boots it.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/setup.sh
cargo build --release --locked -p towalink-controller --bin tlm
tlm="$PWD/target/release/tlm"
dir="${1:-$PWD/target/demo-towalink}"
if [ -e "$dir" ]; then
  [ -f "$dir/config.toml" ] || { echo "demo: $dir exists and is not a Towalink directory" >&2; exit 1; }
  rm -rf "$dir"
fi
export TOWALINK_CONFIG_DIR="$dir"
show() { printf '\n$ tlm %s\n' "$*"; "$tlm" "$@"; }

show add site berlin
show add site paris
show add site hq
show add node primary.berlin
show add node primary.paris
show add node main.hq
show set node primary.berlin wg_endpoint 192.0.2.10
show set node primary.paris wg_endpoint 198.51.100.20
show set node main.hq wg_endpoint 203.0.113.30
show set site hq bird_bfd_interval_ms 50
show -m "Three sites, full mesh" commit all
show list nodes all
show list links
show show_all node main.hq --origin
printf '\n$ cat %s\n' "$dir/effective/hq/main/v1/files/bird_peers.conf"
cat "$dir/effective/hq/main/v1/files/bird_peers.conf"
printf '\n$ bird -p -c .../hq/main/v1/files/bird.conf\n'
bird -p -c "$dir/effective/hq/main/v1/files/bird.conf" && echo "BIRD 2 parser: OK"
show activate all
show git log --oneline

# Images: Alpine's release files and the package repository (with BIRD) from the test assets,
# the static musl node binary beside tlm.
tests/assets.sh
cargo build --release --locked -p towalink-node --target x86_64-unknown-linux-musl
assets="${TOWALINK_TEST_ASSETS:-$PWD/target/test-assets}"
key=$(ls "$assets"/apk-keys/*.rsa.pub)
images="$dir-images"
rm -rf "$images"
for site in berlin paris hq; do
  show image build site "$site" --board x86_64 --alpine-dir "$assets/alpine-x86_64" \
    --mirror "file://$assets/apk-mirror" --apk-key "$key" --cache-dir "$assets/cache" -o "$images"
done
show image inspect "$images/hq-main.img"
cat <<EOF

The installation is in $dir (TOWALINK_CONFIG_DIR=$dir tlm ...).
The images are in $images. Boot one (BIOS; serial console here, Ctrl-A X quits):
  qemu-system-x86_64 -accel tcg -m 512 -nographic -snapshot \\
    -drive file=$images/hq-main.img,format=raw,if=virtio \\
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0
or flash it: dd if=$images/hq-main.img of=/dev/sdX bs=4M conv=fsync
EOF

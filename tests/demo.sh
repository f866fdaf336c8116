#!/usr/bin/env bash
# The main job on built-in defaults: build `tlm`, create a three-site installation in a fresh
# directory (default target/demo-towalink, or $1), commit it, and show what a user looks at:
# the nodes, the WireGuard links, where attributes come from, and a rendered, BIRD-checked
# bird.conf.
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
printf '\nThe installation is in %s (TOWALINK_CONFIG_DIR=%s tlm ...).\n' "$dir" "$dir"

#!/usr/bin/env bash
# Sets up a fresh machine and runs every test tier that exists so far:
#   tier 0  unit and property tests inside each crate
#   tier 1  the real `tlm` binary on temporary configuration directories (tests/tier1_cli.rs)
#   tier 2  the real `towalink-node` with real BIRD 2 in network namespaces (tests/tier2_node.rs;
#           needs root, as .ci/run has)
set -euo pipefail
cd "$(dirname "$0")/.."

tests/setup.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked

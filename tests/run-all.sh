#!/usr/bin/env bash
# Sets up a fresh machine and runs every test tier:
#   tier 0  unit and property tests inside each crate
#   tier 1  the real `tlm` binary on temporary configuration directories (tests/tier1_cli.rs)
#   tier 2  the real `towalink-node` with real BIRD 2 in network namespaces (tests/tier2_*.rs)
#   tier 3  images built by `tlm image build`, booted in qemu (TCG) or checked structurally
#           (tests/tier3_images.rs), from the pinned test assets (tests/assets.sh)
# Before them, the style checks: `cargo fmt --check` and `cargo clippy -D warnings`.
# Tiers 2 and 3 need root, as .ci/run has.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/setup.sh
tests/assets.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
# The static node binaries the images carry.
cargo build --release --locked -p towalink-node \
  --target x86_64-unknown-linux-musl --target aarch64-unknown-linux-musl
cargo test --workspace --locked

#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, integration tests with real QEMU
# guests, end-to-end tests with kubectl against `ignis dev`, and a bench smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
./scripts/check-packaging.sh
cargo build --bin ignis
cargo test --workspace -- --test-threads 2

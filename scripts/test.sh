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
# --all-targets: unit, integration and e2e tests (there are no doctests), so the run ends on
# the e2e suite's summary.
cargo test --workspace --all-targets -- --test-threads 2

#!/usr/bin/env bash
# Regenerate the CRDs from the Rust types (a test keeps the checked-in copies in step).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q
for dir in crds charts/ignis/crds config/crd; do
  target/debug/ignis crd > "$dir/microvm.yaml"
  target/debug/ignis crd pool > "$dir/microvmpool.yaml"
done

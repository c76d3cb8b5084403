#!/usr/bin/env bash
# From a fresh Debian 12 machine: install what Ignis needs, build it, start `ignis dev --demo`
# (embedded API server + controller + agent), which boots the sample MicroVM and shows it
# reaching Ready. Ctrl-C stops every VM it started.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release --bin ignis
exec ./target/release/ignis dev --demo "$@"

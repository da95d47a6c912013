#!/usr/bin/env bash
# The test command (README, CI): makes sure Redis and MariaDB run (installing them if missing),
# then checks formatting and lints, and runs every unit and integration test against the real
# servers. Fails loudly if a service cannot be reached; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked

#!/usr/bin/env bash
# The benchmark (README, BENCHMARKS.md): release build, local Redis and MariaDB, the fake fleet with
# instant completion. Prints the numbers and appends them to BENCHMARKS.md.
#   bash scripts/bench.sh                     # 20,000 tasks, 16 GPUs x 4 slots, 1 instance
#   bash scripts/bench.sh --instances 3 --quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh >/dev/null
cargo build --release --locked --bins --example bench --quiet
exec target/release/examples/bench --record BENCHMARKS.md "$@"

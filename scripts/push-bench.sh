#!/usr/bin/env bash
# Push speed, measured (not a test): generates N NDJSON tasks (default 100000), pushes them with the
# release `qsys-push --file` into a scratch queue on the local Redis (one MULTI/EXEC), checks that
# every task landed, and prints the time and tasks/s. The queue is deleted afterwards.
#   bash scripts/push-bench.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
cargo build --release --locked --bin qsys-push
dir=$(mktemp -d)
queue="qsys-bench:$$"
trap 'redis-cli -h 127.0.0.1 DEL "$queue" >/dev/null; rm -rf "$dir"' EXIT
awk -v n="$n" 'BEGIN { for (i = 0; i < n; i++) printf "{\"type\":\"start_transcribe\",\"data\":{\"s3_bucket\":\"esales-et-callrecordings\",\"s3_key\":\"recordings/2025/07/01/call-%d.wav\",\"call_session\":\"1751353080.%d\"}}\n", i, i }' \
  > "$dir/tasks.ndjson"
printf '[redis]\nurl = "redis://127.0.0.1:6379/0"\nqueues = ["%s"]\n' "$queue" > "$dir/qsysd.toml"
start=$(date +%s%N)
target/release/qsys-push --config "$dir/qsysd.toml" --file "$dir/tasks.ndjson" > "$dir/ids"
end=$(date +%s%N)
pushed=$(redis-cli -h 127.0.0.1 LLEN "$queue")
printed=$(wc -l < "$dir/ids")
if [ "$pushed" != "$n" ] || [ "$printed" != "$n" ]; then
  echo "push-bench: expected $n tasks, Redis holds $pushed and $printed ids were printed" >&2
  exit 1
fi
awk -v n="$n" -v ns="$((end - start))" -v bytes="$(wc -c < "$dir/tasks.ndjson")" 'BEGIN {
  s = ns / 1e9
  printf "push-bench: %d tasks (%.1f MB of NDJSON) pushed in %.3f s: %.0f tasks/s\n", n, bytes / 1e6, s, n / s
}'

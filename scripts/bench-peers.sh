#!/usr/bin/env bash
# qsysd beside three peer task queues (issue 20, deliverable 4), measured, not a test: the same
# workload on the same fake GPU fleet with qsysd (response mode, then callback mode), BullMQ,
# Celery and Dramatiq, one after the other, and one table with the same columns for all.
#
#   bash scripts/bench-peers.sh [--tasks N] [--rounds R] [--only qsysd,qsysd-callback,bullmq,celery,dramatiq]
#
# Workload: N transcription tasks per round (default 5,000; 2 rounds), enqueued up front in bulk
# ({"s3_key":"rec/<i>.wav","task_id":"<id>"}), each sent to the least-loaded of 16 fake GPUs with
# a free slot (4 slots each, never more in flight), its outcome recorded in the system's own
# state. Measured from the first enqueue to the last completion. Each system is written the way
# its docs recommend (scripts/peers/: BullMQ worker with concurrency 64; Celery threads pool 64,
# acks_late, MySQL results; Dramatiq 1 process x 64 threads, Redis results); the peers keep the
# per-GPU slot table in their worker process, qsysd in its scheduler.
#
# Installs BullMQ (npm) into target/peers/node and Celery + Dramatiq (PyPI) into target/peers/venv,
# pinned by scripts/peers/bullmq/package-lock.json and scripts/peers/requirements.txt, skipping what
# is there. Builds the release qsysd, qsys-push and fake-fleet first unless QSYS_PEERS_NO_BUILD=1.
# Uses the local Redis (127.0.0.1:6379; logical DBs 11-15 are this script's and are flushed) and
# MariaDB (127.0.0.1:3306, root; databases qsys_peers_qsysd and qsys_peers_celery, dropped before
# each round), loopback ports 9300-9315 (fleet) and 9390-9391 (qsysd). Every process it starts is
# stopped on exit, also on failure. Prints the table and writes it to target/peers/results.md
# (raw numbers: target/peers/run/results.jsonl, logs: target/peers/run/).
#
# Options (or environment): --tasks N (QSYS_PEERS_TASKS, default 5000), --rounds R
# (QSYS_PEERS_ROUNDS, default 2), --only LIST (QSYS_PEERS_ONLY, default all five).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

tasks=${QSYS_PEERS_TASKS:-5000}
rounds=${QSYS_PEERS_ROUNDS:-2}
only=${QSYS_PEERS_ONLY:-qsysd,qsysd-callback,bullmq,celery,dramatiq}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --tasks) tasks=${2:?--tasks needs a number}; shift 2 ;;
    --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
    --only) only=${2:?--only needs a list}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench-peers: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $tasks$rounds in *[!0-9]*|'') echo "bench-peers: --tasks and --rounds take whole numbers" >&2; exit 2 ;; esac
IFS=, read -r -a systems <<< "$only"
for s in "${systems[@]}"; do
  case $s in
    qsysd|qsysd-callback|bullmq|celery|dramatiq) ;;
    *) echo "bench-peers: unknown system '$s' (qsysd, qsysd-callback, bullmq, celery, dramatiq)" >&2; exit 2 ;;
  esac
done

gpus=16
slots=4
base_port=9300
callback_port=9390
admin_port=9391
peers=$root/target/peers
work=$peers/run
venv=$peers/venv
node_dir=$peers/node
rel=$root/target/release
py=$venv/bin/python
measure=$root/scripts/peers/measure.py
mysql_cli=(mysql -h 127.0.0.1 -P 3306 -u root -N)
# The peers' modules are imported from scripts/peers: keep __pycache__ out of the source tree.
export PYTHONDONTWRITEBYTECODE=1

# --- Every process started here, stopped on exit -------------------------------------------------
started=()
forget() {
  local keep=() p
  for p in "${started[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  started=("${keep[@]}")
}
# Stops one process this script started (its own process group, made by setsid): TERM, then KILL
# after 15 s.
stop_pid() {
  local pid=$1 i=0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    echo "bench-peers: pid $pid still up after 15 s, killing it" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
cleanup() {
  local p
  for p in "${started[@]}"; do stop_pid "$p"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Build, services, installs -----------------------------------------------------------------
if [ "${QSYS_PEERS_NO_BUILD:-}" != 1 ]; then
  cargo build --release --locked --bin qsysd --bin qsys-push --example fake-fleet
fi
for b in "$rel/qsysd" "$rel/qsys-push" "$rel/examples/fake-fleet"; do
  [ -x "$b" ] || { echo "bench-peers: $b is missing (build it, or drop QSYS_PEERS_NO_BUILD)" >&2; exit 1; }
done
redis-cli -h 127.0.0.1 -p 6379 PING >/dev/null || { echo "bench-peers: no Redis at 127.0.0.1:6379" >&2; exit 1; }
"${mysql_cli[@]}" -e 'SELECT 1' >/dev/null || { echo "bench-peers: no MariaDB at 127.0.0.1:3306 (root)" >&2; exit 1; }
for port in $(seq "$base_port" $((base_port + gpus - 1))) "$callback_port" "$admin_port"; do
  if ss -Hltn "sport = :$port" | grep -q .; then
    echo "bench-peers: loopback port $port is taken; this script needs $base_port-$((base_port + gpus - 1)), $callback_port, $admin_port" >&2
    exit 1
  fi
done

mkdir -p "$peers" "$work"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
if ! cmp -s "$root/scripts/peers/requirements.txt" "$venv/requirements.installed"; then
  echo "bench-peers: installing Celery and Dramatiq into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/peers/requirements.txt"
  cp "$root/scripts/peers/requirements.txt" "$venv/requirements.installed"
fi
if ! cmp -s "$root/scripts/peers/bullmq/package-lock.json" "$node_dir/package-lock.json" \
  || [ ! -d "$node_dir/node_modules/bullmq" ]; then
  echo "bench-peers: installing BullMQ into $node_dir"
  mkdir -p "$node_dir"
  cp "$root/scripts/peers/bullmq/package.json" "$root/scripts/peers/bullmq/package-lock.json" "$node_dir/"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
fi

rm -f "$work"/*
"$py" "$measure" versions --qsysd "$rel/qsysd" --node-modules "$node_dir/node_modules" --out "$work/versions.json"
results=$work/results.jsonl
: > "$results"

busy=$( (pgrep -x rustc; pgrep -x cargo) | paste -sd, || true)
echo "bench-peers: $tasks tasks x $rounds rounds: ${systems[*]}; $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ -z "$busy" ] || echo "bench-peers: warning: a build is running (pids $busy): CPU is shared, numbers will be low" >&2

# --- Pieces of one run --------------------------------------------------------------------------
gpu_urls=""
fleet_pid=""
# Starts the fake fleet (response or callback completion) and waits for its 16 URLs.
start_fleet() {
  local mode=$1 log=$2 i=0
  : > "$log.out"
  setsid "$rel/examples/fake-fleet" --gpus "$gpus" --base-port "$base_port" --delay-ms 0-0 \
    --completion "$mode" --callers 32 > "$log.out" 2> "$log" &
  fleet_pid=$!
  started+=("$fleet_pid")
  while [ "$(wc -l < "$log.out")" -lt "$gpus" ]; do
    kill -0 "$fleet_pid" 2>/dev/null || { echo "bench-peers: fake-fleet exited; see $log" >&2; exit 1; }
    [ $i -lt 100 ] || { echo "bench-peers: fake-fleet not up after 10 s; see $log" >&2; exit 1; }
    sleep 0.1; i=$((i + 1))
  done
  gpu_urls=$(paste -sd, "$log.out")
}

# Waits until FILE exists (a worker's ready mark) while PID lives, up to 60 s.
wait_ready() {
  local pid=$1 file=$2 what=$3 i=0
  until [ -s "$file" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "bench-peers: $what exited before it was ready; see $work" >&2; exit 1; }
    [ $i -lt 600 ] || { echo "bench-peers: $what not ready after 60 s; see $work" >&2; exit 1; }
    sleep 0.1; i=$((i + 1))
  done
}

# Empties what a system keeps between rounds: its Redis DBs, its MySQL database.
reset_state() {
  case $1 in
    qsysd|qsysd-callback)
      redis-cli -n 11 FLUSHDB >/dev/null
      "${mysql_cli[@]}" -e 'DROP DATABASE IF EXISTS qsys_peers_qsysd' ;;
    bullmq) redis-cli -n 12 FLUSHDB >/dev/null ;;
    celery)
      redis-cli -n 13 FLUSHDB >/dev/null
      "${mysql_cli[@]}" -e 'DROP DATABASE IF EXISTS qsys_peers_celery; CREATE DATABASE qsys_peers_celery' ;;
    dramatiq)
      redis-cli -n 14 FLUSHDB >/dev/null
      redis-cli -n 15 FLUSHDB >/dev/null ;;
  esac
}

qsysd_config() {
  local completion=$1 file=$2 i=0 url
  cat > "$file" <<EOF
# qsysd for scripts/bench-peers.sh: as examples/bench.rs configures it, on fixed loopback ports.
[redis]
url = "redis://127.0.0.1:6379/11"
queues = ["qsys-peers:q"]
key_prefix = "qsys-peers"
[mysql]
url = "mysql://root@127.0.0.1:3306/qsys_peers_qsysd"
[callback]
listen = "127.0.0.1:$callback_port"
secret = "bench-peers-secret-0123456789"
[admin]
listen = "127.0.0.1:$admin_port"
[gpu]
slots = $slots
completion = "$completion"
[daemon]
instance_id = "bench-peers"
log_level = "warn"
log_target = "stderr"
dispatch_threads = $((gpus * slots))
EOF
  IFS=, read -r -a urls <<< "$gpu_urls"
  for url in "${urls[@]}"; do
    printf '[[gpu.endpoints]]\nid = "g%d"\nurl = "%s"\n' "$i" "$url" >> "$file"
    i=$((i + 1))
  done
}

worker_pid=""
start_worker() {
  local sys=$1 ready=$work/ready-$1 i=0
  rm -f "$ready"
  case $sys in
    qsysd|qsysd-callback)
      local mode=response
      [ "$sys" = qsysd ] || mode=callback
      qsysd_config "$mode" "$work/$sys.toml"
      # A clean environment: the seed's REDIS_*/DB_*/... variables would override the file.
      setsid env -i PATH="$PATH" "$rel/qsysd" --config "$work/$sys.toml" 2>> "$work/$sys.log" &
      worker_pid=$!
      started+=("$worker_pid")
      until curl -sf "http://127.0.0.1:$admin_port/status" >/dev/null 2>&1; do
        kill -0 "$worker_pid" 2>/dev/null || { echo "bench-peers: qsysd exited; see $work/$sys.log" >&2; exit 1; }
        [ $i -lt 200 ] || { echo "bench-peers: qsysd not answering /status after 20 s" >&2; exit 1; }
        sleep 0.1; i=$((i + 1))
      done ;;
    bullmq)
      setsid env NODE_PATH="$node_dir/node_modules" QSYS_PEERS_GPUS="$gpu_urls" QSYS_PEERS_SLOTS="$slots" \
        QSYS_PEERS_BULLMQ_DB=12 QSYS_PEERS_CONCURRENCY=64 \
        node "$root/scripts/peers/bullmq/worker.js" > "$ready" 2>> "$work/bullmq.log" &
      worker_pid=$!
      started+=("$worker_pid")
      wait_ready "$worker_pid" "$ready" "the BullMQ worker" ;;
    celery)
      setsid env PYTHONPATH="$root/scripts/peers" QSYS_PEERS_GPUS="$gpu_urls" QSYS_PEERS_SLOTS="$slots" \
        QSYS_PEERS_READY="$ready" "$venv/bin/celery" -A celery_app worker --pool threads --concurrency 64 \
        --loglevel WARNING 2>> "$work/celery.log" > /dev/null &
      worker_pid=$!
      started+=("$worker_pid")
      wait_ready "$worker_pid" "$ready" "the Celery worker" ;;
    dramatiq)
      setsid env PYTHONPATH="$root/scripts/peers" QSYS_PEERS_GPUS="$gpu_urls" QSYS_PEERS_SLOTS="$slots" \
        QSYS_PEERS_READY="$ready" "$venv/bin/dramatiq" --processes 1 --threads 64 dramatiq_app 2>> "$work/dramatiq.log" > /dev/null &
      worker_pid=$!
      started+=("$worker_pid")
      wait_ready "$worker_pid" "$ready" "the Dramatiq worker" ;;
  esac
}

run_one() {
  local sys=$1 round=$2 mode=response
  [ "$sys" = qsysd-callback ] && mode=callback
  echo "bench-peers: $sys, round $round"
  reset_state "$sys"
  start_fleet "$mode" "$work/fleet-$sys-$round.log"
  start_worker "$sys"
  sleep 1 # let start-up work (first sweeps, Celery's mingle) pass before the clock starts
  local cmd tag=$sys-$round
  case $sys in
    qsysd|qsysd-callback)
      cmd=("$py" "$root/scripts/peers/produce.py" qsysd "$tasks" "$tag" --push "$rel/qsys-push"
        --config "$work/$sys.toml" --queue qsys-peers:q --db qsys_peers_qsysd) ;;
    bullmq)
      cmd=(env NODE_PATH="$node_dir/node_modules" QSYS_PEERS_BULLMQ_DB=12
        node "$root/scripts/peers/bullmq/producer.js" "$tasks" "$tag") ;;
    celery|dramatiq)
      cmd=(env PYTHONPATH="$root/scripts/peers" "$py" "$root/scripts/peers/produce.py" "$sys" "$tasks" "$tag") ;;
  esac
  # In the background and waited for, so that a signal to this script is acted on at once (bash
  # runs traps only between foreground commands); its own group, so a stop takes the producer too.
  setsid "$py" "$measure" run --system "$sys" --round "$round" --n "$tasks" --pid "$worker_pid" \
    --fleet-pid "$fleet_pid" --out "$work/result-$sys-$round.json" -- "${cmd[@]}" &
  local measure_pid=$!
  started+=("$measure_pid")
  wait "$measure_pid"
  forget "$measure_pid"
  stop_pid "$worker_pid"
  stop_pid "$fleet_pid"
  "$py" "$measure" fleet --result "$work/result-$sys-$round.json" --log "$work/fleet-$sys-$round.log"
  cat "$work/result-$sys-$round.json" >> "$results"
  echo >> "$results"
}

# --- The runs: every system once per round, so drift over time touches all alike -------------------
for round in $(seq 1 "$rounds"); do
  for s in "${systems[@]}"; do
    run_one "$s" "$round"
  done
done
# Leave nothing behind but the results: the stores emptied, Celery's database gone too.
for s in "${systems[@]}"; do reset_state "$s"; done
"${mysql_cli[@]}" -e 'DROP DATABASE IF EXISTS qsys_peers_celery'

echo
"$py" "$measure" table --results "$results" --versions "$work/versions.json" --out "$peers/results.md"
echo "bench-peers: table written to target/peers/results.md"

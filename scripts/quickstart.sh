#!/usr/bin/env bash
# The quickstart: on a fresh Debian machine, installs and starts Redis and MariaDB if missing,
# builds qsysd, starts a fake fleet of 4 GPUs (4 slots each) on 127.0.0.1:9100-9103, starts qsysd
# against them, pushes sample tasks of the seed's four types with qsys-push, and shows them finish.
# Everything stays on this machine; the demo database is `qsys_demo`, the queues `demo:*`.
# --keep: leave the demo running afterwards (dashboard, metrics, fleet) until Ctrl-C.
set -euo pipefail
keep=false
for arg in "$@"; do
  case "$arg" in
    --keep) keep=true ;;
    *) echo "quickstart: unknown argument $arg (use --keep)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
root=$(pwd)
demo=$root/target/demo
mkdir -p "$demo"
: > "$demo/handlers.log"

bash scripts/services.sh
if ! command -v cargo >/dev/null; then
  echo "quickstart: cargo is required (https://rustup.rs)" >&2; exit 1
fi
echo "quickstart: building (first build takes a few minutes)"
cargo build --quiet --bins --examples

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

target/debug/examples/fake-fleet --gpus 4 --base-port 9100 --delay-ms 300-1500 \
  --heartbeat-ms 250 --result-bytes 200 \
  > "$demo/fleet.urls" 2> "$demo/fleet.log" &
pids+=($!)
for _ in $(seq 50); do [ "$(wc -l < "$demo/fleet.urls")" -ge 4 ] && break; sleep 0.1; done

cat > "$demo/qsysd.toml" <<TOML
[redis]
url = "redis://127.0.0.1:6379/0"
queues = ["demo:task_queue_1", "demo:task_queue_2"]
[mysql]
url = "mysql://root@127.0.0.1:3306/qsys_demo"
[callback]
listen = "127.0.0.1:8000"
secret = "demo-secret-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[gpu]
slots = 4
# The fake GPUs heartbeat every 250 ms: one silent for 10 s has died.
heartbeat_timeout = "10s"
[types.start_transcribe]
handler = "gpu"
[types.send_email]
handler = "exec"
command = ["/bin/sh", "$root/scripts/demo/handler.sh"]
[types.generate_report]
handler = "exec"
command = ["/bin/sh", "$root/scripts/demo/handler.sh"]
[types.cleanup]
handler = "exec"
command = ["/bin/sh", "$root/scripts/demo/handler.sh"]
[daemon]
instance_id = "demo"
TOML
i=0
while read -r url; do
  printf '[[gpu.endpoints]]\nid = "g%d"\nurl = "%s"\ncancel_url = "%s/cancel"\n' \
    "$i" "$url" "${url%%/ai/*}" >> "$demo/qsysd.toml"
  i=$((i + 1))
done < "$demo/fleet.urls"

mariadb -h 127.0.0.1 -u root -e 'DROP DATABASE IF EXISTS qsys_demo'
redis-cli -h 127.0.0.1 DEL demo:task_queue_1 demo:task_queue_2 >/dev/null
target/debug/qsysd --config "$demo/qsysd.toml" --check-config
DEMO_DIR=$demo target/debug/qsysd --config "$demo/qsysd.toml" 2> "$demo/qsysd.log" &
qsysd_pid=$!
pids+=($qsysd_pid)
for _ in $(seq 100); do grep -q "qsysd starting" "$demo/qsysd.log" 2>/dev/null && break; sleep 0.1; done

push() { target/debug/qsys-push --config "$demo/qsysd.toml" "$@" > /dev/null; }
echo "quickstart: pushing 40 transcriptions, 3 emails, 2 reports, 2 cleanups"
for n in $(seq 1 40); do
  push --type start_transcribe --task-id "demo-call-$n" --data "{\"s3_bucket\":\"esales-et-callrecordings\",\"s3_key\":\"recordings/2025/07/01/call-$n.wav\",\"call_session\":\"1751353080.$n\"}"
done
for n in 1 2 3; do push --type send_email --data "{\"user_id\":$n,\"email\":\"user$n@example.com\",\"subject\":\"Test Email\"}"; done
push --type generate_report --data '{"user_id":456,"report_type":"monthly"}'
push --type generate_report --data '{"user_id":457,"report_type":"weekly"}'
push --type cleanup --data '{"user_id":789}'
push --type cleanup --queue demo:task_queue_2 --data '{"user_id":0}'

sql() { mariadb -h 127.0.0.1 -u root qsys_demo -N -B -e "$1"; }
# Two cancels: the last transcription, still waiting (it never runs), and one a GPU is running
# (the GPU's cancel_url stops it and frees its slot).
target/debug/qsysd --config "$demo/qsysd.toml" cancel demo-call-40 --reason "demo: not needed"
running=""
for _ in $(seq 50); do
  running=$(sql "SELECT task_id FROM tasks WHERE state='processing' AND gpu_id IS NOT NULL LIMIT 1")
  [ -n "$running" ] && break
  sleep 0.1
done
[ -n "$running" ] && target/debug/qsysd --config "$demo/qsysd.toml" cancel "$running" --reason "demo: wrong file"
total=47
while :; do
  done_n=$(sql "SELECT COUNT(*) FROM tasks WHERE state IN ('finished','failed','cancelled')")
  busy=$(sql "SELECT IFNULL(GROUP_CONCAT(CONCAT(gpu_id,'=',n) ORDER BY gpu_id SEPARATOR ' '), 'none') FROM (SELECT gpu_id, COUNT(*) n FROM tasks WHERE state='processing' AND gpu_id IS NOT NULL GROUP BY gpu_id) t")
  waiting=$(redis-cli -h 127.0.0.1 LLEN demo:task_queue_1)
  printf '\rquickstart: %2d/%d done | in redis: %2s | GPU slots busy: %-28s' "$done_n" "$total" "$waiting" "${busy:-none}"
  [ "$done_n" -ge "$total" ] && break
  kill -0 "$qsysd_pid" 2>/dev/null || { echo; echo "qsysd exited; see $demo/qsysd.log" >&2; exit 1; }
  sleep 1
done
echo
echo
echo "Tasks by type and state:"
mariadb -h 127.0.0.1 -u root qsys_demo -t -e \
  "SELECT type, state, COUNT(*) AS tasks FROM tasks GROUP BY type, state ORDER BY type, state"
echo "Transcriptions per GPU (least-loaded first, 4 slots each):"
mariadb -h 127.0.0.1 -u root qsys_demo -t -e \
  "SELECT gpu_id, COUNT(*) AS tasks FROM tasks WHERE type='start_transcribe' GROUP BY gpu_id"
echo "Failures and cancels:"
mariadb -h 127.0.0.1 -u root qsys_demo -t -e \
  "SELECT task_id, type, state, error FROM tasks WHERE state IN ('failed','cancelled')"
echo "A result (the fake GPU's transcript), from qsysd task:"
done_id=$(sql "SELECT task_id FROM tasks WHERE state='finished' AND type='start_transcribe' LIMIT 1")
target/debug/qsysd --config "$demo/qsysd.toml" task "$done_id" | grep -E '^(task|state|result)'

if $keep; then
  echo "quickstart: the demo keeps running (Ctrl-C stops it):"
  echo "  dashboard   http://127.0.0.1:8001/"
  echo "  metrics     http://127.0.0.1:8001/metrics  (Grafana: import packaging/grafana/qsysd.json)"
  echo "  more tasks  target/debug/qsys-push --config $demo/qsysd.toml --type start_transcribe --data '{}'"
  wait "$qsysd_pid"
  exit 0
fi
kill -TERM "$qsysd_pid"
wait "$qsysd_pid" && echo "quickstart: qsysd stopped cleanly (exit 0). Logs: $demo/qsysd.log"

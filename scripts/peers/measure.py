"""Measurement and report of scripts/bench-peers.sh (standard library only).

    measure.py run --system S --round R --n N --pid PID [--pid PID ...] --out FILE -- PRODUCER...
        Runs the producer (bench/peers/produce.py or bullmq/producer.js), which enqueues N tasks
        and waits for the system to record them all. Around it: CPU (utime+stime+cutime+cstime
        from /proc/<pid>/stat) of the worker's process tree (every PID given and its
        descendants), of mariadbd, of redis-server, of the fleet (--fleet-pid) and of the
        producer, read before the first enqueue and when the producer says "done"; the tree's
        summed VmRSS sampled every 100 ms (the peak is kept) and its summed VmHWM at the end; and
        how much CPU other work on the machine took meanwhile (/proc/stat less all of those), so a
        row measured beside someone's build says so. Writes one JSON object to FILE.
    measure.py fleet --result FILE --log FLEET_STDERR
        Adds what fake-fleet printed at exit (per GPU: tasks received, most at once) to FILE.
    measure.py versions --qsysd BIN --node-modules DIR --out JSON
        Records the versions of everything measured (run with the venv's python).
    measure.py table --results JSONL --versions JSON --out MD
        Prints the Markdown tables (one row per system and round, then min-max over rounds with
        the guarantees each keeps) and writes them to MD.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

HZ = os.sysconf("SC_CLK_TCK")


def stat_fields(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    return s[s.rindex(")") + 2:].split()


def cpu_s(pid):
    """utime + stime + cutime + cstime (waited-for children count, so a child that exits
    mid-run is not lost), in seconds; 0 for a process gone."""
    try:
        f = stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields 14-17 of proc(5); after the name, indices 11-14.
    return sum(int(x) for x in f[11:15]) / HZ


def tree(roots):
    """The given pids and all their descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(stat_fields(d)[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(children.get(p, []))
    return out


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def pids_named(name):
    r = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def store_pids():
    return {
        "mariadb": pids_named("mariadbd") or pids_named("mysqld"),
        "redis": pids_named("redis-server"),
    }


# Names that hint at whose work shared the cores (a build, the project's own benchmark or tests,
# another qsysd), reported beside the measured share of other work.
OTHERS = {"rustc", "cargo", "cc", "ld", "bench", "qsysd", "node", "celery", "dramatiq"}
OTHERS_MAX = 0.15


def busy_s():
    """CPU seconds all cores spent busy (not idle or waiting on I/O), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / HZ


def others_busy(ours):
    seen = set()
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in ours:
            try:
                with open(f"/proc/{d}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            if name in OTHERS:
                seen.add(name)
    return seen


def run(a):
    stores = store_pids()
    procs = tree(a.pid)
    ours = set(procs) | {os.getpid()}
    busy = others_busy(ours)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    cpu0 = {
        "worker": sum(cpu_s(p) for p in procs),
        **{k: sum(cpu_s(p) for p in v) for k, v in stores.items()},
    }
    fleet0 = cpu_s(a.fleet_pid) if a.fleet_pid else 0.0
    machine0, self0, t_start = busy_s(), time.process_time(), time.time()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], sum(status_kib(p, "VmRSS") for p in tree(a.pid)))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    producer = subprocess.Popen(a.producer, stdout=subprocess.PIPE, text=True)
    events, cpu1 = {}, None
    for line in producer.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            sys.stderr.write(line)
            continue
        events[ev.get("event")] = ev
        if ev.get("event") == "done":
            busy |= others_busy(ours | {producer.pid} | set(tree([producer.pid])))
            procs = tree(a.pid)
            cpu1 = {
                "worker": sum(cpu_s(p) for p in procs),
                **{k: sum(cpu_s(p) for p in v) for k, v in stores.items()},
            }
            fleet1 = cpu_s(a.fleet_pid) if a.fleet_pid else 0.0
            machine1, self1, t_done = busy_s(), time.process_time(), time.time()
            producer_window = cpu_s(producer.pid)
        elif ev.get("event") == "error":
            sys.stderr.write(f"measure: {a.system} round {a.round}: {ev.get('error')}\n")
    _, status, ru = os.wait4(producer.pid, 0)
    stop.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0 or cpu1 is None or "end" not in events:
        sys.stderr.write(f"measure: {a.system} round {a.round}: the producer failed\n")
        sys.exit(1)
    hwm = sum(status_kib(p, "VmHWM") for p in tree(a.pid))
    enq, end = events["enqueued"], events["end"]
    wall = end["t_last"] - enq["t0"]
    n = a.n
    d = {k: cpu1[k] - cpu0[k] for k in cpu0}
    producer_s = ru.ru_utime + ru.ru_stime
    # Whatever else ran on the machine meanwhile: its busy time less every process measured here.
    # Above OTHERS_MAX cores the row is not clean.
    known = sum(d.values()) + (fleet1 - fleet0) + producer_window + (self1 - self0)
    others_cores = max(0.0, (machine1 - machine0) - known) / (t_done - t_start)
    result = {
        "system": a.system,
        "round": a.round,
        "n": n,
        "wall_s": wall,
        "tasks_per_s": n / wall,
        "enqueue_s": enq["t_enqueued"] - enq["t0"],
        "cpu_ms_per_task": {k: v * 1e3 / n for k, v in d.items()},
        "producer_cpu_ms_per_task": producer_s * 1e3 / n,
        "others_cores": others_cores,
        "fleet_cpu_ms_per_task": (fleet1 - fleet0) * 1e3 / n,
        "rss_peak_mib": peak[0] / 1024,
        "hwm_mib": hwm / 1024,
        "processes": len(procs),
        "completed": end.get("completed"),
        "failed": end.get("failed"),
        "loadavg_before": load,
        "others_busy": sorted(busy),
    }
    with open(a.out, "w") as f:
        json.dump(result, f)
    if others_cores > OTHERS_MAX:
        what = ", ".join(sorted(busy)) or "unknown processes"
        print(f"  warning: {others_cores:.2f} cores went to other work ({what}): this row is not clean")
    print(
        f"  {a.system} round {a.round}: {n} tasks in {wall:.2f} s = {n / wall:,.0f} tasks/s; CPU ms/task "
        f"{d['worker'] * 1e3 / n:.3f} (+ mariadbd {d['mariadb'] * 1e3 / n:.3f}, redis {d['redis'] * 1e3 / n:.3f}); "
        f"peak RSS {peak[0] / 1024:.1f} MiB"
    )


FLEET_LINE = re.compile(r"fake-fleet: g(\d+) received (\d+) tasks, at most (\d+) at once")


def fleet(a):
    with open(a.result) as f:
        r = json.load(f)
    received, most = [], []
    with open(a.log) as f:
        for line in f:
            m = FLEET_LINE.search(line)
            if m:
                received.append(int(m.group(2)))
                most.append(int(m.group(3)))
    r["fleet_received"] = sum(received)
    r["fleet_received_per_gpu"] = received
    r["fleet_max_at_once"] = max(most) if most else None
    with open(a.result, "w") as f:
        json.dump(r, f)
    over = " (over 4!)" if most and max(most) > 4 else ""
    print(
        f"  fleet: {sum(received)} received for {r['n']} tasks, {min(received) if received else 0}-"
        f"{max(received) if received else 0} per GPU, at most {r['fleet_max_at_once']} at once on a GPU{over}"
    )


# What each system promises about its state and delivery, as configured here.
GUARANTEES = {
    "qsysd": ("yes: every transition committed in MySQL", "yes (Redis in-hand list, then MySQL)"),
    "qsysd-callback": ("yes: every transition committed in MySQL", "yes (Redis in-hand list, then MySQL)"),
    "bullmq": ("Redis only: as durable as Redis persistence (none here)", "yes: stalled-job recovery"),
    "celery": ("results in MySQL; queue in Redis", "yes: acks_late + reject_on_worker_lost (Redis visibility timeout)"),
    "dramatiq": ("Redis only (results with a TTL)", "yes: ack after run, dead workers' messages requeued"),
}
LABELS = {
    "qsysd": "qsysd {qsysd}, response mode",
    "qsysd-callback": "qsysd {qsysd}, callback mode",
    "bullmq": "BullMQ {bullmq} (ioredis {ioredis}), concurrency 64",
    "celery": "Celery {celery} (kombu {kombu}), threads 64, MySQL results",
    "dramatiq": "Dramatiq {dramatiq}, 1 process x 64 threads, Redis results",
}
ORDER = ["qsysd", "qsysd-callback", "bullmq", "celery", "dramatiq"]


def rng(xs, fmt):
    lo, hi = min(xs), max(xs)
    a, b = fmt.format(lo), fmt.format(hi)
    return a if a == b else f"{a}–{b}"


def mean(xs):
    return sum(xs) / len(xs)


def own_cpu(r):
    return r["cpu_ms_per_task"]["worker"]


def with_stores(r):
    # A system's own CPU plus the stores it uses (BullMQ and Dramatiq never touch MariaDB).
    return sum(r["cpu_ms_per_task"].values())


def target_line(q, b):
    """Issue 20's target: qsysd >= 3x BullMQ's tasks/s, <= 1/3 of its CPU per task and memory."""
    tput = mean([r["tasks_per_s"] for r in q]) / mean([r["tasks_per_s"] for r in b])
    own = mean([own_cpu(r) for r in q]) / mean([own_cpu(r) for r in b])
    both = mean([with_stores(r) for r in q]) / mean([with_stores(r) for r in b])
    mem = mean([r["rss_peak_mib"] for r in q]) / mean([r["rss_peak_mib"] for r in b])

    def verdict(good):
        return "met" if good else "not met"

    return (
        "Issue 20's target against BullMQ (means over the rounds, qsysd in response mode): "
        f"tasks/s {tput:.2f}x (target >= 3x: {verdict(tput >= 3)}); CPU per task, its own process "
        f"{own:.2f}x (target <= 0.33x: {verdict(own <= 1 / 3)}), with its stores {both:.2f}x "
        f"({verdict(both <= 1 / 3)}); peak RSS {mem:.2f}x (target <= 0.33x: {verdict(mem <= 1 / 3)})."
    )


def table(a):
    with open(a.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(a.versions) as f:
        v = json.load(f)
    rows.sort(key=lambda r: (ORDER.index(r["system"]), r["round"]))

    def label(s):
        try:
            return LABELS[s].format(**v)
        except KeyError:
            return s

    def c(r, k):
        return r["cpu_ms_per_task"][k]

    def lost_twice(r):
        got = r.get("fleet_received")
        failed = r.get("failed") or 0
        lost = r["n"] - (r.get("completed") or 0) - failed
        twice = (got - r["n"]) if got is not None and got > r["n"] else 0
        return f"{failed} / {lost} / {twice}"

    out = []
    out.append(f"Per round ({rows[0]['n'] if rows else 0} tasks each; CPU in ms per task, deltas of "
               "utime+stime over the run; RSS summed over the worker's process tree; the producer "
               "(enqueue, then polling the record) and the fake fleet are shown for reference, "
               "outside the system's columns):")
    out.append("")
    out.append("| system | round | tasks/s | CPU: system | mariadbd | redis-server | system + stores "
               "| peak RSS (MiB) | most at once on a GPU | fleet received / N | failed / lost / run twice "
               "| CPU: producer | CPU: fleet |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(
            f"| {label(r['system'])} | {r['round']} | {r['tasks_per_s']:,.0f} | {c(r, 'worker'):.3f} | "
            f"{c(r, 'mariadb'):.3f} | {c(r, 'redis'):.3f} | {with_stores(r):.3f} | {r['rss_peak_mib']:.1f} | "
            f"{r.get('fleet_max_at_once')} | {r.get('fleet_received')} / {r['n']} | {lost_twice(r)} | "
            f"{r.get('producer_cpu_ms_per_task', 0):.3f} | {r.get('fleet_cpu_ms_per_task', 0):.3f} |"
        )
    out.append("")
    out.append("Over the rounds (min–max), with the guarantees each keeps as configured here:")
    out.append("")
    out.append("| system | tasks/s | CPU ms/task: system | + mariadbd | + redis-server | system + stores "
               "| peak RSS (MiB) | most at once on a GPU | failed / lost / run twice | durable state | at-least-once |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    systems = [s for s in ORDER if any(r["system"] == s for r in rows)]
    by = {s: [r for r in rows if r["system"] == s] for s in systems}
    for s in systems:
        rs = by[s]
        failed = sum(r.get("failed") or 0 for r in rs)
        lost = sum(r["n"] - (r.get("completed") or 0) - (r.get("failed") or 0) for r in rs)
        twice = sum(max(0, (r.get("fleet_received") or 0) - r["n"]) for r in rs)
        dur, alo = GUARANTEES.get(s, ("?", "?"))
        out.append(
            f"| {label(s)} | {rng([r['tasks_per_s'] for r in rs], '{:,.0f}')} "
            f"| {rng([c(r, 'worker') for r in rs], '{:.3f}')} | {rng([c(r, 'mariadb') for r in rs], '{:.3f}')} "
            f"| {rng([c(r, 'redis') for r in rs], '{:.3f}')} | {rng([with_stores(r) for r in rs], '{:.3f}')} "
            f"| {rng([r['rss_peak_mib'] for r in rs], '{:.0f}')} "
            f"| {max((r.get('fleet_max_at_once') or 0) for r in rs)} | {failed} / {lost} / {twice} | {dur} | {alo} |"
        )
    noisy = [r for r in rows if r.get("others_cores", 0) > OTHERS_MAX]
    if noisy:
        out.append("")
        out.append("Not clean (other work shared the cores): " + ", ".join(
            f"{r['system']} round {r['round']} ({r.get('others_cores', 0):.2f} cores; "
            f"{', '.join(r['others_busy']) or 'unknown processes'})" for r in noisy) + ".")
    else:
        out.append("")
        out.append("Clean: no other work shared the cores in any round (under "
                   f"{OTHERS_MAX} cores besides the processes measured).")
    over = [r for r in rows if (r.get("fleet_max_at_once") or 0) > 4]
    out.append("")
    out.append("No system had more than 4 tasks at once on a GPU." if not over else
               "Over 4 at once on a GPU: " + ", ".join(f"{r['system']} round {r['round']}" for r in over) + ".")
    if "qsysd" in by and "bullmq" in by:
        out.append("")
        out.append(target_line(by["qsysd"], by["bullmq"]))
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    with open(a.out, "w") as f:
        f.write(text)


def versions(a):
    from importlib import metadata

    v = {}
    for name in ["celery", "kombu", "dramatiq", "redis", "SQLAlchemy", "PyMySQL", "requests"]:
        try:
            v[name.lower()] = metadata.version(name)
        except metadata.PackageNotFoundError:
            v[name.lower()] = "?"
    v["redis_py"] = v.pop("redis")
    for name in ["bullmq", "ioredis"]:
        try:
            with open(os.path.join(a.node_modules, name, "package.json")) as f:
                v[name] = json.load(f)["version"]
        except (OSError, ValueError, KeyError):
            v[name] = "?"

    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    v["qsysd"] = out([a.qsysd, "--version"]).split()[-1] if out([a.qsysd, "--version"]) else "?"
    v["node"] = out(["node", "--version"]).lstrip("v")
    v["python"] = sys.version.split()[0]
    m = re.search(r"v=(\S+)", out(["redis-server", "--version"]))
    v["redis_server"] = m.group(1) if m else "?"
    v["mariadb"] = out(["mysql", "-h", "127.0.0.1", "-u", "root", "-N", "-e", "SELECT VERSION()"])
    with open(a.out, "w") as f:
        json.dump(v, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--system", required=True)
    r.add_argument("--round", type=int, required=True)
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--pid", type=int, action="append", required=True)
    r.add_argument("--fleet-pid", type=int)
    r.add_argument("--out", required=True)
    r.add_argument("producer", nargs="+")
    f = sub.add_parser("fleet")
    f.add_argument("--result", required=True)
    f.add_argument("--log", required=True)
    v = sub.add_parser("versions")
    v.add_argument("--qsysd", required=True)
    v.add_argument("--node-modules", required=True)
    v.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("--results", required=True)
    t.add_argument("--versions", required=True)
    t.add_argument("--out", required=True)
    a = p.parse_args()
    {"run": run, "fleet": fleet, "versions": versions, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()

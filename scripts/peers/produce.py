"""Producers of scripts/bench-peers.sh for qsysd, Celery and Dramatiq (BullMQ's is
bench/peers/bullmq/producer.js): enqueue N transcription tasks up front, then poll the system's
own record of finished tasks every 100 ms until all N have ended.

    python produce.py qsysd N TAG --push BIN --config FILE --queue Q --db DATABASE
    python produce.py celery N TAG
    python produce.py dramatiq N TAG

Each task's data is {"s3_key": "rec/<i>.wav", "task_id": "<TAG>-<i>"}. Output, JSON lines read by
measure.py: {"event": "enqueued", "t0"} (t0: just before the first enqueue), {"event": "done"}
when the record says all N ended (the measurer reads its CPU counters then), and {"event": "end",
"t_last"} with the time of the last completion: qsysd's own MAX(finished_at) (DATETIME(3));
Celery's date_done has whole seconds and Dramatiq's results carry no time, so for them it is the
poll that saw N (up to 100 ms late).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import pymysql
import redis

POLL = 0.1
STUCK = 60.0


def say(**o):
    sys.stdout.write(json.dumps(o) + "\n")
    sys.stdout.flush()


def task_data(i, tag):
    return {"s3_key": f"rec/{i}.wav", "task_id": f"{tag}-{i}"}


def wait(n, count):
    """Polls count() -> (ended, failed) until ended >= n; fails after STUCK s without progress."""
    last, moved = -1, time.time()
    while True:
        ended, failed = count()
        if ended >= n:
            return ended, failed
        if ended != last:
            last, moved = ended, time.time()
        elif time.time() - moved > STUCK:
            say(event="error", error=f"stuck at {ended} of {n} ended for {STUCK:.0f} s", failed=failed)
            sys.exit(1)
        time.sleep(POLL)


def mysql(db):
    return pymysql.connect(host="127.0.0.1", port=3306, user="root", database=db, autocommit=True)


def qsysd(a):
    lines = "".join(
        json.dumps({"type": "start_transcribe", "data": task_data(i, a.tag)}, separators=(",", ":")) + "\n"
        for i in range(a.n)
    ).encode()
    t0 = time.time()
    # qsys-push --file -: NDJSON on stdin, pushed in one MULTI/EXEC (scripts/push-bench.sh). A
    # clean environment: the seed's REDIS_*/DB_*/QUEUE_NAME variables would override the config.
    subprocess.run(
        [a.push, "--config", a.config, "--file", "-", "--queue", a.queue],
        input=lines, stdout=subprocess.DEVNULL, check=True, env={"PATH": os.environ.get("PATH", "")},
    )
    say(event="enqueued", t0=t0, t_enqueued=time.time())
    c = mysql(a.db)

    def count():
        with c.cursor() as cur:
            cur.execute("SELECT state, COUNT(*) FROM tasks WHERE state IN ('finished', 'failed') GROUP BY state")
            by = dict(cur.fetchall())
        return by.get("finished", 0) + by.get("failed", 0), by.get("failed", 0)

    ended, failed = wait(a.n, count)
    say(event="done", t_poll=time.time())
    with c.cursor() as cur:
        cur.execute("SELECT UNIX_TIMESTAMP(MAX(finished_at)) FROM tasks")
        (t_last,) = cur.fetchone()
    say(event="end", t_last=float(t_last), completed=ended - failed, failed=failed)


def celery(a):
    from celery_app import app, transcribe

    t0 = time.time()
    # Celery has no bulk publish; one shared producer (one connection) for the whole loop is the
    # documented way to send many (https://docs.celeryq.dev/en/stable/userguide/calling.html).
    with app.producer_or_acquire() as producer:
        for i in range(a.n):
            transcribe.apply_async((task_data(i, a.tag),), task_id=f"{a.tag}-{i}", producer=producer)
    say(event="enqueued", t0=t0, t_enqueued=time.time())
    c = mysql("qsys_peers_celery")

    def count():
        with c.cursor() as cur:
            cur.execute(
                "SELECT status, COUNT(*) FROM celery_taskmeta WHERE status IN ('SUCCESS', 'FAILURE') GROUP BY status"
            )
            by = dict(cur.fetchall())
        return by.get("SUCCESS", 0) + by.get("FAILURE", 0), by.get("FAILURE", 0)

    ended, failed = wait(a.n, count)
    t = time.time()
    say(event="done", t_poll=t)
    say(event="end", t_last=t, completed=ended - failed, failed=failed)


def dramatiq(a):
    import dramatiq_app

    t0 = time.time()
    # Dramatiq has no bulk enqueue either: one send per message.
    for i in range(a.n):
        dramatiq_app.transcribe.send(task_data(i, a.tag))
    say(event="enqueued", t0=t0, t_enqueued=time.time())
    # The results live alone in their logical database, one key per message: DBSIZE counts them.
    r = redis.Redis.from_url(dramatiq_app.RESULTS)
    ended, _ = wait(a.n, lambda: (r.dbsize(), 0))
    t = time.time()
    say(event="done", t_poll=t)
    # A failure is stored as a result too, after the retries, as {"__t": ..., "exn": {...}}.
    failed = 0
    for key in r.scan_iter(count=1000):
        v = r.lindex(key, 0)
        if v and b'"exn":' in v:
            failed += 1
    say(event="end", t_last=t, completed=ended - failed, failed=failed)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=["qsysd", "celery", "dramatiq"])
    p.add_argument("n", type=int)
    p.add_argument("tag")
    p.add_argument("--push")
    p.add_argument("--config")
    p.add_argument("--queue")
    p.add_argument("--db")
    a = p.parse_args()
    {"qsysd": qsysd, "celery": celery, "dramatiq": dramatiq}[a.system](a)


if __name__ == "__main__":
    main()

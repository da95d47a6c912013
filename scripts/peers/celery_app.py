"""Celery peer of scripts/bench-peers.sh: one `transcribe` task that POSTs to the least-loaded GPU
with a free slot (bench/peers/slots.py) and returns the GPU's answer as its result.

Written as Celery's docs recommend for long, must-not-be-lost tasks:
- Redis broker, results in MySQL through the SQLAlchemy result backend
  (https://docs.celeryq.dev/en/stable/userguide/configuration.html#database-backend-settings);
- task_acks_late + task_reject_on_worker_lost: the message is acknowledged only after the task
  ran, and redelivered if the worker dies mid-task, so at-least-once
  (https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-acks-late,
  https://docs.celeryq.dev/en/stable/userguide/configuration.html#task-reject-on-worker-lost,
  https://docs.celeryq.dev/en/stable/faq.html#should-i-use-retry-or-acks-late);
- worker_prefetch_multiplier = 1, "reserve one task at a time" for long tasks with acks_late
  (https://docs.celeryq.dev/en/stable/userguide/optimizing.html#prefetch-limits);
- the threads pool (`celery worker --pool threads --concurrency 64`): the work is waiting on HTTP,
  and one process keeps the slot table in one place
  (https://docs.celeryq.dev/en/stable/userguide/workers.html#concurrency).

Run: celery -A celery_app worker --pool threads --concurrency 64 (from bench/peers).
Environment: QSYS_PEERS_GPUS, QSYS_PEERS_SLOTS (slots.py), QSYS_PEERS_CELERY_BROKER,
QSYS_PEERS_CELERY_BACKEND, QSYS_PEERS_READY (a file written once the worker is ready).
"""

import os

from celery import Celery, signals

import slots

BROKER = os.environ.get("QSYS_PEERS_CELERY_BROKER", "redis://127.0.0.1:6379/13")
# ssl_disabled: PyMySQL 1.2 tries TLS by default ("preferred") and builds an SSL context, loading
# the system's CA bundle, for every connection, about 50 ms of CPU; the local MariaDB has no TLS,
# and Celery's database backend opens a connection per result stored outside a prefork child.
BACKEND = os.environ.get(
    "QSYS_PEERS_CELERY_BACKEND", "db+mysql+pymysql://root@127.0.0.1:3306/qsys_peers_celery?ssl_disabled=true"
)

app = Celery("qsys_peers", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Keep results (the state recorded), and say nothing about them beyond the default columns.
    task_ignore_result=False,
    result_expires=None,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="transcribe")
def transcribe(data):
    return slots.run_on_gpu(data)


@signals.worker_ready.connect
def _ready(**_):
    # Create the result tables now, not inside the measured run (the backend does it on first use).
    app.backend.ResultSession().close()
    path = os.environ.get("QSYS_PEERS_READY")
    if path:
        with open(path, "w") as f:
            f.write("ready\n")

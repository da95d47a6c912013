"""Dramatiq peer of scripts/bench-peers.sh: one `transcribe` actor that POSTs to the least-loaded
GPU with a free slot (bench/peers/slots.py) and stores the GPU's answer as its result.

Written as Dramatiq's docs recommend: a RedisBroker, the Results middleware with a Redis backend in
a logical database of its own, and `store_results=True` on the actor
(https://dramatiq.io/cookbook.html#results; the layout of https://redis.io/docs/latest/integrate/dramatiq/).
Messages are acknowledged only once processed and a dead worker's are redelivered: "Dramatiq has
at-least-once message delivery semantics" (https://dramatiq.io/advanced.html#message-persistence).
Results live in Redis only, with the backend's default TTL (10 minutes). The default middleware
(retries, time limit, age limit) is kept.

Run: dramatiq --processes 1 --threads 64 dramatiq_app (from bench/peers).
Environment: QSYS_PEERS_GPUS, QSYS_PEERS_SLOTS (slots.py), QSYS_PEERS_DRAMATIQ_BROKER,
QSYS_PEERS_DRAMATIQ_RESULTS, QSYS_PEERS_READY (a file written once the worker is ready).
"""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

import slots

BROKER = os.environ.get("QSYS_PEERS_DRAMATIQ_BROKER", "redis://127.0.0.1:6379/14")
RESULTS = os.environ.get("QSYS_PEERS_DRAMATIQ_RESULTS", "redis://127.0.0.1:6379/15")


class Ready(Middleware):
    """Tells the benchmark the worker's threads are consuming (Dramatiq has no ready file)."""

    def after_worker_boot(self, broker, worker):
        path = os.environ.get("QSYS_PEERS_READY")
        if path:
            with open(path, "w") as f:
                f.write("ready\n")


broker = RedisBroker(url=BROKER, namespace="qsys-peers-dramatiq")
backend = RedisBackend(url=RESULTS, namespace="qsys-peers-dramatiq-results")
broker.add_middleware(Results(backend=backend))
broker.add_middleware(Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="transcribe", store_results=True)
def transcribe(data):
    return slots.run_on_gpu(data)

"""Per-GPU slot table shared by the Celery and Dramatiq peers of scripts/bench-peers.sh.

Neither Celery nor Dramatiq has a notion of "at most 4 tasks on this endpoint, pick the least
loaded": their docs leave per-resource limits to the application. Both peers run one worker
process with a pool of threads, so the table lives in that process: a lock-protected list of
in-flight counts and a Condition that a thread waits on when every GPU is full (with 64 threads
for 16 x 4 slots that wait is rare, but it is what keeps a GPU at 4 when threads outnumber slots).

The GPUs come from QSYS_PEERS_GPUS (comma-separated URLs, as fake-fleet prints them) and the
slots per GPU from QSYS_PEERS_SLOTS (default 4). requests.Session is kept per thread (a Session
is not documented as thread-safe), so each thread keeps its own keep-alive connections.
"""

import os
import threading

import requests

GPUS = [u for u in os.environ.get("QSYS_PEERS_GPUS", "").split(",") if u]
SLOTS = int(os.environ.get("QSYS_PEERS_SLOTS", "4"))


class SlotTable:
    """Least-loaded choice among GPUs with a free slot; ties rotate so an idle fleet spreads."""

    def __init__(self, gpus, slots):
        self.slots = slots
        self.inflight = [0] * len(gpus)
        self.next = 0
        self.cond = threading.Condition()

    def _pick(self):
        n = len(self.inflight)
        best = None
        for k in range(n):
            g = (self.next + k) % n
            if self.inflight[g] < self.slots and (best is None or self.inflight[g] < self.inflight[best]):
                best = g
        return best

    def acquire(self):
        with self.cond:
            while True:
                g = self._pick()
                if g is not None:
                    self.inflight[g] += 1
                    self.next = (g + 1) % len(self.inflight)
                    return g
                self.cond.wait()

    def release(self, g):
        with self.cond:
            self.inflight[g] -= 1
            self.cond.notify()


TABLE = SlotTable(GPUS, SLOTS)
_local = threading.local()


def _session():
    s = getattr(_local, "session", None)
    if s is None:
        s = _local.session = requests.Session()
    return s


def run_on_gpu(data):
    """POSTs one task to the least-loaded GPU with a free slot and returns what is kept as its
    result: the GPU's id and its JSON answer. A non-2xx answer raises (the task fails)."""
    g = TABLE.acquire()
    try:
        body = dict(data)
        # The fleet's contract (docs/contracts.md section 5): the task's data plus task_id and
        # callback_url. In response mode the answer is the completion, so the URL is unused.
        body.setdefault("callback_url", "")
        r = _session().post(GPUS[g], json=body, timeout=1800)
        r.raise_for_status()
        return {"gpu": f"g{g}", "result": r.json() if r.content else None}
    finally:
        TABLE.release(g)

// BullMQ peer worker of scripts/bench-peers.sh: one Worker, concurrency 64, whose processor POSTs
// each job to the least-loaded GPU with a free slot and returns the GPU's answer, which BullMQ
// keeps in Redis as the job's return value (the recorded state).
//
// Written as BullMQ's docs recommend: a Worker with a processor function and a local concurrency
// factor for I/O-bound jobs (https://docs.bullmq.io/guide/workers/concurrency), an ioredis
// connection with maxRetriesPerRequest: null for workers and an 'error' listener
// (https://docs.bullmq.io/guide/going-to-production), completed jobs kept with their return values
// (no removeOnComplete: https://docs.bullmq.io/guide/workers/auto-removal-of-jobs), stalled-job
// recovery left on (https://docs.bullmq.io/guide/jobs/stalled: a job whose worker died runs again,
// at-least-once). BullMQ has no per-endpoint
// limit (global concurrency and Pro groups limit a queue or a group, not "4 per GPU"), so the
// slot table lives in this process: in-flight counts per GPU, the least loaded with a free slot
// wins (ties rotate), and a job that finds every GPU full waits in a FIFO of promises.
//
// Environment: QSYS_PEERS_GPUS (comma-separated URLs), QSYS_PEERS_SLOTS (default 4),
// QSYS_PEERS_BULLMQ_DB (Redis DB number), QSYS_PEERS_CONCURRENCY (default 64).
// Prints "ready" on stdout once it consumes; stops cleanly on SIGTERM.
'use strict';

const http = require('node:http');
const { Worker } = require('bullmq');
const common = require('./common');

const gpus = (process.env.QSYS_PEERS_GPUS || '').split(',').filter(Boolean).map((u) => new URL(u));
const slots = Number(process.env.QSYS_PEERS_SLOTS || 4);
const concurrency = Number(process.env.QSYS_PEERS_CONCURRENCY || 64);
if (gpus.length === 0) {
  console.error('worker: QSYS_PEERS_GPUS is empty');
  process.exit(2);
}

// Keep-alive sockets; the agent pools them per host:port, so per GPU, at most `slots` each.
const agent = new http.Agent({ keepAlive: true, maxSockets: slots });

const inflight = new Array(gpus.length).fill(0);
const waiters = [];
let next = 0;

function pick() {
  let best = -1;
  for (let k = 0; k < gpus.length; k++) {
    const g = (next + k) % gpus.length;
    if (inflight[g] < slots && (best < 0 || inflight[g] < inflight[best])) best = g;
  }
  if (best >= 0) {
    inflight[best]++;
    next = (best + 1) % gpus.length;
  }
  return best;
}

function acquire() {
  const g = pick();
  return g >= 0 ? Promise.resolve(g) : new Promise((resolve) => waiters.push(resolve));
}

function release(g) {
  inflight[g]--;
  if (waiters.length > 0) waiters.shift()(pick());
}

function post(url, body) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        agent,
        method: 'POST',
        hostname: url.hostname,
        port: url.port,
        path: url.pathname + url.search,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

async function processor(job) {
  const g = await acquire();
  try {
    // The fleet's contract (docs/contracts.md section 5): the task's data plus task_id and
    // callback_url; in response mode the answer is the completion, so the URL is unused.
    const body = JSON.stringify({ callback_url: '', ...job.data });
    const res = await post(gpus[g], body);
    if (res.status < 200 || res.status >= 300) throw new Error(`GPU g${g} answered ${res.status}`);
    return { gpu: `g${g}`, result: res.body ? JSON.parse(res.body) : null };
  } finally {
    release(g);
  }
}

async function main() {
  const worker = new Worker(common.queueName, processor, {
    connection: common.connection({ maxRetriesPerRequest: null }),
    prefix: common.prefix,
    concurrency,
  });
  worker.on('error', (err) => console.error('worker error:', err));
  worker.on('failed', (job, err) => console.error(`job ${job && job.id} failed: ${err.message}`));
  await worker.waitUntilReady();
  process.stdout.write('ready\n');
  const stop = async () => {
    await worker.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

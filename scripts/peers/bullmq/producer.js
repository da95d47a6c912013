// BullMQ peer producer of scripts/bench-peers.sh: adds N jobs with Queue.addBulk (one atomic call,
// https://docs.bullmq.io/guide/queues/adding-bulks), then polls the queue's completed and failed
// counts every 100 ms until all N have ended.
//
//   node producer.js N TAG
//
// Prints JSON lines for bench/peers/measure.py: {"event":"enqueued"} with the time of the first
// enqueue, {"event":"done"} as soon as the counts reach N (the measurer reads CPU counters then),
// and {"event":"end"} with the time of the last completion, taken from the id of the newest
// 'completed' entry of the queue's event stream (Redis's clock, same host) rather than the poll.
'use strict';

const { Queue } = require('bullmq');
const IORedis = require('ioredis');
const common = require('./common');

const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const n = Number(process.argv[2]);
  const tag = process.argv[3] || 'b';
  // Producers fail fast instead of queueing commands while Redis is away (going-to-production).
  const queue = new Queue(common.queueName, {
    connection: common.connection({ enableOfflineQueue: false }),
    prefix: common.prefix,
  });
  await queue.waitUntilReady();
  const jobs = [];
  for (let i = 0; i < n; i++) {
    jobs.push({ name: 'transcribe', data: { s3_key: `rec/${i}.wav`, task_id: `${tag}-${i}` } });
  }
  const t0 = Date.now() / 1000;
  await queue.addBulk(jobs);
  say({ event: 'enqueued', t0, t_enqueued: Date.now() / 1000 });

  let last = -1;
  let moved = Date.now();
  let counts;
  for (;;) {
    counts = await queue.getJobCounts('completed', 'failed');
    const ended = counts.completed + counts.failed;
    if (ended >= n) break;
    if (ended !== last) {
      last = ended;
      moved = Date.now();
    } else if (Date.now() - moved > 60000) {
      say({ event: 'error', error: `stuck at ${ended} of ${n} ended for 60 s`, ...counts });
      process.exit(1);
    }
    await sleep(100);
  }
  const tPoll = Date.now() / 1000;
  say({ event: 'done', t_poll: tPoll });

  const client = new IORedis(common.connection());
  const entries = await client.xrevrange(`${common.prefix}:${common.queueName}:events`, '+', '-', 'COUNT', 500);
  let tLast = null;
  for (const [id, fields] of entries) {
    if (fields[0] === 'event' && fields[1] === 'completed') {
      tLast = Number(id.split('-')[0]) / 1000;
      break;
    }
  }
  say({ event: 'end', t_last: tLast ?? tPoll, completed: counts.completed, failed: counts.failed });
  client.disconnect();
  await queue.close();
}

main().catch((err) => {
  say({ event: 'error', error: String(err && err.stack ? err.stack : err) });
  process.exit(1);
});

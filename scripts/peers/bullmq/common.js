// Settings the BullMQ peer's worker and producer share (scripts/bench-peers.sh): the queue, the
// key prefix and the Redis connection (its own logical database, QSYS_PEERS_BULLMQ_DB).
'use strict';

const db = Number(process.env.QSYS_PEERS_BULLMQ_DB || 12);

module.exports = {
  queueName: 'transcribe',
  prefix: 'qsys-peers-bullmq',
  connection: (extra) => ({ host: '127.0.0.1', port: 6379, db, ...extra }),
};

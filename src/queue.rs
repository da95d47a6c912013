//! The poller thread (`qsys-poller`): takes tasks from the Redis lists into the scheduler's bounded
//! channel.
//!
//! One `BLPOP` over every configured queue, in priority order, so an earlier queue always wins and
//! producers that `RPUSH` get FIFO — what the seed's multi-key `BLPOP` did. Each element is parsed
//! ([`crate::message`]) and recorded in MySQL *before* it goes to the channel; an element that cannot
//! be parsed is recorded `failed` with the reason and the poller goes on.
//!
//! Backpressure: the channel holds one task and the scheduler stops receiving once it holds a few
//! that it cannot place, so when every slot is busy this thread blocks on the send with one task in
//! hand, and everything else stays in Redis. If anything fails after the pop (MySQL down) or a stop
//! comes while a task is in hand, the element goes back to the head of its queue.

use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender};
use redis::{Client, Connection};

use crate::backoff::Backoff;
use crate::message;
use crate::shared::{Shared, Task};
use crate::store::Accepted;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Opens a Redis connection whose reads outlast a blocking pop of `pop_timeout` by a wide margin:
/// a read timeout during a pop makes the client drop the late reply, and the popped element with it.
pub fn connect(client: &Client, pop_timeout: Duration) -> Result<Connection, QueueError> {
    let conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    conn.set_read_timeout(Some(pop_timeout + Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(conn)
}

/// Puts tasks back at the head of their queues, earliest first in the end (so `LPUSH` in reverse).
pub fn return_tasks(client: &Client, tasks: &[(String, String)]) -> Result<(), QueueError> {
    if tasks.is_empty() {
        return Ok(());
    }
    let mut conn = connect(client, Duration::from_secs(1))?;
    let mut pipe = redis::pipe();
    for (queue, json) in tasks.iter().rev() {
        pipe.cmd("LPUSH").arg(queue).arg(json).ignore();
    }
    pipe.query::<()>(&mut conn)?;
    Ok(())
}

pub struct Poller {
    shared: std::sync::Arc<Shared>,
    client: Client,
    tx: Sender<Task>,
}

impl Poller {
    pub fn new(shared: std::sync::Arc<Shared>, client: Client, tx: Sender<Task>) -> Poller {
        Poller { shared, client, tx }
    }

    /// Runs until a stop. Redis and MySQL failures are retried with backoff, never fatal.
    pub fn run(self) {
        let queues = self.shared.config.redis.queues.clone();
        let pop_timeout = self.shared.config.redis.pop_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conn: Option<Connection> = None;
        while !self.shared.stop.is_stopping() {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect(&self.client, pop_timeout) {
                    Ok(c) => {
                        if backoff.failures() > 0 {
                            log::info!("redis connection restored");
                        }
                        conn.insert(c)
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        log::warn!(error:% = e, retry_in:? = wait; "cannot connect to redis");
                        self.shared.stop.sleep(wait);
                        continue;
                    }
                },
            };
            let popped: Result<Option<(String, Vec<u8>)>, _> = redis::cmd("BLPOP")
                .arg(&queues)
                .arg(pop_timeout.as_secs())
                .query(c);
            match popped {
                Ok(None) => backoff.reset(),
                Ok(Some((queue, raw))) => {
                    backoff.reset();
                    if let Err(wait) = self.take(c, &queue, raw, &mut backoff) {
                        self.shared.stop.sleep(wait);
                    }
                }
                Err(e) => {
                    conn = None;
                    let wait = backoff.next_delay();
                    log::warn!(error:% = e, retry_in:? = wait; "redis pop failed");
                    self.shared.stop.sleep(wait);
                }
            }
        }
        log::debug!("poller stopped");
    }

    /// Records one popped element and hands it on. `Err(wait)` asks the caller to back off.
    fn take(
        &self,
        conn: &mut Connection,
        queue: &str,
        raw: Vec<u8>,
        backoff: &mut Backoff,
    ) -> Result<(), Duration> {
        let store = &self.shared.store;
        let msg = match message::parse(&raw, || uuid::Uuid::new_v4().to_string()) {
            Ok(m) => m,
            Err(bad) => {
                return match store.record_malformed(
                    bad.task_id.as_deref(),
                    queue,
                    &raw,
                    &bad.reason,
                ) {
                    Ok(id) => {
                        log::warn!(task_id = id.as_str(), queue, reason = bad.reason.as_str();
                            "malformed queue message recorded as failed");
                        Ok(())
                    }
                    Err(e) => Err(self.put_back(conn, queue, &raw, &e, backoff)),
                };
            }
        };
        let payload = msg.to_json();
        let attempts = match store.accept(
            &msg.task_id,
            queue,
            &msg.kind,
            &payload,
            msg.max_attempts,
            msg.timeout_s,
        ) {
            Ok(Accepted::New) => 0,
            Ok(Accepted::Resumed { attempts }) => attempts,
            Ok(Accepted::Exists { state }) => {
                log::warn!(task_id = msg.task_id.as_str(), queue, state = state.as_str();
                    "task id already known and not pending: duplicate dropped");
                return Ok(());
            }
            Err(e) => {
                // Put back the canonical form so an id qsysd assigned stays the same.
                return Err(self.put_back(conn, queue, payload.as_bytes(), &e, backoff));
            }
        };
        log::debug!(task_id = msg.task_id.as_str(), queue, kind = msg.kind.as_str(); "task taken");
        let mut task = Task {
            msg,
            queue: queue.to_string(),
            attempts,
            taken_at: std::time::Instant::now(),
        };
        loop {
            match self.tx.send_timeout(task, Duration::from_millis(200)) {
                Ok(()) => return Ok(()),
                Err(SendTimeoutError::Timeout(t)) if !self.shared.stop.is_stopping() => task = t,
                Err(SendTimeoutError::Timeout(t) | SendTimeoutError::Disconnected(t)) => {
                    // Stopping with a task in hand: its row stays `pending` and the next taker
                    // resumes it.
                    let back = vec![(t.queue.clone(), t.msg.to_json())];
                    if let Err(e) = return_tasks(&self.client, &back) {
                        log::error!(task_id = t.msg.task_id.as_str(), error:% = e;
                            "could not return task to redis at stop; its row stays pending");
                    }
                    return Ok(());
                }
            }
        }
    }

    /// After a MySQL failure: the element goes back to the head of its queue.
    fn put_back(
        &self,
        conn: &mut Connection,
        queue: &str,
        raw: &[u8],
        error: &dyn std::fmt::Display,
        backoff: &mut Backoff,
    ) -> Duration {
        let wait = backoff.next_delay();
        let pushed: Result<(), _> = redis::cmd("LPUSH").arg(queue).arg(raw).query(conn);
        match pushed {
            Ok(()) => log::warn!(queue, error:% = error, retry_in:? = wait;
                "mysql unavailable: task returned to its queue"),
            Err(e) => log::error!(queue, error:% = error, redis_error:% = e,
                raw = String::from_utf8_lossy(raw).as_ref();
                "mysql unavailable and the task could not be returned to redis"),
        }
        wait
    }
}

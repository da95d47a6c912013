//! The poller thread (`qsys-poller`): takes tasks from the Redis lists into the scheduler's bounded
//! channel, without ever holding a task that exists nowhere else.
//!
//! Reliable fetch: an element is *moved* (`LMOVE`/`BLMOVE`) from its queue to this instance's in-hand
//! list, parsed ([`crate::contract::message`]), recorded in MySQL, and only then removed from the in-hand list
//! and handed on. A `kill -9` at any instant leaves it in the queue, in the in-hand list (taken again
//! on every connect, so also after a Redis restart ate a reply) or in MySQL as `pending` (resumed by
//! the scheduler at start). An element that cannot be parsed is recorded `failed` with the reason and
//! the poller goes on.
//!
//! Priority: a small Lua script moves from the first non-empty queue in configured order, atomically,
//! so an earlier queue always wins and producers that `RPUSH` get FIFO. When every queue is empty the
//! poller blocks on the first queue; with several queues that wait is 100 ms, after which the others
//! are looked at again.
//!
//! Backpressure: a batch goes over a rendezvous channel, and the scheduler stops receiving once it
//! holds [`crate::sched::scheduler::PREFETCH`] tasks it cannot place, so when every slot is busy this thread
//! blocks on the send with one batch ([`TAKE_BATCH`]) in hand, and everything else stays in Redis. A batch is recorded in one
//! MySQL transaction: one log flush for up to 64 tasks. If MySQL fails after a move, the element goes back to the
//! head of its queue; at a stop, a task in hand goes back to its queue ([`crate::shared::Shared::hand_back`]).

use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender};
use redis::{Client, Connection};

use crate::contract::message;
use crate::net::backoff::Backoff;
use crate::net::redis::Timeouts;
use crate::obs::trouble::Trouble;
use crate::shared::{GpuJob, Shared, Task};
use crate::store::{Accepted, Claim, ClaimRequest, NewTask, Store, StoreError};

/// How many elements one move takes at most: one MySQL transaction records them together. Also
/// bounds what the poller holds beyond the scheduler's hand. Each batch costs a fixed number of
/// Redis and MySQL round trips, so this size set the ceiling of the whole pipeline: 16 gave about
/// 3,600 tasks/s in the benchmark, 64 about 4,800 (BENCHMARKS.md).
pub const TAKE_BATCH: usize = 64;

/// Moves up to `ARGV[1]` elements from the head of the first non-empty queue to that queue's in-hand
/// list. KEYS: the n queues in priority order, then their n in-hand lists. Returns the queue's
/// position (1-based) and the elements in order.
const TAKE_SCRIPT: &str = r#"
local n = #KEYS / 2
local max = tonumber(ARGV[1])
for i = 1, n do
  local out = {}
  for j = 1, max do
    local v = redis.call('LMOVE', KEYS[i], KEYS[n + i], 'LEFT', 'RIGHT')
    if not v then break end
    out[j] = v
  end
  if #out > 0 then return {i, out} end
end
return false
"#;

/// An instance's in-hand list for one queue: one per queue, so a recovered element still knows
/// where it came from.
pub(crate) fn in_hand_key(config: &crate::config::Config, instance: &str, queue: &str) -> String {
    format!("{}:inhand:{instance}:{queue}", config.redis.key_prefix)
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Opens a Redis connection whose reads outlast a blocking pop of `pop_timeout` by a wide margin:
/// a read timeout during a pop makes the client drop the late reply, and the popped element with it.
pub(crate) fn connect(client: &Client, pop_timeout: Duration) -> Result<Connection, QueueError> {
    Ok(crate::net::redis::connect(
        client,
        Timeouts::reading(pop_timeout + Duration::from_secs(10)),
    )?)
}

/// Moves what a dead instance held back to the head of its queues: first its in-hand lists (in
/// order), then its `pending` tasks. Returns how many tasks moved.
pub(crate) fn recover_instance(
    shared: &Shared,
    client: &Client,
    config: &crate::config::Config,
    dead: &str,
) -> Result<usize, String> {
    let mut conn = connect(client, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    let mut moved = 0;
    for queue in &config.redis.queues {
        let key = in_hand_key(config, dead, queue);
        // Tail of the in-hand list to the head of the queue keeps the original order.
        loop {
            let v: Option<Vec<u8>> = redis::cmd("LMOVE")
                .arg(&key)
                .arg(queue)
                .arg("RIGHT")
                .arg("LEFT")
                .query(&mut conn)
                .map_err(|e| e.to_string())?;
            if v.is_none() {
                break;
            }
            moved += 1;
        }
    }
    let pending = shared
        .store
        .release_instance_pending(dead)
        .map_err(|e| e.to_string())?;
    if !pending.is_empty() {
        let mut pipe = redis::pipe();
        for (_, queue, payload) in pending.iter().rev() {
            pipe.cmd("LPUSH").arg(queue).arg(payload).ignore();
        }
        pipe.query::<()>(&mut conn).map_err(|e| e.to_string())?;
        moved += pending.len();
    }
    Ok(moved)
}

/// Where a malformed element is kept, whole, for inspection (the row in MySQL keeps its first
/// 64 KiB and the reason). Capped at [`DEAD_LETTER_MAX`] elements, newest first.
pub(crate) fn dead_letter_key(config: &crate::config::Config, queue: &str) -> String {
    format!("{}:dead:{queue}", config.redis.key_prefix)
}

/// Elements a dead-letter list keeps.
const DEAD_LETTER_MAX: isize = 10_000;

/// One moved element: a task to record, or a refusal to record as `failed`.
enum Parsed {
    Task(message::Message),
    Refused(message::Malformed),
}

/// Parses one element, refusing one over `max_bytes` unread.
fn parse_element(raw: &[u8], max_bytes: usize) -> Parsed {
    if raw.len() > max_bytes {
        return Parsed::Refused(message::Malformed {
            task_id: None,
            reason: format!(
                "message of {} bytes is larger than daemon.max_message_bytes ({max_bytes})",
                raw.len()
            ),
        });
    }
    match message::parse(raw, || uuid::Uuid::new_v4().to_string()) {
        Ok(m) => Parsed::Task(m),
        Err(bad) => Parsed::Refused(bad),
    }
}

/// What recording a batch left to do in Redis.
struct Recorded {
    /// The tasks to schedule, in order.
    tasks: Vec<Task>,
    /// Positions of elements recorded as `failed`: they go to the dead-letter list.
    refused: Vec<usize>,
    /// Positions of elements not recorded because MySQL failed: they go back to their queue.
    unrecorded: Vec<usize>,
    /// Why MySQL failed, when it did.
    outage: Option<StoreError>,
}

impl Recorded {
    /// Records element `i` as `failed` with `reason`, for the dead-letter list; on an outage it
    /// stays unrecorded.
    fn refuse(
        &mut self,
        store: &Store,
        queue: &str,
        i: usize,
        raw: &[u8],
        task_id: Option<&str>,
        reason: &str,
    ) {
        match refuse(store, queue, raw, task_id, reason) {
            Ok(()) => self.refused.push(i),
            Err(e) => {
                self.outage = Some(e);
                self.unrecorded.push(i);
            }
        }
    }

    /// Acts on each verdict: a task to hand on, a duplicate to drop, a row MySQL refused to fail,
    /// an outage to try again. A delayed task waits in MySQL held by nobody, not here: the
    /// scheduler adopts it when it is due; a copy taken again after a crash is let go the same
    /// way (returned, to be released).
    fn settle(
        &mut self,
        store: &Store,
        queue: &str,
        raws: &[Vec<u8>],
        verdicts: impl Iterator<Item = Verdict>,
    ) -> Vec<String> {
        let mut release = Vec::new();
        for (((i, msg), verdict), wait) in verdicts {
            let (attempts, new) = match verdict {
                Ok(Accepted::New) => (0, true),
                Ok(Accepted::Resumed { attempts }) => (attempts, false),
                Ok(Accepted::Exists { state }) => {
                    log::warn!(task_id = msg.task_id.as_str(), queue, state = state.as_str();
                        "task id already known and not pending here: duplicate dropped");
                    continue;
                }
                Err(e) if e.is_rejected_data() && self.outage.is_none() => {
                    let reason = format!("mysql refused the task: {e}");
                    self.refuse(store, queue, i, &raws[i], Some(&msg.task_id), &reason);
                    continue;
                }
                Err(e) => {
                    if self.outage.is_none() {
                        self.outage = Some(e);
                    }
                    self.unrecorded.push(i);
                    continue;
                }
            };
            if let Some(wait) = wait {
                log::debug!(task_id = msg.task_id.as_str(), queue, wait:? = wait; "task delayed");
                if !new {
                    release.push(msg.task_id);
                }
                continue;
            }
            log::debug!(task_id = msg.task_id.as_str(), queue, kind = msg.kind.as_str();
                "task taken");
            self.tasks.push(Task::new(msg, queue, attempts));
        }
        release
    }
}

/// Records `rows` in one transaction, with `claims` (the slots of tasks that start at once); when
/// MySQL refuses it for one row's data, row by row, each with its own verdict (after an outage the
/// rest are not tried) and without the claims. `Err`: the batch met an outage.
fn accept_each(
    store: &Store,
    queue: &str,
    rows: &[NewTask<'_>],
    claims: &[ClaimRequest<'_>],
) -> Result<BatchVerdicts, StoreError> {
    match store.accept_and_claim(queue, rows, claims) {
        Ok((all, claimed)) => Ok((all.into_iter().map(Ok).collect(), claimed)),
        Err(e) if e.is_rejected_data() => {
            log::warn!(queue, error:% = e; "mysql refused a batch's data: recording its tasks one by one");
            let mut each = Vec::with_capacity(rows.len());
            let mut down = false;
            for row in rows {
                let verdict = if down {
                    Err(StoreError::Schema("not tried after an outage".into()))
                } else {
                    store
                        .accept(queue, std::slice::from_ref(row))
                        .map(|mut a| a.remove(0))
                };
                down = verdict.as_ref().is_err_and(|e| !e.is_rejected_data());
                each.push(verdict);
            }
            Ok((each, Vec::new()))
        }
        Err(e) => Err(e),
    }
}

/// Each row's verdict, and each claim's (none when the batch was recorded row by row).
type BatchVerdicts = (Vec<Result<Accepted, StoreError>>, Vec<Option<Claim>>);

/// Records parsed elements of `queue`. Refused ones are recorded `failed` with the reason; the
/// tasks go in one transaction. When MySQL refuses that transaction for one row's data (a value
/// out of range, too long, ...), each task is recorded on its own and the one MySQL refuses is
/// failed with MySQL's reason: a poison element never sends its batch back to Redis, where it
/// would stop the queue. On an outage, what was not yet recorded is reported as such; what was
/// recorded stays recorded, so a retried batch records nothing twice.
fn record(shared: &Shared, queue: &str, raws: &[Vec<u8>], parsed: Vec<Parsed>) -> Recorded {
    let store = &shared.store;
    let mut out = Recorded {
        tasks: Vec::new(),
        refused: Vec::new(),
        unrecorded: Vec::new(),
        outage: None,
    };
    let mut msgs: Vec<(usize, message::Message)> = Vec::with_capacity(parsed.len());
    for (i, p) in parsed.into_iter().enumerate() {
        match p {
            Parsed::Task(m) => msgs.push((i, m)),
            Parsed::Refused(bad) if out.outage.is_none() => {
                out.refuse(
                    store,
                    queue,
                    i,
                    &raws[i],
                    bad.task_id.as_deref(),
                    &bad.reason,
                );
            }
            Parsed::Refused(_) => out.unrecorded.push(i),
        }
    }
    if out.outage.is_some() {
        out.unrecorded.extend(msgs.iter().map(|(i, _)| *i));
        out.unrecorded.sort_unstable();
        return out;
    }
    let now = crate::contract::time::now_unix();
    for (_, m) in &mut msgs {
        m.fix_due(now);
    }
    let payloads: Vec<String> = msgs.iter().map(|(_, m)| m.to_json()).collect();
    let waits: Vec<Option<Duration>> = msgs.iter().map(|(_, m)| m.wait_from(now)).collect();
    let rows: Vec<NewTask<'_>> = msgs
        .iter()
        .zip(&payloads)
        .zip(&waits)
        .map(|(((_, m), payload), wait)| NewTask {
            task_id: &m.task_id,
            kind: &m.kind,
            payload,
            max_attempts: m.max_attempts,
            timeout_s: m.timeout_s,
            wait: *wait,
            cost: m.cost(),
        })
        .collect();
    // The head of the batch that finds free slots starts now, claimed with its record (issue 20).
    let heads = msgs.iter().zip(&waits).map(|((_, m), w)| (m, w.is_some()));
    let (reserved, jobs) = shared.reserve_now(queue, heads);
    let claims: Vec<ClaimRequest<'_>> = reserved.iter().map(GpuJob::claim_request).collect();
    let recorded = accept_each(store, queue, &rows, &claims);
    drop((rows, claims));
    let (verdicts, claimed) = match recorded {
        Ok(v) => v,
        Err(e) => {
            shared.start_reserved(reserved, Vec::new(), jobs);
            out.unrecorded.extend(msgs.iter().map(|(i, _)| *i));
            out.outage = Some(e);
            return out;
        }
    };
    let started = shared.start_reserved(reserved, claimed, jobs);
    let release = out.settle(
        store,
        queue,
        raws,
        msgs.into_iter()
            .zip(verdicts)
            .zip(waits)
            .filter(|(((_, m), _), _)| !started.contains(&m.task_id)),
    );
    if let Err(e) = store.release_pending(&release) {
        // Held here and in no memory: the sweep takes them up (and keeps their wait) in 30 s.
        log::warn!(queue, error:% = e; "cannot let go of delayed tasks taken again");
    }
    out
}

/// A recorded element, its verdict, and its wait if it is a delayed task.
type Verdict = (
    ((usize, message::Message), Result<Accepted, StoreError>),
    Option<Duration>,
);

/// Records one refused element as `failed` with `reason`. `Err` only for an outage: a row that
/// MySQL refuses even under a fresh id cannot be recorded at all, so the element is only kept in
/// the dead-letter list, with an error in the log, rather than block its queue.
fn refuse(
    store: &Store,
    queue: &str,
    raw: &[u8],
    task_id: Option<&str>,
    reason: &str,
) -> Result<(), crate::store::StoreError> {
    match store.record_malformed(task_id, queue, raw, reason) {
        Ok(id) => {
            log::warn!(task_id = id.as_str(), queue, reason;
                "malformed queue message recorded as failed");
            Ok(())
        }
        Err(e) if e.is_rejected_data() => {
            log::error!(queue, reason, error:% = e;
                "malformed queue message could not be recorded; kept in the dead-letter list only");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Takes a batch's ids off [`Shared::in_transit`] once the batch is handed on or handed back.
struct InTransit<'a>(&'a Shared, Vec<String>);

impl Drop for InTransit<'_> {
    fn drop(&mut self) {
        let mut set = self.0.lock_in_transit();
        for id in &self.1 {
            set.remove(id);
        }
    }
}

/// The queues the poller may take from now, with their in-hand lists: `active` indexes both.
struct Lists<'a> {
    queues: &'a [String],
    in_hand: &'a [String],
    active: &'a [usize],
}

/// Moves a batch from the first non-empty active queue (in priority order) into its in-hand list:
/// the queue's index and the elements. When all are empty, blocks on the first (up to `block`
/// when it is the only one, else 100 ms).
fn move_batch(
    c: &mut Connection,
    script: &redis::Script,
    lists: &Lists<'_>,
    block: f64,
) -> redis::RedisResult<Option<(usize, Vec<Vec<u8>>)>> {
    let Lists {
        queues,
        in_hand,
        active,
    } = *lists;
    let first = active[0];
    script
        .key(active.iter().map(|&i| &queues[i]).collect::<Vec<_>>())
        .key(active.iter().map(|&i| &in_hand[i]).collect::<Vec<_>>())
        .arg(TAKE_BATCH)
        .invoke::<Option<(usize, Vec<Vec<u8>>)>>(c)
        .and_then(|got| match got {
            Some((i, raws)) => {
                let at = i.saturating_sub(1).min(active.len() - 1);
                Ok(Some((active[at], raws)))
            }
            None => redis::cmd("BLMOVE")
                .arg(&queues[first])
                .arg(&in_hand[first])
                .arg("LEFT")
                .arg("RIGHT")
                .arg(if active.len() == 1 { block } else { 0.1 })
                .query::<Option<Vec<u8>>>(c)
                .map(|v| v.map(|raw| (first, vec![raw]))),
        })
}

pub(crate) struct Poller {
    shared: std::sync::Arc<Shared>,
    client: Client,
    tx: Sender<Vec<Task>>,
}

impl Poller {
    pub(crate) fn new(
        shared: std::sync::Arc<Shared>,
        client: Client,
        tx: Sender<Vec<Task>>,
    ) -> Poller {
        Poller { shared, client, tx }
    }

    /// Runs until a stop. Redis and MySQL failures are retried with backoff, never fatal.
    pub(crate) fn run(self) {
        // Queues, timeouts and key names are fixed for the daemon's life (a reload keeps them).
        let config = self.shared.config();
        let queues = &config.redis.queues;
        let me = &config.daemon.instance_id;
        let in_hand: Vec<String> = queues.iter().map(|q| in_hand_key(&config, me, q)).collect();
        // With one queue to take from, a take blocks, but never past a second: a pause is
        // honoured within one. With several, each is looked at every 100 ms.
        let block = config
            .redis
            .pop_timeout
            .min(Duration::from_secs(1))
            .as_secs_f64();
        let script = redis::Script::new(TAKE_SCRIPT);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut conn: Option<Connection> = None;
        while !self.shared.stop.is_stopping() {
            self.shared.tick("qsys-poller");
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect(&self.client, config.redis.pop_timeout) {
                    Ok(c) => {
                        if backoff.failures() > 0 {
                            log::info!("redis connection restored");
                        }
                        self.shared.cleared(Trouble::Redis);
                        let c = conn.insert(c);
                        if let Err(e) = self.recover(c, queues, &in_hand, &mut backoff) {
                            conn = None;
                            self.redis_trouble(&e, &mut backoff);
                            continue;
                        }
                        c
                    }
                    Err(e) => {
                        self.redis_trouble(&e, &mut backoff);
                        continue;
                    }
                },
            };
            // Paused queues are not taken from: their tasks stay in Redis.
            let paused = self.shared.paused().queues;
            let active: Vec<usize> = (0..queues.len())
                .filter(|&i| !paused.contains(&queues[i]))
                .collect();
            if active.is_empty() {
                self.shared.stop.sleep(Duration::from_millis(250));
                continue;
            }
            let lists = Lists {
                queues,
                in_hand: &in_hand,
                active: &active,
            };
            let taken = move_batch(c, &script, &lists, block);
            match taken {
                Ok(None) => backoff.reset(),
                Ok(Some((i, raws))) => {
                    backoff.reset();
                    if let Err(wait) = self.take(c, &in_hand[i], &queues[i], raws, &mut backoff) {
                        self.shared.stop.sleep(wait);
                    }
                }
                Err(e) => {
                    conn = None;
                    self.redis_trouble(&e, &mut backoff);
                }
            }
        }
        log::debug!("poller stopped");
    }

    /// On every (re)connect: what the in-hand lists still hold was moved by an earlier run of this
    /// instance, or by a move whose reply a broken connection lost. Each is taken again like a fresh
    /// element; a copy whose row is already settled is dropped as a duplicate.
    fn recover(
        &self,
        c: &mut Connection,
        queues: &[String],
        in_hand: &[String],
        backoff: &mut Backoff,
    ) -> Result<(), redis::RedisError> {
        for (key, queue) in in_hand.iter().zip(queues) {
            let items: Vec<Vec<u8>> = redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query(c)?;
            if !items.is_empty() {
                log::info!(queue = queue.as_str(), count = items.len();
                    "recovering tasks left in the in-hand list");
            }
            for chunk in items.chunks(TAKE_BATCH) {
                if let Err(wait) = self.take(c, key, queue, chunk.to_vec(), backoff) {
                    self.shared.stop.sleep(wait);
                }
            }
        }
        Ok(())
    }

    fn redis_trouble(&self, e: &dyn std::fmt::Display, backoff: &mut Backoff) {
        let wait = backoff.next_delay();
        outage!(warn, self.shared, Trouble::Redis, e; "redis unavailable", retry_in:? = wait);
        self.shared.stop.sleep(wait);
    }

    /// Records moved elements, clears them from the in-hand list and hands them on, in order.
    /// `Err(wait)` asks the caller to back off.
    fn take(
        &self,
        conn: &mut Connection,
        in_hand: &str,
        queue: &str,
        mut raws: Vec<Vec<u8>>,
        backoff: &mut Backoff,
    ) -> Result<(), Duration> {
        // Moved into the in-hand list, not yet recorded: a cancel arriving now finds no row.
        crate::pause_point!(self.shared.store.instance(), "poller:moved");
        let config = self.shared.config();
        let parsed: Vec<Parsed> = raws
            .iter()
            .map(|raw| parse_element(raw, config.daemon.max_message_bytes))
            .collect();
        if let Err(e) = give_ids(conn, in_hand, &mut raws, &parsed) {
            // Nothing is recorded yet: the in-hand list is taken again at reconnect.
            log::warn!(queue, error:% = e; "could not give ids to id-less tasks; taken again at reconnect");
            return Err(backoff.next_delay());
        }
        let recorded = record(&self.shared, queue, &raws, parsed);
        let cleared = settle(conn, &config, in_hand, queue, &raws, &recorded);
        if let Some(e) = &recorded.outage {
            let wait = backoff.next_delay();
            match &cleared {
                Ok(()) => outage!(warn, self.shared, Trouble::Mysql, e;
                    "mysql unavailable: tasks returned to their queue",
                    queue, count = recorded.unrecorded.len(), retry_in:? = wait),
                Err(re) => outage!(warn, self.shared, Trouble::Mysql, e;
                    "mysql unavailable; tasks stay in the in-hand list until reconnect",
                    queue, redis_error:% = re),
            }
            if recorded.tasks.is_empty() {
                return Err(wait);
            }
        } else if let Err(e) = &cleared {
            // Recorded already: a leftover copy is dropped as a duplicate when taken again.
            log::warn!(queue, error:% = e; "could not clear the in-hand list");
        }
        let tasks = recorded.tasks;
        if tasks.is_empty() {
            return Ok(());
        }
        self.hand_on(tasks);
        Ok(())
    }

    /// Hands recorded tasks to the scheduler as one batch (it takes a whole batch at once, so it
    /// can place and claim many tasks per round instead of waiting on this thread for each); at
    /// a stop they go back to Redis instead.
    fn hand_on(&self, tasks: Vec<Task>) {
        let in_transit: Vec<String> = tasks.iter().map(|t| t.msg.task_id.clone()).collect();
        self.shared
            .lock_in_transit()
            .extend(in_transit.iter().cloned());
        let _clear = InTransit(&self.shared, in_transit);
        self.shared.hand.giving(tasks.len());
        let mut batch = tasks;
        loop {
            // Blocked on a full fleet is waiting, not being stuck.
            self.shared.tick("qsys-poller");
            match self.tx.send_timeout(batch, Duration::from_millis(200)) {
                Ok(()) => break,
                Err(SendTimeoutError::Timeout(b)) if !self.shared.stop.is_stopping() => batch = b,
                Err(SendTimeoutError::Timeout(back) | SendTimeoutError::Disconnected(back)) => {
                    if let Err(e) = self.shared.hand_back(&self.client, &back) {
                        log::error!(error:% = e;
                            "could not return tasks to redis at stop; they resume at next start");
                    }
                    return;
                }
            }
        }
    }
}

/// Gives every parsed element that had no id the one it now carries: its in-hand copy is swapped
/// for one with the id before anything is recorded, so however often the element is taken again
/// (after a crash, an outage, a stop) it is the same task.
fn give_ids(
    conn: &mut Connection,
    in_hand: &str,
    raws: &mut [Vec<u8>],
    parsed: &[Parsed],
) -> redis::RedisResult<()> {
    let mut swap = redis::pipe();
    swap.atomic();
    let mut swapped = 0;
    for (raw, p) in raws.iter_mut().zip(parsed) {
        if let Parsed::Task(m) = p {
            if m.id_assigned {
                let with_id = m.to_json().into_bytes();
                swap.cmd("LREM").arg(in_hand).arg(1).arg(&*raw).ignore();
                swap.cmd("RPUSH").arg(in_hand).arg(&with_id).ignore();
                *raw = with_id;
                swapped += 1;
            }
        }
    }
    if swapped == 0 {
        return Ok(());
    }
    swap.query(conn)
}

/// Takes a batch off the in-hand list in one step: recorded tasks for good, refused elements into
/// the dead-letter list, unrecorded ones back to the head of their queue in order.
fn settle(
    conn: &mut Connection,
    config: &crate::config::Config,
    in_hand: &str,
    queue: &str,
    raws: &[Vec<u8>],
    recorded: &Recorded,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for raw in raws {
        pipe.cmd("LREM").arg(in_hand).arg(1).arg(raw).ignore();
    }
    if !recorded.refused.is_empty() {
        let dead = dead_letter_key(config, queue);
        for &i in &recorded.refused {
            pipe.cmd("LPUSH").arg(&dead).arg(&raws[i]).ignore();
        }
        pipe.cmd("LTRIM")
            .arg(&dead)
            .arg(0)
            .arg(DEAD_LETTER_MAX - 1)
            .ignore();
    }
    for &i in recorded.unrecorded.iter().rev() {
        pipe.cmd("LPUSH").arg(queue).arg(&raws[i]).ignore();
    }
    pipe.query(conn)
}

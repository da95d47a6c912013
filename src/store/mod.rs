//! MySQL: the durable record of every task and the fleet-wide owner of every GPU slot.
//!
//! Every thread that changes a task's state calls into this module through a shared [`Store`] (a
//! `mysql::Pool` is thread-safe): the poller inserts rows, the scheduler claims slots, dispatch and
//! handler workers and the callback server finish attempts. The busy paths (recording, claiming,
//! ending) take a batch and apply it in one short transaction with few statements, because per-commit
//! and per-statement costs, not rows, are what limit MySQL (BENCHMARKS.md). Each change either states
//! what it expects in its `WHERE` clause (the state, the attempt number, an empty slot) or locks the
//! rows and checks them first, so two threads, or two instances, can never both win: the loser is told
//! why through a typed result rather than an error.
//!
//! The schema is created at start and migrated in place, including a table made by the seed README's
//! DDL. Migrations only use statements every MySQL-protocol server understands (no `ADD COLUMN IF NOT
//! EXISTS`, a MariaDB extension): they look at `information_schema` first, so each step is idempotent.

use std::collections::HashMap;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{params, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, PooledConn, TxOpts};

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: u32 = 4;

/// A task's state in the `tasks.state` column (docs/contracts.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Processing,
    Finished,
    Failed,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Processing => "processing",
            State::Finished => "finished",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "processing" => State::Processing,
            "finished" => State::Finished,
            "failed" => State::Failed,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Finished | State::Failed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mysql: {0}")]
    Mysql(#[from] mysql::Error),
    #[error("mysql url: {0}")]
    Url(#[from] mysql::UrlError),
    #[error("mysql schema: {0}")]
    Schema(String),
}

/// MySQL error codes that refuse a statement's data rather than report an outage: the same
/// statement fails again however often it is retried, so the row that carries the data is failed
/// instead. Out of range (1264, 1690), too long (1406), truncated or wrong value (1265, 1292,
/// 1366, 1367), not valid in the character set (1300), NULL into NOT NULL (1048), packet or row
/// too large (1153, 1301, 1118), bad JSON (3140), a CHECK constraint (3819 MySQL, 4025 MariaDB).
const DATA_ERRORS: &[u16] = &[
    1048, 1118, 1153, 1264, 1265, 1292, 1300, 1301, 1366, 1367, 1406, 1690, 3140, 3819, 4025,
];

impl StoreError {
    /// True when MySQL (or the driver, before sending) refused the data itself, not because it
    /// is unreachable or busy: retrying the same rows cannot succeed.
    pub(crate) fn is_rejected_data(&self) -> bool {
        match self {
            StoreError::Mysql(mysql::Error::MySqlError(e)) => DATA_ERRORS.contains(&e.code),
            StoreError::Mysql(mysql::Error::DriverError(mysql::DriverError::PacketTooLarge)) => {
                true
            }
            StoreError::Mysql(mysql::Error::CodecError(
                mysql_common::proto::codec::error::PacketCodecError::PacketTooLarge,
            )) => true,
            _ => false,
        }
    }
}

/// What happened when a task taken from a queue was recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A new row, `pending`, attempt 0.
    New,
    /// The row existed and is still `pending` (the task was handed back to Redis at a stop): take it
    /// over with the attempts it already used.
    Resumed { attempts: u32 },
    /// The row exists in another state: the task is running or done, so this copy is a duplicate.
    Exists { state: String },
}

/// Result of trying to claim a slot for a task's next attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// The slot row is held by another task (possibly of another instance).
    SlotTaken {
        holder: String,
        attempt: u32,
    },
    /// The task is no longer `pending` at the expected attempt: someone else moved it.
    NotPending,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<'a> {
    Finished,
    /// `retryable`: the failure may pass (connection error, timeout, 5xx, a crashed handler);
    /// otherwise it is the task's own (a 4xx, a `failed` callback) and final.
    Failed {
        error: &'a str,
        retryable: bool,
    },
    /// No completion before the lease deadline: always worth another attempt.
    Expired {
        error: &'a str,
    },
}

impl Ending<'_> {
    fn outcome(&self) -> &'static str {
        match self {
            Ending::Finished => "finished",
            Ending::Failed { .. } => "failed",
            Ending::Expired { .. } => "expired",
        }
    }

    fn error(&self) -> Option<&str> {
        match self {
            Ending::Finished => None,
            Ending::Failed { error, .. } | Ending::Expired { error } => Some(error),
        }
    }

    fn retryable(&self) -> bool {
        matches!(
            self,
            Ending::Failed {
                retryable: true,
                ..
            } | Ending::Expired { .. }
        )
    }

    /// The terminal state this ending leads to when no retry is left.
    pub(crate) fn terminal(&self) -> State {
        match self {
            Ending::Finished => State::Finished,
            _ => State::Failed,
        }
    }
}

/// What an applied ending led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The task is terminal in this state.
    Done(State),
    /// The task is `pending` again and may run after this delay.
    Retry { after: Duration },
}

/// Result of ending an attempt, from a callback or a dispatch outcome (docs/contracts.md §5 reply codes).
#[derive(Debug, PartialEq, Eq)]
pub enum Finish {
    /// The state changed; the GPU slot it held (if any) is free in MySQL.
    Applied {
        slot: Option<(String, usize)>,
        next: Next,
        /// How long ago the task was first taken (for the end-to-end duration metric).
        age: Option<Duration>,
    },
    /// The task is already in exactly this terminal state from this attempt.
    Duplicate,
    /// The attempt named is not the task's current one.
    Stale {
        current: u32,
    },
    /// The task is in a state this change cannot come from (terminal with another status, or not
    /// dispatched).
    Conflict {
        state: String,
    },
    Unknown,
}

/// A task to record, as taken from a queue.
#[derive(Debug, Clone, Copy)]
pub struct NewTask<'a> {
    pub task_id: &'a str,
    pub kind: &'a str,
    pub payload: &'a str,
    pub max_attempts: Option<u32>,
    pub timeout_s: Option<u64>,
}

/// A `pending` task as stored: enough to schedule it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredTask {
    pub task_id: String,
    pub queue: String,
    /// The message in the seed's format.
    pub payload: String,
    pub attempts: u32,
    /// Time left before a retry may run.
    pub wait: Duration,
    /// The GPU of the last attempt, to avoid on the next.
    pub last_gpu: Option<String>,
}

/// A `processing` attempt past its lease deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expired {
    pub task_id: String,
    pub attempt: u32,
    pub gpu_id: Option<String>,
}

/// One held slot row, as read at start to rebuild the in-memory matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSlot {
    pub gpu_id: String,
    pub slot_index: usize,
    pub task_id: String,
    pub attempt: u32,
}

/// A GPU attempt to start, for [`Store::claim_gpu_attempts`].
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    pub task_id: &'a str,
    /// Attempts the task has used: it must still be `pending` at this count.
    pub attempts: u32,
    pub gpu_id: &'a str,
    pub slot: usize,
    /// The attempt's lease, from now.
    pub lease: Duration,
}

/// An attempt to end, for [`Store::end_attempts`].
#[derive(Debug, Clone, Copy)]
pub struct EndRequest<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    pub ending: Ending<'a>,
    /// The wait before a retry, should the ending lead to one (by attempts used since the last
    /// queueing, which only the row knows).
    pub retry: crate::net::backoff::RetryDelay,
}

/// A task row as an ending reads it.
#[derive(Debug, Clone)]
struct EndRow {
    /// `NULL` for a seed-era row without a state.
    state: String,
    attempts: u32,
    gpu: Option<String>,
    slot: Option<u32>,
    max_attempts: Option<u32>,
    attempt_base: u32,
    /// Since the task was first taken.
    age_us: Option<i64>,
    /// Passed back unchanged into `task_attempts.started_at`.
    dispatched_at: mysql::Value,
}

/// What ending `req` does to a task in `row`: the task's next state, or why nothing changes. Pure,
/// so the rules are unit-tested without a server.
fn judge_ending(row: &EndRow, req: &EndRequest<'_>, default_max: u32) -> Result<Next, Finish> {
    let ending = req.ending;
    match State::parse(&row.state) {
        _ if row.attempts != req.attempt => {
            return Err(Finish::Stale {
                current: row.attempts,
            })
        }
        Some(State::Processing) => {}
        Some(s) if s == ending.terminal() && !matches!(ending, Ending::Expired { .. }) => {
            return Err(Finish::Duplicate)
        }
        _ => {
            return Err(Finish::Conflict {
                state: row.state.clone(),
            })
        }
    }
    // After a requeue, attempts count again from `attempt_base`.
    let used = req.attempt.saturating_sub(row.attempt_base);
    if ending.retryable() && used < row.max_attempts.unwrap_or(default_max) {
        Ok(Next::Retry {
            after: req.retry.after(used),
        })
    } else {
        Ok(Next::Done(ending.terminal()))
    }
}

/// `n` copies of `one`, comma-separated: the placeholders of an `IN` list or a multi-row `VALUES`.
fn placeholders(n: usize, one: &str) -> String {
    vec![one; n].join(", ")
}

/// `rows` grown to the next power of two by repeating the last. Every batch statement here means
/// the same with a row repeated (an `IN` list, an `ON DUPLICATE KEY` insert of identical rows), and
/// padding leaves each statement a handful of shapes that the prepared-statement cache keeps: with
/// one shape per batch size nearly every execution was also a prepare.
fn padded<T: Clone>(mut rows: Vec<T>) -> Vec<T> {
    if let Some(last) = rows.last().cloned() {
        rows.resize(rows.len().next_power_of_two(), last);
    }
    rows
}

#[cfg(test)]
mod offline;

/// A shared handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    instance: String,
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A malformed element as kept in `payload`: its text when it is UTF-8 (cut to [`MAX_RAW`]),
/// else `base64:` and its bytes, so that nothing of it is lost to a lossy decoding.
fn stored_raw(raw: &[u8]) -> String {
    use base64::Engine;
    match std::str::from_utf8(raw) {
        Ok(text) => truncate(text, MAX_RAW).to_string(),
        Err(_) => {
            let cut = &raw[..raw.len().min(MAX_RAW / 4 * 3 - 6)];
            format!(
                "base64:{}",
                base64::engine::general_purpose::STANDARD.encode(cut)
            )
        }
    }
}

/// Prepared statements kept per connection. The server's limit (`max_prepared_stmt_count`,
/// 16,382 by default) is shared by every connection of every instance.
const STMT_CACHE: usize = 128;

/// Longest error text kept per task.
const MAX_ERROR: usize = 4000;
/// Longest raw payload kept for a malformed queue element.
const MAX_RAW: usize = 65_536;

impl Store {
    /// Connects (creating the database if it does not exist), with every I/O bounded.
    pub fn connect(
        url: &str,
        tls: bool,
        instance: &str,
        max_connections: usize,
    ) -> Result<Store, StoreError> {
        let opts = Opts::from_url(url)?;
        let db = opts
            .get_db_name()
            .ok_or_else(|| StoreError::Schema("the mysql url names no database".into()))?
            .to_string();
        let mut builder = OptsBuilder::from_opts(opts)
            .tcp_connect_timeout(Some(Duration::from_secs(5)))
            .read_timeout(Some(Duration::from_secs(30)))
            .write_timeout(Some(Duration::from_secs(30)))
            // A lock wait must end well before the read timeout so it surfaces as an error we
            // can retry, not as a dead socket.
            .init(vec!["SET SESSION innodb_lock_wait_timeout = 10"])
            // Room for every statement shape (batches are padded, see `padded`), so a busy
            // connection prepares each once.
            .stmt_cache_size(Some(STMT_CACHE));
        if tls {
            builder = builder.ssl_opts(mysql::SslOpts::default());
        }
        {
            let bootstrap = builder.clone().db_name(None::<String>);
            let mut conn = mysql::Conn::new(bootstrap)?;
            conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{db}`"))?;
        }
        let constraints =
            PoolConstraints::new(1, max_connections.max(2)).expect("min 1 is never above max >= 2");
        let pool = Pool::new(
            builder.db_name(Some(db)).pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    // A reset on every return to the pool dropped the server's prepared
                    // statements, so each statement cost a prepare round trip too.
                    .with_reset_connection(false),
            ),
        )?;
        Ok(Store {
            pool,
            instance: instance.to_string(),
        })
    }

    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    fn conn(&self) -> Result<PooledConn, StoreError> {
        Ok(self.pool.try_get_conn(Duration::from_secs(10))?)
    }

    /// A cheap round trip, for health checks.
    pub(crate) fn ping(&self) -> Result<(), StoreError> {
        self.conn()?.query_drop("SELECT 1")?;
        Ok(())
    }

    /// Creates or upgrades the schema to [`SCHEMA_VERSION`]. Safe to run from several instances at
    /// once: a named lock serialises them.
    pub fn migrate(&self) -> Result<u32, StoreError> {
        let mut c = self.conn()?;
        let got: Option<i64> = c.query_first("SELECT GET_LOCK('qsysd_migrate', 30)")?;
        if got != Some(1) {
            return Err(StoreError::Schema(
                "another instance held the migration lock for 30s".into(),
            ));
        }
        let result = migrate_locked(&mut c);
        let _ = c.query_drop("DO RELEASE_LOCK('qsysd_migrate')");
        result
    }

    /// Makes sure a slot row exists for every configured GPU slot.
    pub fn ensure_slots(&self, gpus: &[(String, usize)]) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(&str, usize)> = gpus
            .iter()
            .flat_map(|(id, n)| (0..*n).map(move |i| (id.as_str(), i)))
            .collect();
        c.exec_batch(
            "INSERT IGNORE INTO gpu_slots (gpu_id, slot_index) VALUES (?, ?)",
            rows.iter().map(|(g, i)| (g, i)),
        )?;
        Ok(())
    }

    /// Every slot row that holds a task.
    pub fn held_slots(&self) -> Result<Vec<HeldSlot>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(String, u32, String, Option<u32>)> = c.query(
            "SELECT gpu_id, slot_index, task_id, attempt FROM gpu_slots WHERE task_id IS NOT NULL",
        )?;
        Ok(rows
            .into_iter()
            .map(|(gpu_id, slot, task_id, attempt)| HeldSlot {
                gpu_id,
                slot_index: slot as usize,
                task_id,
                attempt: attempt.unwrap_or(0),
            })
            .collect())
    }

    /// Records tasks taken from `queue`, all in one transaction (one log flush for the batch).
    /// `payload` is the message in the seed's format. A pending row nobody holds (handed back to
    /// Redis at a stop) or that this instance holds (a copy left in Redis by a crash) is taken
    /// over; any other existing row makes the copy a duplicate.
    ///
    /// The usual batch is all new ids: one multi-row insert whose affected-row count proves it.
    /// Otherwise each row is looked at in turn; a row this very insert created is then pending and
    /// held here, so it comes back as `Resumed { attempts: 0 }`, which means the same as `New`.
    pub fn accept(&self, queue: &str, tasks: &[NewTask<'_>]) -> Result<Vec<Accepted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        // A repeated row is a duplicate key left unchanged: it counts 0 below.
        let rows = padded(tasks.to_vec());
        let sql = format!(
            "INSERT INTO tasks (task_id, queue, state, type, payload, attempts, max_attempts, \
             timeout_s, instance_id, created_at) VALUES {} \
             ON DUPLICATE KEY UPDATE task_id = task_id",
            placeholders(rows.len(), "(?, ?, 'pending', ?, ?, 0, ?, ?, ?, NOW(3))")
        );
        let params: Vec<mysql::Value> = rows
            .iter()
            .flat_map(|t| {
                [
                    t.task_id.into(),
                    queue.into(),
                    t.kind.into(),
                    t.payload.into(),
                    t.max_attempts.into(),
                    t.timeout_s.into(),
                    self.instance.as_str().into(),
                ]
            })
            .collect();
        tx.exec_drop(sql, params)?;
        // An existing row is left unchanged by the no-op update and counts 0.
        if tx.affected_rows() == tasks.len() as u64 {
            tx.commit()?;
            return Ok(tasks.iter().map(|_| Accepted::New).collect());
        }
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            // Read under lock and decide here: an UPDATE's affected count cannot tell a row it
            // matched but left unchanged (this insert's own row, same millisecond) from no row.
            let row: Option<(Option<String>, u32, Option<String>)> = tx.exec_first(
                "SELECT state, attempts, instance_id FROM tasks WHERE task_id = ? FOR UPDATE",
                (t.task_id,),
            )?;
            out.push(match row {
                // The seed's table allowed a NULL state; such a row is not ours to resume.
                Some((Some(state), attempts, holder))
                    if state == "pending"
                        && holder.as_deref().is_none_or(|h| h == self.instance) =>
                {
                    if holder.is_none() {
                        tx.exec_drop(
                            "UPDATE tasks SET instance_id = ?, updated_at = NOW(3) \
                             WHERE task_id = ?",
                            (&self.instance, t.task_id),
                        )?;
                    }
                    Accepted::Resumed { attempts }
                }
                Some((state, _, _)) => Accepted::Exists {
                    state: state.unwrap_or_else(|| "NULL".into()),
                },
                None => Accepted::Exists {
                    state: "deleted".into(),
                },
            });
        }
        tx.commit()?;
        Ok(out)
    }

    /// Records a queue element that could not be parsed as `failed`, keeping the raw text for
    /// inspection. Uses `task_id` if given and free, else a fresh UUID; returns the id used.
    pub(crate) fn record_malformed(
        &self,
        task_id: Option<&str>,
        queue: &str,
        raw: &[u8],
        reason: &str,
    ) -> Result<String, StoreError> {
        let mut c = self.conn()?;
        let text = stored_raw(raw);
        let mut candidates: Vec<String> = task_id.map(str::to_string).into_iter().collect();
        candidates.push(uuid::Uuid::new_v4().to_string());
        let mut refused = None;
        for id in candidates {
            let inserted = c.exec_drop(
                "INSERT INTO tasks (task_id, queue, state, type, payload, error, attempts, \
                 instance_id, created_at, finished_at) \
                 VALUES (:id, :queue, 'failed', NULL, :raw, :err, 0, :inst, NOW(3), NOW(3)) \
                 ON DUPLICATE KEY UPDATE task_id = task_id",
                params! {
                    "id" => id.as_str(), queue, "raw" => text.as_str(),
                    "err" => truncate(&format!("malformed queue message: {reason}"), MAX_ERROR),
                    "inst" => &self.instance,
                },
            );
            match inserted.map_err(StoreError::from) {
                Ok(()) if c.affected_rows() == 1 => return Ok(id),
                // Taken: try the fresh id.
                Ok(()) => {}
                // The producer's id is what MySQL refuses (a constraint of the operator's, say):
                // the row is kept under the fresh id.
                Err(e) if e.is_rejected_data() => refused = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(refused.unwrap_or_else(|| {
            StoreError::Schema("a fresh UUID collided with an existing task id".into())
        }))
    }

    /// Moves each `pending` task at `attempts` to `processing` as attempt `attempts + 1` on its GPU
    /// slot, claiming the slot row, all in one transaction: one log flush and five statements for
    /// the whole batch (the wall of issue 8 is per-commit and per-statement cost, not rows). Both
    /// kinds of row are locked first, so each verdict is exact; a task is claimed only with its slot.
    /// Lock order, here and in [`Store::end_attempts`]: task rows, then slot rows, each by primary
    /// key (forced: on a small table the optimizer would scan, and lock, every row), so a claim and
    /// an ending cannot deadlock.
    pub fn claim_gpu_attempts(&self, reqs: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let ids: Vec<&str> = padded(reqs.iter().map(|r| r.task_id).collect());
        let sql = format!(
            "SELECT task_id, state, attempts FROM tasks FORCE INDEX (PRIMARY) WHERE task_id IN ({}) FOR UPDATE",
            placeholders(ids.len(), "?")
        );
        let mut tasks: HashMap<String, (Option<String>, u32)> = tx
            .exec::<(String, Option<String>, u32), _, _>(sql, &ids)?
            .into_iter()
            .map(|(id, state, attempts)| (id, (state, attempts)))
            .collect();
        let mut slots: HashMap<(String, u32), Option<(String, u32)>> = HashMap::new();
        let locks = padded(reqs.to_vec());
        let sql = format!(
            "SELECT gpu_id, slot_index, task_id, attempt FROM gpu_slots \
             FORCE INDEX (PRIMARY) WHERE (gpu_id, slot_index) IN ({}) FOR UPDATE",
            placeholders(locks.len(), "(?, ?)")
        );
        let params: Vec<mysql::Value> = locks
            .iter()
            .flat_map(|r| [r.gpu_id.into(), (r.slot as u32).into()])
            .collect();
        for mut row in tx.exec::<mysql::Row, _, _>(sql, params)? {
            let key = (
                col(&mut row, 0).unwrap_or_default(),
                col(&mut row, 1).unwrap_or(0),
            );
            let holder = col::<String>(&mut row, 2).map(|t| (t, col(&mut row, 3).unwrap_or(0)));
            slots.insert(key, holder);
        }
        let mut out = Vec::with_capacity(reqs.len());
        let mut claimed = Vec::new();
        for r in reqs {
            let holder = slots
                .get_mut(&(r.gpu_id.to_string(), r.slot as u32))
                .ok_or_else(|| {
                    StoreError::Schema(format!(
                        "slot row {}/{} is missing from gpu_slots",
                        r.gpu_id, r.slot
                    ))
                })?;
            let task = tasks.get_mut(r.task_id);
            let verdict = match (&holder, task) {
                (Some((task_id, attempt)), _) => Claim::SlotTaken {
                    holder: task_id.clone(),
                    attempt: *attempt,
                },
                (None, Some((state, attempts)))
                    if state.as_deref() == Some("pending") && *attempts == r.attempts =>
                {
                    // A repeat of the slot or the task later in the batch sees this claim.
                    *holder = Some((r.task_id.to_string(), r.attempts + 1));
                    *state = Some("processing".into());
                    claimed.push(r);
                    Claim::Claimed
                }
                (None, _) => Claim::NotPending,
            };
            out.push(verdict);
        }
        if !claimed.is_empty() {
            let claimed = padded(claimed);
            let sql = format!(
                "INSERT INTO gpu_slots (gpu_id, slot_index, task_id, attempt, instance_id, \
                 claimed_at) VALUES {} ON DUPLICATE KEY UPDATE task_id = VALUES(task_id), \
                 attempt = VALUES(attempt), instance_id = VALUES(instance_id), \
                 claimed_at = VALUES(claimed_at)",
                placeholders(claimed.len(), "(?, ?, ?, ?, ?, NOW(3))")
            );
            let params: Vec<mysql::Value> = claimed
                .iter()
                .flat_map(|r| {
                    [
                        r.gpu_id.into(),
                        (r.slot as u32).into(),
                        r.task_id.into(),
                        (r.attempts + 1).into(),
                        self.instance.as_str().into(),
                    ]
                })
                .collect();
            tx.exec_drop(sql, params)?;
            // Per-task values by CASE; every row was checked `pending` at `attempts` under lock.
            let cases = vec!["WHEN ? THEN ?"; claimed.len()].join(" ");
            let sql = format!(
                "UPDATE tasks FORCE INDEX (PRIMARY) SET state = 'processing', \
                 attempts = attempts + 1, \
                 gpu_id = CASE task_id {cases} END, slot_index = CASE task_id {cases} END, \
                 dispatched_at = NOW(3), \
                 deadline = NOW(3) + INTERVAL (CASE task_id {cases} END) MICROSECOND, \
                 instance_id = ? WHERE task_id IN ({})",
                placeholders(claimed.len(), "?")
            );
            let mut params: Vec<mysql::Value> = Vec::with_capacity(claimed.len() * 7 + 1);
            params.extend(
                claimed
                    .iter()
                    .flat_map(|r| [r.task_id.into(), r.gpu_id.into()]),
            );
            params.extend(
                claimed
                    .iter()
                    .flat_map(|r| [r.task_id.into(), (r.slot as u32).into()]),
            );
            params.extend(
                claimed
                    .iter()
                    .flat_map(|r| [r.task_id.into(), (r.lease.as_micros() as u64).into()]),
            );
            params.push(self.instance.as_str().into());
            params.extend(claimed.iter().map(|r| r.task_id.into()));
            tx.exec_drop(sql, params)?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Moves a `pending` task to `processing` for a handler (no slot). False if it was not pending at
    /// `attempts`.
    pub(crate) fn start_handler_attempt(
        &self,
        task_id: &str,
        attempts: u32,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "UPDATE tasks SET state = 'processing', attempts = :attempt, dispatched_at = NOW(3), \
             deadline = NOW(3) + INTERVAL :lease MICROSECOND, instance_id = :inst \
             WHERE task_id = :id AND state = 'pending' AND attempts = :attempts",
            params! {
                "attempt" => attempts + 1, "lease" => lease.as_micros() as u64,
                "inst" => &self.instance, "id" => task_id, attempts,
            },
        )?;
        Ok(c.affected_rows() == 1)
    }

    /// Restarts the lease of attempt `attempt` from now: a dispatch that waited for a worker
    /// must not have its lease run out mid-call. False if the attempt is no longer the task's
    /// running one (its lease ended while it waited: it must not be sent at all).
    pub(crate) fn renew_lease(
        &self,
        task_id: &str,
        attempt: u32,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "UPDATE tasks SET deadline = NOW(3) + INTERVAL ? MICROSECOND \
             WHERE task_id = ? AND state = 'processing' AND attempts = ?",
            (lease.as_micros() as u64, task_id, attempt),
        )?;
        Ok(c.affected_rows() == 1)
    }

    /// Fails a task that never ran (unknown type). False if it was not pending.
    pub(crate) fn fail_pending(&self, task_id: &str, error: &str) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "UPDATE tasks SET state = 'failed', error = ?, finished_at = NOW(3) \
             WHERE task_id = ? AND state = 'pending'",
            (truncate(error, MAX_ERROR), task_id),
        )?;
        Ok(c.affected_rows() == 1)
    }

    /// Ends each attempt of `reqs` (see [`EndRequest`]), all in one transaction: the task becomes
    /// terminal, or `pending` again after its `retry` delay when the ending is retryable and attempts are
    /// left (`max_attempts` of the task, else `default_max`); its slot row is freed and the attempt
    /// recorded in `task_attempts`. The rows are locked and read first, the verdicts made in memory
    /// ([`judge_ending`]), then applied by multi-row statements. A request repeated within the batch
    /// sees the earlier one's effect (a duplicate callback is a `Duplicate`, as it would be later).
    pub fn end_attempts(
        &self,
        reqs: &[EndRequest<'_>],
        default_max: u32,
    ) -> Result<Vec<Finish>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let ids: Vec<&str> = padded(reqs.iter().map(|r| r.task_id).collect());
        let sql = format!(
            "SELECT task_id, state, attempts, gpu_id, slot_index, max_attempts, attempt_base, \
             TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)), dispatched_at FROM tasks \
             FORCE INDEX (PRIMARY) WHERE task_id IN ({}) FOR UPDATE",
            placeholders(ids.len(), "?")
        );
        let mut rows: HashMap<String, EndRow> = HashMap::new();
        for mut r in tx.exec::<mysql::Row, _, _>(sql, &ids)? {
            let id: String = col(&mut r, 0).unwrap_or_default();
            let row = EndRow {
                state: col(&mut r, 1).unwrap_or_else(|| "NULL".into()),
                attempts: col(&mut r, 2).unwrap_or(0),
                gpu: col(&mut r, 3),
                slot: col(&mut r, 4),
                max_attempts: col(&mut r, 5),
                attempt_base: col(&mut r, 6).unwrap_or(0),
                age_us: col(&mut r, 7),
                dispatched_at: r.take(8).unwrap_or(mysql::Value::NULL),
            };
            rows.insert(id, row);
        }
        let mut out = Vec::with_capacity(reqs.len());
        let mut finished: Vec<&str> = Vec::new();
        let mut history: Vec<[mysql::Value; 8]> = Vec::new();
        let mut freed: Vec<[mysql::Value; 3]> = Vec::new();
        for r in reqs {
            let Some(row) = rows.get_mut(r.task_id) else {
                out.push(Finish::Unknown);
                continue;
            };
            let next = match judge_ending(row, r, default_max) {
                Ok(next) => next,
                Err(verdict) => {
                    out.push(verdict);
                    continue;
                }
            };
            let error = r.ending.error().map(|e| truncate(e, MAX_ERROR));
            match next {
                Next::Retry { after } => tx.exec_drop(
                    // Whoever ends the attempt schedules the retry (a lease may be expired by an
                    // instance other than the one that dispatched).
                    "UPDATE tasks SET state = 'pending', error = :err, deadline = NULL, \
                     instance_id = :inst, not_before = NOW(3) + INTERVAL :after MICROSECOND \
                     WHERE task_id = :id",
                    params! { "err" => error, "after" => after.as_micros() as u64,
                    "inst" => &self.instance, "id" => r.task_id },
                )?,
                // The common case, gathered into one statement below.
                Next::Done(State::Finished) if error.is_none() => finished.push(r.task_id),
                Next::Done(done) => tx.exec_drop(
                    "UPDATE tasks SET state = ?, error = ?, finished_at = NOW(3), deadline = NULL \
                     WHERE task_id = ?",
                    (done.as_str(), error, r.task_id),
                )?,
            }
            history.push([
                r.task_id.into(),
                row.attempts.into(),
                row.gpu.clone().into(),
                row.slot.into(),
                self.instance.as_str().into(),
                row.dispatched_at.clone(),
                r.ending.outcome().into(),
                error.into(),
            ]);
            let slot = match (&row.gpu, row.slot) {
                (Some(g), Some(s)) => {
                    freed.push([g.as_str().into(), s.into(), r.task_id.into()]);
                    Some((g.clone(), s as usize))
                }
                _ => None,
            };
            row.state = match next {
                Next::Retry { .. } => State::Pending.as_str().into(),
                Next::Done(done) => done.as_str().into(),
            };
            out.push(Finish::Applied {
                slot,
                next,
                age: row.age_us.map(|us| Duration::from_micros(us.max(0) as u64)),
            });
        }
        if !finished.is_empty() {
            let finished = padded(finished);
            let sql = format!(
                "UPDATE tasks FORCE INDEX (PRIMARY) SET state = 'finished', error = NULL, \
                 finished_at = NOW(3), deadline = NULL WHERE task_id IN ({})",
                placeholders(finished.len(), "?")
            );
            tx.exec_drop(sql, &finished)?;
        }
        if !history.is_empty() {
            let history = padded(history);
            let sql = format!(
                "INSERT INTO task_attempts (task_id, attempt, gpu_id, slot_index, instance_id, \
                 started_at, ended_at, outcome, error) VALUES {} \
                 ON DUPLICATE KEY UPDATE ended_at = VALUES(ended_at), outcome = VALUES(outcome), \
                 error = VALUES(error)",
                placeholders(history.len(), "(?, ?, ?, ?, ?, ?, NOW(3), ?, ?)")
            );
            tx.exec_drop(sql, history.concat())?;
        }
        if !freed.is_empty() {
            let freed = padded(freed);
            let sql = format!(
                "UPDATE gpu_slots FORCE INDEX (PRIMARY) SET task_id = NULL, attempt = NULL, \
                 instance_id = NULL, claimed_at = NULL WHERE (gpu_id, slot_index, task_id) IN ({})",
                placeholders(freed.len(), "(?, ?, ?)")
            );
            tx.exec_drop(sql, freed.concat())?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Attempts whose lease deadline has passed, oldest first: this instance's, and those of
    /// instances silent for longer than `dead_after`.
    pub(crate) fn expired(
        &self,
        limit: usize,
        dead_after: Duration,
    ) -> Result<Vec<Expired>, StoreError> {
        let mut c = self.conn()?;
        // Ours, and those of instances whose heartbeat stopped: a live instance expires its own.
        let rows: Vec<(String, u32, Option<String>)> = c.exec(
            "SELECT task_id, attempts, gpu_id FROM tasks t WHERE state = 'processing' \
             AND deadline < NOW(3) AND (instance_id = :me OR instance_id IS NULL OR NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.instance_id = t.instance_id \
              AND i.heartbeat_at > NOW(3) - INTERVAL :dead MICROSECOND)) \
             ORDER BY deadline LIMIT :limit",
            params! { "me" => &self.instance, "dead" => dead_after.as_micros() as u64,
            "limit" => limit as u64 },
        )?;
        Ok(rows
            .into_iter()
            .map(|(task_id, attempt, gpu_id)| Expired {
                task_id,
                attempt,
                gpu_id,
            })
            .collect())
    }

    /// At start: handler attempts this instance was running died with the previous process, so
    /// their leases end now. (GPU attempts may still be running on the GPU and keep theirs.)
    pub(crate) fn expire_orphaned_handlers(&self) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "UPDATE tasks SET deadline = NOW(3) - INTERVAL 1 SECOND WHERE state = 'processing' \
             AND gpu_id IS NULL AND instance_id = ?",
            (&self.instance,),
        )?;
        Ok(c.affected_rows())
    }

    const STORED: &'static str = "SELECT task_id, queue, payload, attempts, \
        GREATEST(0, TIMESTAMPDIFF(MICROSECOND, NOW(3), COALESCE(not_before, NOW(3)))), gpu_id \
        FROM tasks";

    fn stored(row: StoredRow) -> StoredTask {
        let (task_id, queue, payload, attempts, wait, last_gpu) = row;
        StoredTask {
            task_id,
            queue: queue.unwrap_or_default(),
            payload: payload.unwrap_or_default(),
            attempts,
            wait: Duration::from_micros(wait.max(0) as u64),
            last_gpu,
        }
    }

    /// The `pending` tasks this instance holds, oldest first: what a restart resumes.
    pub(crate) fn pending_tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<StoredRow> = c.exec(
            format!(
                "{} WHERE state = 'pending' AND instance_id = ? ORDER BY created_at, task_id",
                Self::STORED
            ),
            (&self.instance,),
        )?;
        Ok(rows.into_iter().map(Self::stored).collect())
    }

    /// One task, if it is `pending` and held by this instance (a retry coming due).
    pub(crate) fn pending_task(&self, task_id: &str) -> Result<Option<StoredTask>, StoreError> {
        let mut c = self.conn()?;
        let row: Option<StoredRow> = c.exec_first(
            format!(
                "{} WHERE task_id = ? AND state = 'pending' AND instance_id = ?",
                Self::STORED
            ),
            (task_id, &self.instance),
        )?;
        Ok(row.map(Self::stored))
    }

    /// Takes over `pending` rows that nobody has held for `older_than` (released at a stop whose
    /// hand-back to Redis never happened, or a dead instance's whose re-push failed), up to
    /// `limit`, oldest first, and returns them to be scheduled here. Rows are locked, so two
    /// instances sweeping at once adopt each row once. Rows without a payload (written by the
    /// seed's worker before qsysd) cannot run and are left as they are.
    pub(crate) fn adopt_orphans(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<StoredTask>, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let rows: Vec<StoredRow> = tx.exec(
            format!(
                "{} WHERE state = 'pending' AND instance_id IS NULL AND payload IS NOT NULL \
                 AND updated_at < NOW(3) - INTERVAL ? MICROSECOND \
                 ORDER BY created_at, task_id LIMIT ? FOR UPDATE",
                Self::STORED
            ),
            (older_than.as_micros() as u64, limit as u64),
        )?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<mysql::Value> = rows.iter().map(|r| r.0.as_str().into()).collect();
        let mut params = vec![mysql::Value::from(self.instance.as_str())];
        params.extend(ids);
        tx.exec_drop(
            format!(
                "UPDATE tasks SET instance_id = ? WHERE state = 'pending' AND instance_id IS NULL \
                 AND task_id IN ({})",
                placeholders(rows.len(), "?")
            ),
            params,
        )?;
        tx.commit()?;
        Ok(rows.into_iter().map(Self::stored).collect())
    }

    /// This instance's `pending` rows untouched for `older_than`, up to `limit`, oldest first:
    /// the scheduler's sweep takes those it does not hold (a path that gave up on a task, a commit
    /// whose acknowledgement was lost) so no row stays `pending` for good.
    pub(crate) fn stale_pending(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<StoredTask>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<StoredRow> = c.exec(
            format!(
                "{} WHERE state = 'pending' AND instance_id = ? \
                 AND updated_at < NOW(3) - INTERVAL ? MICROSECOND \
                 ORDER BY created_at, task_id LIMIT ?",
                Self::STORED
            ),
            (&self.instance, older_than.as_micros() as u64, limit as u64),
        )?;
        Ok(rows.into_iter().map(Self::stored).collect())
    }

    /// Gives up this instance's hold on `pending` tasks that went back to Redis, so whoever pops
    /// them next takes them over.
    pub(crate) fn release_pending(&self, task_ids: &[String]) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        c.exec_batch(
            "UPDATE tasks SET instance_id = NULL WHERE task_id = ? AND state = 'pending' \
             AND instance_id = ?",
            task_ids.iter().map(|id| (id, &self.instance)),
        )?;
        Ok(())
    }

    /// Number of tasks by state and type.
    pub(crate) fn counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(Option<String>, Option<String>, u64)> =
            c.query("SELECT state, type, COUNT(*) FROM tasks GROUP BY state, type")?;
        Ok(rows
            .into_iter()
            .map(|(s, t, n)| (s.unwrap_or_default(), t.unwrap_or_default(), n))
            .collect())
    }

    /// The GPUs an operator drained (fleet-wide, across restarts).
    pub(crate) fn drained(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn()?;
        Ok(c.query("SELECT gpu_id FROM gpu_state WHERE drained = 1")?)
    }

    /// Drains or undrains a GPU, recording who did it.
    pub fn set_drained(&self, gpu_id: &str, drained: bool, by: &str) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "INSERT INTO gpu_state (gpu_id, drained, updated_at, updated_by) \
             VALUES (:gpu, :d, NOW(3), :by) \
             ON DUPLICATE KEY UPDATE drained = :d, updated_at = NOW(3), updated_by = :by",
            params! { "gpu" => gpu_id, "d" => drained, by },
        )?;
        Ok(())
    }

    /// One task as stored, if it exists.
    pub fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let mut c = self.conn()?;
        let row: Option<mysql::Row> = c.exec_first(
            "SELECT task_id, queue, state, type, gpu_id, slot_index, attempts, error, payload, \
             CAST(created_at AS CHAR), CAST(dispatched_at AS CHAR), CAST(finished_at AS CHAR), \
             instance_id, requeues FROM tasks WHERE task_id = ?",
            (task_id,),
        )?;
        Ok(row.map(|mut r| TaskRecord {
            task_id: col(&mut r, 0).unwrap_or_default(),
            queue: col(&mut r, 1),
            state: col(&mut r, 2),
            kind: col(&mut r, 3),
            gpu_id: col(&mut r, 4),
            slot_index: col(&mut r, 5),
            attempts: col(&mut r, 6).unwrap_or(0),
            error: col(&mut r, 7),
            payload: col(&mut r, 8),
            created_at: col(&mut r, 9),
            dispatched_at: col(&mut r, 10),
            finished_at: col(&mut r, 11),
            instance_id: col(&mut r, 12),
            requeues: col(&mut r, 13).unwrap_or(0),
        }))
    }

    /// The attempts of one task, oldest first.
    pub(crate) fn attempts(&self, task_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<mysql::Row> = c.exec(
            "SELECT attempt, gpu_id, slot_index, instance_id, CAST(started_at AS CHAR), \
             CAST(ended_at AS CHAR), outcome, error FROM task_attempts WHERE task_id = ? \
             ORDER BY attempt",
            (task_id,),
        )?;
        Ok(rows
            .into_iter()
            .map(|mut r| AttemptRecord {
                attempt: col(&mut r, 0).unwrap_or(0),
                gpu_id: col(&mut r, 1),
                slot_index: col(&mut r, 2),
                instance_id: col(&mut r, 3),
                started_at: col(&mut r, 4),
                ended_at: col(&mut r, 5),
                outcome: col(&mut r, 6).unwrap_or_default(),
                error: col(&mut r, 7),
            })
            .collect())
    }

    /// The latest failed tasks: `(task_id, type, error, finished_at)`.
    pub(crate) fn recent_failures(&self, limit: usize) -> Result<Vec<Failure>, StoreError> {
        let mut c = self.conn()?;
        type Row = (String, Option<String>, Option<String>, Option<String>);
        let rows: Vec<Row> = c.exec(
            "SELECT task_id, type, error, CAST(finished_at AS CHAR) FROM tasks \
             WHERE state = 'failed' ORDER BY finished_at DESC LIMIT ?",
            (limit as u64,),
        )?;
        Ok(rows
            .into_iter()
            .map(|(task_id, kind, error, finished_at)| Failure {
                task_id,
                kind,
                error,
                finished_at,
            })
            .collect())
    }

    /// Ids of tasks in `state` that ended within the last `since`.
    pub fn terminal_since(&self, state: State, since: Duration) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn()?;
        Ok(c.exec(
            "SELECT task_id FROM tasks WHERE state = ? \
             AND finished_at >= NOW(3) - INTERVAL ? MICROSECOND ORDER BY finished_at",
            (state.as_str(), since.as_micros() as u64),
        )?)
    }

    /// Makes a terminal task `pending` again for a fresh set of attempts (its history stays), held
    /// by nobody, and returns its queue and message for the caller to push. `None`: unknown, or not
    /// terminal (a pending task nobody holds is returned too, so a requeue cut short can be re-run).
    pub fn requeue(&self, task_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        tx.exec_drop(
            "UPDATE tasks SET state = 'pending', attempt_base = attempts, requeues = requeues + 1, \
             error = NULL, finished_at = NULL, deadline = NULL, not_before = NULL, \
             instance_id = NULL WHERE task_id = ? \
             AND (state IN ('finished', 'failed') OR (state = 'pending' AND instance_id IS NULL))",
            (task_id,),
        )?;
        if tx.affected_rows() == 0 {
            tx.rollback()?;
            return Ok(None);
        }
        let row: Option<(Option<String>, Option<String>)> = tx.exec_first(
            "SELECT queue, payload FROM tasks WHERE task_id = ?",
            (task_id,),
        )?;
        tx.commit()?;
        Ok(row.and_then(|(q, p)| Some((q?, p?))))
    }

    /// Other instances whose heartbeat is older than `dead_after`.
    /// How many other instances heartbeated within `dead_after`.
    pub(crate) fn live_peers(&self, dead_after: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        let n: Option<u64> = c.exec_first(
            "SELECT COUNT(*) FROM instances WHERE instance_id <> ? \
             AND heartbeat_at >= NOW(3) - INTERVAL ? MICROSECOND",
            (&self.instance, dead_after.as_micros() as u64),
        )?;
        Ok(n.unwrap_or(0))
    }

    pub(crate) fn dead_instances(&self, dead_after: Duration) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn()?;
        Ok(c.exec(
            "SELECT instance_id FROM instances WHERE instance_id <> ? \
             AND heartbeat_at < NOW(3) - INTERVAL ? MICROSECOND",
            (&self.instance, dead_after.as_micros() as u64),
        )?)
    }

    /// Forgets a dead instance once its work is recovered, so it is not looked at every few seconds
    /// for ever. Conditional on its heartbeat still being old: one that came back keeps its row.
    /// (Its attempts still `processing` are expired by whoever sees their lease end: a holder
    /// with no row counts as dead.)
    pub(crate) fn retire_instance(
        &self,
        dead: &str,
        dead_after: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "DELETE FROM instances WHERE instance_id = ? \
             AND heartbeat_at < NOW(3) - INTERVAL ? MICROSECOND",
            (dead, dead_after.as_micros() as u64),
        )?;
        Ok(c.affected_rows() == 1)
    }

    /// Takes the `pending` tasks a dead instance held: they become held by nobody, and their
    /// queue and message are returned (oldest first) for the caller to push back. Conditional on
    /// the holder, so two instances recovering the same one cannot both take a task.
    pub(crate) fn release_instance_pending(
        &self,
        dead: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let rows: Vec<(String, Option<String>, Option<String>)> = tx.exec(
            "SELECT task_id, queue, payload FROM tasks WHERE state = 'pending' \
             AND instance_id = ? ORDER BY created_at, task_id FOR UPDATE",
            (dead,),
        )?;
        tx.exec_drop(
            "UPDATE tasks SET instance_id = NULL WHERE state = 'pending' AND instance_id = ?",
            (dead,),
        )?;
        tx.commit()?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, q, p)| Some((id, q?, p?)))
            .collect())
    }

    /// Records that this instance is alive.
    pub(crate) fn heartbeat(&self) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "INSERT INTO instances (instance_id, started_at, heartbeat_at) \
             VALUES (?, NOW(3), NOW(3)) ON DUPLICATE KEY UPDATE heartbeat_at = NOW(3)",
            (&self.instance,),
        )?;
        Ok(())
    }
}

/// Column `i` of a row, `None` when NULL.
fn col<T: mysql::prelude::FromValue>(r: &mut mysql::Row, i: usize) -> Option<T> {
    r.take::<Option<T>, _>(i).flatten()
}

/// A task row for `qsysd task` and `/tasks/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskRecord {
    pub task_id: String,
    pub queue: Option<String>,
    pub state: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub gpu_id: Option<String>,
    pub slot_index: Option<u32>,
    pub attempts: u32,
    pub error: Option<String>,
    pub payload: Option<String>,
    pub created_at: Option<String>,
    pub dispatched_at: Option<String>,
    pub finished_at: Option<String>,
    pub instance_id: Option<String>,
    pub requeues: u32,
}

/// One row of `task_attempts`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    pub gpu_id: Option<String>,
    pub slot_index: Option<u32>,
    pub instance_id: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub outcome: String,
    pub error: Option<String>,
}

/// A failed task, for the dashboard and `qsysd status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Failure {
    pub task_id: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub error: Option<String>,
    pub finished_at: Option<String>,
}

/// `task_id, queue, payload, attempts, wait in µs, gpu_id`.
type StoredRow = (
    String,
    Option<String>,
    Option<String>,
    u32,
    i64,
    Option<String>,
);

fn column_exists(c: &mut PooledConn, table: &str, column: &str) -> Result<bool, StoreError> {
    let n: Option<u64> = c.exec_first(
        "SELECT COUNT(*) FROM information_schema.columns \
         WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?",
        (table, column),
    )?;
    Ok(n.unwrap_or(0) > 0)
}

fn index_exists(c: &mut PooledConn, table: &str, index: &str) -> Result<bool, StoreError> {
    let n: Option<u64> = c.exec_first(
        "SELECT COUNT(*) FROM information_schema.statistics \
         WHERE table_schema = DATABASE() AND table_name = ? AND index_name = ?",
        (table, index),
    )?;
    Ok(n.unwrap_or(0) > 0)
}

/// Columns qsysd adds to the seed's table, in order.
const TASK_COLUMNS: &[(&str, &str)] = &[
    ("payload", "MEDIUMTEXT NULL"),
    ("attempts", "INT NOT NULL DEFAULT 0"),
    ("max_attempts", "INT NULL"),
    ("timeout_s", "INT NULL"),
    ("error", "TEXT NULL"),
    ("created_at", "DATETIME(3) NULL"),
    (
        "updated_at",
        "DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)",
    ),
    ("dispatched_at", "DATETIME(3) NULL"),
    ("finished_at", "DATETIME(3) NULL"),
    ("deadline", "DATETIME(3) NULL"),
    ("instance_id", "VARCHAR(64) NULL"),
];

/// Indexes: the seed's three (same names) and the ones qsysd's queries need.
const TASK_INDEXES: &[(&str, &str)] = &[
    ("idx_tasks_state", "(state)"),
    ("idx_tasks_gpu_id", "(gpu_id)"),
    ("idx_tasks_type", "(type)"),
    ("idx_tasks_state_deadline", "(state, deadline)"),
];

fn migrate_locked(c: &mut PooledConn) -> Result<u32, StoreError> {
    c.query_drop("CREATE TABLE IF NOT EXISTS qsys_schema (version INT NOT NULL) ENGINE=InnoDB")?;
    let current: Option<Option<u32>> = c.query_first("SELECT MAX(version) FROM qsys_schema")?;
    let current = current.flatten().unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "database schema is version {current}, newer than this qsysd ({SCHEMA_VERSION}): \
             upgrade qsysd"
        )));
    }
    if current < 1 {
        migrate_v1(c)?;
    }
    if current < 2 {
        migrate_v2(c)?;
    }
    if current < 3 {
        migrate_v3(c)?;
    }
    if current < 4 {
        migrate_v4(c)?;
    }
    Ok(SCHEMA_VERSION)
}

/// The identity columns of every table, with their length: (table, column, length, nullable).
const IDENTITY_COLUMNS: &[(&str, &str, u32, bool)] = &[
    ("tasks", "task_id", 255, false),
    ("tasks", "queue", 255, true),
    ("tasks", "type", 100, true),
    ("tasks", "gpu_id", 64, true),
    ("tasks", "instance_id", 64, true),
    ("task_attempts", "task_id", 255, false),
    ("task_attempts", "gpu_id", 64, true),
    ("task_attempts", "instance_id", 64, true),
    ("gpu_slots", "gpu_id", 64, false),
    ("gpu_slots", "task_id", 255, true),
    ("gpu_slots", "instance_id", 64, true),
    ("gpu_state", "gpu_id", 64, false),
    ("gpu_state", "updated_by", 64, true),
    ("instances", "instance_id", 64, false),
];

/// The collation under which two identities are equal only when their bytes are: binary and
/// without padding (`utf8mb4_bin` is PAD SPACE: `'trail' = 'trail '`). MariaDB and MySQL 8 name it
/// differently; a server with neither gets `VARBINARY` columns.
fn exact_collation(c: &mut PooledConn) -> Result<Option<String>, StoreError> {
    let found: Vec<String> = c.query(
        "SELECT COLLATION_NAME FROM information_schema.COLLATIONS \
         WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin') \
         ORDER BY COLLATION_NAME DESC",
    )?;
    Ok(found.into_iter().next())
}

/// Exact identities (issue 13): task ids, GPU ids, queue, type and instance names compared as
/// bytes, as qsysd's own code compares them. Under the default case-insensitive, PAD SPACE
/// collations `Abc` after `abc` (or `trail ` after `trail`) was dropped as a duplicate and never
/// ran. Text columns become utf8mb4, so any Unicode a producer sends is stored, whatever the
/// server's or the seed table's default character set was.
fn migrate_v4(c: &mut PooledConn) -> Result<(), StoreError> {
    let exact = exact_collation(c)?;
    let identity = |len: u32, nullable: bool| {
        let ty = match &exact {
            Some(collation) => format!("VARCHAR({len}) CHARACTER SET utf8mb4 COLLATE {collation}"),
            None => format!("VARBINARY({len})"),
        };
        format!("{ty} {}", if nullable { "NULL" } else { "NOT NULL" })
    };
    let mut tables: Vec<&str> = IDENTITY_COLUMNS.iter().map(|(t, ..)| *t).collect();
    tables.dedup();
    for table in tables {
        let mut changes: Vec<String> = IDENTITY_COLUMNS
            .iter()
            .filter(|(t, ..)| *t == table)
            .map(|(_, col, len, nullable)| format!("MODIFY `{col}` {}", identity(*len, *nullable)))
            .collect();
        for (t, col, ddl) in [
            ("tasks", "payload", "MEDIUMTEXT CHARACTER SET utf8mb4 NULL"),
            ("tasks", "error", "TEXT CHARACTER SET utf8mb4 NULL"),
            ("task_attempts", "error", "TEXT CHARACTER SET utf8mb4 NULL"),
        ] {
            if t == table {
                changes.push(format!("MODIFY `{col}` {ddl}"));
            }
        }
        c.query_drop(format!(
            "ALTER TABLE `{table}` DEFAULT CHARACTER SET utf8mb4, {}",
            changes.join(", ")
        ))?;
    }
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (4)")?;
    Ok(())
}

/// Operations: persisted drains, and requeues that keep the attempt history.
fn migrate_v3(c: &mut PooledConn) -> Result<(), StoreError> {
    for (name, ddl) in [
        ("attempt_base", "INT NOT NULL DEFAULT 0"),
        ("requeues", "INT NOT NULL DEFAULT 0"),
    ] {
        if !column_exists(c, "tasks", name)? {
            c.query_drop(format!("ALTER TABLE tasks ADD COLUMN {name} {ddl}"))?;
        }
    }
    if !index_exists(c, "tasks", "idx_tasks_state_finished")? {
        c.query_drop("CREATE INDEX idx_tasks_state_finished ON tasks (state, finished_at)")?;
    }
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS gpu_state (
            gpu_id VARCHAR(64) NOT NULL PRIMARY KEY,
            drained TINYINT NOT NULL DEFAULT 0,
            updated_at DATETIME(3) NOT NULL,
            updated_by VARCHAR(64) NULL
        ) ENGINE=InnoDB",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (3)")?;
    Ok(())
}

/// Retries, attempt history and instance heartbeats.
fn migrate_v2(c: &mut PooledConn) -> Result<(), StoreError> {
    if !column_exists(c, "tasks", "not_before")? {
        c.query_drop("ALTER TABLE tasks ADD COLUMN not_before DATETIME(3) NULL")?;
    }
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS task_attempts (
            task_id VARCHAR(255) NOT NULL,
            attempt INT NOT NULL,
            gpu_id VARCHAR(64) NULL,
            slot_index INT NULL,
            instance_id VARCHAR(64) NULL,
            started_at DATETIME(3) NULL,
            ended_at DATETIME(3) NULL,
            outcome VARCHAR(20) NOT NULL,
            error TEXT NULL,
            PRIMARY KEY (task_id, attempt)
        ) ENGINE=InnoDB",
    )?;
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS instances (
            instance_id VARCHAR(64) NOT NULL PRIMARY KEY,
            started_at DATETIME(3) NOT NULL,
            heartbeat_at DATETIME(3) NOT NULL
        ) ENGINE=InnoDB",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (2)")?;
    Ok(())
}

/// The seed's table, widened and extended, and the slot table.
fn migrate_v1(c: &mut PooledConn) -> Result<(), StoreError> {
    // Version 1. The seed's DDL, verbatim in its columns, so an existing seed table is the same
    // starting point as an empty database.
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS tasks (
            task_id VARCHAR(255) PRIMARY KEY,
            queue VARCHAR(100),
            state VARCHAR(20),
            type VARCHAR(50),
            gpu_id VARCHAR(10),
            slot_index INT
        ) ENGINE=InnoDB",
    )?;
    // Widen what the seed made too narrow: endpoint ids up to 64, type names up to 100.
    c.query_drop(
        "ALTER TABLE tasks MODIFY queue VARCHAR(255) NULL, MODIFY type VARCHAR(100) NULL, \
         MODIFY gpu_id VARCHAR(64) NULL",
    )?;
    for (name, ddl) in TASK_COLUMNS {
        if !column_exists(c, "tasks", name)? {
            c.query_drop(format!("ALTER TABLE tasks ADD COLUMN {name} {ddl}"))?;
        }
    }
    for (name, cols) in TASK_INDEXES {
        if !index_exists(c, "tasks", name)? {
            c.query_drop(format!("CREATE INDEX {name} ON tasks {cols}"))?;
        }
    }
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS gpu_slots (
            gpu_id VARCHAR(64) NOT NULL,
            slot_index INT NOT NULL,
            task_id VARCHAR(255) NULL,
            attempt INT NULL,
            instance_id VARCHAR(64) NULL,
            claimed_at DATETIME(3) NULL,
            PRIMARY KEY (gpu_id, slot_index)
        ) ENGINE=InnoDB",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (1)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn states_round_trip() {
        for s in [
            State::Pending,
            State::Processing,
            State::Finished,
            State::Failed,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("done"), None);
        assert!(State::Failed.is_terminal() && !State::Processing.is_terminal());
    }

    fn row(state: &str, attempts: u32, max: Option<u32>, base: u32) -> EndRow {
        EndRow {
            state: state.into(),
            attempts,
            gpu: Some("g0".into()),
            slot: Some(1),
            max_attempts: max,
            attempt_base: base,
            age_us: Some(5),
            dispatched_at: mysql::Value::NULL,
        }
    }

    fn req(attempt: u32, ending: Ending<'_>) -> EndRequest<'_> {
        EndRequest {
            task_id: "t",
            attempt,
            ending,
            retry: crate::net::backoff::RetryDelay {
                base: Duration::from_secs(2),
                max: Duration::from_secs(60),
                jitter: 1.0,
            },
        }
    }

    #[test]
    fn endings_by_state_attempt_and_budget() {
        let oops = Ending::Failed {
            error: "oops",
            retryable: true,
        };
        let final_fail = Ending::Failed {
            error: "bad",
            retryable: false,
        };
        let expired = Ending::Expired { error: "lease" };
        // The delay doubles per attempt used since the task was queued: the second waits 4 s.
        let retry = Ok(Next::Retry {
            after: Duration::from_secs(4),
        });
        // A running attempt: finished, retried while the budget lasts, then failed for good.
        let running = row("processing", 2, None, 0);
        assert_eq!(
            judge_ending(&running, &req(2, Ending::Finished), 3),
            Ok(Next::Done(State::Finished))
        );
        assert_eq!(judge_ending(&running, &req(2, oops), 3), retry);
        assert_eq!(judge_ending(&running, &req(2, expired), 3), retry);
        assert_eq!(
            judge_ending(&running, &req(2, oops), 2),
            Ok(Next::Done(State::Failed))
        );
        assert_eq!(
            judge_ending(&running, &req(2, final_fail), 9),
            Ok(Next::Done(State::Failed))
        );
        // The task's own max_attempts wins over the default; a requeue restarts the count.
        let own = row("processing", 2, Some(2), 0);
        assert_eq!(
            judge_ending(&own, &req(2, oops), 9),
            Ok(Next::Done(State::Failed))
        );
        // ... and its first retry waits the base delay (counted from the absolute attempt it
        // waited 2 s x 2^4).
        let requeued = row("processing", 5, Some(2), 4);
        assert_eq!(
            judge_ending(&requeued, &req(5, oops), 9),
            Ok(Next::Retry {
                after: Duration::from_secs(2)
            })
        );
        // Not applied: another attempt, a repeat, a conflicting state.
        assert_eq!(
            judge_ending(&running, &req(1, Ending::Finished), 3),
            Err(Finish::Stale { current: 2 })
        );
        let done = row("finished", 2, None, 0);
        assert_eq!(
            judge_ending(&done, &req(2, Ending::Finished), 3),
            Err(Finish::Duplicate)
        );
        assert_eq!(
            judge_ending(&done, &req(2, final_fail), 3),
            Err(Finish::Conflict {
                state: "finished".into()
            })
        );
        // A lease never "duplicates" a finished task, and a pending one awaits no result.
        assert!(matches!(
            judge_ending(&row("failed", 2, None, 0), &req(2, expired), 3),
            Err(Finish::Conflict { .. })
        ));
        assert!(matches!(
            judge_ending(&row("pending", 2, None, 0), &req(2, Ending::Finished), 3),
            Err(Finish::Conflict { .. })
        ));
        assert!(matches!(
            judge_ending(&row("NULL", 2, None, 0), &req(2, Ending::Finished), 3),
            Err(Finish::Conflict { .. })
        ));
    }

    #[test]
    fn batches_pad_to_a_power_of_two() {
        assert_eq!(padded(vec![1, 2, 3]), [1, 2, 3, 3]);
        assert_eq!(padded(vec![1, 2, 3, 4]), [1, 2, 3, 4]);
        assert_eq!(padded(vec![7]), [7]);
        assert_eq!(padded((0..17).collect()).len(), 32);
        assert!(padded(Vec::<u8>::new()).is_empty());
    }

    #[test]
    fn placeholder_lists() {
        assert_eq!(placeholders(3, "?"), "?, ?, ?");
        assert_eq!(placeholders(2, "(?, ?)"), "(?, ?), (?, ?)");
        assert_eq!(placeholders(1, "?"), "?");
    }
}

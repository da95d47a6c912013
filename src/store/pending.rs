//! Which instance holds each `pending` task: the holder schedules it, so a restart resumes its
//! own, a stop gives its own back, and rows nobody has held for a while (a hand-back or re-push
//! that never happened) are adopted, so no task is left `pending` for good.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::{placeholders, Store, StoreError};

/// The due time of a paused type's tasks while it is paused: later than any real one.
pub(crate) const PAUSED: &str = "9999-12-31 00:00:00";
/// The due time of the tasks a busy pool let go, until a scheduler sees room in their pool
/// ([`Store::wake_waiting`]): as far out of every sweep's range as [`PAUSED`], and distinct.
pub(super) const POOL_BUSY: &str = "9999-12-30 00:00:00";

/// Which of a busy pool's let-go rows [`Store::wake_waiting`] makes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waking<'a> {
    /// Of these types.
    Of(&'a [String]),
    /// Of any type but these.
    NotOf(&'a [String]),
}

/// Why a scheduler lets go of `pending` rows it held, and so until when they wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LetGo {
    /// Their type is paused: until it is resumed.
    Paused,
    /// Their pool cannot take them while another pool can: until a scheduler sees room.
    PoolBusy,
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

/// `task_id, queue, payload, attempts, wait in µs, gpu_id`.
type StoredRow = (
    String,
    Option<String>,
    Option<String>,
    u32,
    i64,
    Option<String>,
);

impl Store {
    /// The select of a [`StoredRow`], shared by every read that schedules a task again. The wait
    /// is computed by the server, whose clock wrote `not_before`.
    const STORED: &'static str = "SELECT task_id, queue, payload, attempts, \
        GREATEST(0, TIMESTAMPDIFF(MICROSECOND, NOW(3), COALESCE(not_before, NOW(3)))), gpu_id \
        FROM tasks";

    /// A [`StoredRow`] as the scheduler takes it. NULLs (a seed-era row) read as empty: an empty
    /// payload then fails the task's parse, which names the row.
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
    /// `limit`, oldest first, and returns them to be scheduled here. Not a delayed task before
    /// its time, nor a task of a type in `paused`. Rows without a payload (written by the seed's
    /// worker before qsysd) cannot run and are left as they are.
    pub(crate) fn adopt_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        paused: &[String],
    ) -> Result<Vec<StoredTask>, StoreError> {
        self.adopt(
            "",
            "updated_at < NOW(3) - INTERVAL ? MICROSECOND \
             AND (not_before IS NULL OR not_before <= NOW(3))",
            vec![(older_than.as_micros() as u64).into()],
            "created_at, task_id",
            (limit, paused),
        )
    }

    /// Takes over delayed tasks that are due (and rows a paused type let go of, once it is
    /// resumed): `not_before` passed, of a type not in `paused`; up to `limit`, earliest due
    /// first (those due at the same instant by type and task id). No age is waited for, unlike
    /// [`Store::adopt_orphans`]: they were let go on purpose, not by a hand-back on its way to
    /// Redis. Read through `idx_tasks_due`, so a million waiting cost nothing until they are due.
    pub(crate) fn adopt_due(
        &self,
        limit: usize,
        paused: &[String],
    ) -> Result<Vec<StoredTask>, StoreError> {
        self.adopt(
            "FORCE INDEX (idx_tasks_due)",
            "not_before <= NOW(3)",
            Vec::new(),
            // The index's own order: no sort, however many are due.
            "not_before, type, task_id",
            (limit, paused),
        )
    }

    /// Takes over, for this instance, `pending` rows held by nobody that have a payload and meet
    /// `filter` (with `params`), not of a `paused` type, up to `limit` in `order`. The rows are
    /// locked, so two instances adopting at once take each row once.
    fn adopt(
        &self,
        hint: &str,
        filter: &str,
        mut params: Vec<mysql::Value>,
        order: &str,
        (limit, paused): (usize, &[String]),
    ) -> Result<Vec<StoredTask>, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let not_paused = if paused.is_empty() {
            String::new()
        } else {
            params.extend(paused.iter().map(|t| t.as_str().into()));
            format!(
                " AND (type IS NULL OR type NOT IN ({}))",
                placeholders(paused.len(), "?")
            )
        };
        params.push((limit as u64).into());
        let rows: Vec<StoredRow> = tx.exec(
            format!(
                "{} {hint} WHERE state = 'pending' AND instance_id IS NULL AND payload IS NOT NULL \
                 AND {filter}{not_paused} ORDER BY {order} LIMIT ? FOR UPDATE",
                Self::STORED
            ),
            params,
        )?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut params = vec![mysql::Value::from(self.instance.as_str())];
        params.extend(rows.iter().map(|r| r.0.as_str().into()));
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

    /// Lets go of `pending` tasks in the scheduler's hand: held by nobody, and due at [`PAUSED`]
    /// (a paused type's) or [`POOL_BUSY`] (a busy pool's), out of every sweep's range, so that
    /// however large such a backlog grows no read of due or orphaned rows passes over it, and no
    /// instance keeps it in memory. A resume makes a paused type's due now
    /// ([`Store::set_paused`]); [`Store::wake_waiting`] a busy pool's.
    pub(crate) fn let_go(&self, task_ids: &[String], until: LetGo) -> Result<(), StoreError> {
        if task_ids.is_empty() {
            return Ok(());
        }
        let mut c = self.conn()?;
        let until = match until {
            LetGo::Paused => PAUSED,
            LetGo::PoolBusy => POOL_BUSY,
        };
        let mut params = vec![mysql::Value::from(until), self.instance.as_str().into()];
        params.extend(task_ids.iter().map(|id| id.as_str().into()));
        c.exec_drop(
            format!(
                "UPDATE tasks SET instance_id = NULL, not_before = ? \
                 WHERE state = 'pending' AND instance_id = ? AND task_id IN ({})",
                placeholders(task_ids.len(), "?")
            ),
            params,
        )?;
        Ok(())
    }

    /// Makes due now up to `limit` of the rows a busy pool let go, of the `types` chosen (a
    /// pool's with room now; or every type but those of the pools still without room, which also
    /// frees rows whose type a reload moved or removed), for the due adoption to take up; how
    /// many, in the index's order (by type, then id). A plain read looks first, so that with
    /// nothing waiting (one pool, most of the time) no write is made and no lock taken.
    pub(crate) fn wake_waiting(&self, types: Waking<'_>, limit: usize) -> Result<u64, StoreError> {
        let (names, filter) = match types {
            Waking::Of([]) => return Ok(0),
            Waking::Of(names) => (names, "IN"),
            Waking::NotOf(names) => (names, "NOT IN"),
        };
        let filter = if names.is_empty() {
            String::new()
        } else {
            format!(" AND type {filter} ({})", placeholders(names.len(), "?"))
        };
        let mut params: Vec<mysql::Value> = vec![POOL_BUSY.into()];
        params.extend(names.iter().map(|t| t.as_str().into()));
        let rows =
            format!("WHERE state = 'pending' AND instance_id IS NULL AND not_before = ?{filter}");
        let mut c = self.conn()?;
        let any: Option<u8> = c.exec_first(
            format!("SELECT 1 FROM tasks FORCE INDEX (idx_tasks_due) {rows} LIMIT 1"),
            &params,
        )?;
        if any.is_none() {
            return Ok(0);
        }
        params.push((limit as u64).into());
        c.exec_drop(
            format!(
                "UPDATE tasks FORCE INDEX (idx_tasks_due) SET not_before = NOW(3) {rows} \
                 ORDER BY type, task_id LIMIT ?"
            ),
            params,
        )?;
        Ok(c.affected_rows())
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
}

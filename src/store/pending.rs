//! Which instance holds each `pending` task: the holder schedules it, so a restart resumes its
//! own, a stop gives its own back, and rows nobody has held for a while (a hand-back or re-push
//! that never happened) are adopted, so no task is left `pending` for good.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::{placeholders, Store, StoreError};

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
}

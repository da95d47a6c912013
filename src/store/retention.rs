//! Retention (issue 17): terminal tasks older than their state's retention are deleted with their
//! attempts and result, a small transaction at a time, so that a backlog of millions neither
//! holds the locks a claim needs nor slows the task flow.
//!
//! Each batch locks at most [`BATCH`] task rows of one state through `idx_tasks_state_finished`
//! (rows of a live task are never among them: only terminal rows that ended before the cut-off,
//! locked, so a requeue waits or is waited for), deletes their `task_attempts`, `task_results` and
//! `tasks` rows, and takes them out of the rolled-up totals. Only rows already rolled up are
//! deleted (the cut-off is at most the totals' mark), so the counts stay exact.

use std::collections::BTreeMap;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::totals::{hold_mark, take_back};
use super::{placeholders, State, Store, StoreError};

/// Most task rows one prune transaction deletes.
pub(crate) const BATCH: usize = 1000;
/// An instance silent this long is forgotten (its work was recovered long before).
const DEAD_INSTANCE: Duration = Duration::from_secs(86_400);

/// How long each terminal state is kept; `None`: for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub finished: Option<Duration>,
    pub failed: Option<Duration>,
    pub cancelled: Option<Duration>,
}

impl Retention {
    /// Each terminal state with its retention, those kept for ever left out.
    pub(crate) fn states(&self) -> Vec<(State, Duration)> {
        [
            (State::Finished, self.finished),
            (State::Failed, self.failed),
            (State::Cancelled, self.cancelled),
        ]
        .into_iter()
        .filter_map(|(s, d)| Some((s, d?)))
        .collect()
    }
}

impl Store {
    /// Deletes up to [`BATCH`] tasks in `state` that ended more than `older_than` ago (and were
    /// rolled up), with their attempts and results, in one transaction. Returns how many tasks.
    fn prune_batch(&self, state: State, older_than: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let mark = hold_mark(&mut tx)?;
        let rows: Vec<(String, Option<String>)> = tx.exec(
            "SELECT task_id, type FROM tasks FORCE INDEX (idx_tasks_state_finished) \
             WHERE state = ? AND finished_at < LEAST(NOW(3) - INTERVAL ? MICROSECOND, ?) \
             ORDER BY finished_at LIMIT ? FOR UPDATE",
            (
                state.as_str(),
                older_than.as_micros() as u64,
                &mark,
                BATCH as u64,
            ),
        )?;
        if rows.is_empty() {
            tx.rollback()?;
            return Ok(0);
        }
        let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
        let list = placeholders(ids.len(), "?");
        for table in ["task_attempts", "task_results", "tasks"] {
            tx.exec_drop(
                format!("DELETE FROM {table} WHERE task_id IN ({list})"),
                &ids,
            )?;
        }
        let mut by_type: BTreeMap<Option<String>, u64> = BTreeMap::new();
        for (_, kind) in &rows {
            *by_type.entry(kind.clone()).or_insert(0) += 1;
        }
        let taken: Vec<(String, Option<String>, u64)> = by_type
            .into_iter()
            .map(|(kind, n)| (state.as_str().to_string(), kind, n))
            .collect();
        take_back(&mut tx, &taken)?;
        tx.commit()?;
        Ok(rows.len() as u64)
    }

    /// Deletes every task past its state's retention, a [`BATCH`] at a time, calling `pace` (with
    /// the number deleted so far) after each batch: it returns false to stop early. Then forgets
    /// instances silent for a day. The tasks deleted, by state.
    pub(crate) fn prune(
        &self,
        retention: &Retention,
        mut pace: impl FnMut(u64) -> bool,
    ) -> Result<Vec<(State, u64)>, StoreError> {
        let mut total = 0;
        let mut out = Vec::new();
        'states: for (state, keep) in retention.states() {
            out.push((state, 0));
            loop {
                let n = self.prune_batch(state, keep)?;
                total += n;
                if let Some(last) = out.last_mut() {
                    last.1 += n;
                }
                if n == 0 {
                    break;
                }
                if !pace(total) {
                    break 'states;
                }
            }
        }
        self.prune_instances(DEAD_INSTANCE)?;
        Ok(out)
    }

    /// How many tasks in `state` a prune would delete now (for `qsysd prune --dry-run`).
    pub(crate) fn prunable(&self, state: State, older_than: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        let n: Option<u64> = c.exec_first(
            "SELECT COUNT(*) FROM tasks FORCE INDEX (idx_tasks_state_finished) \
             WHERE state = ? AND finished_at < LEAST(NOW(3) - INTERVAL ? MICROSECOND, \
             (SELECT through FROM task_totals_mark WHERE id = 1))",
            (state.as_str(), older_than.as_micros() as u64),
        )?;
        Ok(n.unwrap_or(0))
    }

    /// Deletes the rows of instances whose heartbeat stopped more than `older_than` ago (their
    /// work was recovered long since). Returns how many.
    fn prune_instances(&self, older_than: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "DELETE FROM instances WHERE heartbeat_at < NOW(3) - INTERVAL ? MICROSECOND",
            (older_than.as_micros() as u64,),
        )?;
        Ok(c.affected_rows())
    }

    /// Runs `f` holding the fleet-wide prune lock, so one instance prunes at a time; `None` when
    /// another holds it. The lock is the connection's and goes with it.
    pub(crate) fn with_prune_lock<T>(
        &self,
        f: impl FnOnce() -> T,
    ) -> Result<Option<T>, StoreError> {
        let mut c = self.conn()?;
        let got: Option<i64> =
            c.query_first("SELECT GET_LOCK(CONCAT('qsysd_prune:', DATABASE()), 0)")?;
        if got != Some(1) {
            return Ok(None);
        }
        let out = f();
        let _ = c.query_drop("DO RELEASE_LOCK(CONCAT('qsysd_prune:', DATABASE()))");
        Ok(Some(out))
    }
}

//! Counting tasks by state and type at a cost that does not grow with the table (issue 17):
//! `/status` and every `/metrics` scrape used to `COUNT(*)` all of `tasks`.
//!
//! Terminal rows are rolled up into `task_totals` by whoever holds `task_totals_mark` (the
//! `qsys-retention` thread, every few seconds): the rows that ended after the mark's time and at
//! least [`SETTLE`] ago are counted through `idx_tasks_state_finished` and the mark moves on, a
//! day of rows per transaction at most (so the first rollup of a large table is many short
//! transactions, not one that outlasts a read timeout). A count is then the totals plus a live
//! count of what ended since the mark (the last minute of rows) plus the live count of `pending`
//! and `processing` rows (what is in flight, through `idx_tasks_state (state, type)`). A requeue
//! and a prune take back what they move out of a rolled-up state, under the mark's lock, so the
//! totals stay exact.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use mysql::{Transaction, TxOpts};

use super::{Store, StoreError};

/// How long after a row's `finished_at` it is rolled up: longer than any transaction that
/// writes `finished_at = NOW(3)` can take to commit (lock waits are 10 s, reads 30 s), so no row
/// commits behind the mark.
pub(crate) const SETTLE: Duration = Duration::from_secs(45);

/// How long one [`Store::roll_up`] may go on: the first one of a large table takes many calls.
const ROLL_UP_BUDGET: Duration = Duration::from_secs(2);

/// Tasks by `(state, type)`; a NULL type counts under `""`.
pub(crate) type Counts = BTreeMap<(String, String), u64>;

const TERMINAL: &str = "('finished', 'failed', 'cancelled')";

impl Store {
    /// Tasks by state and type, exact, in three indexed reads: the rolled-up totals, the
    /// terminal rows since the mark, and the rows in flight.
    pub(crate) fn counts(&self) -> Result<Counts, StoreError> {
        let mut c = self.conn()?;
        let mut out = Counts::new();
        let mut add = |rows: Vec<(String, Option<String>, u64)>| {
            for (state, kind, n) in rows {
                *out.entry((state, kind.unwrap_or_default())).or_insert(0) += n;
            }
        };
        // One snapshot for all three: a rollup committing in between would count its rows twice.
        let mut tx = c.start_transaction(TxOpts::default().set_with_consistent_snapshot(true))?;
        // Never below zero, so never a value the conversion refuses, whatever the table holds.
        add(tx.query(
            "SELECT state, type, CAST(GREATEST(n, 0) AS UNSIGNED) FROM task_totals WHERE n > 0",
        )?);
        add(tx.query(format!(
            "SELECT state, type, COUNT(*) FROM tasks FORCE INDEX (idx_tasks_state_finished) \
             WHERE state IN {TERMINAL} AND finished_at > \
             (SELECT through FROM task_totals_mark WHERE id = 1) GROUP BY state, type"
        ))?);
        add(tx.query(
            "SELECT state, type, COUNT(*) FROM tasks FORCE INDEX (idx_tasks_state) \
             WHERE state IN ('pending', 'processing') GROUP BY state, type",
        )?);
        tx.commit()?;
        Ok(out)
    }

    /// Moves the mark on towards [`SETTLE`] ago, adding the terminal rows that ended meanwhile
    /// to the totals: a slice (at most a day of rows) per transaction, the mark's row lock making
    /// instances take turns, for up to [`ROLL_UP_BUDGET`]. Returns how many rows were rolled up.
    pub(crate) fn roll_up(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let mut total = 0;
        loop {
            let (n, caught_up) = self.roll_up_slice()?;
            total += n;
            if caught_up || started.elapsed() >= ROLL_UP_BUDGET {
                return Ok(total);
            }
        }
    }

    /// One slice of [`Store::roll_up`]: rolled-up rows, and whether the mark reached its target.
    fn roll_up_slice(&self) -> Result<(u64, bool), StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        // Locked first: the counts below are read after it, so nothing a requeue or a prune
        // did before it committed is missed.
        let mark: Option<String> = tx.query_first(
            "SELECT CAST(through AS CHAR) FROM task_totals_mark WHERE id = 1 FOR UPDATE",
        )?;
        let mark = mark.ok_or_else(|| StoreError::Schema("task_totals_mark has no row".into()))?;
        // The first row after the mark, one index dive per state: a mark far behind the data
        // (the first rollup) jumps to it instead of walking empty days.
        let mut first: Option<String> = None;
        for state in ["finished", "failed", "cancelled"] {
            let t: Option<Option<String>> = tx.exec_first(
                "SELECT CAST(MIN(finished_at) AS CHAR) FROM tasks \
                 FORCE INDEX (idx_tasks_state_finished) WHERE state = ? AND finished_at > ?",
                (state, &mark),
            )?;
            if let Some(Some(t)) = t {
                first = Some(first.map_or(t.clone(), |f: String| f.min(t)));
            }
        }
        let settle = SETTLE.as_micros() as u64;
        let bounds: Option<(String, bool)> = tx.exec_first(
            "SELECT CAST(LEAST(NOW(3) - INTERVAL ? MICROSECOND, \
               COALESCE(?, NOW(3)) + INTERVAL 1 DAY) AS CHAR(23)), \
               COALESCE(?, NOW(3)) + INTERVAL 1 DAY >= NOW(3) - INTERVAL ? MICROSECOND",
            (settle, &first, &first, settle),
        )?;
        let (upper, caught_up) = bounds.ok_or_else(|| StoreError::Schema("no bounds".into()))?;
        let rows: Vec<(String, Option<String>, u64)> = tx.exec(
            format!(
                "SELECT state, type, COUNT(*) FROM tasks FORCE INDEX (idx_tasks_state_finished) \
                 WHERE state IN {TERMINAL} AND finished_at > ? AND finished_at <= ? \
                 GROUP BY state, type"
            ),
            (&mark, &upper),
        )?;
        let n: u64 = rows.iter().map(|r| r.2).sum();
        for (state, kind, count) in rows {
            tx.exec_drop(
                "INSERT INTO task_totals (state, type, n) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE n = n + VALUES(n)",
                (state, kind.unwrap_or_default(), count),
            )?;
        }
        tx.exec_drop(
            "UPDATE task_totals_mark SET through = GREATEST(through, ?) WHERE id = 1",
            (&upper,),
        )?;
        tx.commit()?;
        Ok((n, caught_up))
    }
}

/// Locks the mark's row shared (a rollup waits until `tx` ends) and returns its time as the
/// server writes it: rows that ended at or before it are in the totals.
pub(crate) fn hold_mark(tx: &mut Transaction<'_>) -> Result<String, StoreError> {
    let through: Option<String> = tx.query_first(
        "SELECT CAST(through AS CHAR) FROM task_totals_mark WHERE id = 1 LOCK IN SHARE MODE",
    )?;
    through.ok_or_else(|| StoreError::Schema("task_totals_mark has no row".into()))
}

/// Inside `tx`, holding the mark ([`hold_mark`]): takes `n` rows of `(state, type)` that ended at
/// or before it out of the totals, because they are about to leave that state (a requeue) or the
/// table (a prune).
pub(crate) fn take_back(
    tx: &mut Transaction<'_>,
    rows: &[(String, Option<String>, u64)],
) -> Result<(), StoreError> {
    for (state, kind, n) in rows {
        tx.exec_drop(
            "UPDATE task_totals SET n = n - ? WHERE state = ? AND type = ?",
            (*n, state, kind.clone().unwrap_or_default()),
        )?;
    }
    Ok(())
}

//! Cancels (issue 16): an operator's cancel is one short transaction on the task row, from any
//! host (`qsysd cancel` works on MySQL directly, the admin API calls the same). What it does
//! depends on where the task is:
//!
//! - no row yet (still in Redis, or never pushed): a `cancelled` row is written under its id, so
//!   the element, when it is taken, is a copy of a terminal task and never runs;
//! - `pending`: it becomes `cancelled` at once; whoever holds it in memory finds it no longer
//!   pending when it tries to start it;
//! - `processing`: the row is marked (`cancel_requested_at`) and the instance running the
//!   attempt stops it ([`crate::work::cancel`]); the task becomes `cancelled` when the attempt
//!   ends, however it ends, so the slot is never freed before the GPU lets go of it.

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::{truncate, State, Store, StoreError, MAX_ERROR};

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    /// The task is `cancelled` now: it was `pending`, or unknown (`was: None`: a row now waits
    /// for its element, which will never run).
    Cancelled { was: Option<State> },
    /// Its attempt is running: the instance running it stops it, and the task becomes
    /// `cancelled` when the attempt ends.
    Requested,
    /// Already terminal (`cancelled` included): nothing changed.
    Terminal { state: String },
}

/// A running attempt an operator cancelled, for the instance that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cancelling {
    pub task_id: String,
    pub attempt: u32,
    pub gpu_id: Option<String>,
    pub kind: Option<String>,
}

impl Store {
    /// Cancels `task_id` (see [`Cancel`]); `reason` becomes the task's error.
    pub fn cancel(&self, task_id: &str, reason: &str) -> Result<Cancel, StoreError> {
        let error = truncate(reason, MAX_ERROR);
        let mut c = self.conn()?;
        // Twice at most: an unknown id the poller records at the same moment is found the second
        // time round.
        for _ in 0..2 {
            let mut tx = c.start_transaction(TxOpts::default())?;
            let row: Option<Option<String>> = tx.exec_first(
                "SELECT state FROM tasks WHERE task_id = ? FOR UPDATE",
                (task_id,),
            )?;
            let state = row.map(|s| s.unwrap_or_else(|| "NULL".into()));
            let out = match state.as_deref().map(|s| (s, State::parse(s))) {
                None => {
                    tx.exec_drop(
                        "INSERT INTO tasks (task_id, state, attempts, error, created_at, \
                         finished_at) VALUES (?, 'cancelled', 0, ?, NOW(3), NOW(3)) \
                         ON DUPLICATE KEY UPDATE task_id = task_id",
                        (task_id, error),
                    )?;
                    if tx.affected_rows() == 0 {
                        tx.rollback()?;
                        continue;
                    }
                    Cancel::Cancelled { was: None }
                }
                Some((_, Some(State::Pending))) => {
                    tx.exec_drop(
                        "UPDATE tasks SET state = 'cancelled', error = ?, finished_at = NOW(3), \
                         not_before = NULL, deadline = NULL WHERE task_id = ?",
                        (error, task_id),
                    )?;
                    Cancel::Cancelled {
                        was: Some(State::Pending),
                    }
                }
                Some((_, Some(State::Processing))) => {
                    tx.exec_drop(
                        "UPDATE tasks SET cancel_requested_at = COALESCE(cancel_requested_at, \
                         NOW(3)), error = ? WHERE task_id = ?",
                        (error, task_id),
                    )?;
                    Cancel::Requested
                }
                Some((s, _)) => Cancel::Terminal {
                    state: s.to_string(),
                },
            };
            tx.commit()?;
            return Ok(out);
        }
        Err(StoreError::Schema(format!(
            "task {task_id:?} appeared and vanished while it was being cancelled"
        )))
    }

    /// The running attempts of this instance that an operator cancelled.
    pub(crate) fn cancelling(&self) -> Result<Vec<Cancelling>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(String, u32, Option<String>, Option<String>)> = c.exec(
            "SELECT task_id, attempts, gpu_id, type FROM tasks WHERE state = 'processing' \
             AND cancel_requested_at IS NOT NULL AND instance_id = ?",
            (&self.instance,),
        )?;
        Ok(rows
            .into_iter()
            .map(|(task_id, attempt, gpu_id, kind)| Cancelling {
                task_id,
                attempt,
                gpu_id,
                kind,
            })
            .collect())
    }
}

//! What operators and the dashboard ask of the store (`/status`, `/tasks/<id>`, `qsysd task`,
//! `requeue`), and the task states every other part reads and writes. These run outside the busy
//! paths, one statement or one short transaction each.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::{col, Store, StoreError};

/// A task's state in the `tasks.state` column (docs/contracts.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Processing,
    Finished,
    Failed,
    /// Stopped by an operator (`qsysd cancel`): it never ran, or its attempt was stopped.
    Cancelled,
}

impl State {
    /// As `tasks.state` holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Processing => "processing",
            State::Finished => "finished",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        Some(match s {
            "pending" => State::Pending,
            "processing" => State::Processing,
            "finished" => State::Finished,
            "failed" => State::Failed,
            "cancelled" => State::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, State::Finished | State::Failed | State::Cancelled)
    }
}

/// A task row for `qsysd task` and `/tasks/<id>`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
    /// The running attempt's last heartbeat, its progress (0 to 1) and message.
    pub heartbeat_at: Option<String>,
    pub progress: Option<f64>,
    pub progress_message: Option<String>,
    /// When an operator cancelled the task while an attempt ran.
    pub cancel_requested_at: Option<String>,
    /// What the endpoint returned, as JSON text.
    #[serde(serialize_with = "as_json")]
    pub result: Option<String>,
}

/// A stored result is JSON qsysd checked when it took it: shown as that JSON, not as a string.
fn as_json<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    let parsed: Option<serde_json::Value> = v.as_deref().and_then(|t| serde_json::from_str(t).ok());
    parsed.serialize(s)
}

/// A running attempt's liveness, for the slot cells of `/status` and the dashboard.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Liveness {
    pub heartbeat_at: Option<String>,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_s: Option<f64>,
    pub progress: Option<f64>,
    pub message: Option<String>,
    pub cancelling: bool,
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

impl Store {
    /// One task as stored, if it exists.
    pub fn task(&self, task_id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let mut c = self.conn()?;
        let row: Option<mysql::Row> = c.exec_first(
            "SELECT task_id, queue, state, type, gpu_id, slot_index, attempts, error, payload, \
             CAST(created_at AS CHAR), CAST(dispatched_at AS CHAR), CAST(finished_at AS CHAR), \
             instance_id, requeues, CAST(heartbeat_at AS CHAR), progress, progress_message, \
             CAST(cancel_requested_at AS CHAR), \
             (SELECT result FROM task_results r WHERE r.task_id = t.task_id) \
             FROM tasks t WHERE task_id = ?",
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
            heartbeat_at: col(&mut r, 14),
            progress: col(&mut r, 15),
            progress_message: col(&mut r, 16),
            cancel_requested_at: col(&mut r, 17),
            result: col(&mut r, 18),
        }))
    }

    /// Heartbeats, progress and cancels of the running attempts that have any, by task id.
    pub(crate) fn liveness(
        &self,
    ) -> Result<std::collections::HashMap<String, Liveness>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<mysql::Row> = c.query(
            "SELECT task_id, CAST(heartbeat_at AS CHAR), \
             TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(3)), progress, progress_message, \
             cancel_requested_at IS NOT NULL FROM tasks WHERE state = 'processing' \
             AND (heartbeat_at IS NOT NULL OR cancel_requested_at IS NOT NULL)",
        )?;
        Ok(rows
            .into_iter()
            .map(|mut r| {
                let id: String = col(&mut r, 0).unwrap_or_default();
                let age: Option<i64> = col(&mut r, 2);
                let live = Liveness {
                    heartbeat_at: col(&mut r, 1),
                    heartbeat_age_s: age.map(|us| (us.max(0) as f64 / 1e5).round() / 10.0),
                    progress: col(&mut r, 3),
                    message: col(&mut r, 4),
                    cancelling: col(&mut r, 5).unwrap_or(false),
                };
                (id, live)
            })
            .collect())
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

    /// The latest `limit` failed tasks, newest first.
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
    /// by nobody, and returns its queue and message for the caller to push. `None`: unknown, not
    /// terminal, or without a message (cancelled before it was ever taken) (a pending task nobody holds is returned too, so a requeue cut short can be re-run).
    pub fn requeue(&self, task_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        // A terminal row already rolled up into the totals leaves its state: taken back out.
        let mark = super::totals::hold_mark(&mut tx)?;
        let was: Option<(Option<String>, Option<String>, bool)> = tx.exec_first(
            "SELECT state, type, COALESCE(finished_at <= ?, 0) FROM tasks WHERE task_id = ? \
             FOR UPDATE",
            (&mark, task_id),
        )?;
        tx.exec_drop(
            "UPDATE tasks SET state = 'pending', attempt_base = attempts, requeues = requeues + 1, \
             error = NULL, finished_at = NULL, deadline = NULL, not_before = NULL, \
             instance_id = NULL, cancel_requested_at = NULL, heartbeat_at = NULL, \
             progress = NULL, progress_message = NULL WHERE task_id = ? \
             AND queue IS NOT NULL AND payload IS NOT NULL \
             AND (state IN ('finished', 'failed', 'cancelled') \
                  OR (state = 'pending' AND instance_id IS NULL))",
            (task_id,),
        )?;
        if tx.affected_rows() == 0 {
            tx.rollback()?;
            return Ok(None);
        }
        if let Some((Some(state), kind, true)) = was {
            if State::parse(&state).is_some_and(State::is_terminal) {
                super::totals::take_back(&mut tx, &[(state, kind, 1)])?;
            }
        }
        let row: Option<(Option<String>, Option<String>)> = tx.exec_first(
            "SELECT queue, payload FROM tasks WHERE task_id = ?",
            (task_id,),
        )?;
        // The next run's result replaces it; until then there is none.
        tx.exec_drop("DELETE FROM task_results WHERE task_id = ?", (task_id,))?;
        tx.commit()?;
        Ok(row.and_then(|(q, p)| Some((q?, p?))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in [
            State::Pending,
            State::Processing,
            State::Finished,
            State::Failed,
            State::Cancelled,
        ] {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("done"), None);
        assert!(State::Failed.is_terminal() && !State::Processing.is_terminal());
    }
}

//! Heartbeats (issue 16): a GPU's `running` callbacks, written like endings, a batch per
//! transaction: one locking read of the batch's rows, one `UPDATE` for all that apply, one
//! commit. Each heartbeat records its time, progress and message and, when its GPU has a
//! `heartbeat_timeout`, pushes the attempt's deadline on to that long from now, never past the
//! lease (`lease_until`).

use std::collections::HashMap;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::TxOpts;

use super::{col, padded, placeholders, State, Store, StoreError};

/// A heartbeat whose token checked out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Beat<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    pub progress: Option<f64>,
    pub message: Option<&'a str>,
}

/// What a heartbeat did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Beaten {
    /// Recorded; the deadline moved on if the GPU has a heartbeat timeout.
    Applied,
    Unknown,
    /// Not the task's current attempt.
    Stale {
        current: u32,
    },
    /// The task is not running (terminal, or pending again after this attempt expired).
    NotRunning {
        state: String,
    },
    /// An operator cancelled the task: the GPU should stop. Its deadline does not move.
    Cancelling,
}

/// A locked row as a heartbeat reads it: state, attempt, GPU, cancel asked.
type BeatRow = (String, u32, Option<String>, bool);

/// What heartbeat `b` does to a task in `row`. Pure.
fn judge_beat(row: Option<&BeatRow>, b: &Beat<'_>) -> Beaten {
    match row {
        None => Beaten::Unknown,
        Some((_, attempts, _, _)) if *attempts != b.attempt => Beaten::Stale { current: *attempts },
        Some((state, ..)) if State::parse(state) != Some(State::Processing) => Beaten::NotRunning {
            state: state.clone(),
        },
        Some((.., true)) => Beaten::Cancelling,
        Some(_) => Beaten::Applied,
    }
}

impl Store {
    /// Records each heartbeat of `beats` in one transaction (see the module doc);
    /// `timeout_of(gpu)` is that GPU's `heartbeat_timeout`. The results come in the order given.
    pub(crate) fn beat(
        &self,
        beats: &[Beat<'_>],
        timeout_of: impl Fn(&str) -> Option<Duration>,
    ) -> Result<Vec<Beaten>, StoreError> {
        if beats.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let ids = padded(beats.iter().map(|b| b.task_id).collect());
        // Task rows by primary key, the lock order of claims and endings.
        let sql = format!(
            "SELECT task_id, state, attempts, gpu_id, cancel_requested_at IS NOT NULL \
             FROM tasks FORCE INDEX (PRIMARY) WHERE task_id IN ({}) FOR UPDATE",
            placeholders(ids.len(), "?")
        );
        let mut rows: HashMap<String, BeatRow> = HashMap::new();
        for mut r in tx.exec::<mysql::Row, _, _>(sql, &ids)? {
            let id: String = col(&mut r, 0).unwrap_or_default();
            let row = (
                col(&mut r, 1).unwrap_or_else(|| "NULL".into()),
                col(&mut r, 2).unwrap_or(0),
                col(&mut r, 3),
                col(&mut r, 4).unwrap_or(false),
            );
            rows.insert(id, row);
        }
        let out: Vec<Beaten> = beats
            .iter()
            .map(|b| judge_beat(rows.get(b.task_id), b))
            .collect();
        let applied: Vec<(&Beat<'_>, Option<u64>)> = beats
            .iter()
            .zip(&out)
            .filter(|(_, o)| **o == Beaten::Applied)
            .map(|(b, _)| {
                let gpu = rows.get(b.task_id).and_then(|r| r.2.as_deref());
                let extend = gpu.and_then(&timeout_of).map(|d| d.as_micros() as u64);
                (b, extend)
            })
            .collect();
        if !applied.is_empty() {
            let applied = padded(applied);
            let cases = vec!["WHEN ? THEN ?"; applied.len()].join(" ");
            // A NULL progress or message keeps the last one; a NULL extension (no heartbeat
            // timeout) leaves the deadline where it is.
            let sql = format!(
                "UPDATE tasks FORCE INDEX (PRIMARY) SET heartbeat_at = NOW(3), \
                 progress = COALESCE(CASE task_id {cases} END, progress), \
                 progress_message = COALESCE(CASE task_id {cases} END, progress_message), \
                 deadline = COALESCE(LEAST(lease_until, \
                   NOW(3) + INTERVAL (CASE task_id {cases} END) MICROSECOND), deadline) \
                 WHERE task_id IN ({})",
                placeholders(applied.len(), "?")
            );
            let mut params: Vec<mysql::Value> = Vec::with_capacity(applied.len() * 7);
            params.extend(
                applied
                    .iter()
                    .flat_map(|(b, _)| [b.task_id.into(), b.progress.into()]),
            );
            params.extend(
                applied
                    .iter()
                    .flat_map(|(b, _)| [b.task_id.into(), b.message.into()]),
            );
            params.extend(
                applied
                    .iter()
                    .flat_map(|(b, extend)| [b.task_id.into(), (*extend).into()]),
            );
            params.extend(applied.iter().map(|(b, _)| b.task_id.into()));
            tx.exec_drop(sql, params)?;
        }
        tx.commit()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(attempt: u32) -> Beat<'static> {
        Beat {
            task_id: "t",
            attempt,
            progress: Some(0.5),
            message: None,
        }
    }

    #[test]
    fn a_heartbeat_applies_only_to_the_running_attempt_not_being_cancelled() {
        let row = |state: &str, attempts, cancel| (state.to_string(), attempts, None, cancel);
        assert_eq!(judge_beat(None, &beat(1)), Beaten::Unknown);
        assert_eq!(
            judge_beat(Some(&row("processing", 1, false)), &beat(1)),
            Beaten::Applied
        );
        assert_eq!(
            judge_beat(Some(&row("processing", 2, false)), &beat(1)),
            Beaten::Stale { current: 2 }
        );
        assert_eq!(
            judge_beat(Some(&row("finished", 1, false)), &beat(1)),
            Beaten::NotRunning {
                state: "finished".into()
            }
        );
        assert_eq!(
            judge_beat(Some(&row("pending", 1, false)), &beat(1)),
            Beaten::NotRunning {
                state: "pending".into()
            }
        );
        assert_eq!(
            judge_beat(Some(&row("processing", 1, true)), &beat(1)),
            Beaten::Cancelling
        );
    }
}

//! Ending attempts, from a callback, a dispatch or handler outcome, or a lease that ran out: the
//! task becomes terminal or `pending` again for a retry, its slot row is freed and the attempt
//! kept in `task_attempts`. The rules (stale, duplicate, conflict, retry budget) are a pure
//! function of the locked row, so they are unit-tested without a server.

use std::collections::HashMap;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{params, Transaction, TxOpts};

use super::claims::{judge_claims, lock_slot_rows, SlotRows, TaskRows};
use super::{
    col, padded, placeholders, truncate, Claim, ClaimRequest, State, Store, StoreError, MAX_ERROR,
};

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<'a> {
    /// With the result the endpoint sent, as JSON text, if any.
    Finished { result: Option<&'a str> },
    /// `retryable`: the failure may pass (connection error, timeout, 5xx, a crashed handler);
    /// otherwise it is the task's own (a 4xx, a `failed` callback) and final.
    Failed { error: &'a str, retryable: bool },
    /// No completion before the lease deadline: always worth another attempt.
    Expired { error: &'a str },
    /// The attempt was stopped: its GPU confirmed a cancel, its `exec` program was killed, its
    /// `http` request abandoned.
    Cancelled,
}

impl Ending<'_> {
    /// The attempt's outcome as the `task_attempts` table and `qsys_attempts_total` name it.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Ending::Finished { .. } => "finished",
            Ending::Failed { .. } => "failed",
            Ending::Expired { .. } => "expired",
            Ending::Cancelled => "cancelled",
        }
    }

    /// Why the attempt did not finish, if it did not.
    pub(crate) fn error(&self) -> Option<&str> {
        match self {
            Ending::Finished { .. } | Ending::Cancelled => None,
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
            Ending::Finished { .. } => State::Finished,
            Ending::Cancelled => State::Cancelled,
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
#[derive(Debug, PartialEq)]
pub enum Finish {
    /// The state changed; the GPU slot it held (if any) is free in MySQL.
    Applied {
        slot: Option<(String, usize)>,
        next: Next,
        /// How long ago the task was first taken (for the end-to-end duration metric).
        age: Option<Duration>,
        /// A GPU attempt that finished its task, and of known size: (size, seconds from its
        /// claim), what its GPU's speed is learned from.
        work: Option<(f64, f64)>,
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

/// A slot an ending is to free, claimed in the same transaction for the next task (issue 20: one
/// commit and no gap between a task's end and the next one's start on its slot).
#[derive(Debug, Clone, Copy)]
pub struct HandOver<'a> {
    /// The position in the endings of the one whose slot this is.
    pub after: usize,
    /// The next task's claim of that slot.
    pub claim: ClaimRequest<'a>,
}

/// What [`Store::end_attempts`] did.
#[derive(Debug, PartialEq)]
pub struct Ended {
    /// Each ending's verdict, in order.
    pub finishes: Vec<Finish>,
    /// Each hand-over's, in order: `None` when its ending did not free that slot (not applied,
    /// or the row named another), else the claim's verdict as [`Store::claim_gpu_attempts`] gives
    /// it.
    pub handed: Vec<Option<Claim>>,
}

/// A `processing` attempt past its lease deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expired {
    pub task_id: String,
    pub attempt: u32,
    pub gpu_id: Option<String>,
    /// The deadline was a heartbeat's, before the lease's end: the attempt fell silent.
    pub silent: bool,
}

/// A task row as an ending reads it.
#[derive(Debug, Clone)]
struct EndRow {
    /// `"NULL"` for a seed-era row without a state: no ending applies to it.
    state: String,
    attempts: u32,
    gpu: Option<String>,
    slot: Option<u32>,
    max_attempts: Option<u32>,
    attempt_base: u32,
    /// An operator cancelled the task while this attempt ran: however it ends, it ends the task.
    cancel_requested: bool,
    /// Since the task was first taken.
    age_us: Option<i64>,
    /// Passed back unchanged into `task_attempts.started_at`.
    dispatched_at: mysql::Value,
    /// The task's size, if known, and how long since its attempt was claimed.
    cost: Option<f64>,
    ran_us: Option<i64>,
}

impl EndRow {
    /// What a GPU's speed is learned from: a finished attempt on a slot, of known size.
    fn work(&self, next: Next, on_gpu: bool) -> Option<(f64, f64)> {
        match (next, on_gpu, self.cost, self.ran_us) {
            (Next::Done(State::Finished), true, Some(cost), Some(us)) if us > 0 => {
                Some((cost, us as f64 / 1e6))
            }
            _ => None,
        }
    }
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
    // A cancelled task stays cancelled, whatever its attempt made of it meanwhile.
    if row.cancel_requested || ending == Ending::Cancelled {
        return Ok(Next::Done(State::Cancelled));
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

/// The rows an ending batch changes beyond its own task row, gathered while the verdicts are made
/// so that each kind is written by one multi-row statement.
#[derive(Default)]
struct EndBatch<'a> {
    /// Tasks finished without an error, the common case.
    finished: Vec<&'a str>,
    /// `task_results` rows: task, result.
    results: Vec<[mysql::Value; 2]>,
    /// `task_attempts` rows: task, attempt, GPU, slot, instance, start, outcome, error.
    history: Vec<[mysql::Value; 8]>,
    /// Slot rows to free: GPU, slot, and the task that must still hold it.
    freed: Vec<(String, u32, &'a str)>,
}

impl Store {
    /// Ends each attempt of `reqs` (see [`EndRequest`]), all in one transaction: the task becomes
    /// terminal, or `pending` again after its `retry` delay when the ending is retryable and attempts are
    /// left (`max_attempts` of the task, else `default_max`); its slot row is freed and the attempt
    /// recorded in `task_attempts`. The rows are locked and read first, the verdicts made in memory
    /// (`judge_ending`), then applied: a statement per retry or failure, and one multi-row
    /// statement each for plain finishes, the attempt history and the freed slots. A request
    /// repeated within the batch sees the earlier one's effect (a duplicate callback is a
    /// `Duplicate`, as it would be later).
    ///
    /// Each of `hand_overs` claims the slot its ending frees for the next task, in the same
    /// transaction, by the rules of [`Store::claim_gpu_attempts`]: its task row is locked with the
    /// ended ones and its slot row after them (the claims' lock order), and it is claimed only if
    /// the ending applied, freed exactly that slot, and the task is `pending` at the attempts
    /// expected. A slot handed over is written held by its new attempt instead of freed.
    pub fn end_attempts(
        &self,
        reqs: &[EndRequest<'_>],
        default_max: u32,
        hand_overs: &[HandOver<'_>],
    ) -> Result<Ended, StoreError> {
        if reqs.is_empty() {
            return Ok(Ended {
                finishes: Vec::new(),
                handed: vec![None; hand_overs.len()],
            });
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let ids = reqs
            .iter()
            .map(|r| r.task_id)
            .chain(hand_overs.iter().map(|h| h.claim.task_id));
        let mut rows = lock_ended_tasks(&mut tx, ids.collect())?;
        let claims: Vec<ClaimRequest<'_>> = hand_overs.iter().map(|h| h.claim).collect();
        let mut slots = if claims.is_empty() {
            SlotRows::new()
        } else {
            lock_slot_rows(&mut tx, &claims)?
        };
        let mut batch = EndBatch::default();
        let mut finishes = Vec::with_capacity(reqs.len());
        for r in reqs {
            let Some(row) = rows.get_mut(r.task_id) else {
                finishes.push(Finish::Unknown);
                continue;
            };
            finishes.push(match judge_ending(row, r, default_max) {
                Ok(next) => self.apply_ending(&mut tx, r, row, next, &mut batch)?,
                Err(verdict) => verdict,
            });
        }
        let (handed, claimed) = judge_hand_overs(reqs, hand_overs, &finishes, &rows, &mut slots)?;
        // A slot handed over is written held by its next attempt, not freed first.
        batch
            .freed
            .retain(|(g, s, _)| !claimed.iter().any(|c| c.gpu_id == g && c.slot as u32 == *s));
        batch.write(&mut tx)?;
        if !claimed.is_empty() {
            let claimed = padded(claimed);
            self.occupy_slots(&mut tx, &claimed)?;
            self.start_gpu_attempts(&mut tx, &claimed)?;
        }
        tx.commit()?;
        Ok(Ended { finishes, handed })
    }

    /// Applies one judged ending: the task row's statement now when it is not a plain finish
    /// (those wait for one statement in `batch`), the attempt's history and freed slot into
    /// `batch`, and the new state into `row` for a repeat later in the batch.
    fn apply_ending<'a>(
        &self,
        tx: &mut Transaction<'_>,
        r: &EndRequest<'a>,
        row: &mut EndRow,
        next: Next,
        batch: &mut EndBatch<'a>,
    ) -> Result<Finish, StoreError> {
        let error = r.ending.error().map(|e| truncate(e, MAX_ERROR));
        if let (
            Next::Done(State::Finished),
            Ending::Finished {
                result: Some(result),
            },
        ) = (next, r.ending)
        {
            batch.results.push([r.task_id.into(), result.into()]);
        }
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
            Next::Done(State::Finished) if error.is_none() => batch.finished.push(r.task_id),
            // The operator's reason is already the task's error; a GPU that cancelled unasked
            // says so.
            Next::Done(State::Cancelled) => tx.exec_drop(
                "UPDATE tasks SET state = 'cancelled', error = COALESCE(?, error), \
                 finished_at = NOW(3), deadline = NULL WHERE task_id = ?",
                (
                    (!row.cancel_requested).then_some("cancelled by its gpu, unasked"),
                    r.task_id,
                ),
            )?,
            Next::Done(done) => tx.exec_drop(
                "UPDATE tasks SET state = ?, error = ?, finished_at = NOW(3), deadline = NULL \
                 WHERE task_id = ?",
                (done.as_str(), error, r.task_id),
            )?,
        }
        let outcome = match next {
            Next::Done(State::Cancelled) => Ending::Cancelled.outcome(),
            _ => r.ending.outcome(),
        };
        batch.history.push([
            r.task_id.into(),
            row.attempts.into(),
            row.gpu.clone().into(),
            row.slot.into(),
            self.instance.as_str().into(),
            row.dispatched_at.clone(),
            outcome.into(),
            error.into(),
        ]);
        let slot = match (&row.gpu, row.slot) {
            (Some(g), Some(s)) => {
                batch.freed.push((g.clone(), s, r.task_id));
                Some((g.clone(), s as usize))
            }
            _ => None,
        };
        row.state = match next {
            Next::Retry { .. } => State::Pending.as_str().into(),
            Next::Done(done) => done.as_str().into(),
        };
        Ok(Finish::Applied {
            work: row.work(next, slot.is_some()),
            slot,
            next,
            age: row.age_us.map(|us| Duration::from_micros(us.max(0) as u64)),
        })
    }

    /// Attempts whose lease deadline has passed, oldest first: this instance's, those held by
    /// nobody, and those of instances silent for longer than `dead_after`. Read through
    /// `idx_tasks_state`: `processing` rows are as many as the fleet's slots and the workers, so
    /// an index on the deadline (moved at every claim and ending) would save nothing.
    pub(crate) fn expired(
        &self,
        limit: usize,
        dead_after: Duration,
    ) -> Result<Vec<Expired>, StoreError> {
        let mut c = self.conn()?;
        // Ours, and those of instances whose heartbeat stopped: a live instance expires its own.
        let rows: Vec<(String, u32, Option<String>, bool)> = c.exec(
            "SELECT task_id, attempts, gpu_id, COALESCE(deadline < lease_until, 0) FROM tasks t \
             FORCE INDEX (idx_tasks_state) WHERE state = 'processing' \
             AND deadline < NOW(3) AND (instance_id = :me OR instance_id IS NULL OR NOT EXISTS \
             (SELECT 1 FROM instances i WHERE i.instance_id = t.instance_id \
              AND i.heartbeat_at > NOW(3) - INTERVAL :dead MICROSECOND)) \
             ORDER BY deadline LIMIT :limit",
            params! { "me" => &self.instance, "dead" => dead_after.as_micros() as u64,
            "limit" => limit as u64 },
        )?;
        Ok(rows
            .into_iter()
            .map(|(task_id, attempt, gpu_id, silent)| Expired {
                task_id,
                attempt,
                gpu_id,
                silent,
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
}

/// Locks and reads the batch's task rows: first, as in [`Store::claim_gpu_attempts`]' lock order
/// (the slot rows an ending frees are locked last, by the statement that frees them).
fn lock_ended_tasks(
    tx: &mut Transaction<'_>,
    ids: Vec<&str>,
) -> Result<HashMap<String, EndRow>, StoreError> {
    let ids = padded(ids);
    let sql = format!(
        "SELECT task_id, state, attempts, gpu_id, slot_index, max_attempts, attempt_base, \
         TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)), dispatched_at, \
         cancel_requested_at IS NOT NULL, cost, \
         TIMESTAMPDIFF(MICROSECOND, dispatched_at, NOW(3)) FROM tasks \
         FORCE INDEX (PRIMARY) WHERE task_id IN ({}) FOR UPDATE",
        placeholders(ids.len(), "?")
    );
    let mut rows = HashMap::new();
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
            cancel_requested: col(&mut r, 9).unwrap_or(false),
            cost: col(&mut r, 10),
            ran_us: col(&mut r, 11),
        };
        rows.insert(id, row);
    }
    Ok(rows)
}

/// Each hand-over's verdict on the locked rows, after the endings (`finishes`) were applied to
/// them: `None` unless its ending applied and freed exactly its slot; else the claim's, judged
/// as a claim is ([`judge_claims`]) on the slot rows as the endings leave them. Also the
/// requests claimed.
fn judge_hand_overs<'r, 'a>(
    reqs: &[EndRequest<'_>],
    hand_overs: &'r [HandOver<'a>],
    finishes: &[Finish],
    rows: &HashMap<String, EndRow>,
    slots: &mut SlotRows,
) -> Result<(Vec<Option<Claim>>, Vec<&'r ClaimRequest<'a>>), StoreError> {
    let mut tasks: TaskRows = hand_overs
        .iter()
        .filter_map(|h| {
            let row = rows.get(h.claim.task_id)?;
            Some((
                h.claim.task_id.to_string(),
                (Some(row.state.clone()), row.attempts),
            ))
        })
        .collect();
    let mut handed = Vec::with_capacity(hand_overs.len());
    let mut claimed = Vec::new();
    for h in hand_overs {
        let c = &h.claim;
        let key = (c.gpu_id.to_string(), c.slot as u32);
        let freed = matches!(finishes.get(h.after), Some(Finish::Applied {
            slot: Some((g, s)), ..
        }) if g == c.gpu_id && *s == c.slot);
        let Some(holder) = slots.get_mut(&key).filter(|_| freed) else {
            handed.push(None);
            continue;
        };
        // The ending's statement frees the row only if its task still holds it.
        if holder
            .as_ref()
            .is_some_and(|(t, _)| t == reqs[h.after].task_id)
        {
            *holder = None;
        }
        let (verdict, ok) = judge_claims(std::slice::from_ref(c), &mut tasks, slots)?;
        claimed.extend(ok);
        handed.push(verdict.into_iter().next());
    }
    Ok((handed, claimed))
}

impl EndBatch<'_> {
    /// The gathered rows, one statement per kind (none for an empty kind): finished tasks, then
    /// the attempt history, then the freed slot rows, after every task row's own statement.
    fn write(self, tx: &mut Transaction<'_>) -> Result<(), StoreError> {
        if !self.finished.is_empty() {
            let finished = padded(self.finished);
            let sql = format!(
                "UPDATE tasks FORCE INDEX (PRIMARY) SET state = 'finished', error = NULL, \
                 finished_at = NOW(3), deadline = NULL WHERE task_id IN ({})",
                placeholders(finished.len(), "?")
            );
            tx.exec_drop(sql, &finished)?;
        }
        if !self.results.is_empty() {
            let results = padded(self.results);
            let sql = format!(
                "INSERT INTO task_results (task_id, result, stored_at) VALUES {} \
                 ON DUPLICATE KEY UPDATE result = VALUES(result), stored_at = VALUES(stored_at)",
                placeholders(results.len(), "(?, ?, NOW(3))")
            );
            tx.exec_drop(sql, results.concat())?;
        }
        if !self.history.is_empty() {
            let history = padded(self.history);
            let sql = format!(
                "INSERT INTO task_attempts (task_id, attempt, gpu_id, slot_index, instance_id, \
                 started_at, ended_at, outcome, error) VALUES {} \
                 ON DUPLICATE KEY UPDATE ended_at = VALUES(ended_at), outcome = VALUES(outcome), \
                 error = VALUES(error)",
                placeholders(history.len(), "(?, ?, ?, ?, ?, ?, NOW(3), ?, ?)")
            );
            tx.exec_drop(sql, history.concat())?;
        }
        if !self.freed.is_empty() {
            let freed = padded(self.freed);
            let sql = format!(
                "UPDATE gpu_slots FORCE INDEX (PRIMARY) SET task_id = NULL, attempt = NULL, \
                 instance_id = NULL, claimed_at = NULL WHERE (gpu_id, slot_index, task_id) IN ({})",
                placeholders(freed.len(), "(?, ?, ?)")
            );
            let params: Vec<mysql::Value> = freed
                .into_iter()
                .flat_map(|(g, s, t)| [g.into(), s.into(), t.into()])
                .collect();
            tx.exec_drop(sql, params)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, attempts: u32, max: Option<u32>, base: u32) -> EndRow {
        EndRow {
            state: state.into(),
            attempts,
            gpu: Some("g0".into()),
            slot: Some(1),
            max_attempts: max,
            attempt_base: base,
            cancel_requested: false,
            age_us: Some(5),
            dispatched_at: mysql::Value::NULL,
            cost: None,
            ran_us: None,
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

    /// Whatever ends the attempt of a task an operator cancelled ends the task `cancelled`: never
    /// finished, never retried; a `cancelled` report repeats as a duplicate.
    #[test]
    fn a_cancelled_task_ends_cancelled_however_its_attempt_ends() {
        let mut running = row("processing", 1, None, 0);
        running.cancel_requested = true;
        let cancelled = Ok(Next::Done(State::Cancelled));
        for ending in [
            Ending::Finished { result: Some("1") },
            Ending::Failed {
                error: "oops",
                retryable: true,
            },
            Ending::Expired { error: "lease" },
            Ending::Cancelled,
        ] {
            assert_eq!(
                judge_ending(&running, &req(1, ending), 3),
                cancelled,
                "{ending:?}"
            );
        }
        // A GPU that stopped a task unasked ends it cancelled too.
        assert_eq!(
            judge_ending(
                &row("processing", 1, None, 0),
                &req(1, Ending::Cancelled),
                3
            ),
            cancelled
        );
        let done = row("cancelled", 1, None, 0);
        assert_eq!(
            judge_ending(&done, &req(1, Ending::Cancelled), 3),
            Err(Finish::Duplicate)
        );
        assert_eq!(
            judge_ending(&done, &req(1, Ending::Finished { result: None }), 3),
            Err(Finish::Conflict {
                state: "cancelled".into()
            })
        );
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
            judge_ending(&running, &req(2, Ending::Finished { result: None }), 3),
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
            judge_ending(&running, &req(1, Ending::Finished { result: None }), 3),
            Err(Finish::Stale { current: 2 })
        );
        let done = row("finished", 2, None, 0);
        assert_eq!(
            judge_ending(&done, &req(2, Ending::Finished { result: None }), 3),
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
            judge_ending(
                &row("pending", 2, None, 0),
                &req(2, Ending::Finished { result: None }),
                3
            ),
            Err(Finish::Conflict { .. })
        ));
        assert!(matches!(
            judge_ending(
                &row("NULL", 2, None, 0),
                &req(2, Ending::Finished { result: None }),
                3
            ),
            Err(Finish::Conflict { .. })
        ));
    }
}

//! Starting attempts: a GPU attempt claims its slot row and its task row together, so a slot runs
//! one task fleet-wide whichever instance claims it; a handler attempt (no slot) only moves its
//! task. Renewing a lease keeps an attempt that waited for a worker from expiring mid-call.

use std::collections::HashMap;
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{params, Transaction, TxOpts};

use super::{col, padded, placeholders, Store, StoreError};

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
    /// The GPU's `heartbeat_timeout`: the attempt must be heard of within it.
    pub heartbeat: Option<Duration>,
}

/// The deadline an attempt starts with: its lease, or sooner when its GPU must heartbeat. Each
/// heartbeat then pushes it on, never past the lease.
pub(crate) fn first_deadline(lease: Duration, heartbeat: Option<Duration>) -> Duration {
    heartbeat.map_or(lease, |h| h.min(lease))
}

/// Result of trying to claim a slot for a task's next attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Locked task rows by id: `(state, attempts)`, updated in memory as the batch claims them.
pub(super) type TaskRows = HashMap<String, (Option<String>, u32)>;

/// Locked slot rows by `(gpu_id, slot_index)`: the holder's `(task_id, attempt)`, if any, updated
/// in memory as the batch claims them.
pub(super) type SlotRows = HashMap<(String, u32), Option<(String, u32)>>;

impl Store {
    /// Moves each `pending` task at `attempts` to `processing` as attempt `attempts + 1` on its GPU
    /// slot, claiming the slot row, all in one transaction: one log flush and three statements for
    /// the whole batch (the wall of issue 8 is per-commit and per-statement cost, not rows). Both
    /// kinds of row are locked first, by one statement, so each verdict is exact; a task is claimed
    /// only with its slot. Lock order, here and in [`Store::end_attempts`]: task rows, then slot
    /// rows, each by primary key (forced: on a small table the optimizer would scan, and lock,
    /// every row), so a claim and an ending cannot deadlock.
    pub fn claim_gpu_attempts(&self, reqs: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let out = self.claim_in(&mut tx, reqs)?;
        tx.commit()?;
        Ok(out)
    }

    /// [`Store::claim_gpu_attempts`] inside `tx`, whose other rows were locked before (the lock
    /// order: task rows, then slot rows).
    pub(super) fn claim_in(
        &self,
        tx: &mut Transaction<'_>,
        reqs: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        let (mut tasks, mut slots) = lock_claimed_rows(tx, reqs)?;
        let (out, claimed) = judge_claims(reqs, &mut tasks, &mut slots)?;
        if !claimed.is_empty() {
            let claimed = padded(claimed);
            self.occupy_slots(tx, &claimed)?;
            self.start_gpu_attempts(tx, &claimed)?;
        }
        Ok(out)
    }

    /// Writes the claimed slot rows as held by their task's new attempt, here.
    pub(super) fn occupy_slots(
        &self,
        tx: &mut Transaction<'_>,
        claimed: &[&ClaimRequest<'_>],
    ) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// Moves the claimed tasks to `processing` on their slots, in one statement: per-task values
    /// by `CASE`, since every row was checked `pending` at `attempts` under lock.
    pub(super) fn start_gpu_attempts(
        &self,
        tx: &mut Transaction<'_>,
        claimed: &[&ClaimRequest<'_>],
    ) -> Result<(), StoreError> {
        let cases = vec!["WHEN ? THEN ?"; claimed.len()].join(" ");
        let sql = format!(
            "UPDATE tasks FORCE INDEX (PRIMARY) SET state = 'processing', \
             attempts = attempts + 1, \
             gpu_id = CASE task_id {cases} END, slot_index = CASE task_id {cases} END, \
             dispatched_at = NOW(3), \
             lease_until = NOW(3) + INTERVAL (CASE task_id {cases} END) MICROSECOND, \
             deadline = NOW(3) + INTERVAL (CASE task_id {cases} END) MICROSECOND, \
             heartbeat_at = NULL, progress = NULL, progress_message = NULL, \
             instance_id = ? WHERE task_id IN ({})",
            placeholders(claimed.len(), "?")
        );
        let mut params: Vec<mysql::Value> = Vec::with_capacity(claimed.len() * 9 + 1);
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
        params.extend(claimed.iter().flat_map(|r| {
            let first = first_deadline(r.lease, r.heartbeat);
            [r.task_id.into(), (first.as_micros() as u64).into()]
        }));
        params.push(self.instance.as_str().into());
        params.extend(claimed.iter().map(|r| r.task_id.into()));
        tx.exec_drop(sql, params)?;
        Ok(())
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
             deadline = NOW(3) + INTERVAL :lease MICROSECOND, lease_until = NULL, \
             heartbeat_at = NULL, progress = NULL, progress_message = NULL, instance_id = :inst \
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
        heartbeat: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "UPDATE tasks SET lease_until = NOW(3) + INTERVAL ? MICROSECOND, \
             deadline = NOW(3) + INTERVAL ? MICROSECOND \
             WHERE task_id = ? AND state = 'processing' AND attempts = ?",
            (
                lease.as_micros() as u64,
                first_deadline(lease, heartbeat).as_micros() as u64,
                task_id,
                attempt,
            ),
        )?;
        Ok(c.affected_rows() == 1)
    }
}

/// Locks and reads the batch's task rows, then its slot rows, in one statement (issue 20: one
/// round trip fewer a claim). The branches of a `UNION ALL` run in their written order, so the
/// lock order of [`Store::claim_gpu_attempts`] holds; each row says which table it is from.
fn lock_claimed_rows(
    tx: &mut Transaction<'_>,
    reqs: &[ClaimRequest<'_>],
) -> Result<(TaskRows, SlotRows), StoreError> {
    let ids: Vec<&str> = padded(reqs.iter().map(|r| r.task_id).collect());
    let (slot_sql, slot_params) = slot_lock(reqs);
    let sql = format!(
        "(SELECT 't', task_id, NULL, state, attempts FROM tasks FORCE INDEX (PRIMARY) \
         WHERE task_id IN ({}) FOR UPDATE) UNION ALL ({slot_sql})",
        placeholders(ids.len(), "?"),
    );
    let mut params: Vec<mysql::Value> = ids.iter().map(|&id| id.into()).collect();
    params.extend(slot_params);
    let (mut tasks, mut slots) = (TaskRows::new(), SlotRows::new());
    for mut row in tx.exec::<mysql::Row, _, _>(sql, params)? {
        let key: String = col(&mut row, 1).unwrap_or_default();
        if col::<String>(&mut row, 0).as_deref() == Some("t") {
            tasks.insert(key, (col(&mut row, 3), col(&mut row, 4).unwrap_or(0)));
        } else {
            insert_slot(&mut slots, key, &mut row);
        }
    }
    Ok((tasks, slots))
}

/// The statement that locks and reads the slot rows `reqs` name, `'s', gpu_id, slot_index,
/// task_id, attempt` each, with its parameters.
fn slot_lock(reqs: &[ClaimRequest<'_>]) -> (String, Vec<mysql::Value>) {
    let locks = padded(reqs.to_vec());
    let sql = format!(
        "SELECT 's', gpu_id, slot_index, task_id, attempt FROM gpu_slots FORCE INDEX (PRIMARY) \
         WHERE (gpu_id, slot_index) IN ({}) FOR UPDATE",
        placeholders(locks.len(), "(?, ?)")
    );
    let params = locks
        .iter()
        .flat_map(|r| [r.gpu_id.into(), (r.slot as u32).into()])
        .collect();
    (sql, params)
}

/// One row of [`slot_lock`] into `slots`, by `(gpu_id, slot_index)`.
fn insert_slot(slots: &mut SlotRows, gpu_id: String, row: &mut mysql::Row) {
    let holder = col::<String>(row, 3).map(|t| (t, col(row, 4).unwrap_or(0)));
    slots.insert((gpu_id, col(row, 2).unwrap_or(0)), holder);
}

/// Locks and reads the slot rows `reqs` name (after their task rows: the lock order above).
pub(super) fn lock_slot_rows(
    tx: &mut Transaction<'_>,
    reqs: &[ClaimRequest<'_>],
) -> Result<SlotRows, StoreError> {
    let (sql, params) = slot_lock(reqs);
    let mut slots = SlotRows::new();
    for mut row in tx.exec::<mysql::Row, _, _>(sql, params)? {
        let key: String = col(&mut row, 1).unwrap_or_default();
        insert_slot(&mut slots, key, &mut row);
    }
    Ok(slots)
}

/// Each request's verdict on the locked rows, in order, and the requests claimed. A claim is
/// applied to the rows in memory, so a repeat of the slot or the task later in the batch sees it.
/// A slot row missing from `gpu_slots` is an error: `ensure_slots` writes one per configured slot.
pub(super) fn judge_claims<'r, 'a>(
    reqs: &'r [ClaimRequest<'a>],
    tasks: &mut TaskRows,
    slots: &mut SlotRows,
) -> Result<(Vec<Claim>, Vec<&'r ClaimRequest<'a>>), StoreError> {
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
                *holder = Some((r.task_id.to_string(), r.attempts + 1));
                *state = Some("processing".into());
                claimed.push(r);
                Claim::Claimed
            }
            (None, _) => Claim::NotPending,
        };
        out.push(verdict);
    }
    Ok((out, claimed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(task_id: &'a str, attempts: u32, gpu_id: &'a str, slot: usize) -> ClaimRequest<'a> {
        ClaimRequest {
            task_id,
            attempts,
            gpu_id,
            slot,
            lease: Duration::from_secs(60),
            heartbeat: None,
        }
    }

    #[test]
    fn a_heartbeat_timeout_only_ever_shortens_the_first_deadline() {
        let s = Duration::from_secs;
        assert_eq!(first_deadline(s(60), None), s(60));
        assert_eq!(first_deadline(s(60), Some(s(10))), s(10));
        assert_eq!(first_deadline(s(5), Some(s(10))), s(5));
    }

    #[test]
    fn each_claim_sees_the_ones_before_it_in_the_batch() {
        let mut tasks: TaskRows = [
            ("a".to_string(), (Some("pending".to_string()), 0)),
            ("b".to_string(), (Some("pending".to_string()), 1)),
            ("c".to_string(), (Some("pending".to_string()), 0)),
            ("done".to_string(), (Some("finished".to_string()), 1)),
        ]
        .into();
        let mut slots: SlotRows = [
            (("g0".to_string(), 0), None),
            (("g0".to_string(), 1), Some(("peer".to_string(), 4))),
            (("g1".to_string(), 0), None),
        ]
        .into();
        let reqs = [
            req("a", 0, "g0", 0),
            // The same slot again: a's claim above holds it now.
            req("c", 0, "g0", 0),
            // Held by another task in MySQL.
            req("c", 0, "g0", 1),
            // Not at the attempt count the scheduler read, or not pending at all.
            req("b", 0, "g1", 0),
            req("done", 1, "g1", 0),
            // The same task twice: its first claim moved it to processing.
            req("a", 0, "g1", 0),
            req("c", 0, "g1", 0),
        ];
        let (verdicts, claimed) = judge_claims(&reqs, &mut tasks, &mut slots).expect("judged");
        assert_eq!(
            verdicts,
            [
                Claim::Claimed,
                Claim::SlotTaken {
                    holder: "a".into(),
                    attempt: 1
                },
                Claim::SlotTaken {
                    holder: "peer".into(),
                    attempt: 4
                },
                Claim::NotPending,
                Claim::NotPending,
                Claim::NotPending,
                Claim::Claimed,
            ]
        );
        let ids: Vec<&str> = claimed.iter().map(|r| r.task_id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(slots[&("g1".to_string(), 0)], Some(("c".to_string(), 1)));
        assert_eq!(tasks["c"].0.as_deref(), Some("processing"));
    }

    #[test]
    fn a_slot_row_missing_from_mysql_is_an_error_not_a_claim() {
        let mut tasks: TaskRows = [("a".to_string(), (Some("pending".to_string()), 0))].into();
        let mut slots = SlotRows::new();
        let e =
            judge_claims(&[req("a", 0, "g9", 3)], &mut tasks, &mut slots).expect_err("no slot row");
        assert!(e.to_string().contains("slot row g9/3 is missing"), "{e}");
    }
}

//! Recording tasks taken from the queues: a task runs only once it has its row, and a copy of a
//! task already recorded (handed back to Redis, or left there by a crash) is told apart from a new
//! one by that row. A queue element that cannot be parsed is kept as a `failed` row, for inspection.

use mysql::prelude::Queryable;
use mysql::{params, TxOpts};

use super::{padded, placeholders, truncate, Claim, ClaimRequest, Store, StoreError, MAX_ERROR};

/// Longest raw payload kept for a malformed queue element.
const MAX_RAW: usize = 65_536;

/// What happened when a task taken from a queue was recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A new row, `pending`, attempt 0.
    New,
    /// The row existed and is still `pending`, held by nobody (handed back to Redis at a stop) or
    /// by this instance (left in Redis by a crash): take it over with the attempts it already used.
    Resumed { attempts: u32 },
    /// The row exists in another state: the task is running or done, so this copy is a duplicate.
    Exists { state: String },
}

/// A task to record, as taken from a queue.
#[derive(Debug, Clone, Copy)]
pub struct NewTask<'a> {
    pub task_id: &'a str,
    pub kind: &'a str,
    pub payload: &'a str,
    pub max_attempts: Option<u32>,
    pub timeout_s: Option<u64>,
    /// A delayed task's wait: its new row is `pending` from now plus this, held by nobody, so
    /// no instance keeps it in memory (the scheduler adopts it when it is due).
    pub wait: Option<std::time::Duration>,
    /// Its work size ([`crate::contract::message::Message::cost`]), for the pools' backlog.
    pub cost: Option<f64>,
}

impl Store {
    /// Records tasks taken from `queue`, all in one transaction (one log flush for the batch).
    /// `payload` is the message in the seed's format. A pending row nobody holds (handed back to
    /// Redis at a stop) or that this instance holds (a copy left in Redis by a crash) is taken
    /// over; any other existing row makes the copy a duplicate.
    ///
    /// The usual batch is all new ids: one multi-row insert whose affected-row count proves it.
    /// Otherwise each row is looked at in turn; a row this very insert created is then pending and
    /// held here, so it comes back as `Resumed { attempts: 0 }`, which means the same as `New`.
    pub fn accept(&self, queue: &str, tasks: &[NewTask<'_>]) -> Result<Vec<Accepted>, StoreError> {
        Ok(self.accept_and_claim(queue, tasks, &[])?.0)
    }

    /// [`Store::accept`], and in the same transaction each of `claims` (of tasks of this batch) as
    /// [`Store::claim_gpu_attempts`] would: a task that finds a free slot as it arrives starts with
    /// one commit for its record and its claim (issue 20). The claims are tried only when every
    /// row is new (the usual batch); otherwise each comes back `None` and nothing is claimed.
    pub fn accept_and_claim(
        &self,
        queue: &str,
        tasks: &[NewTask<'_>],
        claims: &[ClaimRequest<'_>],
    ) -> Result<(Vec<Accepted>, Vec<Option<Claim>>), StoreError> {
        let unclaimed = || claims.iter().map(|_| None).collect();
        if tasks.is_empty() {
            return Ok((Vec::new(), unclaimed()));
        }
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        // A repeated row is a duplicate key left unchanged: it counts 0 below.
        let rows = padded(tasks.to_vec());
        let sql = format!(
            "INSERT INTO tasks (task_id, queue, state, type, payload, attempts, max_attempts, \
             timeout_s, instance_id, created_at, not_before, cost) VALUES {} \
             ON DUPLICATE KEY UPDATE task_id = task_id",
            placeholders(
                rows.len(),
                "(?, ?, 'pending', ?, ?, 0, ?, ?, ?, NOW(3), NOW(3) + INTERVAL ? MICROSECOND, ?)"
            )
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
                    match t.wait {
                        Some(_) => mysql::Value::NULL,
                        None => self.instance.as_str().into(),
                    },
                    t.wait.map(|w| w.as_micros() as u64).into(),
                    t.cost.into(),
                ]
            })
            .collect();
        tx.exec_drop(sql, params)?;
        // An existing row is left unchanged by the no-op update and counts 0.
        if tx.affected_rows() == tasks.len() as u64 {
            let claimed = if claims.is_empty() {
                Vec::new()
            } else {
                self.claim_in(&mut tx, claims)?
                    .into_iter()
                    .map(Some)
                    .collect()
            };
            tx.commit()?;
            return Ok((tasks.iter().map(|_| Accepted::New).collect(), claimed));
        }
        let out = tasks
            .iter()
            .map(|t| self.accept_one(&mut tx, queue, t))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok((out, unclaimed()))
    }

    /// One row of a batch that was not all new: read under lock and decided here (an UPDATE's
    /// affected count cannot tell a row it matched but left unchanged, this insert's own row in
    /// the same millisecond, from no row).
    fn accept_one(
        &self,
        tx: &mut mysql::Transaction<'_>,
        queue: &str,
        t: &NewTask<'_>,
    ) -> Result<Accepted, StoreError> {
        let row: Option<(Option<String>, u32, Option<String>)> = tx.exec_first(
            "SELECT state, attempts, instance_id FROM tasks WHERE task_id = ? FOR UPDATE",
            (t.task_id,),
        )?;
        Ok(match row {
            // The seed's table allowed a NULL state; such a row is not ours to resume.
            Some((Some(state), attempts, holder))
                if state == "pending" && holder.as_deref().is_none_or(|h| h == self.instance) =>
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
            Some((state, _, _)) => {
                // Cancelled before it was taken: the row waited without its message, which
                // it keeps now, for `qsysd task` and a requeue. Not its type: the row may be
                // in the rolled-up counts already, under the type it had (none).
                if state.as_deref() == Some("cancelled") {
                    tx.exec_drop(
                        "UPDATE tasks SET queue = ?, payload = ?, max_attempts = ?, \
                         timeout_s = ? WHERE task_id = ? AND payload IS NULL",
                        (queue, t.payload, t.max_attempts, t.timeout_s, t.task_id),
                    )?;
                }
                Accepted::Exists {
                    state: state.unwrap_or_else(|| "NULL".into()),
                }
            }
            None => Accepted::Exists {
                state: "deleted".into(),
            },
        })
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

//! The fleet as MySQL sees it: one row per GPU slot (the fleet-wide claim), operators' drains,
//! and each instance's heartbeat, by which the others tell a dead instance from a live one and
//! take back the work it held.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{params, TxOpts};

use super::{Store, StoreError};

/// One held slot row, as read at start to rebuild the in-memory matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSlot {
    pub gpu_id: String,
    pub slot_index: usize,
    pub task_id: String,
    pub attempt: u32,
}

impl Store {
    /// Makes sure a slot row exists for every configured GPU slot.
    pub fn ensure_slots(&self, gpus: &[(String, usize)]) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(&str, usize)> = gpus
            .iter()
            .flat_map(|(id, n)| (0..*n).map(move |i| (id.as_str(), i)))
            .collect();
        c.exec_batch(
            "INSERT IGNORE INTO gpu_slots (gpu_id, slot_index) VALUES (?, ?)",
            rows.iter().map(|(g, i)| (g, i)),
        )?;
        Ok(())
    }

    /// Every slot row that holds a task.
    pub fn held_slots(&self) -> Result<Vec<HeldSlot>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(String, u32, String, Option<u32>)> = c.query(
            "SELECT gpu_id, slot_index, task_id, attempt FROM gpu_slots WHERE task_id IS NOT NULL",
        )?;
        Ok(rows
            .into_iter()
            .map(|(gpu_id, slot, task_id, attempt)| HeldSlot {
                gpu_id,
                slot_index: slot as usize,
                task_id,
                attempt: attempt.unwrap_or(0),
            })
            .collect())
    }

    /// The GPUs an operator drained (fleet-wide, across restarts).
    pub(crate) fn drained(&self) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn()?;
        Ok(c.query("SELECT gpu_id FROM gpu_state WHERE drained = 1")?)
    }

    /// Drains or undrains a GPU, recording who did it.
    pub fn set_drained(&self, gpu_id: &str, drained: bool, by: &str) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "INSERT INTO gpu_state (gpu_id, drained, updated_at, updated_by) \
             VALUES (:gpu, :d, NOW(3), :by) \
             ON DUPLICATE KEY UPDATE drained = :d, updated_at = NOW(3), updated_by = :by",
            params! { "gpu" => gpu_id, "d" => drained, by },
        )?;
        Ok(())
    }

    /// Records that this instance is alive.
    pub(crate) fn heartbeat(&self) -> Result<(), StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "INSERT INTO instances (instance_id, started_at, heartbeat_at) \
             VALUES (?, NOW(3), NOW(3)) ON DUPLICATE KEY UPDATE heartbeat_at = NOW(3)",
            (&self.instance,),
        )?;
        Ok(())
    }

    /// How many other instances heartbeated within `dead_after`: slot events are published to
    /// peers only while there is one.
    pub(crate) fn live_peers(&self, dead_after: Duration) -> Result<u64, StoreError> {
        let mut c = self.conn()?;
        let n: Option<u64> = c.exec_first(
            "SELECT COUNT(*) FROM instances WHERE instance_id <> ? \
             AND heartbeat_at >= NOW(3) - INTERVAL ? MICROSECOND",
            (&self.instance, dead_after.as_micros() as u64),
        )?;
        Ok(n.unwrap_or(0))
    }

    /// Other instances whose heartbeat is older than `dead_after`: the work they held is to be
    /// given back to the fleet, and then they are retired ([`Store::retire_instance`]).
    pub(crate) fn dead_instances(&self, dead_after: Duration) -> Result<Vec<String>, StoreError> {
        let mut c = self.conn()?;
        Ok(c.exec(
            "SELECT instance_id FROM instances WHERE instance_id <> ? \
             AND heartbeat_at < NOW(3) - INTERVAL ? MICROSECOND",
            (&self.instance, dead_after.as_micros() as u64),
        )?)
    }

    /// Forgets a dead instance once its work is recovered, so it is not looked at every few seconds
    /// for ever. Conditional on its heartbeat still being old: one that came back keeps its row.
    /// (Its attempts still `processing` are expired by whoever sees their lease end: a holder
    /// with no row counts as dead.)
    pub(crate) fn retire_instance(
        &self,
        dead: &str,
        dead_after: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        c.exec_drop(
            "DELETE FROM instances WHERE instance_id = ? \
             AND heartbeat_at < NOW(3) - INTERVAL ? MICROSECOND",
            (dead, dead_after.as_micros() as u64),
        )?;
        Ok(c.affected_rows() == 1)
    }

    /// Takes the `pending` tasks a dead instance held: they become held by nobody, and their
    /// queue and message are returned (oldest first) for the caller to push back. Conditional on
    /// the holder, so two instances recovering the same one cannot both take a task.
    pub(crate) fn release_instance_pending(
        &self,
        dead: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut c = self.conn()?;
        let mut tx = c.start_transaction(TxOpts::default())?;
        let rows: Vec<(String, Option<String>, Option<String>)> = tx.exec(
            "SELECT task_id, queue, payload FROM tasks WHERE state = 'pending' \
             AND instance_id = ? ORDER BY created_at, task_id FOR UPDATE",
            (dead,),
        )?;
        tx.exec_drop(
            "UPDATE tasks SET instance_id = NULL WHERE state = 'pending' AND instance_id = ?",
            (dead,),
        )?;
        tx.commit()?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, q, p)| Some((id, q?, p?)))
            .collect())
    }
}

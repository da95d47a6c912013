//! What the pools know about work, in MySQL: each GPU's learned speed (so a restart or a peer
//! starts from what was learned, not from nothing), the sizes of the `pending` rows (part of a
//! pool's backlog), and each pool's backlog and time to drain as an instance last saw them (for
//! `qsys-push --wait`, which reads MySQL and no instance's listener).

use std::collections::HashMap;

use mysql::prelude::Queryable;

use super::pending::POOL_BUSY;
use super::{placeholders, Store, StoreError};

/// The `pending` rows of one type that are waiting to run: not a delayed task before its time,
/// nor a paused type's (a busy pool's are counted: they wait for room, not for a time).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PendingWork {
    pub kind: String,
    pub tasks: u64,
    /// Of which of known size, and the sum of those sizes.
    pub sized: u64,
    pub size: f64,
}

/// A pool's numbers, as an instance publishes them for `qsys-push --wait`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolStat {
    pub pool: String,
    pub backlog_cost: f64,
    pub capacity: Option<f64>,
    pub drain_s: Option<f64>,
    /// Its task types as a JSON array (a type name may hold any character but a control one),
    /// by which `qsys-push` finds the pools of its tasks.
    pub types: String,
}

impl Store {
    /// Writes learned speeds: (GPU, speed, attempts measured).
    pub(crate) fn save_speeds(&self, speeds: &[(String, f64, u64)]) -> Result<(), StoreError> {
        if speeds.is_empty() {
            return Ok(());
        }
        let mut c = self.conn()?;
        let params: Vec<mysql::Value> = speeds
            .iter()
            .flat_map(|(g, s, n)| [g.as_str().into(), (*s).into(), (*n).into()])
            .collect();
        c.exec_drop(
            format!(
                "INSERT INTO gpu_speeds (gpu_id, speed, samples, updated_at) VALUES {} \
                 ON DUPLICATE KEY UPDATE speed = VALUES(speed), samples = VALUES(samples), \
                 updated_at = VALUES(updated_at)",
                placeholders(speeds.len(), "(?, ?, ?, NOW(3))")
            ),
            params,
        )?;
        Ok(())
    }

    /// Every GPU's persisted speed.
    pub(crate) fn speeds(&self) -> Result<HashMap<String, f64>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(String, f64)> = c.query("SELECT gpu_id, speed FROM gpu_speeds")?;
        Ok(rows.into_iter().collect())
    }

    /// The waiting `pending` rows by type, with their sizes (a busy pool's let-go rows counted).
    /// Read through `idx_tasks_due`, whose entries say a row's due time: a delayed task before
    /// its time or a paused type's row is passed over in the index, and only the rows counted
    /// are read for their size (the hands, a busy pool's overflow).
    pub(crate) fn pending_work(&self) -> Result<Vec<PendingWork>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(Option<String>, u64, u64, Option<f64>)> = c.exec(
            "SELECT type, COUNT(*), COUNT(cost), SUM(cost) FROM tasks FORCE INDEX (idx_tasks_due) \
             WHERE state = 'pending' AND (not_before IS NULL OR not_before <= NOW(3) \
             OR not_before = ?) GROUP BY type",
            (POOL_BUSY,),
        )?;
        Ok(rows
            .into_iter()
            .filter_map(|(kind, tasks, sized, size)| {
                Some(PendingWork {
                    kind: kind?,
                    tasks,
                    sized,
                    size: size.unwrap_or(0.0),
                })
            })
            .collect())
    }

    /// Publishes each pool's numbers.
    pub(crate) fn save_pool_stats(&self, pools: &[PoolStat]) -> Result<(), StoreError> {
        if pools.is_empty() {
            return Ok(());
        }
        let mut c = self.conn()?;
        let params: Vec<mysql::Value> = pools
            .iter()
            .flat_map(|p| {
                [
                    p.pool.as_str().into(),
                    p.backlog_cost.into(),
                    p.capacity.into(),
                    p.drain_s.into(),
                    p.types.as_str().into(),
                ]
            })
            .collect();
        c.exec_drop(
            format!(
                "INSERT INTO pool_stats (pool, backlog_cost, capacity, drain_s, types, updated_at) \
                 VALUES {} ON DUPLICATE KEY UPDATE backlog_cost = VALUES(backlog_cost), \
                 capacity = VALUES(capacity), drain_s = VALUES(drain_s), types = VALUES(types), \
                 updated_at = VALUES(updated_at)",
                placeholders(pools.len(), "(?, ?, ?, ?, ?, NOW(3))")
            ),
            params,
        )?;
        Ok(())
    }
}

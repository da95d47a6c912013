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
    /// Rows a busy pool let go (counted, their sizes not read).
    pub let_go: bool,
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

    /// The waiting `pending` rows by type, with their sizes: the rows instances hold (their
    /// hands, bounded) and those held by nobody that are due, read for their sizes; and the rows
    /// a busy pool let go, counted from `idx_tasks_due` alone, their sizes unknown (they may be
    /// a whole backlog, not worth a row read each second). A delayed task before its time and a
    /// paused type's row lie outside both ranges.
    pub(crate) fn pending_work(&self) -> Result<Vec<PendingWork>, StoreError> {
        let mut c = self.conn()?;
        // Two ranges of the index, not one scan of every pending entry.
        let sized: Vec<(Option<String>, u64, u64, Option<f64>)> = c.query(
            "SELECT type, COUNT(*), COUNT(cost), SUM(cost) FROM (\
             (SELECT type, cost FROM tasks FORCE INDEX (idx_tasks_due) \
              WHERE state = 'pending' AND instance_id IS NOT NULL) \
             UNION ALL (SELECT type, cost FROM tasks FORCE INDEX (idx_tasks_due) \
              WHERE state = 'pending' AND instance_id IS NULL \
              AND (not_before IS NULL OR not_before <= NOW(3)))) AS w GROUP BY type",
        )?;
        let waiting: Vec<(Option<String>, u64)> = c.exec(
            "SELECT type, COUNT(*) FROM tasks FORCE INDEX (idx_tasks_due) \
             WHERE state = 'pending' AND instance_id IS NULL AND not_before = ? GROUP BY type",
            (POOL_BUSY,),
        )?;
        let sized = sized.into_iter().map(|(k, n, s, z)| (k, n, s, z, false));
        let let_go = waiting.into_iter().map(|(k, n)| (k, n, 0, None, true));
        Ok(sized
            .chain(let_go)
            .filter_map(|(kind, tasks, sized, size, let_go)| {
                Some(PendingWork {
                    kind: kind?,
                    tasks,
                    sized,
                    size: size.unwrap_or(0.0),
                    let_go,
                })
            })
            .collect())
    }

    /// The mean size of the rows a busy pool let go, by type (of those of known size; `None`:
    /// none is): read now and then, for [`Store::pending_work`]'s counts of them.
    pub(crate) fn let_go_sizes(&self) -> Result<HashMap<String, Option<f64>>, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(Option<String>, Option<f64>)> = c.exec(
            "SELECT type, AVG(cost) FROM tasks FORCE INDEX (idx_tasks_due) WHERE state = 'pending' \
             AND instance_id IS NULL AND not_before = ? GROUP BY type",
            (POOL_BUSY,),
        )?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, mean)| Some((k?, mean)))
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

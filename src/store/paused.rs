//! Paused queues and task types (issue 17), persisted so that every instance honours them
//! within a second (the maintenance thread reads them each second, like drains) and a restart
//! keeps them.

use std::collections::BTreeSet;

use mysql::prelude::Queryable;

use super::{Store, StoreError};

/// What is paused now.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Paused {
    /// Queues not taken from: their tasks stay in Redis.
    pub queues: BTreeSet<String>,
    /// Types whose tasks wait in MySQL, held by no instance, without a slot or a worker.
    pub types: BTreeSet<String>,
}

/// What a pause names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKind {
    Queue,
    Type,
}

impl PauseKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PauseKind::Queue => "queue",
            PauseKind::Type => "type",
        }
    }
}

impl Store {
    /// Pauses (`paused`) or resumes the queue or type `name`, recording who did it. True when
    /// that changed anything.
    pub fn set_paused(
        &self,
        kind: PauseKind,
        name: &str,
        paused: bool,
        by: &str,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn()?;
        if paused {
            c.exec_drop(
                "INSERT INTO paused (kind, name, paused_at, paused_by) VALUES (?, ?, NOW(3), ?) \
                 ON DUPLICATE KEY UPDATE kind = kind",
                (kind.as_str(), name, by),
            )?;
        } else {
            c.exec_drop(
                "DELETE FROM paused WHERE kind = ? AND name = ?",
                (kind.as_str(), name),
            )?;
            let changed = c.affected_rows() > 0;
            // The tasks a pause let go are due now: every instance's next look takes them up.
            if kind == PauseKind::Type {
                c.exec_drop(
                    "UPDATE tasks FORCE INDEX (idx_tasks_due) SET not_before = NOW(3) \
                     WHERE state = 'pending' AND instance_id IS NULL AND not_before = ? \
                     AND type = ?",
                    (super::pending::PAUSED, name),
                )?;
            }
            return Ok(changed);
        }
        Ok(c.affected_rows() > 0)
    }

    /// Every paused queue and type.
    pub fn paused(&self) -> Result<Paused, StoreError> {
        let mut c = self.conn()?;
        let rows: Vec<(String, String)> = c.query("SELECT kind, name FROM paused")?;
        let mut out = Paused::default();
        for (kind, name) in rows {
            match kind.as_str() {
                "queue" => out.queues.insert(name),
                "type" => out.types.insert(name),
                _ => false,
            };
        }
        Ok(out)
    }
}

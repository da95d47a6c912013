//! What every daemon thread shares: the validated config, the store, the slot matrix, the callback
//! signer, the stop flags and the scheduler's wake-up channel.
//!
//! [`Shared::finish`] is the one place an attempt ends, whoever learned of it (the callback server,
//! a dispatch worker in `response` mode or after an error, a handler worker): MySQL first, then the
//! in-memory slot, then a wake-up so the scheduler can hand the freed slot to the next task.

use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crossbeam_channel::Sender;

use crate::config::Config;
use crate::message::Message;
use crate::shutdown::Shutdown;
use crate::slots::SlotMatrix;
use crate::store::{Finish, State, Store, StoreError};
use crate::token::Signer;

/// A task in memory, between the poller and a worker.
#[derive(Debug, Clone)]
pub struct Task {
    pub msg: Message,
    pub queue: String,
    /// Attempts already used (0 for a new task).
    pub attempts: u32,
    pub taken_at: Instant,
}

/// Tells the scheduler something may have become possible (a slot or a worker freed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Wake,
}

pub struct Shared {
    pub config: Config,
    pub store: Store,
    pub slots: Mutex<SlotMatrix>,
    pub signer: Signer,
    pub stop: Shutdown,
    pub events: Sender<Event>,
    /// Process groups of running `exec` handlers, killed if the grace period runs out.
    pub children: Mutex<HashSet<i32>>,
}

impl Shared {
    /// The slot matrix. A panic while it was held takes the daemon down anyway (the supervisor sees
    /// the thread die), so a poisoned lock is still usable for an orderly stop.
    pub fn slots(&self) -> MutexGuard<'_, SlotMatrix> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn wake_scheduler(&self) {
        // The scheduler is gone only during shutdown, when nobody needs waking.
        let _ = self.events.send(Event::Wake);
    }

    /// Ends attempt `attempt` of `task_id` as `status` and frees what it held.
    pub fn finish(
        &self,
        task_id: &str,
        attempt: u32,
        status: State,
        error: Option<&str>,
        source: &str,
    ) -> Result<Finish, StoreError> {
        let out = self.store.finish(task_id, attempt, status, error)?;
        match &out {
            Finish::Applied { slot } => {
                if let Some((gpu, index)) = slot {
                    self.slots().release(gpu, *index, task_id);
                }
                let gpu = slot.as_ref().map(|(g, _)| g.as_str()).unwrap_or("");
                match status {
                    State::Finished => log::info!(
                        task_id, attempt, gpu, source; "task finished"
                    ),
                    _ => log::warn!(
                        task_id, attempt, gpu, source, error = error.unwrap_or(""); "task failed"
                    ),
                }
                self.wake_scheduler();
            }
            other => log::info!(
                task_id, attempt, source, status = status.as_str(), outcome:? = other;
                "completion not applied"
            ),
        }
        Ok(out)
    }

    pub fn kill_children(&self) {
        let groups: Vec<i32> = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        for pgid in groups {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

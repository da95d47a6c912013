//! The slot event (docs/contracts.md): what one instance publishes on Redis pub/sub when it
//! claims or frees a GPU slot, so that its peers' mirrors follow without a MySQL read. A peer's
//! event is checked before it is applied ([`crate::sched::slotsync`]).

use serde::{Deserialize, Serialize};

/// One claim or release, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SlotEvent {
    pub(crate) instance: String,
    pub(crate) claimed: bool,
    pub(crate) gpu: String,
    pub(crate) slot: usize,
    pub(crate) task_id: String,
    pub(crate) attempt: u32,
}

//! Placement: the scheduler thread and the threads that keep the slot mirror in step with the
//! other instances.

pub(crate) mod scheduler;
pub(crate) mod slotsync;

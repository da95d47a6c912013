//! The producer side (`qsys-push` and its Lambda runtime): events, pushing, following.

pub(crate) mod events;
pub(crate) mod follow;
pub mod lambda;
pub mod push;

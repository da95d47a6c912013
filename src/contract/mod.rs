//! The contracts qsysd shares with its producers, GPU endpoints and peer instances
//! (docs/contracts.md): what may arrive, what is sent, and the limits on both, each written once.

pub(crate) mod limits;
pub(crate) mod message;
pub(crate) mod names;
pub(crate) mod report;
pub(crate) mod slot_event;
pub(crate) mod time;
pub(crate) mod token;

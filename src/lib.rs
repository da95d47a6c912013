//! qsysd: a synchronous, threaded task-queue daemon. Tasks come from Redis lists, every task is
//! recorded in MySQL, transcription tasks run on a fleet of GPU HTTP endpoints with a fixed number
//! of slots each, other task types run through configured handlers, and completion arrives through
//! an authenticated HTTP callback.
//!
//! The binaries (`qsysd`, `qsys-push`) only parse arguments and call into this library. Thread map:
//!
//! | thread            | module          | talks through                                  |
//! |-------------------|-----------------|------------------------------------------------|
//! | `qsys-signal`     | [`daemon`]      | [`shutdown::Shutdown`]                         |
//! | `qsys-poller`     | [`queue`]       | Redis → MySQL (a batch per transaction) → scheduler |
//! | `qsys-scheduler`  | [`scheduler`]   | slot matrix ([`slots`]), MySQL (a round's claims per transaction), worker channels |
//! | `qsys-dispatch-N` | [`dispatch`]    | GPU endpoints over HTTP, [`shared::Shared::end_attempt`] |
//! | `qsys-handler-N`  | [`handlers`]    | exec / HTTP handlers, [`shared::Shared::end_attempt`] |
//! | `qsys-callback-N` | [`callback`]    | `tiny_http`: parse and verify, then the writer  |
//! | `qsys-callback-writer` | [`callback`] | [`shared::Shared::end_attempts`], every waiting callback per transaction |
//! | `qsys-maintenance`| [`maintenance`] | leases, GPU health probes, failover, drains     |
//! | `qsys-heartbeat`  | [`maintenance`] | this instance's heartbeat row, alone on its thread |
//! | `qsys-admin`      | [`admin`]       | `/metrics`, `/status`, `/tasks/<id>`, actions   |
//! | `qsys-slotpub/sub`| [`slotsync`]    | slot claims and frees between instances (Redis) |
//! | main              | [`daemon`]      | joins every thread                              |

/// A named place where a test may pause this instance's thread: `pause_point!(instance, "name")`.
/// Without the `test-utils` feature (every build but this crate's tests) it is nothing.
#[macro_export]
macro_rules! pause_point {
    ($instance:expr, $point:expr) => {
        #[cfg(feature = "test-utils")]
        $crate::testing::reached($instance, $point);
    };
}

pub mod admin;
pub mod backoff;
pub mod callback;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod events;
pub mod follow;
pub mod handlers;
pub mod http;
pub mod lambda;
pub mod listener;
pub mod logging;
pub mod maintenance;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod ops;
pub mod push;
pub mod queue;
pub mod scheduler;
pub mod shared;
pub mod shutdown;
pub mod slots;
pub mod slotsync;
pub mod store;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod token;

//! qsysd: a synchronous, threaded task-queue daemon. Tasks come from Redis lists, every task is
//! recorded in MySQL, transcription tasks run on a fleet of GPU HTTP endpoints with a fixed number
//! of slots each, other task types run through configured handlers, and completion arrives through
//! an authenticated HTTP callback.
//!
//! The binaries (`qsysd`, `qsys-push`) only parse arguments and call into this library, whose
//! modules are private behind the short list of `pub use` below. ARCHITECTURE.md has the map of
//! modules and threads and the invariants; docs/contracts.md what users and integrators rely on.
//! The tree, by role:
//!
//! | module     | holds                                                                     |
//! |------------|---------------------------------------------------------------------------|
//! | `contract` | the rules written once: queue message, callback report, token, slot event, names, limits |
//! | `config`   | the file and the seed's variables, validated into typed values, one function per section |
//! | `store`    | MySQL: schema, intake, claims, endings, fleet rows, records               |
//! | `fleet`    | the slot matrix (MySQL's mirror), GPU health, the placement policy (pure) |
//! | `shared`   | what every thread shares, the one place an attempt ends, stop flags      |
//! | `sched`    | `qsys-scheduler`; `qsys-slotpub`/`qsys-slotsub` (slot events between instances) |
//! | `work`     | `qsys-poller`, `qsys-dispatch-N`, `qsys-handler-N`, `qsys-callback-N` and its writer, `qsys-maintenance`/`qsys-heartbeat` |
//! | `admin`    | `qsys-admin`: routes, auth, status, metrics exposition, dashboard; the operator's commands |
//! | `daemon`   | build the pieces, then start the threads; signals, supervision, reload, systemd notify |
//! | `producer` | `qsys-push`: events, push, `--wait`, the Lambda runtime                   |
//! | `net`      | the HTTP client, the listeners' limits, the Redis connector, backoff      |
//! | `obs`      | the log sink, metrics, the trouble kinds                                  |
//! | `secret`   | secret strings, never printed                                             |
//! | `sync`     | the poison-tolerant lock helpers                                          |

#![deny(unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]

/// A named place where a test may pause this instance's thread: `pause_point!(instance, "name")`.
/// Without the `test-utils` feature (every build but this crate's tests) it is nothing.
#[macro_export]
macro_rules! pause_point {
    ($instance:expr, $point:expr) => {
        #[cfg(feature = "test-utils")]
        $crate::testing::reached($instance, $point);
        // Without the feature the instance is still named, so what names it is not dead code.
        #[cfg(not(feature = "test-utils"))]
        let _ = $instance;
    };
}

/// Counts a [`obs::trouble::Trouble`] and logs it at `level` with the error and any further
/// key-values, from the caller's module (so the log line names the component):
/// `trouble!(warn, shared, Trouble::Mysql, e; "mysql error claiming slots", count = n)`.
macro_rules! trouble {
    ($level:ident, $shared:expr, $kind:expr, $error:expr; $msg:literal $(, $($kv:tt)+)?) => {{
        let error = &$error;
        $shared.count($kind);
        log::$level!(error:% = error $(, $($kv)+)?; $msg);
    }};
}

/// [`trouble!`] from the thread that judges a dependency's health: also raises it as a
/// `/healthz` problem (and pauses what needs it) until `Shared::cleared`.
macro_rules! outage {
    ($level:ident, $shared:expr, $kind:expr, $error:expr; $msg:literal $(, $($kv:tt)+)?) => {{
        let error = &$error;
        $shared.raise($kind, error);
        log::$level!(error:% = error $(, $($kv)+)?; $msg);
    }};
}

mod admin;
mod config;
mod contract;
mod daemon;
mod fleet;
mod net;
mod obs;
mod producer;
mod sched;
mod secret;
mod shared;
mod store;
mod sync;
#[cfg(feature = "test-utils")]
pub mod testing;
mod work;

// What the binaries and the tests use; everything else is `pub(crate)`.

/// The operator's commands (`qsysd status`, `drain`, `requeue`, `cancel`, `task`).
pub use admin::ops;
/// Configuration: the file, the seed's environment variables, and their validation.
pub use config::{
    format_duration, parse_duration, process_env, producer_env, Completion, Config, ConfigError,
    Env, Handler, Secret, DEFAULT_PATH,
};
pub use contract::report::{parse_report, Outcome, Report};
/// The contracts' parsers and the callback signer, for the fuzz and protocol tests.
pub use contract::{message::parse as parse_message, token::Signer};
/// The daemon: build, start, stop, reload, wait.
pub use daemon::Daemon;
pub use fleet::GpuView;
pub use fleet::Health;
pub use net::backoff::RetryDelay;
/// The outgoing HTTP client (tests talk to both listeners with it).
pub use net::http;
/// The log sink.
pub use obs::logging;
/// The producer (`qsys-push`) and its Lambda runtime.
pub use producer::{lambda, push};
/// Batch sizes the pipeline tests compute bounds from.
pub use sched::scheduler::PREFETCH;
/// The MySQL store, for the schema tests.
pub use store::{
    Accepted, Cancel, Claim, ClaimRequest, EndRequest, Ended, Ending, Finish, HandOver, NewTask,
    Next, PauseKind, Paused, Retention, State, Store, StoreError, SCHEMA_VERSION,
};
pub use work::poller::TAKE_BATCH;

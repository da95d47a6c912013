//! The handler pool (`qsys-handler-N`): runs the task types that are not GPU work (email, reports,
//! cleanup) through their configured handler, never taking a GPU slot.
//!
//! - `exec`: the program gets the task JSON on stdin and `QSYS_TASK_ID` / `QSYS_TASK_TYPE` in an
//!   environment of its own (`PATH`, `LANG`, `LC_ALL` and the type's `env` list of the daemon's, no
//!   more: the daemon's secrets stay out), runs in its own process group, and is killed with the
//!   whole group at its timeout. Exit 0 = finished; otherwise the tail of its stderr becomes the
//!   task's error. Its pipes are serviced on the worker's thread without blocking and closed when
//!   the run ends, so a descendant that keeps them open holds neither a thread nor the worker.
//! - `http`: the task JSON is POSTed to the configured URL; 2xx = finished.
//!
//! A cancel ([`crate::work::cancel`]) kills an `exec` program's process group within a tick of
//! its loop; an `http` handler's request is abandoned (its attempt ended at once, its answer,
//! when it comes, changes nothing).
//!
//! Each worker takes a task from the scheduler's rendezvous channel, moves it to `processing`, runs
//! it, records the end through [`crate::shared::Shared::end_attempt_patiently`] and wakes the scheduler, which may then hand it the
//! next one.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use serde_json::{json, Value};

mod exec;
mod http;

use crate::config::Handler;
use crate::obs::trouble::Trouble;
use crate::shared::{Shared, Task};
use crate::store::Ending;
use exec::run_exec;
use http::run_http;

/// How much of an `exec` handler's stderr is kept as the error.
pub(super) const STDERR_TAIL: usize = 2048;

/// The JSON a handler receives: the seed's message plus the id and the attempt number.
pub(crate) fn task_json(task: &Task, attempt: u32) -> String {
    json!({
        "task_id": task.msg.task_id,
        "type": task.msg.kind,
        "data": Value::Object(task.msg.data.clone()),
        "attempt": attempt,
    })
    .to_string()
}

/// Keeps the last `max` bytes of `bytes`, lossily decoded and trimmed.
pub(super) fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Why a handler run failed, and whether another attempt may do better.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub error: String,
    pub retryable: bool,
}

pub(super) fn retryable(error: String) -> Failure {
    Failure {
        error,
        retryable: true,
    }
}

pub(crate) fn run_worker(shared: Arc<Shared>, jobs: Receiver<Task>) {
    let agent = crate::net::http::agent();
    while let Ok(task) = jobs.recv() {
        run_one(&shared, &agent, &task);
        shared.wake_scheduler();
    }
}

fn run_one(shared: &Shared, agent: &ureq::Agent, task: &Task) {
    let task_id = task.msg.task_id.as_str();
    crate::pause_point!(shared.store.instance(), "handler:received");
    // The scheduler sends configured non-GPU types here; a reload may have changed the type
    // since. Its row is still `pending` and held here: back to the scheduler, which places it
    // under the configuration now in force.
    let config = shared.config();
    let handler = config.types.get(&task.msg.kind);
    let configured = match handler {
        Some(Handler::Exec { timeout, .. } | Handler::Http { timeout, .. }) => *timeout,
        Some(Handler::Gpu { .. }) | None => {
            log::info!(task_id; "task type changed by a reload; placed again");
            shared.retry_later(task_id, Duration::ZERO);
            return;
        }
    };
    let timeout = task
        .msg
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(configured);
    let attempt = task.attempts + 1;
    // The worker's own timeout ends the run; the lease only matters if this process dies.
    let lease = timeout + LEASE_MARGIN;
    match shared
        .store
        .start_handler_attempt(task_id, task.attempts, lease)
    {
        Ok(true) => {}
        Ok(false) => {
            log::info!(task_id; "task no longer pending; not run");
            return;
        }
        Err(e) => {
            // The row is `pending` (or, if only the reply was lost, `processing` under a lease):
            // the scheduler reads it again and places it, or finds it no longer pending.
            log::error!(task_id, error:% = e; "mysql error starting handler; placed again in 1s");
            shared.retry_later(task_id, Duration::from_secs(1));
            return;
        }
    }
    log::info!(task_id, kind = task.msg.kind.as_str(), attempt, queue = task.queue.as_str();
        "handler started");
    shared.first_dispatch(&task.msg, attempt);
    let input = task_json(task, attempt);
    let result = match handler {
        Some(Handler::Exec { command, env, .. }) => {
            run_exec(shared, command, env, task, &input, timeout)
        }
        Some(Handler::Http {
            url, bearer_token, ..
        }) => run_http(agent, url, bearer_token.as_ref(), &input, timeout),
        Some(Handler::Gpu { .. }) | None => unreachable!("the handler was matched above"),
    };
    if result.is_err() {
        shared.count(Trouble::Handler);
    }
    let ending = match &result {
        Ok(()) => Ending::Finished { result: None },
        Err(f) => Ending::Failed {
            error: &f.error,
            retryable: f.retryable,
        },
    };
    shared.end_attempt_patiently(task_id, attempt, ending, "handler", PATIENCE);
}

/// What a handler's lease adds to its timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How long a handler worker keeps trying to record an outcome through a MySQL outage.
const PATIENCE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail(b"  abc\n", 10), "abc");
        assert_eq!(tail(b"0123456789", 4), "6789");
    }
}

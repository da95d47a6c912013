//! The callback writer (`qsys-callback-writer`): ends the attempts of every verified callback
//! waiting in one transaction, then answers each by its typed result.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::json;

use super::{Answer, Verified};
use crate::contract::report::Report;
use crate::net::server::reply;
use crate::obs::trouble::Trouble;
use crate::shared::Shared;
use crate::store::{Ending, Finish, StoreError};

/// Most callbacks one writer transaction takes.
const WRITE_BATCH: usize = 256;

/// The callback writer (`qsys-callback-writer`): ends every verified callback waiting, up to
/// [`WRITE_BATCH`], in one MySQL transaction, and only then answers each (a 200 means recorded).
/// One commit for many callbacks is what lets completions keep up with a busy fleet: one transaction
/// per callback made MariaDB's CPU the ceiling (BENCHMARKS.md). Runs until every callback thread is
/// gone, so nothing received is left unanswered.
pub(crate) fn run_writer(shared: Arc<Shared>, verified: Receiver<Verified>) {
    loop {
        shared.tick("qsys-callback-writer");
        let first = match verified.recv_timeout(Duration::from_millis(200)) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let batch: Vec<Verified> = std::iter::once(first)
            .chain(verified.try_iter().take(WRITE_BATCH - 1))
            .collect();
        let ends: Vec<(&str, u32, Ending<'_>)> = batch
            .iter()
            .map(|v| (v.report.task_id.as_str(), v.attempt, v.ending()))
            .collect();
        let result = shared.end_attempts(&ends, "callback");
        if let Err(e) = &result {
            shared.raise(Trouble::Mysql, e);
        }
        drop(ends);
        for (i, v) in batch.into_iter().enumerate() {
            let (status, body, label) =
                answer(&v.report, v.attempt, result.as_ref().map(|out| &out[i]));
            shared.metrics.callbacks.inc(label);
            reply(v.req, status, &body);
        }
    }
    log::debug!("callback writer stopped");
}

/// The answer to a verified callback, given what ending its attempt did (docs/contracts.md §5 reply codes).
fn answer(report: &Report, attempt: u32, result: Result<&Finish, &StoreError>) -> Answer {
    let task_id = report.task_id.as_str();
    match result {
        Ok(Finish::Applied { .. }) => (
            200,
            json!({ "task_id": task_id, "state": report.status.as_str() }),
            "applied",
        ),
        Ok(Finish::Duplicate) => (
            200,
            json!({ "task_id": task_id, "state": report.status.as_str(), "duplicate": true }),
            "duplicate",
        ),
        Ok(Finish::Unknown) => (
            404,
            json!({ "error": "unknown task", "task_id": task_id }),
            "unknown",
        ),
        Ok(Finish::Stale { current }) => (
            409,
            json!({ "error": "stale attempt", "task_id": task_id, "attempt": attempt,
                    "current_attempt": current }),
            "stale",
        ),
        Ok(Finish::Conflict { state }) => (
            409,
            json!({ "error": "task is not awaiting this result", "task_id": task_id,
                    "state": state }),
            "conflict",
        ),
        Err(e) => {
            log::error!(task_id, error:% = e; "callback could not be recorded");
            (
                503,
                json!({ "error": "database unavailable, retry later" }),
                "unavailable",
            )
        }
    }
}

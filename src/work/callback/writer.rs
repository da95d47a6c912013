//! The callback writer (`qsys-callback-writer`): ends the attempts of every verified callback
//! waiting in one transaction, then answers each by its typed result.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::json;

use super::{Answer, Verified};
use crate::contract::report::{Outcome, Report};
use crate::net::server::reply;
use crate::obs::trouble::Trouble;
use crate::shared::Shared;
use crate::store::{Ending, Finish, StoreError};

/// Most callbacks one writer transaction takes.
const WRITE_BATCH: usize = 256;

/// How the writer ends attempts: [`Shared::end_attempts`] (MySQL first, then the slots, the
/// metrics and the scheduler) in production; a trait so the writer's batching and answers are
/// unit-tested with an in-memory model (below).
pub(crate) trait Endings {
    /// Ends each `(task_id, attempt, ending)` in one transaction; the results in that order.
    fn end_attempts(
        &self,
        ends: &[(&str, u32, Ending<'_>)],
        source: &str,
    ) -> Result<Vec<Finish>, StoreError>;

    /// The transaction failed: counted (the heartbeat judges whether MySQL is out).
    fn failed(&self);
}

impl Endings for Shared {
    fn end_attempts(
        &self,
        ends: &[(&str, u32, Ending<'_>)],
        source: &str,
    ) -> Result<Vec<Finish>, StoreError> {
        Shared::end_attempts(self, ends, source)
    }

    fn failed(&self) {
        self.count(Trouble::Mysql);
    }
}

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
        let reports: Vec<(&Report, u32)> = batch.iter().map(|v| (&v.report, v.attempt)).collect();
        let answers = write_batch(&*shared, &reports);
        drop(reports);
        for (v, (status, body, label)) in batch.into_iter().zip(answers) {
            shared.metrics.callbacks.inc(label);
            reply(v.req, status, &body);
        }
    }
    log::debug!("callback writer stopped");
}

/// Ends the attempts of a batch of verified callbacks in one transaction and answers each, in the
/// batch's order: every one by its own result, or all 503 when the transaction failed.
fn write_batch(ender: &impl Endings, batch: &[(&Report, u32)]) -> Vec<Answer> {
    let ends: Vec<(&str, u32, Ending<'_>)> = batch
        .iter()
        .map(|&(report, attempt)| (report.task_id.as_str(), attempt, ending(report)))
        .collect();
    let result = ender.end_attempts(&ends, "callback");
    if result.is_err() {
        ender.failed();
    }
    batch
        .iter()
        .enumerate()
        .map(|(i, &(report, attempt))| answer(report, attempt, result.as_ref().map(|out| &out[i])))
        .collect()
}

/// What a report ends its attempt with. A GPU that reports `failed` has judged the task itself:
/// final, not retried.
fn ending(report: &Report) -> Ending<'_> {
    match report.status {
        Outcome::Finished => Ending::Finished,
        Outcome::Failed => Ending::Failed {
            error: report
                .error
                .as_deref()
                .unwrap_or("reported failed by the gpu"),
            retryable: false,
        },
    }
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;
    use crate::store::{Next, State};

    /// The endings contract in memory: task id -> (current attempt, terminal outcome if ended).
    #[derive(Default)]
    struct MemEndings {
        tasks: RefCell<HashMap<String, (u32, Option<bool>)>>,
        transactions: RefCell<usize>,
        outages: RefCell<usize>,
        down: bool,
    }

    impl Endings for MemEndings {
        fn end_attempts(
            &self,
            ends: &[(&str, u32, Ending<'_>)],
            _source: &str,
        ) -> Result<Vec<Finish>, StoreError> {
            *self.transactions.borrow_mut() += 1;
            if self.down {
                return Err(StoreError::Schema("mysql is down (test)".into()));
            }
            let mut tasks = self.tasks.borrow_mut();
            Ok(ends
                .iter()
                .map(|&(id, attempt, ending)| {
                    let finished = ending == Ending::Finished;
                    match tasks.get_mut(id) {
                        None => Finish::Unknown,
                        Some((current, _)) if *current != attempt => {
                            Finish::Stale { current: *current }
                        }
                        Some((_, Some(done))) if *done == finished => Finish::Duplicate,
                        Some((_, Some(_))) => Finish::Conflict {
                            state: "failed".into(),
                        },
                        Some((_, end)) => {
                            *end = Some(finished);
                            let state = if finished {
                                State::Finished
                            } else {
                                State::Failed
                            };
                            Finish::Applied {
                                slot: None,
                                next: Next::Done(state),
                                age: None,
                            }
                        }
                    }
                })
                .collect())
        }

        fn failed(&self) {
            *self.outages.borrow_mut() += 1;
        }
    }

    fn report(id: &str, status: Outcome) -> Report {
        Report {
            task_id: id.into(),
            status,
            error: None,
        }
    }

    fn statuses(answers: &[Answer]) -> Vec<(u16, &'static str)> {
        answers.iter().map(|(s, _, label)| (*s, *label)).collect()
    }

    #[test]
    fn a_batch_is_one_transaction_and_each_callback_gets_its_own_answer_in_order() {
        let store = MemEndings::default();
        store.tasks.borrow_mut().extend([
            ("a".to_string(), (1, None)),
            ("b".to_string(), (2, None)),
            ("c".to_string(), (1, Some(true))),
            ("d".to_string(), (1, Some(true))),
        ]);
        let (a, b, c, d, e) = (
            report("a", Outcome::Finished),
            report("b", Outcome::Finished),
            report("c", Outcome::Finished),
            report("d", Outcome::Failed),
            report("e", Outcome::Finished),
        );
        let answers = write_batch(&store, &[(&a, 1), (&b, 1), (&c, 1), (&d, 1), (&e, 1)]);
        assert_eq!(
            statuses(&answers),
            [
                (200, "applied"),
                (409, "stale"),
                (200, "duplicate"),
                (409, "conflict"),
                (404, "unknown"),
            ]
        );
        assert_eq!(answers[0].1["state"], "finished");
        assert_eq!(answers[1].1["current_attempt"], 2);
        assert_eq!(answers[2].1["duplicate"], true);
        assert_eq!(*store.transactions.borrow(), 1);
        assert_eq!(*store.outages.borrow(), 0);
    }

    #[test]
    fn a_failed_transaction_answers_every_callback_503_and_is_raised_once() {
        let store = MemEndings {
            down: true,
            ..MemEndings::default()
        };
        let (a, b) = (report("a", Outcome::Finished), report("b", Outcome::Failed));
        let answers = write_batch(&store, &[(&a, 1), (&b, 1)]);
        assert_eq!(
            statuses(&answers),
            [(503, "unavailable"), (503, "unavailable")]
        );
        assert_eq!(*store.outages.borrow(), 1);
    }

    #[test]
    fn a_failed_report_ends_its_attempt_for_good_with_its_error() {
        let mut r = report("a", Outcome::Failed);
        assert_eq!(
            ending(&r),
            Ending::Failed {
                error: "reported failed by the gpu",
                retryable: false
            }
        );
        r.error = Some("out of memory".into());
        assert_eq!(
            ending(&r),
            Ending::Failed {
                error: "out of memory",
                retryable: false
            }
        );
        assert_eq!(ending(&report("a", Outcome::Finished)), Ending::Finished);
    }
}

//! The callback writer (`qsys-callback-writer`): ends the attempts of every verified callback
//! waiting in one transaction, records heartbeats a batch at a time, then answers each by its
//! typed result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde_json::json;

use super::{Answer, Verified};
use crate::contract::report::{Outcome, Report};
use crate::net::server::reply;
use crate::obs::trouble::Trouble;
use crate::shared::Shared;
use crate::store::{Beat, Beaten, Ending, Finish, Next, State, StoreError};

/// Most callbacks one writer transaction takes.
const WRITE_BATCH: usize = 256;
/// Most result text one ending transaction carries: well inside MySQL's default 16 MiB packet,
/// whatever `callback.max_result_bytes` is (at most 4 MiB, so a batch always takes one).
const RESULT_BUDGET: usize = 8 << 20;
/// How long a heartbeat may wait for others to share its transaction. Heartbeats are not
/// urgent, and a fleet's arrive spread out: without the wait each would be a commit of its own.
const HEARTBEAT_LINGER: Duration = Duration::from_millis(250);

/// How the writer reaches MySQL: [`Shared::end_attempts`] (MySQL first, then the slots, the
/// metrics and the scheduler) and the store's heartbeat batch in production; a trait so the
/// writer's batching and answers are unit-tested with an in-memory model (below).
pub(crate) trait Endings {
    /// Ends each `(task_id, attempt, ending)` in one transaction; the results in that order.
    fn end_attempts(
        &self,
        ends: &[(&str, u32, Ending<'_>)],
        source: &str,
    ) -> Result<Vec<Finish>, StoreError>;

    /// Records each heartbeat in one transaction; the results in that order.
    fn beat(&self, beats: &[Beat<'_>]) -> Result<Vec<Beaten>, StoreError>;

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

    fn beat(&self, beats: &[Beat<'_>]) -> Result<Vec<Beaten>, StoreError> {
        let config = self.config();
        self.store.beat(beats, |gpu| {
            config
                .gpus
                .iter()
                .find(|g| g.id == gpu)
                .and_then(|g| g.heartbeat_timeout)
        })
    }

    fn failed(&self) {
        self.count(Trouble::Mysql);
    }
}

/// The callback writer (`qsys-callback-writer`): ends every verified callback waiting, up to
/// [`WRITE_BATCH`] (and [`RESULT_BUDGET`] of results), in one MySQL transaction, and only then
/// answers each (a 200 means recorded). One commit for many callbacks is what lets completions
/// keep up with a busy fleet: one transaction per callback made MariaDB's CPU the ceiling
/// (BENCHMARKS.md). Heartbeats gather for up to [`HEARTBEAT_LINGER`] and are written together,
/// also answered once committed. Runs until every callback thread is gone, so nothing received
/// is left unanswered.
pub(crate) fn run_writer(shared: Arc<Shared>, verified: Receiver<Verified>) {
    let mut carried: Option<Verified> = None;
    let mut beats: Vec<Verified> = Vec::new();
    let mut beats_since = Instant::now();
    loop {
        shared.tick("qsys-callback-writer");
        let wait = if beats.is_empty() {
            Duration::from_millis(200)
        } else {
            HEARTBEAT_LINGER.saturating_sub(beats_since.elapsed())
        };
        let first = match carried.take() {
            Some(v) => Some(v),
            None => match verified.recv_timeout(wait) {
                Ok(v) => Some(v),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    write_beats(&shared, std::mem::take(&mut beats));
                    break;
                }
            },
        };
        let mut ends = Vec::new();
        let mut result_bytes = 0;
        for v in first.into_iter().chain(verified.try_iter()) {
            if v.report.status == Outcome::Running {
                if beats.is_empty() {
                    beats_since = Instant::now();
                }
                beats.push(v);
                if beats.len() >= WRITE_BATCH {
                    write_beats(&shared, std::mem::take(&mut beats));
                }
                continue;
            }
            let size = v.report.result.as_ref().map_or(0, String::len);
            if !ends.is_empty()
                && (ends.len() >= WRITE_BATCH || result_bytes + size > RESULT_BUDGET)
            {
                carried = Some(v);
                break;
            }
            result_bytes += size;
            ends.push(v);
        }
        if !ends.is_empty() {
            let reports: Vec<(&Report, u32)> =
                ends.iter().map(|v| (&v.report, v.attempt)).collect();
            let answers = write_batch(&*shared, &reports);
            drop(reports);
            answer_all(&shared, ends, answers, |m| &m.callbacks);
        }
        if !beats.is_empty() && beats_since.elapsed() >= HEARTBEAT_LINGER {
            write_beats(&shared, std::mem::take(&mut beats));
        }
    }
    log::debug!("callback writer stopped");
}

/// Replies to each request with its answer, counting each under its label.
fn answer_all(
    shared: &Shared,
    batch: Vec<Verified>,
    answers: Vec<Answer>,
    counter: impl Fn(&crate::obs::metrics::Metrics) -> &crate::obs::metrics::Labeled,
) {
    for (v, (status, body, label)) in batch.into_iter().zip(answers) {
        counter(&shared.metrics).inc(label);
        reply(v.req, status, &body);
    }
}

/// Records a batch of heartbeats in one transaction and answers each.
fn write_beats(shared: &Shared, batch: Vec<Verified>) {
    if batch.is_empty() {
        return;
    }
    let reports: Vec<(&Report, u32)> = batch.iter().map(|v| (&v.report, v.attempt)).collect();
    let answers = beat_batch(shared, &reports);
    drop(reports);
    answer_all(shared, batch, answers, |m| &m.heartbeats);
}

/// Records a batch of verified heartbeats in one transaction and answers each, in order: by its
/// own result, or all 503 when the transaction failed.
fn beat_batch(store: &impl Endings, batch: &[(&Report, u32)]) -> Vec<Answer> {
    let beats: Vec<Beat<'_>> = batch
        .iter()
        .map(|&(r, attempt)| Beat {
            task_id: &r.task_id,
            attempt,
            progress: r.progress,
            message: r.message.as_deref(),
        })
        .collect();
    let result = store.beat(&beats);
    if result.is_err() {
        store.failed();
    }
    batch
        .iter()
        .enumerate()
        .map(|(i, &(report, attempt))| {
            let task_id = report.task_id.as_str();
            match result.as_ref().map(|out| &out[i]) {
                Ok(Beaten::Applied) => (
                    200,
                    json!({ "task_id": task_id, "state": "processing" }),
                    "applied",
                ),
                Ok(Beaten::Cancelling) => (
                    409,
                    json!({ "error": "task cancelled: stop it", "task_id": task_id,
                            "cancel": true }),
                    "cancelling",
                ),
                Ok(Beaten::Unknown) => unknown(task_id),
                Ok(Beaten::Stale { current }) => stale(task_id, attempt, *current),
                Ok(Beaten::NotRunning { state }) => conflict(task_id, state),
                Err(e) => unavailable(task_id, e),
            }
        })
        .collect()
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
        Outcome::Finished => Ending::Finished {
            result: report.result.as_deref(),
        },
        Outcome::Cancelled => Ending::Cancelled,
        // Heartbeats never reach here; were one to, it would end nothing it should not.
        Outcome::Failed | Outcome::Running => Ending::Failed {
            error: report
                .error
                .as_deref()
                .unwrap_or("reported failed by the gpu"),
            retryable: false,
        },
    }
}

fn unknown(task_id: &str) -> Answer {
    (
        404,
        json!({ "error": "unknown task", "task_id": task_id }),
        "unknown",
    )
}

fn stale(task_id: &str, attempt: u32, current: u32) -> Answer {
    (
        409,
        json!({ "error": "stale attempt", "task_id": task_id, "attempt": attempt,
                "current_attempt": current }),
        "stale",
    )
}

fn conflict(task_id: &str, state: &str) -> Answer {
    (
        409,
        json!({ "error": "task is not awaiting this result", "task_id": task_id,
                "state": state }),
        "conflict",
    )
}

fn unavailable(task_id: &str, e: &StoreError) -> Answer {
    log::error!(task_id, error:% = e; "callback could not be recorded");
    (
        503,
        json!({ "error": "database unavailable, retry later" }),
        "unavailable",
    )
}

/// The answer to a verified callback, given what ending its attempt did (docs/contracts.md §5 reply codes).
fn answer(report: &Report, attempt: u32, result: Result<&Finish, &StoreError>) -> Answer {
    let task_id = report.task_id.as_str();
    match result {
        // The task was cancelled while this attempt ran: the attempt is over and its slot free,
        // but the task stays cancelled, whatever the GPU made of it.
        Ok(Finish::Applied {
            next: Next::Done(State::Cancelled),
            ..
        }) if report.status != Outcome::Cancelled => (
            409,
            json!({ "error": "task was cancelled", "task_id": task_id, "state": "cancelled" }),
            "cancelled",
        ),
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
        Ok(Finish::Unknown) => unknown(task_id),
        Ok(Finish::Stale { current }) => stale(task_id, attempt, *current),
        Ok(Finish::Conflict { state }) => conflict(task_id, state),
        Err(e) => unavailable(task_id, e),
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
                    let finished = matches!(ending, Ending::Finished { .. });
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
                                work: None,
                            }
                        }
                    }
                })
                .collect())
        }

        fn beat(&self, beats: &[Beat<'_>]) -> Result<Vec<Beaten>, StoreError> {
            *self.transactions.borrow_mut() += 1;
            if self.down {
                return Err(StoreError::Schema("mysql is down (test)".into()));
            }
            let tasks = self.tasks.borrow();
            Ok(beats
                .iter()
                .map(|b| match tasks.get(b.task_id) {
                    None => Beaten::Unknown,
                    Some((current, _)) if *current != b.attempt => {
                        Beaten::Stale { current: *current }
                    }
                    Some((_, Some(_))) => Beaten::NotRunning {
                        state: "finished".into(),
                    },
                    Some((_, None)) => Beaten::Applied,
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
            progress: None,
            message: None,
            result: None,
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
        assert_eq!(
            ending(&report("a", Outcome::Finished)),
            Ending::Finished { result: None }
        );
        let mut done = report("a", Outcome::Finished);
        done.result = Some("[1]".into());
        assert_eq!(
            ending(&done),
            Ending::Finished {
                result: Some("[1]")
            }
        );
        assert_eq!(ending(&report("a", Outcome::Cancelled)), Ending::Cancelled);
    }

    #[test]
    fn heartbeats_are_one_transaction_answered_each_by_its_own_result() {
        let store = MemEndings::default();
        store.tasks.borrow_mut().extend([
            ("a".to_string(), (1, None)),
            ("b".to_string(), (2, None)),
            ("c".to_string(), (1, Some(true))),
        ]);
        let beats: Vec<Report> = ["a", "b", "c", "d"]
            .iter()
            .map(|id| report(id, Outcome::Running))
            .collect();
        let batch: Vec<(&Report, u32)> = beats.iter().map(|r| (r, 1)).collect();
        let answers = beat_batch(&store, &batch);
        assert_eq!(
            statuses(&answers),
            [
                (200, "applied"),
                (409, "stale"),
                (409, "conflict"),
                (404, "unknown")
            ]
        );
        assert_eq!(*store.transactions.borrow(), 1);
        let down = MemEndings {
            down: true,
            ..MemEndings::default()
        };
        let answers = beat_batch(&down, &batch[..1]);
        assert_eq!(statuses(&answers), [(503, "unavailable")]);
        assert_eq!(*down.outages.borrow(), 1);
    }

    /// A finished or failed callback for a task cancelled meanwhile ends the attempt (the slot
    /// frees) but is told the task is cancelled; the GPU's own `cancelled` is applied.
    #[test]
    fn a_callback_after_a_cancel_is_told_the_task_was_cancelled() {
        let cancelled = Finish::Applied {
            slot: None,
            next: Next::Done(State::Cancelled),
            age: None,
            work: None,
        };
        let (status, body, label) = answer(&report("a", Outcome::Finished), 1, Ok(&cancelled));
        assert_eq!((status, label), (409, "cancelled"));
        assert_eq!(body["state"], "cancelled");
        let (status, _, label) = answer(&report("a", Outcome::Cancelled), 1, Ok(&cancelled));
        assert_eq!((status, label), (200, "applied"));
    }
}

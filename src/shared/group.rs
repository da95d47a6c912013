//! Group commit of single endings: a dispatch thread in response mode (and a handler, the lease
//! check, the canceller) ends one attempt at a time, and each used to be a transaction and a log
//! flush of its own (1.07 commits a task in response mode against 0.14 in callback mode, where
//! the writer batches: issue 20). Here the first thread to arrive becomes the leader: it takes
//! every ending queued meanwhile and writes them in one transaction, while the next ones queue
//! behind it for the following one. Nobody waits for a batch to fill: alone, an ending is written
//! at once; under load, the endings that arrive during one commit share the next.
//!
//! A batch that fails is written again one ending at a time, so that a row MySQL refuses fails
//! only its own ending (and an outage fails each with its own error). A follower waits at most
//! [`PATIENCE`] for its ending to be written, then gives up with an error (its caller retries:
//! an ending applied twice is a duplicate, which changes nothing).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::store::{Ending, Finish, StoreError};
use crate::sync::{wait_while, Locked};

/// Most endings one transaction takes.
const BATCH: usize = 256;
/// How long an ending waits for the batches ahead of it.
const PATIENCE: Duration = Duration::from_secs(60);

/// An ending to write, owned while it waits in the queue.
pub(crate) struct Queued {
    task_id: String,
    attempt: u32,
    outcome: Owned,
    source: String,
}

/// [`Ending`] with its text owned.
enum Owned {
    Finished { result: Option<String> },
    Failed { error: String, retryable: bool },
    Expired { error: String },
    Cancelled,
}

impl Owned {
    fn of(e: Ending<'_>) -> Owned {
        match e {
            Ending::Finished { result } => Owned::Finished {
                result: result.map(str::to_string),
            },
            Ending::Failed { error, retryable } => Owned::Failed {
                error: error.to_string(),
                retryable,
            },
            Ending::Expired { error } => Owned::Expired {
                error: error.to_string(),
            },
            Ending::Cancelled => Owned::Cancelled,
        }
    }

    fn ending(&self) -> Ending<'_> {
        match self {
            Owned::Finished { result } => Ending::Finished {
                result: result.as_deref(),
            },
            Owned::Failed { error, retryable } => Ending::Failed {
                error,
                retryable: *retryable,
            },
            Owned::Expired { error } => Ending::Expired { error },
            Owned::Cancelled => Ending::Cancelled,
        }
    }
}

#[derive(Default)]
struct State {
    queue: Vec<(u64, Queued)>,
    done: HashMap<u64, Result<Finish, StoreError>>,
    leading: bool,
    next: u64,
}

/// The queue of endings and who writes them (see the module docs).
#[derive(Default)]
pub(crate) struct Group {
    state: Mutex<State>,
    written: Condvar,
}

/// Writes a batch of endings, from one source, in one transaction: [`super::Shared::end_attempts`].
pub(crate) type Write<'a> =
    dyn Fn(&[(&str, u32, Ending<'_>)], &str) -> Result<Vec<Finish>, StoreError> + 'a;

impl Group {
    /// Ends `task_id`'s attempt `attempt` with the endings queued beside it, through `write`.
    pub(crate) fn end(
        &self,
        (task_id, attempt, ending): (&str, u32, Ending<'_>),
        source: &str,
        write: &Write<'_>,
    ) -> Result<Finish, StoreError> {
        let deadline = Instant::now() + PATIENCE;
        let mut s = self.state.locked();
        let id = s.next;
        s.next += 1;
        s.queue.push((
            id,
            Queued {
                task_id: task_id.to_string(),
                attempt,
                outcome: Owned::of(ending),
                source: source.to_string(),
            },
        ));
        loop {
            if let Some(r) = s.done.remove(&id) {
                return r;
            }
            if !s.leading {
                s.leading = true;
                let n = s.queue.len().min(BATCH);
                let batch: Vec<(u64, Queued)> = s.queue.drain(..n).collect();
                drop(s);
                let out = write_all(&batch, write);
                s = self.state.locked();
                s.done.extend(out);
                s.leading = false;
                self.written.notify_all();
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Not written yet: taken out of the queue (a batch being written is let be; it
                // ends as a duplicate when retried).
                s.queue.retain(|(q, _)| *q != id);
                return Err(StoreError::Schema(format!(
                    "the end of attempt {attempt} of {task_id} waited {PATIENCE:?} for the endings ahead"
                )));
            }
            s = wait_while(&self.written, s, left, |s| {
                s.leading && !s.done.contains_key(&id)
            });
        }
    }
}

/// Writes `batch`, one transaction per source; a failed transaction is tried again one ending at
/// a time. Each ending's result, by its id.
fn write_all(batch: &[(u64, Queued)], write: &Write<'_>) -> Vec<(u64, Result<Finish, StoreError>)> {
    let mut sources: Vec<&str> = batch.iter().map(|(_, q)| q.source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let mut out = Vec::with_capacity(batch.len());
    for source in sources {
        let group: Vec<&(u64, Queued)> = batch.iter().filter(|(_, q)| q.source == source).collect();
        let ends: Vec<(&str, u32, Ending<'_>)> = group
            .iter()
            .map(|(_, q)| (q.task_id.as_str(), q.attempt, q.outcome.ending()))
            .collect();
        match write(&ends, source) {
            Ok(finishes) => out.extend(
                group
                    .iter()
                    .map(|(id, _)| *id)
                    .zip(finishes.into_iter().map(Ok)),
            ),
            Err(_) if ends.len() > 1 => {
                for ((id, _), end) in group.iter().zip(&ends) {
                    let r = write(std::slice::from_ref(end), source)
                        .map(|mut f| f.pop().expect("one finish per ending"));
                    out.push((*id, r));
                }
            }
            Err(e) => out.push((group[0].0, Err(e))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::store::Next;

    fn applied() -> Finish {
        Finish::Applied {
            slot: None,
            next: Next::Done(crate::store::State::Finished),
            age: None,
            work: None,
        }
    }

    #[test]
    fn endings_that_arrive_together_share_a_transaction() {
        let group = Arc::new(Group::default());
        let transactions = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let (group, transactions) = (Arc::clone(&group), Arc::clone(&transactions));
                std::thread::spawn(move || {
                    let write = |ends: &[(&str, u32, Ending<'_>)], _: &str| {
                        transactions.fetch_add(1, Ordering::SeqCst);
                        // A commit takes a while: the others queue meanwhile.
                        std::thread::sleep(Duration::from_millis(20));
                        Ok(ends.iter().map(|_| applied()).collect())
                    };
                    let id = format!("t{i}");
                    let end = (id.as_str(), 1, Ending::Finished { result: None });
                    group.end(end, "dispatch", &write)
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("no panic").expect("written"), applied());
        }
        let n = transactions.load(Ordering::SeqCst);
        assert!(n < 32 / 4, "32 endings took {n} transactions");
    }

    #[test]
    fn a_failed_batch_is_written_one_ending_at_a_time() {
        let group = Group::default();
        // Refuses any batch that holds "bad"; writes the rest.
        let write = |ends: &[(&str, u32, Ending<'_>)], _: &str| {
            if ends.iter().any(|e| e.0 == "bad") {
                Err(StoreError::Schema("refused".into()))
            } else {
                Ok(ends.iter().map(|_| applied()).collect())
            }
        };
        let batch: Vec<(u64, Queued)> = ["a", "bad", "b"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    i as u64,
                    Queued {
                        task_id: id.to_string(),
                        attempt: 1,
                        outcome: Owned::of(Ending::Failed {
                            error: "boom",
                            retryable: true,
                        }),
                        source: "dispatch".into(),
                    },
                )
            })
            .collect();
        let out: HashMap<u64, Result<Finish, StoreError>> =
            write_all(&batch, &write).into_iter().collect();
        assert!(out[&0].is_ok() && out[&2].is_ok());
        assert!(out[&1].is_err());
        // Alone, an ending is written at once, by its own thread.
        let end = ("solo", 1, Ending::Cancelled);
        assert_eq!(
            group.end(end, "cancel", &write).expect("written"),
            applied()
        );
    }
}

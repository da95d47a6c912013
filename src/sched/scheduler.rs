//! The scheduler thread (`qsys-scheduler`): decides where each task runs.
//!
//! It receives batches of tasks from the poller and keeps fewer than [`PREFETCH`] in hand before it
//! takes another. Each round it places every task it can: a GPU task gets the least-loaded GPU's
//! free slot ([`crate::fleet`]), reserved in memory, and all the slots reserved in the round are
//! claimed in MySQL in one transaction (with the move of each task to `processing`) before the jobs
//! go to the dispatch pool. One commit per round, not per task, is what keeps the scheduler ahead of
//! a busy fleet (BENCHMARKS.md); a claim MySQL refuses comes back into the hand. Other types go to
//! the handler pool through a rendezvous channel: only an idle worker takes one, so nothing queues
//! invisibly. An unknown type fails at once. When nothing can be placed it stops receiving, which
//! blocks the poller, which leaves tasks in Redis (promise 6).
//!
//! Wake-ups come on the event channel whenever a slot or a worker frees; retries come there too and
//! wait in a timer heap until their backoff has passed (the row is read again then, so a retry always
//! runs from what MySQL says). At start it resumes the `pending` tasks MySQL says this instance holds.
//! At a stop it drains the channel and returns every task it holds to the head of its Redis queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender, TrySendError};

use crate::config::{Completion, Endpoint, Handler};
use crate::fleet::Holder;
use crate::obs::trouble::Trouble;
use crate::shared::{Event, Shared, Task};
use crate::store::{Claim, ClaimRequest};

/// Below this many unplaced tasks the scheduler takes another batch (up to
/// [`crate::work::poller::TAKE_BATCH`]) from the poller, so it holds at most `PREFETCH - 1 + TAKE_BATCH`:
/// enough that the slots freed during one claim transaction all find a task in the next round.
pub const PREFETCH: usize = 16;

/// A GPU attempt, handed to a dispatch worker with its slot reserved in memory; the worker claims it
/// in MySQL.
#[derive(Debug)]
pub(crate) struct GpuJob {
    pub task: Task,
    pub attempt: u32,
    /// The GPU's settings as they were when the slot was reserved.
    pub endpoint: Arc<Endpoint>,
    pub slot: usize,
    /// The attempt's lease, from the task or the endpoint.
    pub lease: Duration,
    /// When MySQL committed the claim, and so started the lease.
    pub claimed_at: Instant,
}

/// What became of one attempt to place a task.
enum Placed {
    Done,
    /// Cannot go now (no slot, no idle worker, MySQL trouble): keep it.
    Wait(Task),
}

pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    tasks: Receiver<Vec<Task>>,
    events: Receiver<Event>,
    gpu_jobs: Sender<GpuJob>,
    handler_jobs: Sender<Task>,
    client: redis::Client,
    pending: VecDeque<Task>,
    /// After a MySQL error, placement pauses until then.
    retry_at: Option<Instant>,
    /// Retries waiting for their backoff: (due, task id).
    delayed: BinaryHeap<Reverse<(Instant, String)>>,
    /// When [`Scheduler::sweep`] last ran.
    swept: Instant,
}

/// How often the scheduler looks for `pending` rows nobody is working on.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A row nobody holds is adopted once it has been so for this long: a hand-back releases its rows
/// a moment before it pushes them to Redis, where a peer takes them over the usual way.
const ORPHAN_AFTER: Duration = Duration::from_secs(5);
/// A row held here but in no thread's memory is taken again once untouched for this long: well
/// past any path from the poller's record or the hand to a worker's start.
const STALE_AFTER: Duration = Duration::from_secs(30);

impl Scheduler {
    pub(crate) fn new(
        shared: Arc<Shared>,
        tasks: Receiver<Vec<Task>>,
        events: Receiver<Event>,
        gpu_jobs: Sender<GpuJob>,
        handler_jobs: Sender<Task>,
        client: redis::Client,
    ) -> Scheduler {
        Scheduler {
            shared,
            tasks,
            events,
            gpu_jobs,
            handler_jobs,
            client,
            pending: VecDeque::new(),
            retry_at: None,
            delayed: BinaryHeap::new(),
            swept: Instant::now(),
        }
    }

    /// Takes over the `pending` tasks MySQL says this instance holds (a restart after a crash):
    /// due ones in order, the others when their backoff ends.
    pub(crate) fn resume(&mut self) -> Result<usize, crate::store::StoreError> {
        let rows = self.shared.store.pending_tasks()?;
        let n = rows.len();
        for row in rows {
            let wait = row.wait;
            let id = row.task_id.clone();
            match Task::from_stored(row) {
                Ok(t) if wait.is_zero() => self.pending.push_back(t),
                Ok(_) => self.delayed.push(Reverse((Instant::now() + wait, id))),
                Err(e) => {
                    log::error!(task_id = id.as_str(), error = e.as_str(); "cannot resume task")
                }
            }
        }
        Ok(n)
    }

    /// No `pending` row stays so for good (issue 14): adopts rows nobody holds (a stop whose
    /// hand-back to Redis failed or crashed half-way, a dead instance's whose re-push failed), and
    /// takes again this instance's rows that no thread holds (a path that gave up on a task, a
    /// commit whose acknowledgement was lost). Bounded: at most a hand's worth per sweep, and only
    /// while the hand has room; two indexed reads every [`SWEEP_EVERY`].
    fn sweep(&mut self) {
        if self.swept.elapsed() < SWEEP_EVERY || self.pending.len() >= PREFETCH {
            return;
        }
        self.swept = Instant::now();
        let room = PREFETCH * 4;
        let store = &self.shared.store;
        let mut found = match store.adopt_orphans(ORPHAN_AFTER, room) {
            Ok(rows) => {
                if !rows.is_empty() {
                    log::warn!(count = rows.len(); "adopted pending tasks that no instance held");
                }
                rows
            }
            Err(e) => {
                log::warn!(error:% = e; "mysql error looking for orphaned tasks");
                return;
            }
        };
        match store.stale_pending(STALE_AFTER, room) {
            Ok(rows) => found.extend(rows),
            Err(e) => log::warn!(error:% = e; "mysql error looking for stale tasks"),
        }
        if found.is_empty() {
            return;
        }
        let mut held = self.shared.lock_in_transit().clone();
        held.extend(self.pending.iter().map(|t| t.msg.task_id.clone()));
        held.extend(self.delayed.iter().map(|Reverse((_, id))| id.clone()));
        let mut taken = Vec::new();
        for row in found {
            if held.contains(row.task_id.as_str()) {
                continue;
            }
            let (id, wait) = (row.task_id.clone(), row.wait);
            match Task::from_stored(row) {
                Ok(t) if wait.is_zero() => taken.push(t),
                Ok(_) => self.delayed.push(Reverse((Instant::now() + wait, id))),
                Err(e) => {
                    log::error!(task_id = id.as_str(), error = e.as_str(); "cannot resume task")
                }
            }
        }
        if !taken.is_empty() {
            log::warn!(count = taken.len(); "took up pending tasks that no thread held");
            self.pending.extend(taken);
        }
    }

    /// Moves retries whose backoff is over into the hand, reading each back from MySQL.
    fn release_due(&mut self) {
        let now = Instant::now();
        while self
            .delayed
            .peek()
            .is_some_and(|Reverse((due, _))| *due <= now)
        {
            let Some(Reverse((_, id))) = self.delayed.pop() else {
                break;
            };
            match self.shared.store.pending_task(&id) {
                Ok(Some(row)) => match Task::from_stored(row) {
                    // Retries go first: they have waited already.
                    Ok(t) => self.pending.push_front(t),
                    Err(e) => log::error!(task_id = id.as_str(), error = e.as_str();
                        "cannot retry task"),
                },
                Ok(None) => log::debug!(task_id = id.as_str(); "retry no longer pending here"),
                Err(e) => {
                    log::warn!(task_id = id.as_str(), error:% = e; "mysql error loading a retry");
                    self.delayed
                        .push(Reverse((now + Duration::from_secs(1), id)));
                    break;
                }
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Wake => {}
            Event::Retry { task_id, after } => {
                self.delayed
                    .push(Reverse((Instant::now() + after, task_id)));
            }
        }
    }

    pub(crate) fn run(mut self) {
        let none = never();
        let mut poller_gone = false;
        while !self.shared.stop.is_stopping() {
            self.shared.tick("qsys-scheduler");
            self.sweep();
            self.release_due();
            self.place_pending();
            let rx = if self.pending.len() < PREFETCH && !poller_gone {
                &self.tasks
            } else {
                &none
            };
            let next_due = self
                .delayed
                .peek()
                .map(|Reverse((due, _))| due.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(250))
                .min(Duration::from_millis(250));
            select! {
                recv(rx) -> t => match t {
                    Ok(t) => self.pending.extend(t),
                    // The supervisor notices the poller's end; stop listening to it.
                    Err(_) => poller_gone = true,
                },
                recv(self.events) -> e => {
                    if let Ok(e) = e {
                        self.on_event(e);
                    }
                },
                default(next_due) => {},
            }
            // Take in everything else already waiting, so the next round places (and claims in
            // one transaction) all that became possible meanwhile, not one task per commit.
            while let Ok(e) = self.events.try_recv() {
                self.on_event(e);
            }
            while self.pending.len() < PREFETCH && !poller_gone {
                match self.tasks.try_recv() {
                    Ok(t) => self.pending.extend(t),
                    Err(_) => break,
                }
            }
        }
        self.hand_back();
        log::debug!("scheduler stopped");
    }

    /// Tries every task in hand, in order. Once no GPU slot is free no later GPU task is tried;
    /// likewise for handler tasks and idle workers.
    fn place_pending(&mut self) {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.retry_at = None;
        let (mut gpu_full, mut workers_busy) = (false, false);
        let mut jobs = Vec::new();
        for _ in 0..self.pending.len() {
            let task = self.pending.pop_front().expect("len checked");
            let handler = self.shared.config().types.get(&task.msg.kind).cloned();
            let placed = match handler {
                None => self.fail_unknown(task),
                Some(Handler::Gpu) if gpu_full => Placed::Wait(task),
                Some(Handler::Gpu) => match self.reserve(&task) {
                    Some((endpoint, slot, lease)) => {
                        jobs.push(GpuJob {
                            attempt: task.attempts + 1,
                            task,
                            endpoint,
                            slot,
                            lease,
                            claimed_at: Instant::now(),
                        });
                        Placed::Done
                    }
                    None => {
                        // The policy may depend on the task (a retry avoids its last GPU), so a
                        // miss ends the round's GPU placements only when no slot is free at all.
                        gpu_full = !self.shared.slots().has_free();
                        Placed::Wait(task)
                    }
                },
                Some(_) if workers_busy => Placed::Wait(task),
                Some(_) => match self.handler_jobs.try_send(task) {
                    Ok(()) => Placed::Done,
                    Err(TrySendError::Full(t) | TrySendError::Disconnected(t)) => {
                        workers_busy = true;
                        Placed::Wait(t)
                    }
                },
            };
            if let Placed::Wait(t) = placed {
                self.pending.push_back(t);
            }
            if self.retry_at.is_some() {
                break;
            }
        }
        self.claim(jobs);
    }

    fn fail_unknown(&mut self, task: Task) -> Placed {
        let error = format!("unknown task type {:?}", task.msg.kind);
        match self.shared.store.fail_pending(&task.msg.task_id, &error) {
            Ok(_) => {
                log::warn!(task_id = task.msg.task_id.as_str(), queue = task.queue.as_str(),
                    kind = task.msg.kind.as_str(); "unknown task type: task failed");
                Placed::Done
            }
            Err(e) => self.db_trouble(task, &e),
        }
    }

    fn db_trouble(&mut self, task: Task, e: &dyn std::fmt::Display) -> Placed {
        log::warn!(task_id = task.msg.task_id.as_str(), error:% = e;
            "mysql error while scheduling; will retry");
        self.retry_at = Some(Instant::now() + Duration::from_secs(1));
        Placed::Wait(task)
    }

    /// Reserves the least-loaded free slot in memory for `task`'s next attempt: the GPU, the slot
    /// and the attempt's lease. `None`: no slot is free.
    fn reserve(&self, task: &Task) -> Option<(Arc<Endpoint>, usize, Duration)> {
        let (at, ep) = {
            let mut m = self.shared.slots();
            let at = m.place(task.avoid_gpu.as_deref())?;
            m.occupy(
                at,
                Holder {
                    task_id: task.msg.task_id.clone(),
                    attempt: task.attempts + 1,
                    since: Instant::now(),
                },
            );
            (at, Arc::clone(m.endpoint(at.gpu())))
        };
        let timeout = task
            .msg
            .timeout_s
            .map(Duration::from_secs)
            .unwrap_or(ep.task_timeout);
        // In response mode the call itself may run for the whole timeout: give the lease the
        // request timeout on top so the call's own verdict comes first.
        let lease = match ep.completion {
            Completion::Callback => timeout,
            Completion::Response => timeout + ep.request_timeout,
        };
        Some((ep, at.slot(), lease))
    }

    /// Claims the slots reserved this round in one MySQL transaction and hands each claimed job to
    /// the dispatch pool. A slot MySQL says is held (another instance took it) is mirrored and its
    /// task placed again; on a MySQL error every reservation is undone and placement pauses.
    fn claim(&mut self, jobs: Vec<GpuJob>) {
        if jobs.is_empty() {
            return;
        }
        let reqs: Vec<ClaimRequest<'_>> = jobs
            .iter()
            .map(|j| ClaimRequest {
                task_id: &j.task.msg.task_id,
                attempts: j.task.attempts,
                gpu_id: &j.endpoint.id,
                slot: j.slot,
                lease: j.lease,
            })
            .collect();
        let claims = self.shared.store.claim_gpu_attempts(&reqs);
        drop(reqs);
        let claims = match claims {
            Ok(c) => c,
            Err(e) => {
                trouble!(warn, self.shared, Trouble::Mysql, e;
                    "mysql error claiming slots; will retry", count = jobs.len());
                for job in jobs.into_iter().rev() {
                    self.release(&job);
                    self.pending.push_front(job.task);
                }
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                return;
            }
        };
        let mut again = Vec::new();
        let committed = Instant::now();
        for (mut job, claim) in jobs.into_iter().zip(claims) {
            job.claimed_at = committed;
            let ep = &job.endpoint;
            let task_id = job.task.msg.task_id.as_str();
            match claim {
                Claim::Claimed => {
                    self.shared
                        .announce(true, &ep.id, job.slot, task_id, job.attempt);
                    log::info!(task_id, gpu = ep.id.as_str(), slot = job.slot,
                        attempt = job.attempt, queue = job.task.queue.as_str(); "slot claimed");
                    // Unbounded (jobs never outnumber claimed slots); it fails only if every
                    // dispatch worker is gone, which the supervisor is already handling.
                    if let Err(e) = self.gpu_jobs.send(job) {
                        log::error!(task_id = e.0.task.msg.task_id.as_str();
                            "dispatch pool gone; task stays processing until its lease ends");
                    }
                }
                Claim::SlotTaken { holder, attempt } => {
                    // MySQL knows a holder the mirror did not: mirror it; the task is placed again.
                    // Routine with several instances: another one claimed it first.
                    log::info!(gpu = ep.id.as_str(), slot = job.slot, holder = holder.as_str();
                        "slot held in mysql but free in memory; mirrored");
                    self.shared.slots().hold(&ep.id, job.slot, holder, attempt);
                    again.push(job.task);
                }
                Claim::NotPending => {
                    self.release(&job);
                    log::info!(task_id; "task no longer pending (moved elsewhere); dropped from hand");
                }
            }
        }
        for task in again.into_iter().rev() {
            self.pending.push_front(task);
        }
    }

    /// Undoes the in-memory reservation of a job whose claim did not happen.
    fn release(&self, job: &GpuJob) {
        self.shared
            .slots()
            .release(&job.endpoint.id, job.slot, &job.task.msg.task_id);
    }

    /// At a stop: everything still in hand, and whatever the poller sent meanwhile, goes back to
    /// the head of its queue in its original order.
    fn hand_back(&mut self) {
        // The poller ends within its pop timeout; wait for it to close the channel.
        let deadline =
            Instant::now() + self.shared.config().redis.pop_timeout + Duration::from_secs(5);
        while let Ok(t) = self
            .tasks
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.pending.extend(t);
        }
        let back: Vec<Task> = self.pending.drain(..).collect();
        if back.is_empty() {
            return;
        }
        match crate::work::poller::hand_back(&self.client, &self.shared.store, &back) {
            Ok(()) => log::info!(count = back.len(); "returned tasks in hand to redis"),
            Err(e) => log::error!(count = back.len(), error:% = e;
                "could not return tasks to redis; they resume at the next start"),
        }
    }
}

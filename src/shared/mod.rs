//! What every daemon thread shares: the validated config, the store, the slot matrix, the callback
//! signer, the stop flags and the scheduler's wake-up channel.
//!
//! [`Shared::end_attempt`] is the one place an attempt ends, whoever learned of it (the callback
//! server, a dispatch worker in `response` mode or after an error, a handler worker, the lease
//! check): MySQL first, then the in-memory slot, then a message to the scheduler — a wake-up so it can
//! hand the freed slot on, and the task itself when it is to be retried.

mod deck;
mod group;
pub(crate) mod shutdown;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
pub(crate) use deck::{Deck, HandCount};
use serde_json::{json, Value};

use crate::config::{Config, Endpoint};
use crate::contract::message::Message;
use crate::contract::slot_event::SlotEvent;
use crate::contract::token::Signer;
use crate::fleet::{Holder, SlotMatrix, SlotRef};
use crate::net::backoff::{Backoff, RetryDelay};
use crate::net::redis::Timeouts;
use crate::obs::trouble::Trouble;
use crate::shared::shutdown::Shutdown;
use crate::store::{
    Claim, ClaimRequest, EndRequest, Ending, Finish, HandOver, Next, Store, StoreError, StoredTask,
};
use crate::sync::{Locked, ReadWrite};

/// Without a systemd watchdog, how long a loop may go without progress before it is reported.
pub(crate) const STALL_LIMIT: Duration = Duration::from_secs(60);

/// A task in memory, between the poller and a worker.
#[derive(Debug, Clone)]
pub(crate) struct Task {
    pub msg: Message,
    pub queue: String,
    /// Attempts already used (0 for a new task).
    pub attempts: u32,
    /// The GPU of the previous attempt: a retry goes elsewhere if it can.
    pub avoid_gpu: Option<String>,
}

impl Task {
    /// A new task just taken from `queue`.
    pub(crate) fn new(msg: Message, queue: &str, attempts: u32) -> Task {
        Task {
            msg,
            queue: queue.to_string(),
            attempts,
            avoid_gpu: None,
        }
    }

    /// A task read back from MySQL (restart, retry). Its payload was written by qsysd, so a parse
    /// error means the row was edited by hand; the error says so.
    pub(crate) fn from_stored(row: StoredTask) -> Result<Task, String> {
        let msg = crate::contract::message::parse(row.payload.as_bytes(), || row.task_id.clone())
            .map_err(|m| {
            format!(
                "stored payload of {} is unreadable: {}",
                row.task_id, m.reason
            )
        })?;
        let mut task = Task::new(msg, &row.queue, row.attempts);
        task.avoid_gpu = row.last_gpu;
        Ok(task)
    }
}

/// A GPU attempt, handed to a dispatch worker once the scheduler has claimed its slot in MySQL.
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

impl GpuJob {
    /// The next attempt of `task` on `slot` of `endpoint`, with its lease: the task's timeout,
    /// else the GPU's; in response mode the call itself may run for the whole timeout, so the
    /// lease has the request timeout on top and the call's own verdict comes first.
    pub(crate) fn new(task: Task, endpoint: Arc<Endpoint>, slot: usize) -> GpuJob {
        let timeout = task
            .msg
            .timeout_s
            .map(Duration::from_secs)
            .unwrap_or(endpoint.task_timeout);
        let lease = match endpoint.completion {
            crate::config::Completion::Callback => timeout,
            crate::config::Completion::Response => timeout + endpoint.request_timeout,
        };
        GpuJob {
            attempt: task.attempts + 1,
            task,
            endpoint,
            slot,
            lease,
            claimed_at: Instant::now(),
        }
    }

    /// Who holds its slot in memory: this attempt, from now.
    pub(crate) fn holder(&self) -> Holder {
        Holder::new(
            self.task.msg.task_id.clone(),
            self.attempt,
            self.task.msg.cost(),
        )
    }

    /// What MySQL is asked to start this attempt.
    pub(crate) fn claim_request(&self) -> ClaimRequest<'_> {
        ClaimRequest {
            task_id: &self.task.msg.task_id,
            attempts: self.task.attempts,
            gpu_id: &self.endpoint.id,
            slot: self.slot,
            lease: self.lease,
            heartbeat: self.endpoint.heartbeat_timeout,
        }
    }
}

/// A task lent from the deck for the slot the ending at `after` is to free.
struct Lent {
    after: usize,
    at: SlotRef,
    pool: String,
    job: GpuJob,
}

/// What the scheduler is told by other threads.
#[derive(Debug)]
pub(crate) enum Event {
    /// Something may have become possible (a slot or a worker freed).
    Wake,
    /// A task is `pending` again and may run once `after` has passed.
    Retry { task_id: String, after: Duration },
}

pub(crate) struct Shared {
    /// The configuration in force; a reload swaps it (see [`Shared::config`]).
    pub config: RwLock<Arc<Config>>,
    pub store: Store,
    pub slots: Mutex<SlotMatrix>,
    pub signer: Signer,
    pub stop: Shutdown,
    pub events: Sender<Event>,
    /// Process groups of running `exec` handlers, killed if the grace period runs out.
    pub children: Mutex<HashSet<i32>>,
    /// Attempts `(task_id, attempt)` an operator cancelled, for an `exec` run here to stop
    /// ([`crate::work::cancel`]).
    pub cancels: Mutex<HashSet<(String, u32)>>,
    /// What is wrong right now, by dependency ("redis", "mysql"), for `/healthz` and the log.
    pub problems: Mutex<BTreeMap<&'static str, String>>,
    /// Set by SIGHUP; the supervisor reloads the config file.
    pub reload_requested: AtomicBool,
    /// When each looping thread last went round its loop: the watchdog is fed only while all do.
    pub progress: Mutex<BTreeMap<&'static str, Instant>>,
    /// Length of each queue in Redis, as last measured by the maintenance thread.
    pub queue_depths: Mutex<Vec<(String, u64)>>,
    pub metrics: crate::obs::metrics::Metrics,
    /// This instance's slot claims and frees, for the other instances (`qsys-slotpub`).
    pub slot_events: Sender<SlotEvent>,
    /// Whether other instances are alive (checked every second by the maintenance thread). Alone,
    /// an instance publishes no slot events: nobody would read them.
    pub peers: AtomicBool,
    /// Ids of the tasks the poller has recorded and not yet handed to the scheduler: with the
    /// scheduler's hand, what this instance holds in memory (the scheduler's sweep leaves these
    /// rows alone).
    pub in_transit: Mutex<HashSet<String>>,
    /// The queues and types paused now (`paused` in MySQL, read every second).
    pub paused: RwLock<crate::store::Paused>,
    /// For tasks without an `enqueued_at`: when this instance first saw each queue's head
    /// element, by queue (a hash of the element, and when).
    pub heads: Mutex<BTreeMap<String, (u64, Instant)>>,
    /// Age of the oldest waiting task per queue, as last measured, in seconds.
    pub queue_ages: Mutex<BTreeMap<String, f64>>,
    /// Each pool's backlog and time to drain, as last worked out (every second).
    pub(crate) pools: Mutex<Vec<crate::fleet::PoolDrain>>,
    /// Single endings (dispatch, handlers, leases, cancels), written together when they come
    /// together.
    endings: group::Group,
    /// The scheduler's GPU tasks waiting for a slot of a full pool, which an ending hands its
    /// freed slot to ([`deck`]). Locked after `slots` when both are held.
    pub(crate) deck: Mutex<Deck>,
    /// The dispatch pool's queue, for the jobs a hand-over or an intake starts; the scheduler
    /// empties it at its stop, so the pool's workers end once the last job handed to them is sent.
    pub(crate) dispatch: Mutex<Option<Sender<GpuJob>>>,
    /// Tasks in the scheduler's hand and on its deck, or on their way to it: while there are
    /// any, no task arriving starts ahead of them.
    pub(crate) hand: HandCount,
}

impl Shared {
    /// The state for a daemon starting with `config`, and the receiving ends of its scheduler's
    /// event channel and its slot-event publisher's channel.
    pub(crate) fn new(
        config: Config,
        store: Store,
        slots: SlotMatrix,
        signer: Signer,
    ) -> (Shared, Receiver<Event>, Receiver<SlotEvent>) {
        let (events, events_rx) = unbounded();
        let (slot_events, slot_rx) = unbounded();
        let shared = Shared {
            config: RwLock::new(Arc::new(config)),
            store,
            slots: Mutex::new(slots),
            signer,
            stop: Shutdown::new(),
            events,
            children: Mutex::default(),
            cancels: Mutex::default(),
            problems: Mutex::default(),
            reload_requested: AtomicBool::new(false),
            progress: Mutex::default(),
            queue_depths: Mutex::default(),
            pools: Mutex::default(),
            endings: group::Group::default(),
            deck: Mutex::default(),
            dispatch: Mutex::default(),
            hand: HandCount::default(),
            metrics: Default::default(),
            slot_events,
            // Until the first check: publishing to nobody is harmless, staying silent is not.
            peers: AtomicBool::new(true),
            in_transit: Mutex::default(),
            paused: RwLock::default(),
            heads: Mutex::default(),
            queue_ages: Mutex::default(),
        };
        (shared, events_rx, slot_rx)
    }

    /// What is paused now.
    pub(crate) fn paused(&self) -> crate::store::Paused {
        self.paused.reading().clone()
    }

    /// Puts `paused` in force here (the maintenance thread, every second, and an admin action
    /// at once).
    pub(crate) fn set_paused(&self, paused: crate::store::Paused) {
        let changed = *self.paused.reading() != paused;
        if changed {
            log::info!(queues:? = paused.queues, types:? = paused.types; "paused queues and types");
            *self.paused.writing() = paused;
            self.wake_scheduler();
        }
    }

    /// Counts the wait of a task from its producer's `enqueued_at` to its first dispatch (not a
    /// delayed task's: it waited on purpose).
    pub(crate) fn first_dispatch(&self, msg: &Message, attempt: u32) {
        if let (1, Some(at), None) = (attempt, msg.enqueued_at, msg.due) {
            let waited = crate::contract::time::now_unix() - at;
            self.metrics
                .queue_wait_seconds
                .observe(Duration::from_secs_f64(waited.max(0.0)));
        }
    }

    pub(crate) fn lock_in_transit(&self) -> MutexGuard<'_, HashSet<String>> {
        self.in_transit.locked()
    }

    /// Asks the scheduler to place `task_id` again once `after` has passed (its row is `pending`
    /// and held here): how every path that gives up on a task hands it back.
    pub(crate) fn retry_later(&self, task_id: &str, after: Duration) {
        let _ = self.events.send(Event::Retry {
            task_id: task_id.to_string(),
            after,
        });
    }

    /// Gives up this instance's hold on tasks' `pending` rows, then puts the tasks back at the head of
    /// their queues (earliest ends up first, so `LPUSH` in reverse), so whoever pops them next takes
    /// them over. In this order a peer never pops a copy whose row this instance still holds (it would
    /// drop it as a duplicate, and the row would then be held by nobody and in no list). A crash or a
    /// Redis failure between the two leaves rows that nobody holds: any instance's scheduler adopts
    /// those ([`crate::sched::scheduler`]'s sweep), so they run anyway.
    pub(crate) fn hand_back(&self, client: &redis::Client, tasks: &[Task]) -> Result<(), String> {
        let store = &self.store;
        if tasks.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = tasks.iter().map(|t| t.msg.task_id.clone()).collect();
        store.release_pending(&ids).map_err(|e| e.to_string())?;
        crate::pause_point!(store.instance(), "hand-back:released");
        let mut conn =
            crate::net::redis::connect(client, Timeouts::reading(Duration::from_secs(11)))
                .map_err(|e| e.to_string())?;
        let mut pipe = redis::pipe();
        for t in tasks.iter().rev() {
            pipe.cmd("LPUSH")
                .arg(&t.queue)
                .arg(t.msg.to_json())
                .ignore();
        }
        pipe.query::<()>(&mut conn).map_err(|e| e.to_string())
    }

    /// The configuration in force now. Callers hold the `Arc` for one piece of work, so a reload
    /// never changes settings under a task in flight.
    pub(crate) fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.reading())
    }

    /// Puts `config` in force.
    pub(crate) fn set_config(&self, config: Config) {
        *self.config.writing() = Arc::new(config);
    }

    /// The slot matrix. A panic while it was held takes the daemon down anyway (the supervisor sees
    /// the thread die), so a poisoned lock is still usable for an orderly stop.
    pub(crate) fn slots(&self) -> MutexGuard<'_, SlotMatrix> {
        self.slots.locked()
    }

    /// Tells the other instances that this one claimed (or freed) a slot.
    pub(crate) fn announce(
        &self,
        claimed: bool,
        gpu: &str,
        slot: usize,
        task_id: &str,
        attempt: u32,
    ) {
        // An instance that starts meanwhile builds its mirror from MySQL and is noticed within a
        // second, when every held slot is published again (`maintenance::watch_peers`).
        if !self.peers.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // The publisher is gone only during shutdown; the others resync from MySQL anyway.
        let _ = self.slot_events.send(SlotEvent {
            instance: self.config().daemon.instance_id.clone(),
            claimed,
            gpu: gpu.to_string(),
            slot,
            task_id: task_id.to_string(),
            attempt,
        });
    }

    pub(crate) fn wake_scheduler(&self) {
        // The scheduler is gone only during shutdown, when nobody needs waking.
        let _ = self.events.send(Event::Wake);
    }

    /// Ends attempt `attempt` of `task_id` and frees what it held; a retry goes to the scheduler.
    /// Written with the other single endings that come meanwhile ([`group`]): one commit for the
    /// many a busy response-mode fleet ends at once.
    pub(crate) fn end_attempt(
        &self,
        task_id: &str,
        attempt: u32,
        ending: Ending<'_>,
        source: &str,
    ) -> Result<Finish, StoreError> {
        self.endings
            .end((task_id, attempt, ending), source, &|ends, source| {
                self.end_attempts(ends, source)
            })
    }

    /// Ends each `(task_id, attempt, ending)` in one MySQL transaction, then frees their slots in
    /// memory and tells the scheduler; the results come in the order given. A slot an ending
    /// frees goes to the first task on deck that placement would put there, claimed in the same
    /// transaction and sent to the dispatch pool after the commit (issue 20).
    pub(crate) fn end_attempts(
        &self,
        ends: &[(&str, u32, Ending<'_>)],
        source: &str,
    ) -> Result<Vec<Finish>, StoreError> {
        let r = self.config().retry;
        let reqs: Vec<EndRequest<'_>> = ends
            .iter()
            .map(|&(task_id, attempt, ending)| EndRequest {
                task_id,
                attempt,
                ending,
                retry: RetryDelay {
                    base: r.backoff,
                    max: r.backoff_max,
                    jitter: rand::random::<f64>(),
                },
            })
            .collect();
        let (lent, jobs) = self.lend_for(ends);
        let hand_overs: Vec<HandOver<'_>> = lent
            .iter()
            .map(|l| HandOver {
                after: l.after,
                claim: l.job.claim_request(),
            })
            .collect();
        let ended = self.store.end_attempts(&reqs, r.max_attempts, &hand_overs);
        drop(hand_overs);
        let ended = match ended {
            Ok(ended) => ended,
            Err(e) => {
                self.give_back(lent.into_iter().map(|l| (l.pool, l.job.task)).collect());
                return Err(e);
            }
        };
        let mut next: Vec<Option<(SlotRef, GpuJob)>> = reqs.iter().map(|_| None).collect();
        let mut back = Vec::new();
        let committed = Instant::now();
        {
            let mut deck = self.deck.locked();
            for (mut l, verdict) in lent.into_iter().zip(ended.handed) {
                match verdict {
                    Some(Claim::Claimed) => {
                        deck.settle(&l.job.task.msg.task_id);
                        l.job.claimed_at = committed;
                        next[l.after] = Some((l.at, l.job));
                    }
                    Some(Claim::NotPending) => {
                        deck.settle(&l.job.task.msg.task_id);
                        log::info!(task_id = l.job.task.msg.task_id.as_str();
                            "task no longer pending (moved elsewhere); dropped from hand");
                    }
                    Some(Claim::SlotTaken { .. }) | None => back.push((l.pool, l.job.task)),
                }
            }
        }
        self.give_back(back);
        for ((req, finish), next) in reqs.iter().zip(&ended.finishes).zip(next) {
            self.ended(req, finish, source, next.as_ref());
            if let (Some((_, job)), Some(jobs)) = (next, &jobs) {
                self.dispatch_claimed(jobs, job, "ending");
            }
        }
        self.wake_scheduler();
        Ok(ended.finishes)
    }

    /// Lends, for each slot `ends` are to free in memory, the first task on deck that placement
    /// would put there (not of a paused type): nothing while the deck is idle, at a stop, or
    /// once the dispatch pool's queue is gone. The queue comes with them: held until their jobs
    /// are sent.
    fn lend_for(&self, ends: &[(&str, u32, Ending<'_>)]) -> (Vec<Lent>, Option<Sender<GpuJob>>) {
        if self.deck.locked().is_idle() {
            return (Vec::new(), None);
        }
        let Some(jobs) = self.dispatch_queue() else {
            return (Vec::new(), None);
        };
        let policy = self.config().placement;
        let paused = self.paused().types;
        let mut lent: Vec<Lent> = Vec::new();
        let mut m = self.slots();
        let mut deck = self.deck.locked();
        for (after, &(task_id, attempt, _)) in ends.iter().enumerate() {
            if deck.is_idle() {
                break;
            }
            let Some(at) = m.held_by(task_id, attempt) else {
                continue;
            };
            if lent.iter().any(|l| l.at == at) {
                continue;
            }
            let ep = Arc::clone(m.endpoint(at.gpu()));
            let taken = deck.lend(&ep.pool, |t| {
                !paused.contains(&t.msg.kind)
                    && m.would_hand_over(at, &ep.pool, t.msg.cost(), t.avoid_gpu.as_deref(), policy)
            });
            if let Some((pool, task)) = taken {
                let job = GpuJob::new(task, ep, at.slot());
                lent.push(Lent {
                    after,
                    at,
                    pool,
                    job,
                });
            }
        }
        (lent, Some(jobs))
    }

    /// The slots, reserved in memory, for the head of a batch just taken from `queue`, so that
    /// its record's transaction claims them too ([`crate::store::Store::accept_and_claim`]):
    /// tasks in order, up to the first that cannot start now — a delayed one (`delayed`), one
    /// whose type is not a GPU type or is paused, one placement finds no slot for or would keep
    /// waiting for a busy GPU. Nothing while the scheduler holds a task (it would be overtaken),
    /// at a stop, or once the dispatch pool's queue is gone; the queue comes with the jobs.
    pub(crate) fn reserve_now<'m>(
        &self,
        queue: &str,
        msgs: impl Iterator<Item = (&'m Message, bool)>,
    ) -> (Vec<GpuJob>, Option<Sender<GpuJob>>) {
        if !self.hand.is_empty() {
            return (Vec::new(), None);
        }
        let Some(jobs) = self.dispatch_queue() else {
            return (Vec::new(), None);
        };
        let config = self.config();
        let paused = self.paused().types;
        let mut reserved = Vec::new();
        let mut m = self.slots();
        for (msg, delayed) in msgs {
            let Some(crate::config::Handler::Gpu { pool }) = config.types.get(&msg.kind) else {
                break;
            };
            if delayed || paused.contains(&msg.kind) {
                break;
            }
            let Some(at) = m.try_place(pool, msg.cost(), None, config.placement) else {
                break;
            };
            let ep = Arc::clone(m.endpoint(at.gpu()));
            let job = GpuJob::new(Task::new(msg.clone(), queue, 0), ep, at.slot());
            m.occupy(at, job.holder());
            reserved.push(job);
        }
        (reserved, Some(jobs))
    }

    /// After the record's commit: each reserved job MySQL claimed (`Some(Claimed)`) goes to the
    /// dispatch pool; the others' reservations are undone (a slot MySQL says is held is mirrored)
    /// and their tasks go to the scheduler as usual. `verdicts` is empty when the record failed.
    /// Returns the ids started.
    pub(crate) fn start_reserved(
        &self,
        reserved: Vec<GpuJob>,
        verdicts: Vec<Option<Claim>>,
        jobs: Option<Sender<GpuJob>>,
    ) -> HashSet<String> {
        let mut started = HashSet::new();
        let mut verdicts = verdicts.into_iter();
        let committed = Instant::now();
        for mut job in reserved {
            match (verdicts.next().flatten(), &jobs) {
                (Some(Claim::Claimed), Some(jobs)) => {
                    job.claimed_at = committed;
                    started.insert(job.task.msg.task_id.clone());
                    self.dispatch_claimed(jobs, job, "intake");
                }
                // MySQL knows a holder the mirror did not: mirrored over the reservation.
                (Some(Claim::SlotTaken { holder, attempt }), _) => {
                    self.slots()
                        .hold(&job.endpoint.id, job.slot, holder, attempt);
                }
                _ => self.unreserve(&job),
            }
        }
        started
    }

    /// The dispatch pool's queue for a job started outside the scheduler's round: none at a
    /// stop, or once the scheduler emptied it.
    fn dispatch_queue(&self) -> Option<Sender<GpuJob>> {
        if self.stop.is_stopping() {
            return None;
        }
        self.dispatch.locked().clone()
    }

    /// Undoes the in-memory reservation of a job whose claim did not happen.
    pub(crate) fn unreserve(&self, job: &GpuJob) {
        self.slots()
            .release(&job.endpoint.id, job.slot, &job.task.msg.task_id);
    }

    /// Lent tasks not claimed go back on deck; at a stop they stay `pending` here in MySQL.
    fn give_back(&self, tasks: Vec<(String, Task)>) {
        if tasks.is_empty() {
            return;
        }
        for t in self.deck.locked().give_back(tasks) {
            log::info!(task_id = t.msg.task_id.as_str();
                "stopping: task stays pending here, resumed at the next start");
        }
        self.wake_scheduler();
    }

    /// A GPU attempt claimed `by` the scheduler, an ending or an intake
    /// ([`crate::obs::metrics::CLAIMED_BY`]) goes to the dispatch pool: announced to the other
    /// instances, counted and logged first.
    pub(crate) fn dispatch_claimed(&self, jobs: &Sender<GpuJob>, job: GpuJob, by: &str) {
        let ep = &job.endpoint;
        let task_id = job.task.msg.task_id.as_str();
        self.metrics.claims.inc(by);
        self.announce(true, &ep.id, job.slot, task_id, job.attempt);
        self.first_dispatch(&job.task.msg, job.attempt);
        log::info!(task_id, gpu = ep.id.as_str(), slot = job.slot,
            attempt = job.attempt, queue = job.task.queue.as_str(), by; "slot claimed");
        // Unbounded (jobs never outnumber claimed slots); it fails only if every dispatch worker
        // is gone, which the supervisor is already handling.
        if let Err(e) = jobs.send(job) {
            log::error!(task_id = e.0.task.msg.task_id.as_str();
                "dispatch pool gone; task stays processing until its lease ends");
        }
    }

    /// What follows an ending in memory: metrics, the slot (held at once by the `successor`
    /// the same transaction gave it to, if any), the log, a retry for the scheduler.
    fn ended(
        &self,
        req: &EndRequest<'_>,
        out: &Finish,
        source: &str,
        successor: Option<&(SlotRef, GpuJob)>,
    ) {
        let EndRequest {
            task_id,
            attempt,
            ending,
            ..
        } = *req;
        let Finish::Applied {
            slot,
            next,
            age,
            work,
        } = out
        else {
            log::info!(task_id, attempt, source, outcome:? = out; "completion not applied");
            return;
        };
        // As `task_attempts` records it: an attempt of a task cancelled meanwhile is `cancelled`,
        // however it ended.
        let outcome = match next {
            Next::Done(crate::store::State::Cancelled) => Ending::Cancelled.outcome(),
            _ => ending.outcome(),
        };
        self.metrics.attempts.inc(outcome);
        match next {
            Next::Retry { .. } => {
                self.metrics
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Next::Done(_) => {
                if let Some(age) = age {
                    self.metrics.task_seconds.observe(*age);
                }
            }
        }
        if let Some((gpu, index)) = slot {
            let mut m = self.slots();
            m.release(gpu, *index, task_id);
            if let Some((at, job)) = successor {
                m.occupy(*at, job.holder());
            }
            if let Some((cost, seconds)) = work {
                m.learn(gpu, *cost, *seconds);
            }
            drop(m);
            self.announce(false, gpu, *index, task_id, attempt);
        }
        let gpu = slot.as_ref().map(|(g, _)| g.as_str()).unwrap_or("");
        let error = ending.error().unwrap_or("");
        match next {
            Next::Done(crate::store::State::Finished) => {
                log::info!(task_id, attempt, gpu, source; "task finished")
            }
            Next::Done(crate::store::State::Cancelled) => {
                log::warn!(task_id, attempt, gpu, source; "task cancelled")
            }
            Next::Done(_) => log::warn!(task_id, attempt, gpu, source, error; "task failed"),
            Next::Retry { after } => {
                log::warn!(task_id, attempt, gpu, source, error, retry_in:? = after;
                    "attempt failed; will retry");
                self.retry_later(task_id, *after);
            }
        }
    }

    /// [`Shared::end_attempt`] that keeps trying through a MySQL outage (with backoff, up to
    /// `patience`), so a result already in hand is not lost to a short blip. `None`: gave up (the
    /// lease will settle the attempt later) or stopping.
    pub(crate) fn end_attempt_patiently(
        &self,
        task_id: &str,
        attempt: u32,
        ending: Ending<'_>,
        source: &str,
        patience: Duration,
    ) -> Option<Finish> {
        let deadline = Instant::now() + patience;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.end_attempt(task_id, attempt, ending, source) {
                Ok(f) => return Some(f),
                Err(e) => {
                    let wait = backoff.next_delay();
                    trouble!(error, self, Trouble::Mysql, e;
                        "could not record the end of an attempt",
                        task_id, attempt, source, retry_in:? = wait);
                    if Instant::now() + wait > deadline || self.stop.sleep(wait) {
                        return None;
                    }
                }
            }
        }
    }

    /// Records that the looping thread `name` is making progress.
    pub(crate) fn tick(&self, name: &'static str) {
        self.progress.locked().insert(name, Instant::now());
    }

    /// The looping threads that have not gone round for longer than `limit`.
    pub(crate) fn stalled(&self, limit: Duration) -> Vec<&'static str> {
        self.progress
            .locked()
            .iter()
            .filter(|(_, t)| t.elapsed() > limit)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Tasks waiting in Redis over every queue, as last measured.
    pub(crate) fn waiting(&self) -> u64 {
        self.queue_depths.locked().iter().map(|(_, n)| n).sum()
    }

    /// The `STATUS=` line and the log's summary: slot use, backlog, GPUs down.
    pub(crate) fn status_line(&self) -> String {
        let (busy, total, down) = {
            let m = self.slots();
            (m.busy(), m.total(), m.down())
        };
        format!(
            "{busy}/{total} GPU slots busy, {} tasks waiting, {down} GPUs down",
            self.waiting()
        )
    }

    /// Counts `kind` in `qsys_errors_total`. Sites that also log use `trouble!`.
    pub(crate) fn count(&self, kind: Trouble) {
        self.metrics.errors.inc(kind.label());
    }

    /// Counts `kind` and makes `/healthz` (and the maintenance thread, which waits while MySQL is
    /// out) see it as failing with `error` until [`Shared::cleared`]: for the threads that judge a
    /// dependency's health. Sites that also log use `outage!`.
    pub(crate) fn raise(&self, kind: Trouble, error: &dyn std::fmt::Display) {
        self.count(kind);
        self.problems
            .locked()
            .insert(kind.label(), error.to_string());
    }

    /// `kind` works again.
    pub(crate) fn cleared(&self, kind: Trouble) {
        self.problems.locked().remove(kind.label());
    }

    pub(crate) fn problems(&self) -> BTreeMap<&'static str, String> {
        self.problems.locked().clone()
    }

    /// Whether an operator cancelled attempt `attempt` of `task_id`, which runs here.
    pub(crate) fn cancel_asked(&self, task_id: &str, attempt: u32) -> bool {
        self.cancels
            .locked()
            .contains(&(task_id.to_string(), attempt))
    }

    pub(crate) fn kill_children(&self) {
        let groups: Vec<i32> = self.children.locked().iter().copied().collect();
        for pgid in groups {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    /// 200 when MySQL answers now and no other dependency is known to fail; otherwise 503 with what is
    /// wrong, by dependency.
    pub(crate) fn health(&self) -> (u16, Value) {
        let mut problems = self.problems();
        // A loop that stopped going round is as unhealthy as a lost dependency (README: operations).
        let stalled = self.stalled(STALL_LIMIT);
        if !stalled.is_empty() && !self.stop.is_stopping() {
            problems.insert(
                "threads",
                format!(
                    "no progress for over {}s: {}",
                    STALL_LIMIT.as_secs(),
                    stalled.join(", ")
                ),
            );
        }
        match self.store.ping() {
            Ok(()) => {
                problems.remove("mysql");
            }
            Err(e) => {
                problems.insert("mysql", e.to_string());
            }
        }
        if problems.is_empty() {
            (200, json!({ "status": "ok" }))
        } else {
            (503, json!({ "status": "unhealthy", "problems": problems }))
        }
    }
}

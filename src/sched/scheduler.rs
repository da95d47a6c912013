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
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{never, select, Receiver, Sender, TrySendError};

use crate::config::{Endpoint, Handler};
use crate::fleet::{Holder, Place};
use crate::obs::trouble::Trouble;
use crate::shared::{Event, GpuJob, Shared, Task};
use crate::store::{Claim, ClaimRequest, LetGo, Store, StoreError, StoredTask, Waking};
use crate::sync::Locked;

/// Below this many unplaced tasks (in hand and on deck) the scheduler takes another batch (up to
/// [`crate::work::poller::TAKE_BATCH`]) from the poller, so it holds at most `PREFETCH - 1 + TAKE_BATCH`:
/// enough that the slots freed during one claim transaction all find a task in the next round,
/// and at saturation that the slots one batch of endings frees all find a task on deck. At 16,
/// an ending found the deck empty for about a fifth of the slots at saturation (each then waited
/// for a scheduler round: slot gap p99 12–13 ms); at 64, for 1% (p99 5–6 ms; BENCHMARKS.md).
pub const PREFETCH: usize = 64;

/// With several pools, the tasks of a pool that cannot take them kept in a full hand; the rest
/// wait in MySQL (so one pool's backlog never blocks another's).
const KEEP_PER_POOL: usize = 4;

/// Most tasks a round keeps in hand to wait for a busy GPU (placement by predicted finish): at
/// most half the hand, so the rest always takes work the free slots can run.
const MAX_WAITING: usize = 8;

/// Rows a busy pool let go that one look makes due, per pool with a free slot.
const WAKE_BATCH: usize = 16;

/// One placement round's GPU side.
struct GpuRound {
    /// Slots reserved, to claim in one transaction.
    jobs: Vec<GpuJob>,
    /// Pools found with no free slot: their later tasks are not tried.
    full: HashSet<String>,
    /// Tasks kept in hand per pool that could not place them.
    kept: HashMap<String, usize>,
    /// Tasks let go for a busy pool.
    overflow: Vec<String>,
    /// Tasks kept this round to wait for a busy GPU.
    waiting: usize,
    /// With several pools, those with a free slot at the round's start (none with one pool:
    /// nothing is ever let go then).
    open_pools: Vec<String>,
    /// The hand was full when the round started.
    crowded: bool,
    /// Tasks of pools with no free slot, with their pool: on deck after the round.
    deck: Vec<(String, Task)>,
}

impl GpuRound {
    fn new(shared: &Shared, crowded: bool) -> GpuRound {
        let mut m = shared.slots();
        m.new_round();
        let pools = m.pools_open();
        let open_pools = pools
            .iter()
            .filter(|(_, open)| pools.len() > 1 && *open)
            .map(|(p, _)| p.to_string())
            .collect();
        GpuRound {
            jobs: Vec::new(),
            full: HashSet::new(),
            kept: HashMap::new(),
            overflow: Vec::new(),
            waiting: 0,
            open_pools,
            crowded,
            deck: Vec::new(),
        }
    }
}

/// What became of one attempt to place a task: `None` when it went (or is done with), the task
/// back when it cannot go now (no slot, no idle worker, MySQL trouble) and stays in hand.
type Placed = Option<Task>;

/// What the scheduler asks of MySQL. A trait so that its placement logic is unit-tested with an
/// in-memory store (below) as well as end to end against MariaDB (tests/); [`Store`] is the one
/// production implementation.
pub(crate) trait Claims {
    /// The `pending` rows this instance holds (at start).
    fn pending_tasks(&self) -> Result<Vec<StoredTask>, StoreError>;
    /// One `pending` row this instance holds, when it still is.
    fn pending_task(&self, task_id: &str) -> Result<Option<StoredTask>, StoreError>;
    /// `pending` rows nobody has held for `older_than`, not of a `paused` type, now held here.
    fn adopt_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        paused: &[String],
    ) -> Result<Vec<StoredTask>, StoreError>;
    /// Delayed (or let-go) `pending` rows that are due, not of a `paused` type, now held here.
    fn adopt_due(&self, limit: usize, paused: &[String]) -> Result<Vec<StoredTask>, StoreError>;
    /// Gives up this instance's hold on `pending` rows, to wait in MySQL (`until`).
    fn let_go(&self, task_ids: &[String], until: LetGo) -> Result<(), StoreError>;
    /// Makes up to `limit` rows let go for a busy pool due now, of the `types` chosen.
    fn wake_waiting(&self, types: Waking<'_>, limit: usize) -> Result<u64, StoreError>;
    /// This instance's `pending` rows untouched for `older_than`.
    fn stale_pending(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<StoredTask>, StoreError>;
    /// Fails a `pending` task for good; false if it was no longer pending.
    fn fail_pending(&self, task_id: &str, error: &str) -> Result<bool, StoreError>;
    /// Claims each slot for its task's next attempt, in one transaction.
    fn claim_gpu_attempts(&self, reqs: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError>;
}

impl Claims for Store {
    fn pending_tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
        Store::pending_tasks(self)
    }
    fn pending_task(&self, task_id: &str) -> Result<Option<StoredTask>, StoreError> {
        Store::pending_task(self, task_id)
    }
    fn adopt_orphans(
        &self,
        older_than: Duration,
        limit: usize,
        paused: &[String],
    ) -> Result<Vec<StoredTask>, StoreError> {
        Store::adopt_orphans(self, older_than, limit, paused)
    }
    fn adopt_due(&self, limit: usize, paused: &[String]) -> Result<Vec<StoredTask>, StoreError> {
        Store::adopt_due(self, limit, paused)
    }
    fn let_go(&self, task_ids: &[String], until: LetGo) -> Result<(), StoreError> {
        Store::let_go(self, task_ids, until)
    }
    fn wake_waiting(&self, types: Waking<'_>, limit: usize) -> Result<u64, StoreError> {
        Store::wake_waiting(self, types, limit)
    }
    fn stale_pending(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<StoredTask>, StoreError> {
        Store::stale_pending(self, older_than, limit)
    }
    fn fail_pending(&self, task_id: &str, error: &str) -> Result<bool, StoreError> {
        Store::fail_pending(self, task_id, error)
    }
    fn claim_gpu_attempts(&self, reqs: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
        Store::claim_gpu_attempts(self, reqs)
    }
}

pub(crate) struct Scheduler<S: Claims = Store> {
    shared: Arc<Shared>,
    store: S,
    tasks: Receiver<Vec<Task>>,
    events: Receiver<Event>,
    gpu_jobs: Sender<GpuJob>,
    handler_jobs: Sender<Task>,
    client: redis::Client,
    pending: VecDeque<Task>,
    /// How many tasks at the head of `pending` were put first since the last round: the tasks
    /// back from the deck go behind them.
    first: usize,
    /// After a MySQL error, placement pauses until then.
    retry_at: Option<Instant>,
    /// Retries waiting for their backoff: (due, task id).
    delayed: BinaryHeap<Reverse<(Instant, String)>>,
    /// When [`Scheduler::sweep`] last ran.
    swept: Instant,
    /// When [`Scheduler::adopt_due`] last looked.
    due_checked: Instant,
}

/// How often the scheduler looks for `pending` rows nobody is working on.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often it looks for delayed tasks that are due: they run within this of their time.
const DUE_EVERY: Duration = Duration::from_millis(500);
/// A row nobody holds is adopted once it has been so for this long: a hand-back releases its rows
/// a moment before it pushes them to Redis, where a peer takes them over the usual way.
const ORPHAN_AFTER: Duration = Duration::from_secs(5);
/// A row held here but in no thread's memory is taken again once untouched for this long: well
/// past any path from the poller's record or the hand to a worker's start.
const STALE_AFTER: Duration = Duration::from_secs(30);

impl<S: Claims> Scheduler<S> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        store: S,
        tasks: Receiver<Vec<Task>>,
        events: Receiver<Event>,
        gpu_jobs: Sender<GpuJob>,
        handler_jobs: Sender<Task>,
        client: redis::Client,
    ) -> Scheduler<S> {
        Scheduler {
            shared,
            store,
            tasks,
            events,
            gpu_jobs,
            handler_jobs,
            client,
            pending: VecDeque::new(),
            first: 0,
            retry_at: None,
            delayed: BinaryHeap::new(),
            swept: Instant::now(),
            due_checked: Instant::now() - DUE_EVERY,
        }
    }

    /// Takes over the `pending` tasks MySQL says this instance holds (a restart after a crash):
    /// due ones in order, the others when their backoff ends.
    pub(crate) fn resume(&mut self) -> Result<usize, StoreError> {
        let rows = self.store.pending_tasks()?;
        let n = rows.len();
        for row in rows {
            if let Some(t) = self.take_up(row) {
                self.pending.push_back(t);
            }
        }
        // Counted before the poller starts, so no task arriving starts ahead of these.
        self.shared.hand.set_held(self.held());
        Ok(n)
    }

    /// Takes a batch from the poller into the hand, and counts it there.
    fn take_in(&mut self, batch: Vec<Task>) {
        let n = batch.len();
        self.pending.extend(batch);
        self.shared.hand.taken(n, self.held());
    }

    /// Puts `task` at the head of the hand, ahead of those on deck too.
    fn put_first(&mut self, task: Task) {
        self.pending.push_front(task);
        self.first += 1;
    }

    /// Tasks in hand: those here and those on deck (lent ones included).
    fn held(&self) -> usize {
        self.pending.len() + self.shared.deck.locked().len()
    }

    /// A row this instance now holds, as a task: due now (returned), waiting for its backoff
    /// (timed), or unreadable (logged and left to its lease or an operator).
    fn take_up(&mut self, row: StoredTask) -> Option<Task> {
        let (id, wait) = (row.task_id.clone(), row.wait);
        match Task::from_stored(row) {
            Ok(t) if wait.is_zero() => Some(t),
            Ok(_) => {
                self.delayed.push(Reverse((Instant::now() + wait, id)));
                None
            }
            Err(e) => {
                log::error!(task_id = id.as_str(), error = e.as_str(); "cannot resume task");
                None
            }
        }
    }

    /// No `pending` row stays so for good (issue 14): adopts rows nobody holds (a stop whose
    /// hand-back to Redis failed or crashed half-way, a dead instance's whose re-push failed), and
    /// takes again this instance's rows that no thread holds (a path that gave up on a task, a
    /// commit whose acknowledgement was lost). Bounded: at most a hand's worth per sweep, and only
    /// while the hand has room; two indexed reads every [`SWEEP_EVERY`].
    fn sweep(&mut self) {
        if self.swept.elapsed() < SWEEP_EVERY || self.held() >= PREFETCH {
            return;
        }
        self.swept = Instant::now();
        self.wake_waiting(true);
        let room = PREFETCH;
        let paused = self.held_back_types();
        let store = &self.store;
        let mut found = match store.adopt_orphans(ORPHAN_AFTER, room, &paused) {
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
        held.extend(self.shared.deck.locked().ids().map(str::to_string));
        held.extend(self.delayed.iter().map(|Reverse((_, id))| id.clone()));
        let mut taken = Vec::new();
        for row in found {
            if held.contains(row.task_id.as_str()) {
                continue;
            }
            taken.extend(self.take_up(row));
        }
        if !taken.is_empty() {
            log::warn!(count = taken.len(); "took up pending tasks that no thread held");
            self.pending.extend(taken);
        }
    }

    /// The task types no row should be adopted for now: those paused, those of a pool with no
    /// GPU up, and, with several pools, those of a pool with no free slot (its tasks would only
    /// be let go again: [`Scheduler::place_pending`]).
    fn held_back_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.shared.paused().types.into_iter().collect();
        let config = self.shared.config();
        let m = self.shared.slots();
        let several = m.pools_open().len() > 1;
        for (name, h) in &config.types {
            let Handler::Gpu { pool } = h else { continue };
            if !m.pool_up(pool) || (several && !m.pool_open(pool)) {
                types.push(name.clone());
            }
        }
        types
    }

    /// Makes due the rows a busy pool let go: for each pool with a free slot now, [`WAKE_BATCH`]
    /// of its types' (a paused type's wait for its resume); or (`all`, at each sweep) of every
    /// type but those paused and those of the pools still without room, so that a row whose type
    /// a reload moved to another pool or removed is not left waiting for good.
    /// [`Scheduler::adopt_due`] takes them up.
    fn wake_waiting(&self, all: bool) {
        let paused = self.shared.paused().types;
        let (mut open, mut held): (BTreeMap<String, Vec<String>>, Vec<String>) = Default::default();
        {
            let config = self.shared.config();
            let m = self.shared.slots();
            for (name, h) in &config.types {
                let Handler::Gpu { pool } = h else { continue };
                if m.pool_open(pool) && !paused.contains(name) {
                    open.entry(pool.clone()).or_default().push(name.clone());
                } else {
                    held.push(name.clone());
                }
            }
        }
        let batches: Vec<Waking<'_>> = if all {
            held.extend(paused.iter().cloned());
            vec![Waking::NotOf(&held)]
        } else {
            open.values().map(|types| Waking::Of(types)).collect()
        };
        for types in batches {
            if let Err(e) = self.store.wake_waiting(types, WAKE_BATCH) {
                log::warn!(error:% = e; "mysql error waking tasks a busy pool let go");
                return;
            }
        }
    }

    /// Takes up delayed tasks that are due (and the tasks of a type resumed), earliest first,
    /// while the hand has room: they wait in MySQL, held by nobody, until then.
    fn adopt_due(&mut self) {
        let held = self.held();
        if self.due_checked.elapsed() < DUE_EVERY || held >= PREFETCH {
            return;
        }
        self.due_checked = Instant::now();
        self.wake_waiting(false);
        let paused = self.held_back_types();
        let room = PREFETCH - held;
        match self.store.adopt_due(room, &paused) {
            Ok(rows) => {
                // As many due as there was room: more may be waiting, so look again as soon
                // as the hand has room (a burst comes due at the pace tasks are placed).
                if rows.len() == room {
                    self.due_checked = Instant::now() - DUE_EVERY;
                }
                for row in rows {
                    let id = row.task_id.clone();
                    match Task::from_stored(row) {
                        Ok(t) => self.pending.push_back(t),
                        Err(e) => log::error!(task_id = id.as_str(), error = e.as_str();
                            "cannot take up a due task"),
                    }
                }
            }
            Err(e) => log::warn!(error:% = e; "mysql error looking for due tasks"),
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
            match self.store.pending_task(&id) {
                Ok(Some(row)) => match Task::from_stored(row) {
                    // Retries go first: they have waited already.
                    Ok(t) => self.put_first(t),
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
            self.adopt_due();
            self.release_due();
            self.place_pending();
            let rx = if self.held() < PREFETCH && !poller_gone {
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
            self.shared.hand.set_held(self.held());
            select! {
                recv(rx) -> t => match t {
                    Ok(t) => self.take_in(t),
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
            while self.held() < PREFETCH && !poller_gone {
                match self.tasks.try_recv() {
                    Ok(t) => self.take_in(t),
                    Err(_) => break,
                }
            }
        }
        self.hand_back();
        // Hand-overs now end with their slot freed; the dispatch pool ends with the last job.
        self.shared.dispatch.locked().take();
        log::debug!("scheduler stopped");
    }

    /// Tries every task in hand, in order. Once a pool has no free slot no later task of that
    /// pool is tried; likewise for handler tasks and idle workers. With several pools, a full
    /// hand never waits on one pool while another has room: past [`KEEP_PER_POOL`] of a pool
    /// that cannot take them, its tasks are let go to wait in MySQL (found again when it has
    /// room), so the hand takes in the other pools' work.
    fn place_pending(&mut self) {
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.retry_at = None;
        // Back from the deck, behind the tasks put first since the last round (they were
        // ahead of them, or are retries).
        let at = std::mem::take(&mut self.first).min(self.pending.len());
        for t in self.shared.deck.locked().take_all().into_iter().rev() {
            self.pending.insert(at, t);
        }
        let mut workers_busy = false;
        let paused = self.shared.paused().types;
        let mut let_go = Vec::new();
        let mut round = GpuRound::new(&self.shared, self.held() >= PREFETCH);
        for _ in 0..self.pending.len() {
            let task = self.pending.pop_front().expect("len checked");
            let handler = self.shared.config().types.get(&task.msg.kind).cloned();
            let placed = match handler {
                // Waits in MySQL, held by nobody, until the type is resumed.
                _ if paused.contains(&task.msg.kind) => {
                    let_go.push(task.msg.task_id);
                    None
                }
                None => self.fail_unknown(task),
                Some(Handler::Gpu { pool }) => self.place_gpu(task, &pool, &mut round),
                Some(_) if workers_busy => Some(task),
                Some(_) => match self.handler_jobs.try_send(task) {
                    Ok(()) => None,
                    Err(TrySendError::Full(t) | TrySendError::Disconnected(t)) => {
                        workers_busy = true;
                        Some(t)
                    }
                },
            };
            if let Some(t) = placed {
                self.pending.push_back(t);
            }
            if self.retry_at.is_some() {
                break;
            }
        }
        // On deck before the claim's transaction, so the slots freed meanwhile find them.
        let refused = self.shared.deck.locked().put(round.deck);
        self.pending.extend(refused);
        for (ids, until) in [(let_go, LetGo::Paused), (round.overflow, LetGo::PoolBusy)] {
            if let Err(e) = self.store.let_go(&ids, until) {
                // Held here and in no memory: the sweep takes them up in 30 s and lets go again.
                log::warn!(error:% = e, count = ids.len(); "cannot let go of tasks");
            }
        }
        self.claim(round.jobs);
    }

    /// A GPU task of `pool` in this round: reserved (its job joins the round's claim), kept in
    /// hand, or let go to wait in MySQL while another pool has room and the hand is full.
    fn place_gpu(&self, task: Task, pool: &str, round: &mut GpuRound) -> Placed {
        // Waiting tasks never fill the hand: past MAX_WAITING, one that would wait for a busy GPU
        // takes its best free slot instead, so there is always room for other work.
        let may_wait = round.waiting < MAX_WAITING;
        let place = if round.full.contains(pool) {
            Place::Full
        } else {
            match self.reserve(&task, pool, may_wait) {
                Ok((endpoint, slot)) => {
                    round.jobs.push(GpuJob::new(task, endpoint, slot));
                    return None;
                }
                Err(place) => place,
            }
        };
        if place == Place::Wait {
            round.waiting += 1;
        }
        let held = round.kept.entry(pool.to_string()).or_default();
        // Only a pool with no free slot lets go (one with a slot free is woken at once).
        if place == Place::Full {
            round.full.insert(pool.to_string());
            if round.crowded && *held >= KEEP_PER_POOL && round.open_pools.iter().any(|p| p != pool)
            {
                round.overflow.push(task.msg.task_id);
                return None;
            }
            *held += 1;
            round.deck.push((pool.to_string(), task));
            return None;
        }
        *held += 1;
        Some(task)
    }

    fn fail_unknown(&mut self, task: Task) -> Placed {
        let error = format!("unknown task type {:?}", task.msg.kind);
        match self.store.fail_pending(&task.msg.task_id, &error) {
            Ok(_) => {
                log::warn!(task_id = task.msg.task_id.as_str(), queue = task.queue.as_str(),
                    kind = task.msg.kind.as_str(); "unknown task type: task failed");
                None
            }
            Err(e) => self.db_trouble(task, &e),
        }
    }

    fn db_trouble(&mut self, task: Task, e: &dyn std::fmt::Display) -> Placed {
        log::warn!(task_id = task.msg.task_id.as_str(), error:% = e;
            "mysql error while scheduling; will retry");
        self.retry_at = Some(Instant::now() + Duration::from_secs(1));
        Some(task)
    }

    /// Reserves a free slot of `pool` in memory for `task`'s next attempt, by the configured
    /// placement: the GPU and the slot. `Err`: no slot now ([`Place::Full`]), or one the task
    /// should not take ([`Place::Wait`]).
    fn reserve(
        &self,
        task: &Task,
        pool: &str,
        may_wait: bool,
    ) -> Result<(Arc<Endpoint>, usize), Place> {
        let policy = self.shared.config().placement;
        let cost = task.msg.cost();
        let mut m = self.shared.slots();
        let at = match m.place(pool, cost, task.avoid_gpu.as_deref(), policy, may_wait) {
            Place::Slot(at) => at,
            other => return Err(other),
        };
        m.occupy(
            at,
            Holder::new(task.msg.task_id.clone(), task.attempts + 1, cost),
        );
        Ok((Arc::clone(m.endpoint(at.gpu())), at.slot()))
    }

    /// Claims the slots reserved this round in one MySQL transaction and hands each claimed job to
    /// the dispatch pool. A slot MySQL says is held (another instance took it) is mirrored and its
    /// task placed again; on a MySQL error every reservation is undone and placement pauses.
    fn claim(&mut self, jobs: Vec<GpuJob>) {
        if jobs.is_empty() {
            return;
        }
        let reqs: Vec<ClaimRequest<'_>> = jobs.iter().map(GpuJob::claim_request).collect();
        let claims = self.store.claim_gpu_attempts(&reqs);
        drop(reqs);
        let claims = match claims {
            Ok(c) => c,
            Err(e) => {
                trouble!(warn, self.shared, Trouble::Mysql, e;
                    "mysql error claiming slots; will retry", count = jobs.len());
                for job in jobs.into_iter().rev() {
                    self.shared.unreserve(&job);
                    self.put_first(job.task);
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
                Claim::Claimed => self
                    .shared
                    .dispatch_claimed(&self.gpu_jobs, job, "scheduler"),
                Claim::SlotTaken { holder, attempt } => {
                    // MySQL knows a holder the mirror did not: mirror it; the task is placed again.
                    // Routine with several instances: another one claimed it first.
                    log::info!(gpu = ep.id.as_str(), slot = job.slot, holder = holder.as_str();
                        "slot held in mysql but free in memory; mirrored");
                    self.shared.slots().hold(&ep.id, job.slot, holder, attempt);
                    again.push(job.task);
                }
                Claim::NotPending => {
                    self.shared.unreserve(&job);
                    log::info!(task_id; "task no longer pending (moved elsewhere); dropped from hand");
                }
            }
        }
        for task in again.into_iter().rev() {
            self.put_first(task);
        }
    }

    /// At a stop: everything still in hand, and whatever the poller sent meanwhile, goes back to
    /// the head of its queue in its original order.
    fn hand_back(&mut self) {
        for t in self.shared.deck.locked().close().into_iter().rev() {
            self.pending.push_front(t);
        }
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
        match self.shared.hand_back(&self.client, &back) {
            Ok(()) => log::info!(count = back.len(); "returned tasks in hand to redis"),
            Err(e) => log::error!(count = back.len(), error:% = e;
                "could not return tasks to redis; they resume at the next start"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::path::Path;
    use std::sync::Mutex;

    use crossbeam_channel::{bounded, unbounded};

    use super::*;
    use crate::config::{Config, Env, Secret};
    use crate::contract::token::Signer;
    use crate::fleet::SlotMatrix;
    use crate::sync::Locked;

    /// The claims contract in memory: a slot row is held by at most one task, and only a
    /// `pending` task can claim one. `down` makes every call an outage.
    #[derive(Default)]
    struct MemStore {
        pending: Mutex<HashSet<String>>,
        held: Mutex<HashMap<(String, usize), (String, u32)>>,
        failed: Mutex<Vec<(String, String)>>,
        /// Requests per claim transaction, in order.
        rounds: Mutex<Vec<usize>>,
        /// Tasks let go, and why.
        let_go: Mutex<Vec<(String, LetGo)>>,
        down: bool,
    }

    fn outage() -> StoreError {
        StoreError::Schema("mysql is down (test)".into())
    }

    impl Claims for MemStore {
        fn pending_tasks(&self) -> Result<Vec<StoredTask>, StoreError> {
            Ok(Vec::new())
        }
        fn pending_task(&self, _: &str) -> Result<Option<StoredTask>, StoreError> {
            Ok(None)
        }
        fn adopt_orphans(
            &self,
            _: Duration,
            _: usize,
            _: &[String],
        ) -> Result<Vec<StoredTask>, StoreError> {
            Ok(Vec::new())
        }
        fn adopt_due(&self, _: usize, _: &[String]) -> Result<Vec<StoredTask>, StoreError> {
            Ok(Vec::new())
        }
        fn let_go(&self, task_ids: &[String], until: LetGo) -> Result<(), StoreError> {
            self.let_go
                .locked()
                .extend(task_ids.iter().map(|id| (id.clone(), until)));
            Ok(())
        }
        fn wake_waiting(&self, _: Waking<'_>, _: usize) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn stale_pending(&self, _: Duration, _: usize) -> Result<Vec<StoredTask>, StoreError> {
            Ok(Vec::new())
        }
        fn fail_pending(&self, task_id: &str, error: &str) -> Result<bool, StoreError> {
            if self.down {
                return Err(outage());
            }
            self.failed
                .locked()
                .push((task_id.to_string(), error.to_string()));
            Ok(self.pending.locked().remove(task_id))
        }
        fn claim_gpu_attempts(&self, reqs: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
            if self.down {
                return Err(outage());
            }
            self.rounds.locked().push(reqs.len());
            let mut held = self.held.locked();
            let mut pending = self.pending.locked();
            Ok(reqs
                .iter()
                .map(|r| {
                    let key = (r.gpu_id.to_string(), r.slot);
                    if let Some((holder, attempt)) = held.get(&key) {
                        return Claim::SlotTaken {
                            holder: holder.clone(),
                            attempt: *attempt,
                        };
                    }
                    if !pending.remove(r.task_id) {
                        return Claim::NotPending;
                    }
                    held.insert(key, (r.task_id.to_string(), r.attempts + 1));
                    Claim::Claimed
                })
                .collect())
        }
    }

    const CONFIG: &str = r#"
        [callback]
        listen = "127.0.0.1:0"
        secret = "0123456789abcdef"
        [[gpu.endpoints]]
        id = "g0"
        url = "http://127.0.0.1:1/run"
        slots = 2
        [[gpu.endpoints]]
        id = "g1"
        url = "http://127.0.0.1:1/run"
        slots = 2
        [types.start_transcribe]
        handler = "gpu"
        [types.email]
        handler = "exec"
        command = ["/bin/true"]
    "#;

    struct Rig {
        sched: Scheduler<MemStore>,
        gpu_jobs: Receiver<GpuJob>,
        /// Kept so the handler channel stays open; nobody receives (every worker busy).
        _handler_jobs: Receiver<Task>,
    }

    fn rig(store: MemStore) -> Rig {
        let config = Config::from_toml(CONFIG, Path::new("test.toml"), &Env::new()).expect("ok");
        let matrix = SlotMatrix::new(&config.gpus);
        let signer = Signer::new(Secret::new("0123456789abcdef"), "http://x/callback");
        let (shared, events, _slot_events) =
            Shared::new(config, Store::offline("test"), matrix, signer);
        let (_, tasks) = bounded(0);
        let (gpu_tx, gpu_jobs) = unbounded();
        let (handler_tx, handler_jobs) = bounded(0);
        let client = redis::Client::open("redis://127.0.0.1:1").expect("a url");
        let sched = Scheduler::new(
            Arc::new(shared),
            store,
            tasks,
            events,
            gpu_tx,
            handler_tx,
            client,
        );
        Rig {
            sched,
            gpu_jobs,
            _handler_jobs: handler_jobs,
        }
    }

    fn task(id: &str, kind: &str) -> Task {
        let raw = format!(r#"{{"type":"{kind}","data":{{"task_id":"{id}"}}}}"#);
        let msg = crate::contract::message::parse(raw.as_bytes(), || unreachable!("has an id"))
            .expect("a well-formed message");
        Task::new(msg, "q1", 0)
    }

    /// A store where `ids` are pending.
    fn pending(ids: &[&str]) -> MemStore {
        let store = MemStore::default();
        store
            .pending
            .locked()
            .extend(ids.iter().map(|s| s.to_string()));
        store
    }

    /// The tasks in hand: on deck (waiting for a full pool), then the others.
    fn hand(r: &Rig) -> Vec<String> {
        let deck = r
            .sched
            .shared
            .deck
            .locked()
            .ids()
            .map(str::to_string)
            .collect::<Vec<_>>();
        deck.into_iter()
            .chain(r.sched.pending.iter().map(|t| t.msg.task_id.clone()))
            .collect()
    }

    #[test]
    fn a_round_fills_every_free_slot_least_loaded_first_in_one_claim() {
        let ids = ["t1", "t2", "t3", "t4", "t5"];
        let mut r = rig(pending(&ids));
        r.sched
            .pending
            .extend(ids.iter().map(|id| task(id, "start_transcribe")));
        r.sched.place_pending();
        let jobs: Vec<GpuJob> = r.gpu_jobs.try_iter().collect();
        let placed: Vec<(&str, &str, usize)> = jobs
            .iter()
            .map(|j| (j.task.msg.task_id.as_str(), j.endpoint.id.as_str(), j.slot))
            .collect();
        // The GPUs alternate (equal load, rotating tie-break); each fills its lowest slot first.
        assert_eq!(
            placed,
            [
                ("t1", "g0", 0),
                ("t2", "g1", 0),
                ("t3", "g0", 1),
                ("t4", "g1", 1)
            ]
        );
        assert!(jobs.iter().all(|j| j.attempt == 1));
        assert_eq!(
            *r.sched.store.rounds.locked(),
            [4],
            "one transaction for the round"
        );
        assert_eq!(hand(&r), ["t5"], "the fifth waits in hand, in order");
        assert_eq!(r.sched.shared.slots().busy(), 4);
    }

    #[test]
    fn a_slot_mysql_says_is_held_is_mirrored_and_the_task_placed_again() {
        let store = pending(&["t1"]);
        store
            .held
            .locked()
            .insert(("g0".into(), 0), ("peer-task".into(), 3));
        let mut r = rig(store);
        r.sched.pending.push_back(task("t1", "start_transcribe"));
        r.sched.place_pending();
        assert!(r.gpu_jobs.try_recv().is_err(), "nothing dispatched yet");
        assert_eq!(hand(&r), ["t1"]);
        let view = r.sched.shared.slots().view();
        let cell = view[0].cells[0].as_ref().expect("mirrored");
        assert_eq!((cell.task_id.as_str(), cell.attempt), ("peer-task", 3));
        // The next round places it on a slot that is free in MySQL too.
        r.sched.place_pending();
        let job = r.gpu_jobs.try_recv().expect("dispatched");
        assert_eq!((job.endpoint.id.as_str(), job.slot), ("g1", 0));
        assert!(hand(&r).is_empty());
    }

    #[test]
    fn a_mysql_error_undoes_every_reservation_and_pauses_placement() {
        let mut r = rig(MemStore {
            down: true,
            ..MemStore::default()
        });
        r.sched.pending.push_back(task("t1", "start_transcribe"));
        r.sched.pending.push_back(task("t2", "start_transcribe"));
        r.sched.place_pending();
        assert!(r.gpu_jobs.try_recv().is_err());
        assert_eq!(r.sched.shared.slots().busy(), 0, "reservations undone");
        assert_eq!(hand(&r), ["t1", "t2"], "back in hand, in order");
        assert!(r.sched.retry_at.is_some());
        assert_eq!(r.sched.shared.metrics.errors.get("mysql"), 1);
    }

    #[test]
    fn a_task_no_longer_pending_is_dropped_and_its_slot_freed() {
        let mut r = rig(MemStore::default());
        r.sched.pending.push_back(task("gone", "start_transcribe"));
        r.sched.place_pending();
        assert!(r.gpu_jobs.try_recv().is_err());
        assert!(hand(&r).is_empty());
        assert_eq!(r.sched.shared.slots().busy(), 0);
    }

    /// A task of a paused type is let go (it waits in MySQL, held by nobody) and does not hold
    /// up the others.
    #[test]
    fn a_paused_type_is_let_go_and_the_rest_runs() {
        let mut r = rig(pending(&["p1", "g1"]));
        r.sched.shared.set_paused(crate::store::Paused {
            types: ["email".to_string()].into(),
            ..Default::default()
        });
        r.sched.pending.push_back(task("p1", "email"));
        r.sched.pending.push_back(task("g1", "start_transcribe"));
        r.sched.place_pending();
        assert_eq!(
            *r.sched.store.let_go.locked(),
            [("p1".to_string(), LetGo::Paused)]
        );
        assert_eq!(
            r.gpu_jobs.try_recv().expect("g1 placed").task.msg.task_id,
            "g1"
        );
        assert!(hand(&r).is_empty());
    }

    #[test]
    fn an_unknown_type_fails_at_once() {
        let mut r = rig(pending(&["t1"]));
        r.sched.pending.push_back(task("t1", "no_such_type"));
        r.sched.place_pending();
        assert!(hand(&r).is_empty());
        assert_eq!(
            *r.sched.store.failed.locked(),
            [(
                "t1".to_string(),
                "unknown task type \"no_such_type\"".to_string()
            )]
        );
    }

    #[test]
    fn a_retry_avoids_the_gpu_of_its_last_attempt() {
        let mut r = rig(pending(&["t1"]));
        let mut t = task("t1", "start_transcribe");
        t.avoid_gpu = Some("g0".into());
        r.sched.pending.push_back(t);
        r.sched.place_pending();
        let job = r.gpu_jobs.try_recv().expect("dispatched");
        assert_eq!(job.endpoint.id, "g1");
    }

    #[test]
    fn handler_work_waits_for_an_idle_worker_without_holding_up_gpu_work() {
        let mut r = rig(pending(&["gpu1"]));
        r.sched.pending.push_back(task("mail1", "email"));
        r.sched.pending.push_back(task("gpu1", "start_transcribe"));
        r.sched.place_pending();
        assert_eq!(hand(&r), ["mail1"], "no worker is idle");
        assert_eq!(
            r.gpu_jobs.try_recv().expect("placed").task.msg.task_id,
            "gpu1"
        );
    }
}

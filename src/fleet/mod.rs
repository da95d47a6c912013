//! The GPU slot matrix: which task holds which slot of which GPU, in memory.
//!
//! The matrix is pure data with no I/O; the daemon keeps one behind a `Mutex` shared by the scheduler
//! thread (which picks and occupies slots), and the dispatch, handler, callback and maintenance
//! threads (which release slots after MySQL has recorded the end of an attempt, and feed GPU health).
//! MySQL's `gpu_slots` table is the authority; this is its mirror, kept so that picking a slot costs
//! no round trip. Each row carries its endpoint's settings, so a dispatch uses the settings its slot
//! was claimed under even if a reload changes them meanwhile.
//!
//! Health lives here too, because it decides what `pick` may choose: after `eject_after` consecutive
//! failed dispatches a GPU is ejected for a cooldown that doubles with each ejection (never the last
//! GPU still up); when the cooldown ends the maintenance thread probes it, and a GPU that answers comes
//! back with one usable slot, doubling with each successful dispatch up to its configured count.
//!
//! A reload reshapes the matrix ([`SlotMatrix::reconfigure`]): new GPUs join, a removed GPU and slots
//! beyond a lowered count drain (they take nothing new and vanish as their tasks end). Rows are
//! never removed, so a row index stays valid for the daemon's life.
//!
//! Which GPU of its pool a task gets is the placement policy's choice ([`placement`]), a pure
//! function; what it weighs (each GPU's learned speed, each pool's usual task size) is learned
//! here ([`speed`]), under the same lock, so a placement reads it at no cost.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Endpoint, HealthPolicy, Placement};
use crate::contract::limits::MAX_SLOTS;
use placement::{Candidate, Choice};
use speed::{Sizes, Speed};

mod placement;
mod speed;

/// Who holds a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub task_id: String,
    pub attempt: u32,
    pub since: Instant,
    /// The task's own work size, if it gave one (a task of unknown size, and a hold learned
    /// from MySQL or a peer, have none: nobody waits on an end that cannot be predicted).
    pub cost: Option<f64>,
}

impl Holder {
    /// A holder from now.
    pub(crate) fn new(task_id: String, attempt: u32, cost: Option<f64>) -> Holder {
        Holder {
            task_id,
            attempt,
            since: Instant::now(),
            cost,
        }
    }
}

/// Whether a GPU takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Out until `until`, then probed.
    Ejected {
        until: Instant,
    },
    /// A probe is running.
    Probing,
}

#[derive(Debug)]
struct Gpu {
    endpoint: Arc<Endpoint>,
    /// Slot cells; those at index `cap` and beyond are draining after a reload lowered the count.
    cells: Vec<Option<Holder>>,
    /// The configured slot count (0 once the GPU is removed from the config).
    cap: usize,
    /// Usable slots: `cap`, or fewer while ramping up after a readmission.
    limit: usize,
    health: Health,
    failures: u32,
    /// Ejections since the GPU last ran at full capacity.
    ejections: u32,
    /// Removed from the config: drains, takes nothing new.
    retired: bool,
    /// Drained by an operator (persisted in MySQL): finishes what it has, takes nothing new.
    drained: bool,
    /// Dispatches answered or not, and the last error, for `qsysd status`.
    dispatched: u64,
    failed: u64,
    last_error: Option<String>,
    speed: Speed,
}

impl Gpu {
    fn new(endpoint: Arc<Endpoint>) -> Gpu {
        let n = endpoint.slots;
        Gpu {
            speed: Speed::seeded(endpoint.speed),
            endpoint,
            cells: vec![None; n],
            cap: n,
            limit: n,
            health: Health::Up,
            failures: 0,
            ejections: 0,
            retired: false,
            drained: false,
            dispatched: 0,
            failed: 0,
            last_error: None,
        }
    }

    fn busy(&self) -> usize {
        self.cells.iter().filter(|c| c.is_some()).count()
    }

    /// Usable slots right now.
    fn usable(&self) -> usize {
        self.limit.min(self.cap)
    }

    fn free_cell(&self) -> Option<usize> {
        self.cells[..self.cap.min(self.cells.len())]
            .iter()
            .position(Option::is_none)
    }

    /// Up and taking new work, whether or not a slot is free now.
    fn serving(&self) -> bool {
        self.health == Health::Up && !self.retired && !self.drained && self.usable() > 0
    }

    fn open(&self) -> bool {
        self.serving() && self.busy() < self.usable() && self.free_cell().is_some()
    }

    /// When its first slot is predicted to free, from now: its running attempts' predicted
    /// ends, each followed by the work of the tasks this round already waits for here
    /// (`promised`, in seconds on this GPU, in order), as a list scheduler would place them.
    /// `None` if an attempt's end is unknown (its size or the speed) or long overdue.
    fn frees_in(&self, now: Instant, promised: impl Iterator<Item = f64>) -> Option<Duration> {
        let speed = self.speed.estimate()?;
        let mut ends = Vec::with_capacity(self.cells.len());
        for h in self.cells.iter().flatten() {
            let predicted = (h.cost? / speed).min(1e9);
            let ran = now.duration_since(h.since).as_secs_f64();
            // A little late is the estimate's error (the attempt ends any moment); far later,
            // the estimate says nothing.
            if ran > predicted * (1.0 + OVERDUE) {
                return None;
            }
            ends.push((predicted - ran).max(0.0));
        }
        for work in promised {
            let (i, first) = ends
                .iter()
                .copied()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(&b.1))?;
            ends[i] = first + work;
        }
        let first = ends.into_iter().reduce(f64::min)?;
        Some(Duration::from_secs_f64(first.min(1e9)))
    }

    /// Work its running attempts have left, by their sizes and its speed; an attempt of
    /// unknown size counts as `median`.
    fn work_left(&self, now: Instant, median: Option<f64>) -> f64 {
        let speed = self.speed.estimate();
        self.cells
            .iter()
            .flatten()
            .filter_map(|h| {
                let size = h.cost.or(median)?;
                let done = speed.map_or(0.0, |s| s * now.duration_since(h.since).as_secs_f64());
                Some((size - done).max(0.0))
            })
            .sum()
    }

    /// Drops free cells beyond the configured count.
    fn trim(&mut self) {
        while self.cells.len() > self.cap && self.cells.last().is_some_and(Option::is_none) {
            self.cells.pop();
        }
    }
}

/// A slot's coordinates in the matrix. Only the matrix makes them (the fields are private), so a
/// `SlotRef` always names a row that exists (rows are never removed) and a slot below
/// [`MAX_SLOTS`]: taking one can neither panic nor allocate more than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotRef {
    gpu: usize,
    slot: usize,
}

impl SlotRef {
    /// The GPU's row, for [`SlotMatrix::endpoint`].
    pub(crate) fn gpu(self) -> usize {
        self.gpu
    }

    /// The slot index within the GPU.
    pub(crate) fn slot(self) -> usize {
        self.slot
    }
}

/// GPUs x slots, each cell free or held.
#[derive(Debug)]
pub(crate) struct SlotMatrix {
    gpus: Vec<Gpu>,
    cursor: usize,
    /// Each pool's recent task sizes.
    sizes: HashMap<String, Sizes>,
    /// This round's tasks told to wait for a busy GPU: (row, seconds of work there). Each will
    /// take that GPU's next free slot, so the next task's wait there starts after it.
    promised: Vec<(usize, f64)>,
}

/// An attempt running this much (a share of its predicted time) past its predicted end makes its
/// GPU's next free slot unknown: nobody waits for it.
const OVERDUE: f64 = 0.5;

/// What [`SlotMatrix::place`] found for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Slot(SlotRef),
    /// A slot is free, but a busy GPU will end the task clearly sooner: keep it in hand.
    Wait,
    /// No GPU of its pool can take it now.
    Full,
}

/// A pool's backlog, as last worked out ([`crate::work::backlog`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolDrain {
    pub(crate) view: PoolView,
    /// Work not yet done, in cost units: running, in MySQL and in Redis.
    pub(crate) backlog_cost: f64,
    /// `backlog_cost` over the capacity, when that is known and above zero.
    pub(crate) drain_s: Option<f64>,
}

/// One pool, for status, metrics and the time to drain.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PoolView {
    pub(crate) pool: String,
    pub(crate) gpus: usize,
    pub(crate) gpus_up: usize,
    pub(crate) slots_busy: usize,
    /// Usable slots of its GPUs up.
    pub(crate) slots_up: usize,
    /// Cost units per second its GPUs up work through at full use (their speeds times their
    /// slots); `None` while no GPU up has a speed.
    pub(crate) capacity: Option<f64>,
    /// Work its running attempts have left, in cost units.
    pub(crate) running_cost: f64,
    /// Its usual task size (the median of recent ones), if any is known.
    pub(crate) median_cost: Option<f64>,
}

/// One GPU's row, for status output.
#[derive(Debug, Clone)]
pub struct GpuView {
    pub id: String,
    pub cells: Vec<Option<Holder>>,
    pub slots: usize,
    pub limit: usize,
    pub health: Health,
    pub failures: u32,
    pub retired: bool,
    pub drained: bool,
    pub dispatched: u64,
    pub failed: u64,
    pub last_error: Option<String>,
    pub pool: String,
    /// Cost units per second of wall time per attempt, when known.
    pub speed: Option<f64>,
}

/// What a dispatch outcome did to a GPU's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HealthChange {
    None,
    Ejected {
        cooldown: Duration,
    },
    /// Its usable slots grew to this many.
    Ramped {
        limit: usize,
    },
}

impl SlotMatrix {
    /// A matrix with every slot free, one row per endpoint in config order.
    pub(crate) fn new(endpoints: &[Arc<Endpoint>]) -> SlotMatrix {
        SlotMatrix {
            gpus: endpoints.iter().cloned().map(Gpu::new).collect(),
            cursor: 0,
            sizes: HashMap::new(),
            promised: Vec::new(),
        }
    }

    /// Applies a new endpoint list (a reload): known GPUs take the new settings and slot count,
    /// new ones join, missing ones retire and drain. Held slots are never touched.
    pub(crate) fn reconfigure(&mut self, endpoints: &[Arc<Endpoint>]) {
        for g in &mut self.gpus {
            match endpoints.iter().find(|e| e.id == g.endpoint.id) {
                Some(e) => {
                    let full = g.limit >= g.cap;
                    // A changed seed counts only while too little is measured here; a GPU in
                    // another pool starts again (a pool may have a unit of its own).
                    let moved = e.pool != g.endpoint.pool;
                    if moved || e.speed != g.endpoint.speed {
                        g.speed.restart(e.speed, moved);
                    }
                    g.endpoint = Arc::clone(e);
                    g.cap = e.slots;
                    g.retired = false;
                    if g.cells.len() < g.cap {
                        g.cells.resize(g.cap, None);
                    }
                    g.limit = if full { g.cap } else { g.limit.min(g.cap) };
                }
                None => {
                    g.retired = true;
                    g.cap = 0;
                }
            }
            g.trim();
        }
        for e in endpoints {
            if !self.gpus.iter().any(|g| g.endpoint.id == e.id) {
                self.gpus.push(Gpu::new(Arc::clone(e)));
            }
        }
    }

    /// A free slot of a GPU of `pool` for a task of `cost` whose previous attempt ran on `avoid`,
    /// by the placement `policy` among the pool's GPUs that take work now: its lowest free slot;
    /// or, when it `may_wait`, [`Place::Wait`] for a busy one. Advances the rotation past the
    /// chosen GPU.
    pub(crate) fn place(
        &mut self,
        pool: &str,
        cost: Option<f64>,
        avoid: Option<&str>,
        policy: Placement,
        may_wait: bool,
    ) -> Place {
        let now = Instant::now();
        let known = cost;
        let cost = cost.or_else(|| self.median_cost(pool));
        // Speeds and free times matter only to a prediction.
        let predicting = policy == Placement::PredictedFinish && cost.is_some();
        let n = self.gpus.len();
        let rows: Vec<usize> = (0..n)
            .map(|k| (self.cursor + k) % n)
            .filter(|&g| self.gpus[g].endpoint.pool == pool && self.gpus[g].serving())
            .collect();
        let candidates: Vec<Candidate<'_>> = rows
            .iter()
            .map(|&g| {
                let gpu = &self.gpus[g];
                Candidate {
                    id: &gpu.endpoint.id,
                    // A GPU with no free cell left (a slot beyond a lowered count still held)
                    // is as full as its usable count says.
                    busy: if gpu.open() {
                        gpu.busy()
                    } else {
                        gpu.usable().max(gpu.busy())
                    },
                    usable: gpu.usable(),
                    speed: gpu.speed.estimate().filter(|_| predicting),
                    frees_in: if predicting && !gpu.open() {
                        gpu.frees_in(
                            now,
                            self.promised
                                .iter()
                                .filter(|(row, _)| *row == g)
                                .map(|(_, work)| *work),
                        )
                    } else {
                        None
                    },
                }
            })
            .collect();
        let choice = match policy {
            Placement::LeastLoaded => placement::least_loaded(&candidates, avoid).map(Choice::Slot),
            Placement::PredictedFinish => {
                placement::predicted_finish(&candidates, cost, avoid, may_wait)
            }
        };
        let g = match choice {
            None => return Place::Full,
            Some(Choice::Wait(i)) => {
                let speed = candidates[i].speed.expect("a GPU waited for has a speed");
                let work = cost.expect("a task that waits has a cost") / speed;
                drop(candidates);
                self.promised.push((rows[i], work));
                return Place::Wait;
            }
            Some(Choice::Slot(i)) => rows[i],
        };
        // Noted once placed: a task that waits is asked about again every round.
        if let Some(c) = known {
            self.sizes.entry(pool.to_string()).or_default().note(c);
        }
        self.cursor = (g + 1) % n;
        let slot = self.gpus[g]
            .free_cell()
            .expect("an open GPU has a free cell");
        Place::Slot(SlotRef { gpu: g, slot })
    }

    /// The slot attempt `attempt` of `task_id` holds in memory, if any.
    pub(crate) fn held_by(&self, task_id: &str, attempt: u32) -> Option<SlotRef> {
        self.gpus.iter().enumerate().find_map(|(gpu, g)| {
            let slot = g.cells.iter().position(|c| {
                c.as_ref()
                    .is_some_and(|h| h.attempt == attempt && h.task_id == task_id)
            })?;
            Some(SlotRef { gpu, slot })
        })
    }

    /// Whether a task of `pool` (of `cost`, last run on `avoid`) would be placed on `at` were it
    /// free now: asked by an ending about to free it, so the slot goes straight to the next task
    /// in the same transaction (issue 20). The policy decides exactly as for a free slot, so a
    /// drained, retired or ejected GPU, a slot beyond a lowered count, a GPU of another pool and
    /// (by predicted finish) a GPU the task would rather not wait on all say no. The rotation
    /// moves past the GPU only when it says yes; nothing else changes.
    pub(crate) fn would_hand_over(
        &mut self,
        at: SlotRef,
        pool: &str,
        cost: Option<f64>,
        avoid: Option<&str>,
        policy: Placement,
    ) -> bool {
        let Some(holder) = self.gpus[at.gpu]
            .cells
            .get_mut(at.slot)
            .and_then(Option::take)
        else {
            return false;
        };
        let cursor = self.cursor;
        let yes = self.try_place(pool, cost, avoid, policy) == Some(at);
        self.gpus[at.gpu].cells[at.slot] = Some(holder);
        if !yes {
            self.cursor = cursor;
        }
        yes
    }

    /// The free slot [`SlotMatrix::place`] gives a task that may wait, if it gives one; a task
    /// it would keep waiting for a busy GPU leaves no promise behind (outside the scheduler's
    /// round, nobody keeps it).
    pub(crate) fn try_place(
        &mut self,
        pool: &str,
        cost: Option<f64>,
        avoid: Option<&str>,
        policy: Placement,
    ) -> Option<SlotRef> {
        let promised = self.promised.len();
        let place = self.place(pool, cost, avoid, policy, true);
        self.promised.truncate(promised);
        match place {
            Place::Slot(at) => Some(at),
            Place::Wait | Place::Full => None,
        }
    }

    /// Starts a placement round: no task waits for a busy GPU yet.
    pub(crate) fn new_round(&mut self) {
        self.promised.clear();
    }

    /// A pool's usual task size: the median of those recently placed.
    fn median_cost(&self, pool: &str) -> Option<f64> {
        self.sizes.get(pool).and_then(Sizes::median)
    }

    /// A finished attempt on `gpu_id` of `cost` that ran `seconds`: its speed is learned.
    pub(crate) fn learn(&mut self, gpu_id: &str, cost: f64, seconds: f64) {
        if let Some(g) = self.index(gpu_id) {
            self.gpus[g].speed.observe(cost, seconds);
        }
    }

    /// Speeds learned since last asked, to persist: (GPU, speed, attempts measured).
    pub(crate) fn unsaved_speeds(&mut self) -> Vec<(String, f64, u64)> {
        self.gpus
            .iter_mut()
            .filter_map(|g| {
                let (speed, n) = g.speed.take_unsaved()?;
                Some((g.endpoint.id.clone(), speed, n))
            })
            .collect()
    }

    /// Persisted speeds (an earlier run's, a peer's), for GPUs that have measured too little here.
    pub(crate) fn reseed(&mut self, speeds: &HashMap<String, f64>) {
        for g in &mut self.gpus {
            if let Some(s) = speeds.get(&g.endpoint.id) {
                g.speed.reseed(*s);
            }
        }
    }

    /// Whether any GPU of `pool` could take a task now.
    pub(crate) fn pool_open(&self, pool: &str) -> bool {
        self.gpus
            .iter()
            .any(|g| g.endpoint.pool == pool && g.open())
    }

    /// The pools of the GPUs in the config, and whether each could take a task now; cheap
    /// enough for every placement round.
    pub(crate) fn pools_open(&self) -> Vec<(&str, bool)> {
        let mut pools: Vec<(&str, bool)> = Vec::new();
        for g in self.gpus.iter().filter(|g| !g.retired) {
            let pool = g.endpoint.pool.as_str();
            match pools.iter_mut().find(|(p, _)| *p == pool) {
                Some((_, open)) => *open |= g.open(),
                None => pools.push((pool, g.open())),
            }
        }
        pools
    }

    /// Whether any GPU of `pool` is up and takes work (a slot free or not).
    pub(crate) fn pool_up(&self, pool: &str) -> bool {
        self.gpus
            .iter()
            .any(|g| g.endpoint.pool == pool && g.serving())
    }

    /// Every pool of the config, with its state now.
    pub(crate) fn pools(&self) -> Vec<PoolView> {
        let now = Instant::now();
        let mut pools: BTreeMap<&str, PoolView> = BTreeMap::new();
        for g in self.gpus.iter().filter(|g| !g.retired) {
            let pool = g.endpoint.pool.as_str();
            let p = pools.entry(pool).or_insert_with(|| PoolView {
                pool: pool.to_string(),
                gpus: 0,
                gpus_up: 0,
                slots_busy: 0,
                slots_up: 0,
                capacity: None,
                running_cost: 0.0,
                median_cost: self.median_cost(pool),
            });
            p.gpus += 1;
            p.slots_busy += g.busy();
            p.running_cost += g.work_left(now, p.median_cost);
            if g.serving() {
                p.gpus_up += 1;
                p.slots_up += g.usable();
                if let Some(speed) = g.speed.estimate() {
                    *p.capacity.get_or_insert(0.0) += speed * g.usable() as f64;
                }
            }
        }
        pools.into_values().collect()
    }

    /// Makes the mirror agree with MySQL's held slots (`(gpu, slot) -> (task, attempt)`): cells
    /// MySQL says are held are marked so; cells it says are free are freed, unless their holder was
    /// set within `grace` (a claim of ours not yet committed). Returns how many cells changed.
    pub(crate) fn resync(
        &mut self,
        held: &std::collections::HashMap<(String, usize), (String, u32)>,
        grace: Duration,
    ) -> usize {
        let mut changed = 0;
        for g in &mut self.gpus {
            for (i, cell) in g.cells.iter_mut().enumerate() {
                match (held.get(&(g.endpoint.id.clone(), i)), cell.as_ref()) {
                    (Some((task, _)), Some(h)) if &h.task_id == task => {}
                    (Some((task, attempt)), _) => {
                        *cell = Some(Holder::new(task.clone(), *attempt, None));
                        changed += 1;
                    }
                    (None, Some(h)) if h.since.elapsed() > grace => {
                        *cell = None;
                        changed += 1;
                    }
                    (None, _) => {}
                }
            }
            g.trim();
        }
        changed
    }

    /// Marks exactly the GPUs in `drained` as drained (what MySQL's `gpu_state` says).
    pub(crate) fn set_drained(&mut self, drained: &[String]) {
        for g in &mut self.gpus {
            g.drained = drained.contains(&g.endpoint.id);
        }
    }

    /// Records a dispatch to GPU `gpu_id` that the endpoint answered (`error` is `None`) or did not
    /// (connection error, timeout, 5xx). Ejects the GPU after too many failures in a row, unless it
    /// is the last one up.
    pub(crate) fn record_dispatch(
        &mut self,
        gpu_id: &str,
        error: Option<&str>,
        now: Instant,
        policy: &HealthPolicy,
    ) -> HealthChange {
        let Some(gpu) = self.index(gpu_id) else {
            return HealthChange::None;
        };
        let ok = error.is_none();
        {
            let g = &mut self.gpus[gpu];
            g.dispatched += 1;
            if let Some(e) = error {
                g.failed += 1;
                g.last_error = Some(e.to_string());
            }
        }
        let others_up = self
            .gpus
            .iter()
            .enumerate()
            // A drained GPU takes no new work, so it does not count as another one up.
            .any(|(i, g)| i != gpu && g.health == Health::Up && !g.retired && !g.drained);
        let g = &mut self.gpus[gpu];
        if ok {
            g.failures = 0;
            if g.health == Health::Up && g.limit < g.cap {
                g.limit = (g.limit * 2).min(g.cap);
                if g.limit == g.cap {
                    g.ejections = 0;
                }
                return HealthChange::Ramped { limit: g.limit };
            }
            return HealthChange::None;
        }
        g.failures += 1;
        if g.health != Health::Up || g.failures < policy.eject_after || !others_up {
            return HealthChange::None;
        }
        let cooldown = policy.cooldown_for(g.ejections);
        g.health = Health::Ejected {
            until: now + cooldown,
        };
        g.ejections += 1;
        g.failures = 0;
        HealthChange::Ejected { cooldown }
    }

    /// GPUs whose cooldown is over, now marked as being probed.
    pub(crate) fn take_due_probes(&mut self, now: Instant) -> Vec<Arc<Endpoint>> {
        let mut due = Vec::new();
        for g in &mut self.gpus {
            if matches!(g.health, Health::Ejected { until } if until <= now) {
                g.health = Health::Probing;
                due.push(Arc::clone(&g.endpoint));
            }
        }
        due
    }

    /// A probe's result: readmit with one usable slot, or eject again for a longer cooldown.
    pub(crate) fn probe_result(
        &mut self,
        gpu_id: &str,
        ok: bool,
        now: Instant,
        policy: &HealthPolicy,
    ) -> HealthChange {
        let Some(gpu) = self.index(gpu_id) else {
            return HealthChange::None;
        };
        let g = &mut self.gpus[gpu];
        if ok {
            g.health = Health::Up;
            g.limit = 1;
            g.failures = 0;
            return HealthChange::Ramped { limit: 1 };
        }
        let cooldown = policy.cooldown_for(g.ejections);
        g.health = Health::Ejected {
            until: now + cooldown,
        };
        g.ejections += 1;
        HealthChange::Ejected { cooldown }
    }

    /// Index of a GPU by id.
    pub(crate) fn index(&self, gpu_id: &str) -> Option<usize> {
        self.gpus.iter().position(|g| g.endpoint.id == gpu_id)
    }

    /// The settings of the GPU at row `gpu`.
    pub(crate) fn endpoint(&self, gpu: usize) -> &Arc<Endpoint> {
        &self.gpus[gpu].endpoint
    }

    /// Marks `at` as held: a slot [`SlotMatrix::place`] chose, or one [`SlotMatrix::hold`] checked.
    pub(crate) fn occupy(&mut self, at: SlotRef, holder: Holder) {
        let cells = &mut self.gpus[at.gpu].cells;
        if cells.len() <= at.slot {
            cells.resize(at.slot + 1, None);
        }
        cells[at.slot] = Some(holder);
    }

    /// Marks `gpu_id`/`slot` as held by `task_id` from now, as MySQL or another instance says.
    /// False if this matrix has no such GPU or the index is not below [`MAX_SLOTS`]. A slot beyond
    /// the configured count is taken (it holds an attempt from before a reload or a restart with
    /// fewer slots, and drains).
    pub(crate) fn hold(
        &mut self,
        gpu_id: &str,
        slot: usize,
        task_id: String,
        attempt: u32,
    ) -> bool {
        let Some(gpu) = self.index(gpu_id).filter(|_| slot < MAX_SLOTS) else {
            return false;
        };
        self.occupy(SlotRef { gpu, slot }, Holder::new(task_id, attempt, None));
        true
    }

    /// Frees the slot of `gpu_id`/`slot` if `task_id` holds it. False if it did not (already freed,
    /// or a GPU this matrix does not know).
    pub(crate) fn release(&mut self, gpu_id: &str, slot: usize, task_id: &str) -> bool {
        let Some(g) = self.index(gpu_id) else {
            return false;
        };
        let gpu = &mut self.gpus[g];
        let Some(cell) = gpu.cells.get_mut(slot) else {
            return false;
        };
        if cell.as_ref().is_some_and(|h| h.task_id == task_id) {
            *cell = None;
            gpu.trim();
            return true;
        }
        false
    }

    pub(crate) fn busy(&self) -> usize {
        self.gpus.iter().map(Gpu::busy).sum()
    }

    /// Configured slots over every GPU still in the config.
    pub(crate) fn total(&self) -> usize {
        self.gpus.iter().map(|g| g.cap).sum()
    }

    /// GPUs not up (ejected or being probed).
    pub(crate) fn down(&self) -> usize {
        self.gpus
            .iter()
            .filter(|g| !g.retired && g.health != Health::Up)
            .count()
    }

    /// A copy of every row, for status and tests.
    pub(crate) fn view(&self) -> Vec<GpuView> {
        self.gpus
            .iter()
            .map(|g| GpuView {
                id: g.endpoint.id.clone(),
                cells: g.cells.clone(),
                slots: g.cap,
                limit: g.usable(),
                health: g.health,
                failures: g.failures,
                retired: g.retired,
                drained: g.drained,
                dispatched: g.dispatched,
                failed: g.failed,
                last_error: g.last_error.clone(),
                pool: g.endpoint.pool.clone(),
                speed: g.speed.estimate(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(gpus: &[(&str, usize)]) -> SlotMatrix {
        SlotMatrix::new(&endpoints(gpus))
    }

    fn endpoints(gpus: &[(&str, usize)]) -> Vec<Arc<Endpoint>> {
        gpus.iter()
            .map(|(id, n)| {
                Arc::new(Endpoint {
                    id: id.to_string(),
                    url: format!("http://127.0.0.1:1/{id}"),
                    health_url: format!("http://127.0.0.1:1/{id}"),
                    slots: *n,
                    completion: crate::config::Completion::Callback,
                    bearer_token: None,
                    request_timeout: Duration::from_secs(1),
                    task_timeout: Duration::from_secs(60),
                    heartbeat_timeout: None,
                    cancel_url: None,
                    pool: "default".into(),
                    speed: None,
                })
            })
            .collect()
    }

    fn holder(id: &str) -> Holder {
        Holder::new(id.into(), 1, None)
    }

    /// A least-loaded placement in the default pool, as the slot it found.
    fn pick(m: &mut SlotMatrix, avoid: Option<&str>) -> Option<SlotRef> {
        match m.place("default", None, avoid, Placement::LeastLoaded, true) {
            Place::Slot(at) => Some(at),
            Place::Wait | Place::Full => None,
        }
    }

    fn fill(m: &mut SlotMatrix, n: usize) -> Vec<SlotRef> {
        (0..n)
            .map(|i| {
                let at = pick(m, None).expect("free slot");
                m.occupy(at, holder(&format!("t{i}")));
                at
            })
            .collect()
    }

    #[test]
    fn idle_fleet_rotates_instead_of_always_g0() {
        let mut m = matrix(&[("g0", 4), ("g1", 4), ("g2", 4), ("g3", 4)]);
        let gpus: Vec<usize> = fill(&mut m, 8).iter().map(|s| s.gpu).collect();
        assert_eq!(gpus, [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn least_loaded_wins() {
        let mut m = matrix(&[("g0", 4), ("g1", 4)]);
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 1 }, holder("b"));
        // g0 is empty, g1 half full: the next two go to g0 whatever the cursor says.
        m.cursor = 1;
        assert_eq!(pick(&mut m, None).map(|s| s.gpu), Some(0));
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("c"));
        assert_eq!(pick(&mut m, None).map(|s| s.gpu), Some(0));
    }

    #[test]
    fn load_is_a_share_of_capacity() {
        // g0 has 2 slots with 1 busy (50%), g1 has 4 with 1 busy (25%): g1 is less loaded.
        let mut m = matrix(&[("g0", 2), ("g1", 4)]);
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("b"));
        assert_eq!(pick(&mut m, None).map(|s| s.gpu), Some(1));
    }

    #[test]
    fn never_more_than_capacity_and_lowest_free_slot() {
        let mut m = matrix(&[("g0", 2), ("g1", 3)]);
        let taken = fill(&mut m, 5);
        assert_eq!(pick(&mut m, None), None);
        assert!(!m.pool_open("default"));
        assert_eq!((m.busy(), m.total()), (5, 5));
        let mut per_gpu = [0; 2];
        for s in &taken {
            per_gpu[s.gpu] += 1;
        }
        assert_eq!(per_gpu, [2, 3]);
        // Free slot 0 of g1: it is the only choice and the lowest index is reused.
        let held = m.view()[1].cells[0].clone().expect("held");
        assert!(m.release("g1", 0, &held.task_id));
        assert_eq!(pick(&mut m, None), Some(SlotRef { gpu: 1, slot: 0 }));
    }

    #[test]
    fn release_only_by_the_holder() {
        let mut m = matrix(&[("g0", 1)]);
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("a"));
        assert!(!m.release("g0", 0, "b"));
        assert!(!m.release("g9", 0, "a"));
        assert!(!m.release("g0", 5, "a"));
        assert!(m.release("g0", 0, "a"));
        assert!(!m.release("g0", 0, "a"));
    }

    #[test]
    fn any_index_from_outside_is_safe() {
        let mut m = matrix(&[("g0", 2)]);
        for slot in [usize::MAX, usize::MAX - 1, MAX_SLOTS, 1 << 40] {
            assert!(!m.hold("g0", slot, "x".into(), 1), "slot {slot}");
            assert!(!m.release("g0", slot, "x"), "slot {slot}");
        }
        assert!(!m.hold("g9", 0, "x".into(), 1));
        assert_eq!(m.view()[0].cells.len(), 2, "nothing was allocated");
        // Below the bound, a slot beyond the configured count is held (and drains when freed).
        assert!(m.hold("g0", MAX_SLOTS - 1, "old".into(), 1));
        assert_eq!(m.busy(), 1);
        assert_eq!(m.total(), 2);
        assert!(m.release("g0", MAX_SLOTS - 1, "old"));
        assert_eq!(m.view()[0].cells.len(), 2);
    }

    const POLICY: HealthPolicy = HealthPolicy {
        eject_after: 3,
        cooldown: Duration::from_secs(10),
        cooldown_max: Duration::from_secs(60),
    };

    #[test]
    fn retries_avoid_the_last_gpu_unless_it_is_the_only_choice() {
        let mut m = matrix(&[("g0", 2), ("g1", 2)]);
        for _ in 0..4 {
            assert_eq!(pick(&mut m, Some("g0")).map(|s| s.gpu), Some(1));
        }
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 1 }, holder("b"));
        assert_eq!(pick(&mut m, Some("g0")).map(|s| s.gpu), Some(0));
    }

    #[test]
    fn ejection_after_consecutive_failures_then_probe_and_ramp_up() {
        let t0 = Instant::now();
        let mut m = matrix(&[("g0", 4), ("g1", 4)]);
        assert_eq!(
            m.record_dispatch("g0", Some("down"), t0, &POLICY),
            HealthChange::None
        );
        assert_eq!(
            m.record_dispatch("g0", None, t0, &POLICY),
            HealthChange::None
        );
        // A success resets the count: three more failures are needed.
        m.record_dispatch("g0", Some("down"), t0, &POLICY);
        m.record_dispatch("g0", Some("down"), t0, &POLICY);
        let change = m.record_dispatch("g0", Some("down"), t0, &POLICY);
        assert_eq!(
            change,
            HealthChange::Ejected {
                cooldown: Duration::from_secs(10)
            }
        );
        // Ejected: nothing goes there, even when it is the least loaded.
        for _ in 0..4 {
            let at = pick(&mut m, None).expect("g1 has room");
            assert_eq!(at.gpu, 1);
            m.occupy(at, holder("x"));
        }
        assert_eq!(pick(&mut m, None), None);
        assert!(m.take_due_probes(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(m.take_due_probes(t0 + Duration::from_secs(10))[0].id, "g0");
        assert!(
            m.take_due_probes(t0 + Duration::from_secs(11)).is_empty(),
            "one probe at a time"
        );
        // A failed probe doubles the cooldown.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            m.probe_result("g0", false, t1, &POLICY),
            HealthChange::Ejected {
                cooldown: Duration::from_secs(20)
            }
        );
        assert_eq!(m.take_due_probes(t1 + Duration::from_secs(20)).len(), 1);
        // Readmitted with one slot, then 2, then 4.
        assert_eq!(
            m.probe_result("g0", true, t1, &POLICY),
            HealthChange::Ramped { limit: 1 }
        );
        let at = pick(&mut m, None).expect("one slot");
        m.occupy(at, holder("r1"));
        assert_eq!(
            pick(&mut m, None),
            None,
            "only one usable slot after readmission"
        );
        assert_eq!(
            m.record_dispatch("g0", None, t1, &POLICY),
            HealthChange::Ramped { limit: 2 }
        );
        assert_eq!(
            m.record_dispatch("g0", None, t1, &POLICY),
            HealthChange::Ramped { limit: 4 }
        );
        assert_eq!(
            m.record_dispatch("g0", None, t1, &POLICY),
            HealthChange::None
        );
        assert_eq!(m.view()[0].limit, 4);
    }

    #[test]
    fn the_last_gpu_up_is_never_ejected() {
        let t0 = Instant::now();
        let mut m = matrix(&[("g0", 1), ("g1", 1)]);
        for _ in 0..3 {
            m.record_dispatch("g0", Some("down"), t0, &POLICY);
        }
        assert_eq!(
            m.view()[0].health,
            Health::Ejected {
                until: t0 + Duration::from_secs(10)
            }
        );
        for _ in 0..10 {
            assert_eq!(
                m.record_dispatch("g1", Some("down"), t0, &POLICY),
                HealthChange::None
            );
        }
        assert_eq!(m.view()[1].health, Health::Up);
    }

    #[test]
    fn the_last_undrained_gpu_up_is_never_ejected() {
        let t0 = Instant::now();
        let mut m = matrix(&[("g0", 1), ("g1", 1)]);
        m.set_drained(&["g0".to_string()]);
        for _ in 0..10 {
            assert_eq!(
                m.record_dispatch("g1", Some("down"), t0, &POLICY),
                HealthChange::None
            );
        }
        assert_eq!(m.view()[1].health, Health::Up);
    }

    #[test]
    fn reload_adds_drains_and_resizes_without_touching_held_slots() {
        let mut m = matrix(&[("g0", 2), ("g1", 2)]);
        m.occupy(SlotRef { gpu: 0, slot: 1 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("b"));
        // g0 shrinks to 1 slot (its busy slot 1 drains), g1 is removed, g2 joins.
        m.reconfigure(&endpoints(&[("g0", 1), ("g2", 3)]));
        assert_eq!(m.total(), 4);
        assert_eq!(m.busy(), 2, "held slots survive the reload");
        let v = m.view();
        assert!(v[1].retired && v[1].cells[0].is_some());
        // New work goes to g2 only: g1 is gone, and g0 already runs one task, its new count.
        let mut got = Vec::new();
        while let Some(at) = pick(&mut m, None) {
            m.occupy(at, holder("n"));
            got.push((m.endpoint(at.gpu).id.clone(), at.slot));
        }
        let g2: Vec<(String, usize)> = (0..3).map(|s| ("g2".to_string(), s)).collect();
        assert_eq!(got, g2);
        // The draining slots vanish as their tasks end; then g0's one slot takes work again.
        assert!(m.release("g0", 1, "a"));
        assert_eq!(m.view()[0].cells.len(), 1);
        assert!(m.release("g1", 0, "b"));
        assert!(m.view()[1].cells.is_empty());
        assert_eq!(pick(&mut m, None), Some(SlotRef { gpu: 0, slot: 0 }));
        // g1 comes back.
        m.reconfigure(&endpoints(&[("g0", 1), ("g1", 2), ("g2", 3)]));
        assert_eq!(m.total(), 6);
        assert!(pick(&mut m, None).is_some_and(|at| m.endpoint(at.gpu).id == "g1"));
    }

    fn predict(m: &mut SlotMatrix, cost: f64) -> Place {
        m.place(
            "default",
            Some(cost),
            None,
            Placement::PredictedFinish,
            true,
        )
    }

    #[test]
    fn tasks_wait_for_a_fast_gpu_in_turn_and_the_next_takes_a_free_slot() {
        // g0: 4 slots at 1 unit/s; g1: 1 slot at 4 units/s, busy for 10 more seconds.
        let mut m = matrix(&[("g0", 4), ("g1", 1)]);
        m.reseed(&HashMap::from([("g0".into(), 1.0), ("g1".into(), 4.0)]));
        m.occupy(
            SlotRef { gpu: 1, slot: 0 },
            Holder::new("running".into(), 1, Some(40.0)),
        );
        m.new_round();
        // An hour of audio: 3600 s on g0, or 10 + 900 s on g1.
        assert_eq!(predict(&mut m, 3600.0), Place::Wait);
        // The next one would start on g1 after the first: 910 + 900 s, still well ahead.
        assert_eq!(predict(&mut m, 3600.0), Place::Wait);
        // The third would start at 1810 s: 2710 s is no longer clearly sooner than 3600 s.
        assert_eq!(
            predict(&mut m, 3600.0),
            Place::Slot(SlotRef { gpu: 0, slot: 0 })
        );
        // A new round starts from what runs.
        m.new_round();
        assert_eq!(predict(&mut m, 3600.0), Place::Wait);
        // Told it may not wait, the same task takes the best free slot.
        assert_eq!(
            m.place(
                "default",
                Some(3600.0),
                None,
                Placement::PredictedFinish,
                false
            ),
            Place::Slot(SlotRef { gpu: 0, slot: 0 })
        );
        // Least-loaded never waits.
        assert_eq!(pick(&mut m, None), Some(SlotRef { gpu: 0, slot: 0 }));
        // Only the placed tasks' sizes were noted, not the waiting ones' (asked every round).
        assert_eq!(m.pools()[0].median_cost, Some(3600.0));
        assert_eq!(m.sizes["default"].len(), 2);
    }

    #[test]
    fn pools_keep_their_own_gpus() {
        let mut eps = endpoints(&[("a0", 1), ("b0", 1)]);
        Arc::make_mut(&mut eps[1]).pool = "b".into();
        let mut m = SlotMatrix::new(&eps);
        let place =
            |m: &mut SlotMatrix, pool| m.place(pool, None, None, Placement::LeastLoaded, true);
        assert_eq!(place(&mut m, "b"), Place::Slot(SlotRef { gpu: 1, slot: 0 }));
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("x"));
        // b is full: a's free slot is not offered to it.
        assert_eq!(place(&mut m, "b"), Place::Full);
        assert!(m.pool_open("default") && !m.pool_open("b"));
        assert_eq!(place(&mut m, "nobody"), Place::Full);
        let pools = m.pools();
        assert_eq!(pools.len(), 2);
        assert_eq!((pools[0].pool.as_str(), pools[0].slots_busy), ("b", 1));
    }

    #[test]
    fn drained_gpus_take_nothing_new_and_keep_what_they_run() {
        let mut m = matrix(&[("g0", 2), ("g1", 2)]);
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("a"));
        m.set_drained(&["g0".to_string()]);
        for _ in 0..2 {
            let at = pick(&mut m, None).expect("g1 has room");
            assert_eq!(at.gpu, 1);
            m.occupy(at, holder("b"));
        }
        assert_eq!(pick(&mut m, None), None);
        assert_eq!(m.busy(), 3);
        m.set_drained(&[]);
        assert_eq!(pick(&mut m, None).map(|s| s.gpu), Some(0));
        let v = m.view();
        assert!(!v[0].drained);
    }

    #[test]
    fn resync_follows_mysql_but_spares_fresh_claims() {
        let mut m = matrix(&[("g0", 2)]);
        let fresh = SlotRef { gpu: 0, slot: 1 };
        m.occupy(fresh, holder("mine-in-flight"));
        let held =
            std::collections::HashMap::from([(("g0".to_string(), 0), ("theirs".to_string(), 2))]);
        assert_eq!(m.resync(&held, Duration::from_secs(2)), 1);
        let v = m.view();
        assert_eq!(
            v[0].cells[0].as_ref().map(|h| h.task_id.as_str()),
            Some("theirs")
        );
        assert!(
            v[0].cells[1].is_some(),
            "a claim younger than the grace is kept"
        );
        assert_eq!(
            m.resync(&held, Duration::ZERO),
            1,
            "an old one MySQL does not know is freed"
        );
        assert!(m.view()[0].cells[1].is_none());
    }

    #[test]
    fn cooldown_is_capped() {
        assert_eq!(POLICY.cooldown_for(0), Duration::from_secs(10));
        assert_eq!(POLICY.cooldown_for(2), Duration::from_secs(40));
        assert_eq!(POLICY.cooldown_for(3), Duration::from_secs(60));
        assert_eq!(POLICY.cooldown_for(99), Duration::from_secs(60));
    }

    #[test]
    fn fair_share_over_many_rounds() {
        // Random release order, constant pressure: every GPU ends up with about the same count.
        let mut m = matrix(&[("g0", 4), ("g1", 4), ("g2", 4), ("g3", 4)]);
        let mut counts = [0usize; 4];
        let mut held: Vec<(String, usize, String)> = Vec::new();
        let mut seed = 7u64;
        for i in 0..4000 {
            while let Some(at) = pick(&mut m, None) {
                let id = format!("t{i}-{}", held.len());
                m.occupy(at, holder(&id));
                counts[at.gpu] += 1;
                held.push((m.endpoint(at.gpu).id.clone(), at.slot, id));
            }
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let k = (seed >> 33) as usize % held.len();
            let (g, s, id) = held.swap_remove(k);
            assert!(m.release(&g, s, &id));
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        let (min, max) = (*min.expect("4"), *max.expect("4"));
        assert!(max - min <= max / 10, "{counts:?}");
    }

    /// A full pool's freed slot goes to the next task only where a placement would put it:
    /// not on a drained GPU, not in another pool, and the holder is back in place either way.
    #[test]
    fn a_freed_slot_is_handed_over_only_where_placement_would_put_the_task() {
        let mut m = matrix(&[("g0", 1), ("g1", 1)]);
        let held = fill(&mut m, 2);
        let at = m.held_by("t1", 1).expect("t1 holds a slot");
        assert_eq!(at, held[1]);
        assert_eq!(m.held_by("t1", 2), None, "another attempt holds nothing");
        assert!(m.would_hand_over(at, "default", None, None, Placement::LeastLoaded));
        assert!(!m.would_hand_over(at, "other", None, None, Placement::LeastLoaded));
        let id = m.endpoint(at.gpu()).id.clone();
        m.set_drained(std::slice::from_ref(&id));
        assert!(!m.would_hand_over(at, "default", None, None, Placement::LeastLoaded));
        assert_eq!(m.busy(), 2, "every holder stays");
        assert_eq!(m.held_by("t1", 1), Some(at));
        // A slot that is already free is the scheduler's to place, not an ending's.
        m.set_drained(&[]);
        assert!(m.release(&id, at.slot(), "t1"));
        assert!(!m.would_hand_over(at, "default", None, None, Placement::LeastLoaded));
    }
}

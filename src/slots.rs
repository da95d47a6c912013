//! The GPU slot matrix: which task holds which slot of which GPU, in memory.
//!
//! The matrix is pure data with no I/O; the daemon keeps one behind a `Mutex` shared by the scheduler
//! thread (which picks and occupies slots), and the dispatch, handler and callback threads (which
//! release them after MySQL has recorded the end of an attempt). MySQL's `gpu_slots` table is the
//! authority; this is its mirror, kept so that picking a slot costs no round trip.
//!
//! Health lives here too, because it decides what `pick` may choose: after `eject_after` consecutive
//! failed dispatches a GPU is ejected for a cooldown that doubles with each ejection (never the last
//! GPU still up); when the cooldown ends the maintenance thread probes it, and a GPU that answers comes
//! back with one usable slot, doubling with each successful dispatch up to its configured count.
//!
//! Choice rule: the GPU with the lowest share of busy slots wins (so a 2-slot GPU with one task is as
//! loaded as a 4-slot GPU with two), ties are broken by a rotating cursor so that an idle fleet does
//! not send every first task to `g0`, and within a GPU the lowest free slot index is used.

use std::time::{Duration, Instant};

/// Who holds a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub task_id: String,
    pub attempt: u32,
    pub since: Instant,
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

/// When to eject a GPU and for how long.
#[derive(Debug, Clone, Copy)]
pub struct HealthPolicy {
    pub eject_after: u32,
    pub cooldown: Duration,
    pub cooldown_max: Duration,
}

impl HealthPolicy {
    /// The cooldown after the `n`-th ejection in a row (0-based): doubles up to the cap.
    pub fn cooldown_for(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        self.cooldown.saturating_mul(factor).min(self.cooldown_max)
    }
}

#[derive(Debug)]
struct Gpu {
    id: String,
    cells: Vec<Option<Holder>>,
    /// Usable slots: the configured count, or fewer while ramping up after a readmission.
    limit: usize,
    health: Health,
    failures: u32,
    /// Ejections since the GPU last ran at full capacity.
    ejections: u32,
}

impl Gpu {
    fn busy(&self) -> usize {
        self.cells.iter().filter(|c| c.is_some()).count()
    }

    fn open(&self) -> bool {
        self.health == Health::Up && self.busy() < self.limit
    }
}

/// A slot's coordinates in the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRef {
    pub gpu: usize,
    pub slot: usize,
}

/// GPUs x slots, each cell free or held.
#[derive(Debug)]
pub struct SlotMatrix {
    gpus: Vec<Gpu>,
    cursor: usize,
}

/// One GPU's row, for status output.
#[derive(Debug, Clone)]
pub struct GpuView {
    pub id: String,
    pub cells: Vec<Option<Holder>>,
    pub limit: usize,
    pub health: Health,
    pub failures: u32,
}

/// What a dispatch outcome did to a GPU's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthChange {
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
    /// A matrix with every slot free: `(gpu id, slot count)` per GPU, in config order.
    pub fn new<'a>(gpus: impl IntoIterator<Item = (&'a str, usize)>) -> SlotMatrix {
        SlotMatrix {
            gpus: gpus
                .into_iter()
                .map(|(id, n)| Gpu {
                    id: id.to_string(),
                    cells: vec![None; n],
                    limit: n,
                    health: Health::Up,
                    failures: 0,
                    ejections: 0,
                })
                .collect(),
            cursor: 0,
        }
    }

    /// The least-loaded open GPU's lowest free slot, or `None` when no GPU can take a task. Advances
    /// the tie-break cursor past the chosen GPU.
    pub fn pick(&mut self) -> Option<SlotRef> {
        self.pick_avoiding(None)
    }

    /// Like [`SlotMatrix::pick`], but GPU `avoid` (where a retried task last failed) is chosen only
    /// when no other GPU can take the task.
    pub fn pick_avoiding(&mut self, avoid: Option<&str>) -> Option<SlotRef> {
        let n = self.gpus.len();
        let mut best: Option<(usize, usize, usize)> = None; // (gpu, busy, limit)
        let mut fallback = None;
        for k in 0..n {
            let g = (self.cursor + k) % n;
            let gpu = &self.gpus[g];
            if !gpu.open() {
                continue;
            }
            if avoid == Some(gpu.id.as_str()) {
                fallback = Some(g);
                continue;
            }
            let (busy, limit) = (gpu.busy(), gpu.limit);
            // busy/limit < best_busy/best_limit, compared without division.
            let better = match best {
                None => true,
                Some((_, b, l)) => busy * l < b * limit,
            };
            if better {
                best = Some((g, busy, limit));
            }
        }
        let g = best.map(|(g, _, _)| g).or(fallback)?;
        self.cursor = (g + 1) % n;
        let slot = self.gpus[g]
            .cells
            .iter()
            .position(Option::is_none)
            .expect("an open GPU has a free cell");
        Some(SlotRef { gpu: g, slot })
    }

    /// Records a dispatch to `gpu` that the endpoint answered (`ok`) or did not (connection error,
    /// timeout, 5xx). Ejects the GPU after too many failures in a row, unless it is the last one up.
    pub fn record_dispatch(
        &mut self,
        gpu: usize,
        ok: bool,
        now: Instant,
        policy: &HealthPolicy,
    ) -> HealthChange {
        let others_up = self
            .gpus
            .iter()
            .enumerate()
            .any(|(i, g)| i != gpu && g.health == Health::Up);
        let g = &mut self.gpus[gpu];
        if ok {
            g.failures = 0;
            if g.health == Health::Up && g.limit < g.cells.len() {
                g.limit = (g.limit * 2).min(g.cells.len());
                if g.limit == g.cells.len() {
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
    pub fn take_due_probes(&mut self, now: Instant) -> Vec<usize> {
        let mut due = Vec::new();
        for (i, g) in self.gpus.iter_mut().enumerate() {
            if matches!(g.health, Health::Ejected { until } if until <= now) {
                g.health = Health::Probing;
                due.push(i);
            }
        }
        due
    }

    /// A probe's result: readmit with one usable slot, or eject again for a longer cooldown.
    pub fn probe_result(
        &mut self,
        gpu: usize,
        ok: bool,
        now: Instant,
        policy: &HealthPolicy,
    ) -> HealthChange {
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
    pub fn index(&self, gpu_id: &str) -> Option<usize> {
        self.gpus.iter().position(|g| g.id == gpu_id)
    }

    /// Marks `at` as held. The caller picked it or read it from MySQL.
    pub fn occupy(&mut self, at: SlotRef, holder: Holder) {
        self.gpus[at.gpu].cells[at.slot] = Some(holder);
    }

    /// Frees `at` unconditionally (a claim that MySQL refused).
    pub fn vacate(&mut self, at: SlotRef) {
        self.gpus[at.gpu].cells[at.slot] = None;
    }

    /// Frees the slot of `gpu_id`/`slot` if `task_id` holds it. False if it did not (already freed,
    /// or a GPU or slot that is no longer configured).
    pub fn release(&mut self, gpu_id: &str, slot: usize, task_id: &str) -> bool {
        let Some(at) = self.find(gpu_id, slot) else {
            return false;
        };
        let cell = &mut self.gpus[at.gpu].cells[at.slot];
        if cell.as_ref().is_some_and(|h| h.task_id == task_id) {
            *cell = None;
            return true;
        }
        false
    }

    /// The coordinates of a configured slot, by GPU id.
    pub fn find(&self, gpu_id: &str, slot: usize) -> Option<SlotRef> {
        let g = self.index(gpu_id)?;
        (slot < self.gpus[g].cells.len()).then_some(SlotRef { gpu: g, slot })
    }

    pub fn gpu_id(&self, gpu: usize) -> &str {
        &self.gpus[gpu].id
    }

    pub fn has_free(&self) -> bool {
        self.gpus.iter().any(Gpu::open)
    }

    pub fn busy(&self) -> usize {
        self.gpus.iter().map(Gpu::busy).sum()
    }

    pub fn total(&self) -> usize {
        self.gpus.iter().map(|g| g.cells.len()).sum()
    }

    /// A copy of every row, for status and tests.
    pub fn view(&self) -> Vec<GpuView> {
        self.gpus
            .iter()
            .map(|g| GpuView {
                id: g.id.clone(),
                cells: g.cells.clone(),
                limit: g.limit,
                health: g.health,
                failures: g.failures,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(id: &str) -> Holder {
        Holder {
            task_id: id.into(),
            attempt: 1,
            since: Instant::now(),
        }
    }

    fn fill(m: &mut SlotMatrix, n: usize) -> Vec<SlotRef> {
        (0..n)
            .map(|i| {
                let at = m.pick().expect("free slot");
                m.occupy(at, holder(&format!("t{i}")));
                at
            })
            .collect()
    }

    #[test]
    fn idle_fleet_rotates_instead_of_always_g0() {
        let mut m = SlotMatrix::new([("g0", 4), ("g1", 4), ("g2", 4), ("g3", 4)]);
        let gpus: Vec<usize> = fill(&mut m, 8).iter().map(|s| s.gpu).collect();
        assert_eq!(gpus, [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn least_loaded_wins() {
        let mut m = SlotMatrix::new([("g0", 4), ("g1", 4)]);
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 1 }, holder("b"));
        // g0 is empty, g1 half full: the next two go to g0 whatever the cursor says.
        m.cursor = 1;
        assert_eq!(m.pick().map(|s| s.gpu), Some(0));
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("c"));
        assert_eq!(m.pick().map(|s| s.gpu), Some(0));
    }

    #[test]
    fn load_is_a_share_of_capacity() {
        // g0 has 2 slots with 1 busy (50%), g1 has 4 with 1 busy (25%): g1 is less loaded.
        let mut m = SlotMatrix::new([("g0", 2), ("g1", 4)]);
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("b"));
        assert_eq!(m.pick().map(|s| s.gpu), Some(1));
    }

    #[test]
    fn never_more_than_capacity_and_lowest_free_slot() {
        let mut m = SlotMatrix::new([("g0", 2), ("g1", 3)]);
        let taken = fill(&mut m, 5);
        assert_eq!(m.pick(), None);
        assert!(!m.has_free());
        assert_eq!((m.busy(), m.total()), (5, 5));
        let mut per_gpu = [0; 2];
        for s in &taken {
            per_gpu[s.gpu] += 1;
        }
        assert_eq!(per_gpu, [2, 3]);
        // Free slot 0 of g1: it is the only choice and the lowest index is reused.
        let held = m.view()[1].cells[0].clone().expect("held");
        assert!(m.release("g1", 0, &held.task_id));
        assert_eq!(m.pick(), Some(SlotRef { gpu: 1, slot: 0 }));
    }

    #[test]
    fn release_only_by_the_holder() {
        let mut m = SlotMatrix::new([("g0", 1)]);
        m.occupy(SlotRef { gpu: 0, slot: 0 }, holder("a"));
        assert!(!m.release("g0", 0, "b"));
        assert!(!m.release("g9", 0, "a"));
        assert!(!m.release("g0", 5, "a"));
        assert!(m.release("g0", 0, "a"));
        assert!(!m.release("g0", 0, "a"));
    }

    const POLICY: HealthPolicy = HealthPolicy {
        eject_after: 3,
        cooldown: Duration::from_secs(10),
        cooldown_max: Duration::from_secs(60),
    };

    #[test]
    fn retries_avoid_the_last_gpu_unless_it_is_the_only_choice() {
        let mut m = SlotMatrix::new([("g0", 2), ("g1", 2)]);
        for _ in 0..4 {
            assert_eq!(m.pick_avoiding(Some("g0")).map(|s| s.gpu), Some(1));
        }
        m.occupy(SlotRef { gpu: 1, slot: 0 }, holder("a"));
        m.occupy(SlotRef { gpu: 1, slot: 1 }, holder("b"));
        assert_eq!(m.pick_avoiding(Some("g0")).map(|s| s.gpu), Some(0));
    }

    #[test]
    fn ejection_after_consecutive_failures_then_probe_and_ramp_up() {
        let t0 = Instant::now();
        let mut m = SlotMatrix::new([("g0", 4), ("g1", 4)]);
        assert_eq!(m.record_dispatch(0, false, t0, &POLICY), HealthChange::None);
        assert_eq!(m.record_dispatch(0, true, t0, &POLICY), HealthChange::None);
        // A success resets the count: three more failures are needed.
        m.record_dispatch(0, false, t0, &POLICY);
        m.record_dispatch(0, false, t0, &POLICY);
        let change = m.record_dispatch(0, false, t0, &POLICY);
        assert_eq!(
            change,
            HealthChange::Ejected {
                cooldown: Duration::from_secs(10)
            }
        );
        // Ejected: nothing goes there, even when it is the least loaded.
        for _ in 0..4 {
            let at = m.pick().expect("g1 has room");
            assert_eq!(at.gpu, 1);
            m.occupy(at, holder("x"));
        }
        assert_eq!(m.pick(), None);
        assert!(m.take_due_probes(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(m.take_due_probes(t0 + Duration::from_secs(10)), [0]);
        assert!(
            m.take_due_probes(t0 + Duration::from_secs(11)).is_empty(),
            "one probe at a time"
        );
        // A failed probe doubles the cooldown.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            m.probe_result(0, false, t1, &POLICY),
            HealthChange::Ejected {
                cooldown: Duration::from_secs(20)
            }
        );
        assert_eq!(m.take_due_probes(t1 + Duration::from_secs(20)), [0]);
        // Readmitted with one slot, then 2, then 4.
        assert_eq!(
            m.probe_result(0, true, t1, &POLICY),
            HealthChange::Ramped { limit: 1 }
        );
        let at = m.pick().expect("one slot");
        m.occupy(at, holder("r1"));
        assert_eq!(m.pick(), None, "only one usable slot after readmission");
        assert_eq!(
            m.record_dispatch(0, true, t1, &POLICY),
            HealthChange::Ramped { limit: 2 }
        );
        assert_eq!(
            m.record_dispatch(0, true, t1, &POLICY),
            HealthChange::Ramped { limit: 4 }
        );
        assert_eq!(m.record_dispatch(0, true, t1, &POLICY), HealthChange::None);
        assert_eq!(m.view()[0].limit, 4);
    }

    #[test]
    fn the_last_gpu_up_is_never_ejected() {
        let t0 = Instant::now();
        let mut m = SlotMatrix::new([("g0", 1), ("g1", 1)]);
        for _ in 0..3 {
            m.record_dispatch(0, false, t0, &POLICY);
        }
        assert_eq!(
            m.view()[0].health,
            Health::Ejected {
                until: t0 + Duration::from_secs(10)
            }
        );
        for _ in 0..10 {
            assert_eq!(m.record_dispatch(1, false, t0, &POLICY), HealthChange::None);
        }
        assert_eq!(m.view()[1].health, Health::Up);
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
        let mut m = SlotMatrix::new([("g0", 4), ("g1", 4), ("g2", 4), ("g3", 4)]);
        let mut counts = [0usize; 4];
        let mut held: Vec<(String, usize, String)> = Vec::new();
        let mut seed = 7u64;
        for i in 0..4000 {
            while let Some(at) = m.pick() {
                let id = format!("t{i}-{}", held.len());
                m.occupy(at, holder(&id));
                counts[at.gpu] += 1;
                held.push((m.gpu_id(at.gpu).to_string(), at.slot, id));
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
}

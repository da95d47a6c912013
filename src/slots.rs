//! The GPU slot matrix: which task holds which slot of which GPU, in memory.
//!
//! The matrix is pure data with no I/O; the daemon keeps one behind a `Mutex` shared by the scheduler
//! thread (which picks and occupies slots), and the dispatch, handler and callback threads (which
//! release them after MySQL has recorded the end of an attempt). MySQL's `gpu_slots` table is the
//! authority; this is its mirror, kept so that picking a slot costs no round trip.
//!
//! Choice rule: the GPU with the lowest share of busy slots wins (so a 2-slot GPU with one task is as
//! loaded as a 4-slot GPU with two), ties are broken by a rotating cursor so that an idle fleet does
//! not send every first task to `g0`, and within a GPU the lowest free slot index is used.

use std::time::Instant;

/// Who holds a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub task_id: String,
    pub attempt: u32,
    pub since: Instant,
}

#[derive(Debug)]
struct Gpu {
    id: String,
    cells: Vec<Option<Holder>>,
}

impl Gpu {
    fn busy(&self) -> usize {
        self.cells.iter().filter(|c| c.is_some()).count()
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
                })
                .collect(),
            cursor: 0,
        }
    }

    /// The least-loaded GPU's lowest free slot, or `None` when every slot is held. Advances the
    /// tie-break cursor past the chosen GPU.
    pub fn pick(&mut self) -> Option<SlotRef> {
        let n = self.gpus.len();
        let mut best: Option<(usize, usize, usize)> = None; // (gpu, busy, cap)
        for k in 0..n {
            let g = (self.cursor + k) % n;
            let gpu = &self.gpus[g];
            let (busy, cap) = (gpu.busy(), gpu.cells.len());
            if busy >= cap {
                continue;
            }
            // busy/cap < best_busy/best_cap, compared without division.
            let better = match best {
                None => true,
                Some((_, b, c)) => busy * c < b * cap,
            };
            if better {
                best = Some((g, busy, cap));
            }
        }
        let (g, _, _) = best?;
        self.cursor = (g + 1) % n;
        let slot = self.gpus[g]
            .cells
            .iter()
            .position(Option::is_none)
            .expect("a GPU with busy < cap has a free cell");
        Some(SlotRef { gpu: g, slot })
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
        let g = self.gpus.iter().position(|g| g.id == gpu_id)?;
        (slot < self.gpus[g].cells.len()).then_some(SlotRef { gpu: g, slot })
    }

    pub fn gpu_id(&self, gpu: usize) -> &str {
        &self.gpus[gpu].id
    }

    pub fn has_free(&self) -> bool {
        self.gpus.iter().any(|g| g.busy() < g.cells.len())
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

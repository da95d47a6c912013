//! What qsysd learns about work: each GPU's speed and each pool's usual task size.
//!
//! A speed is cost units per second of wall time for one attempt, measured from the claim to the
//! end, so it holds whatever the GPU really does at the concurrency it runs at (4 attempts at
//! once on a GPU that batches them are each slower than one alone; the estimate says so). The
//! estimate is the median of the last [`WINDOW`] finished attempts, each weighing its size: a few
//! outliers (a file that was mostly silence, a GPU paused by its host for a minute) move it by at
//! most their share of the work, where a mean would be dragged as far as they go; and a ten-second
//! call, whose time is mostly the round trip, does not count as much as an hour of audio, whose
//! time is the GPU's (an unweighted median of a fleet's many short calls reads the GPU slower
//! than it is on the long files that decide placement and the time to drain). Until
//! [`MIN_SAMPLES`] attempts are known it is the seed: what MySQL kept from an earlier run or a
//! peer, else the endpoint's configured `speed`.

use std::collections::VecDeque;

/// Attempts the speed estimate looks at.
pub(crate) const WINDOW: usize = 32;
/// Attempts needed before a GPU's own measure replaces its seed.
pub(crate) const MIN_SAMPLES: usize = 3;
/// Task sizes a pool's median looks at.
const COST_WINDOW: usize = 256;

/// The middle of `values` (the mean of the two middle ones for an even count); `None` if empty.
fn median(values: &VecDeque<f64>) -> Option<f64> {
    weighted_median(values.iter().map(|v| (*v, 1.0)))
}

/// The value below and above which half the weight lies (the mean of the two values around the
/// middle when it falls exactly between them); `None` without weight.
fn weighted_median(values: impl Iterator<Item = (f64, f64)>) -> Option<f64> {
    let mut v: Vec<(f64, f64)> = values.filter(|(_, w)| *w > 0.0).collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let half = v.iter().map(|(_, w)| w).sum::<f64>() / 2.0;
    let mut below = 0.0;
    for (i, (x, w)) in v.iter().enumerate() {
        below += w;
        if below > half {
            return Some(*x);
        }
        if below == half {
            return Some(v.get(i + 1).map_or(*x, |next| (x + next.0) / 2.0));
        }
    }
    None
}

/// One GPU's speed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Speed {
    /// (speed, size) of the last finished attempts.
    recent: VecDeque<(f64, f64)>,
    /// The speed to use until enough is measured here.
    seed: Option<f64>,
    /// Attempts measured here since the start.
    measured: u64,
    /// Measured since last written to MySQL.
    unsaved: bool,
    /// The median of `recent`, kept as it changes: a placement reads it for every GPU.
    median: Option<f64>,
    /// The seed came from a reload: what MySQL keeps (an older speed) does not replace it.
    pinned: bool,
}

impl Speed {
    pub(crate) fn seeded(seed: Option<f64>) -> Speed {
        Speed {
            seed,
            ..Speed::default()
        }
    }

    /// The estimate, if there is one.
    pub(crate) fn estimate(&self) -> Option<f64> {
        if self.recent.len() >= MIN_SAMPLES {
            self.median
        } else {
            self.seed
        }
    }

    /// A finished attempt of `cost` that took `seconds`. Zero-cost and instant ones say nothing
    /// about speed and are not counted.
    pub(crate) fn observe(&mut self, cost: f64, seconds: f64) {
        if !(cost > 0.0 && seconds > 0.0 && cost.is_finite() && seconds.is_finite()) {
            return;
        }
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((cost / seconds, cost));
        self.median = weighted_median(self.recent.iter().copied());
        self.measured += 1;
        self.unsaved = true;
    }

    /// Whether this instance has measured enough that a persisted value is not needed.
    pub(crate) fn own(&self) -> bool {
        self.recent.len() >= MIN_SAMPLES
    }

    /// What MySQL (an earlier run, a peer) says, used while too little is measured here and no
    /// reload set a seed.
    pub(crate) fn reseed(&mut self, speed: f64) {
        if !self.own() && !self.pinned && speed.is_finite() && speed > 0.0 {
            self.seed = Some(speed);
        }
    }

    /// A reload's new seed (`speed`), or a new start for a GPU moved to another pool (whose unit
    /// may differ): what was measured is dropped there. Written to MySQL for peers and restarts.
    pub(crate) fn restart(&mut self, seed: Option<f64>, forget: bool) {
        if forget {
            self.recent.clear();
            self.median = None;
            self.measured = 0;
        }
        if !self.own() {
            self.seed = seed;
            self.pinned = true;
            self.unsaved = seed.is_some();
        }
    }

    /// The estimate to write to MySQL, and how many attempts made it, if it changed since last
    /// time: a measured one, or a reload's seed.
    pub(crate) fn take_unsaved(&mut self) -> Option<(f64, u64)> {
        if !std::mem::take(&mut self.unsaved) || !(self.own() || self.pinned) {
            return None;
        }
        Some((self.estimate()?, self.measured))
    }
}

/// Each pool's recent task sizes: an unknown size counts as the pool's median.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sizes {
    recent: VecDeque<f64>,
}

impl Sizes {
    pub(crate) fn note(&mut self, cost: f64) {
        if self.recent.len() == COST_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(cost);
    }

    pub(crate) fn median(&self) -> Option<f64> {
        median(&self.recent)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_recent_attempts_and_not_the_seed_once_measured() {
        let mut s = Speed::seeded(Some(10.0));
        assert_eq!(s.estimate(), Some(10.0));
        s.observe(100.0, 50.0);
        s.observe(100.0, 50.0);
        // Two measures: still the seed.
        assert_eq!(s.estimate(), Some(10.0));
        s.observe(100.0, 25.0);
        assert_eq!(s.estimate(), Some(2.0));
        // A persisted value no longer replaces what is measured here.
        s.reseed(50.0);
        assert_eq!(s.estimate(), Some(2.0));
    }

    #[test]
    fn a_few_outliers_do_not_swing_it() {
        let mut s = Speed::default();
        for _ in 0..26 {
            s.observe(40.0, 10.0);
        }
        // Six wild ones of the same size (a silent file, a stalled host) out of 32.
        for _ in 0..3 {
            s.observe(40.0, 0.01);
            s.observe(40.0, 1000.0);
        }
        assert_eq!(s.estimate(), Some(4.0));
        // The window moves: a GPU that really got slower is followed.
        for _ in 0..WINDOW {
            s.observe(10.0, 10.0);
        }
        assert_eq!(s.estimate(), Some(1.0));
    }

    #[test]
    fn long_files_weigh_more_than_short_calls() {
        let mut s = Speed::default();
        // Twenty ten-second calls at 500/s (their round trip counts), five hour-long files at
        // 950/s: the hours are most of the work.
        for _ in 0..20 {
            s.observe(10.0, 0.02);
        }
        for _ in 0..5 {
            s.observe(3600.0, 3600.0 / 950.0);
        }
        assert_eq!(s.estimate(), Some(950.0));
        assert_eq!(
            weighted_median([(1.0, 1.0), (3.0, 1.0)].into_iter()),
            Some(2.0)
        );
        assert_eq!(weighted_median(std::iter::empty()), None);
    }

    #[test]
    fn nothing_is_learned_from_zero_or_nonsense() {
        let mut s = Speed::default();
        for (c, t) in [
            (0.0, 1.0),
            (1.0, 0.0),
            (f64::NAN, 1.0),
            (1.0, f64::INFINITY),
        ] {
            s.observe(c, t);
        }
        assert_eq!(s.estimate(), None);
        assert_eq!(s.take_unsaved(), None);
        s.reseed(-1.0);
        s.reseed(f64::NAN);
        assert_eq!(s.estimate(), None);
        s.reseed(3.0);
        assert_eq!(s.estimate(), Some(3.0));
    }

    #[test]
    fn a_reloads_seed_stands_until_measured_and_a_move_forgets() {
        let mut s = Speed::seeded(Some(10.0));
        s.restart(Some(20.0), false);
        s.reseed(5.0);
        assert_eq!(
            s.estimate(),
            Some(20.0),
            "MySQL's older speed does not replace it"
        );
        assert_eq!(
            s.take_unsaved(),
            Some((20.0, 0)),
            "written for peers and restarts"
        );
        for _ in 0..3 {
            s.observe(30.0, 1.0);
        }
        s.restart(Some(99.0), false);
        assert_eq!(s.estimate(), Some(30.0), "a measure beats any seed");
        s.restart(None, true);
        assert_eq!(
            s.estimate(),
            None,
            "moved to another pool: its unit may differ"
        );
    }

    #[test]
    fn unsaved_once_per_change() {
        let mut s = Speed::default();
        for _ in 0..3 {
            s.observe(10.0, 1.0);
        }
        assert_eq!(s.take_unsaved(), Some((10.0, 3)));
        assert_eq!(s.take_unsaved(), None);
    }

    #[test]
    fn a_pools_median_size() {
        let mut z = Sizes::default();
        assert_eq!(z.median(), None);
        for c in [10.0, 30.0, 3600.0] {
            z.note(c);
        }
        assert_eq!(z.median(), Some(30.0));
    }
}

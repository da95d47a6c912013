//! The placement policy: which GPU of a task's pool it goes to, as a pure function of the pool's
//! GPUs (docs/contracts.md, promise of least-loaded placement, and placement by predicted finish).
//!
//! The slot matrix decides who is a candidate (up, not drained or retired, of the task's pool);
//! this decides among them, so a policy can be read and unit-tested without health, ramp-up or
//! drains in the way. Two rules:
//!
//! - **Least-loaded** ([`least_loaded`]): the lowest share of busy slots wins (a 2-slot GPU with
//!   one task is as loaded as a 4-slot GPU with two); ties go to the first candidate in rotation
//!   order, which the matrix starts one past its last choice so that an idle fleet does not send
//!   every first task to `g0`; the GPU where a retried task last failed is chosen only when it is
//!   the only candidate.
//! - **Predicted finish** ([`predicted_finish`]): the GPU where this task should end first: when
//!   its slot is free (now, or when its first running attempt is predicted to end) plus the task's
//!   cost over the GPU's learned speed. A GPU whose slots are all busy can win: the task then
//!   waits for it in the scheduler's hand (a free slot elsewhere goes to the tasks behind it), but
//!   only when it would end clearly sooner there ([`WAIT_GAIN`]) and the busy GPU's running
//!   attempts are all within their predictions (an overdue one says the prediction is wrong, and a
//!   task never waits on a guess gone stale). Near-ties, an unknown cost and an unknown speed fall
//!   back to least-loaded, so a fleet with nothing learned yet behaves as before and learns.

use std::time::Duration;

/// A GPU of the task's pool that is up and takes work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Candidate<'a> {
    pub(crate) id: &'a str,
    /// Slots held now.
    pub(crate) busy: usize,
    /// Slots it may use now (its count, or fewer while ramping up).
    pub(crate) usable: usize,
    /// Cost units per second of wall time per attempt, when known.
    pub(crate) speed: Option<f64>,
    /// With every usable slot busy: how long until the first of its attempts is predicted to
    /// end; `None` when an attempt's end is unknown or overdue. Ignored while a slot is free.
    pub(crate) frees_in: Option<Duration>,
}

impl Candidate<'_> {
    fn open(&self) -> bool {
        self.busy < self.usable
    }

    /// Seconds from now until a task of `cost` would end here, if that can be predicted.
    fn finish(&self, cost: f64) -> Option<f64> {
        let speed = self.speed.filter(|s| *s > 0.0)?;
        let start = if self.open() {
            0.0
        } else {
            self.frees_in?.as_secs_f64()
        };
        Some(start + cost / speed)
    }
}

/// What to do with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    /// Use a free slot of the candidate at this index.
    Slot(usize),
    /// Keep the task: the busy candidate at this index will end it clearly sooner than any
    /// free one.
    Wait(usize),
}

/// A task waits for a busy GPU only if it is predicted to end there this much sooner (as a share
/// of its best free GPU's finish): a prediction is an estimate, and a free slot left unused for a
/// small gain costs more than it saves.
pub(crate) const WAIT_GAIN: f64 = 0.25;

/// Finishes this close (as a share) are a tie, settled by least-loaded: two GPUs of one model
/// learn slightly different speeds, and should still share the work by load.
const TIE: f64 = 0.02;

/// The index in `candidates` (given in rotation order) of the open GPU to use, avoiding `avoid`
/// (the GPU of the task's previous attempt) while another open candidate exists. `None` only
/// when no candidate has a free slot.
pub(crate) fn least_loaded(candidates: &[Candidate<'_>], avoid: Option<&str>) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut fallback = None;
    for (i, c) in candidates.iter().enumerate() {
        if !c.open() {
            continue;
        }
        if avoid == Some(c.id) {
            fallback.get_or_insert(i);
            continue;
        }
        // busy/usable < best.busy/best.usable, compared without division.
        let better = best.is_none_or(|b| {
            let b = &candidates[b];
            c.busy * b.usable < b.busy * c.usable
        });
        if better {
            best = Some(i);
        }
    }
    best.or(fallback)
}

/// Where a task of `cost` (`None`: unknown) should go among `candidates` (rotation order), by
/// predicted finish, waiting for a busy one only if it `may_wait`; least-loaded for ties and
/// unknowns. `None` only when no candidate has a free slot.
pub(crate) fn predicted_finish(
    candidates: &[Candidate<'_>],
    cost: Option<f64>,
    avoid: Option<&str>,
    may_wait: bool,
) -> Option<Choice> {
    let fallback = least_loaded(candidates, avoid)?;
    let Some(cost) = cost else {
        return Some(Choice::Slot(fallback));
    };
    // The previous attempt's GPU is a candidate only when it is the only open one.
    let others_open = candidates.iter().any(|c| c.open() && avoid != Some(c.id));
    let eligible = |c: &Candidate<'_>| !(others_open && avoid == Some(c.id));
    let mut open = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        if c.open() && eligible(c) {
            match c.finish(cost) {
                Some(f) => open.push((i, f)),
                // One open GPU of unknown speed: nothing to compare it with.
                None => return Some(Choice::Slot(fallback)),
            }
        }
    }
    let best_open = open.iter().map(|(_, f)| *f).fold(f64::INFINITY, f64::min);
    let best_busy = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| may_wait && !c.open() && eligible(c) && Some(c.id) != avoid)
        .filter_map(|(i, c)| Some((i, c.finish(cost)?)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((i, f)) = best_busy {
        if f < best_open * (1.0 - WAIT_GAIN) {
            return Some(Choice::Wait(i));
        }
    }
    // The near-best open GPUs, settled by load and rotation.
    let tied: Vec<Candidate<'_>> = open
        .iter()
        .filter(|(_, f)| *f <= best_open * (1.0 + TIE))
        .map(|&(i, _)| candidates[i])
        .collect();
    let pick = least_loaded(&tied, avoid).expect("the best open GPU is among the tied");
    let id = tied[pick].id;
    Some(Choice::Slot(
        candidates
            .iter()
            .position(|c| c.id == id)
            .expect("a tied candidate is a candidate"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, busy: usize, usable: usize) -> Candidate<'_> {
        Candidate {
            id,
            busy,
            usable,
            speed: None,
            frees_in: None,
        }
    }

    fn at(id: &str, busy: usize, speed: f64, frees_in: Option<f64>) -> Candidate<'_> {
        Candidate {
            speed: Some(speed),
            frees_in: frees_in.map(Duration::from_secs_f64),
            ..c(id, busy, 4)
        }
    }

    #[test]
    fn lowest_share_wins_whatever_the_slot_count() {
        // g0 is half busy with 2 slots, g1 a quarter busy with 4.
        assert_eq!(least_loaded(&[c("g0", 1, 2), c("g1", 1, 4)], None), Some(1));
        // Equal shares: the first in rotation order.
        assert_eq!(least_loaded(&[c("g0", 1, 2), c("g1", 2, 4)], None), Some(0));
        assert_eq!(least_loaded(&[c("g1", 2, 4), c("g0", 1, 2)], None), Some(0));
        // A full GPU is never chosen.
        assert_eq!(least_loaded(&[c("g0", 2, 2), c("g1", 3, 4)], None), Some(1));
        assert_eq!(least_loaded(&[c("g0", 2, 2)], None), None);
    }

    #[test]
    fn the_previous_gpu_only_when_alone() {
        let both = [c("g0", 0, 4), c("g1", 3, 4)];
        assert_eq!(least_loaded(&both, Some("g0")), Some(1));
        assert_eq!(least_loaded(&both[..1], Some("g0")), Some(0));
        assert_eq!(least_loaded(&[], Some("g0")), None);
        assert_eq!(least_loaded(&[], None), None);
    }

    #[test]
    fn a_long_task_goes_to_the_fast_gpu_even_when_it_is_busier() {
        // slow: 1 unit/s, idle; fast: 4 units/s, 3 of 4 busy.
        let fleet = [at("slow", 0, 1.0, None), at("fast", 3, 4.0, None)];
        assert_eq!(
            predicted_finish(&fleet, Some(3600.0), None, true),
            Some(Choice::Slot(1))
        );
        // Least-loaded would have taken the idle one.
        assert_eq!(least_loaded(&fleet, None), Some(0));
    }

    #[test]
    fn a_task_waits_for_a_busy_fast_gpu_only_when_clearly_sooner() {
        // fast is full, its first slot frees in 10 s.
        let fleet = [at("slow", 0, 1.0, None), at("fast", 4, 4.0, Some(10.0))];
        // An hour of audio: 3600 s on slow, 10 + 900 s on fast.
        assert_eq!(
            predicted_finish(&fleet, Some(3600.0), None, true),
            Some(Choice::Wait(1))
        );
        // Not allowed to wait (a full hand): the free slot.
        assert_eq!(
            predicted_finish(&fleet, Some(3600.0), None, false),
            Some(Choice::Slot(0))
        );
        // Ten seconds of audio: 10 s on slow now, 12.5 s on fast later.
        assert_eq!(
            predicted_finish(&fleet, Some(10.0), None, true),
            Some(Choice::Slot(0))
        );
        // An overdue attempt on fast: its end is unknown, so nobody waits for it.
        let stale = [at("slow", 0, 1.0, None), at("fast", 4, 4.0, None)];
        assert_eq!(
            predicted_finish(&stale, Some(3600.0), None, true),
            Some(Choice::Slot(0))
        );
    }

    #[test]
    fn unknowns_and_ties_fall_back_to_least_loaded() {
        let fleet = [at("a", 2, 1.0, None), at("b", 1, 1.0, None)];
        // Same speed: a tie, and b is less loaded.
        assert_eq!(
            predicted_finish(&fleet, Some(100.0), None, true),
            Some(Choice::Slot(1))
        );
        // No cost: least-loaded.
        let mixed = [at("slow", 0, 1.0, None), at("fast", 2, 4.0, None)];
        assert_eq!(
            predicted_finish(&mixed, None, None, true),
            Some(Choice::Slot(0))
        );
        // An open GPU of unknown speed: least-loaded.
        let unknown = [c("new", 0, 4), at("fast", 2, 4.0, None)];
        assert_eq!(
            predicted_finish(&unknown, Some(100.0), None, true),
            Some(Choice::Slot(0))
        );
        // Nothing free: no choice.
        let full = [at("a", 4, 1.0, Some(1.0)), at("b", 4, 4.0, Some(1.0))];
        assert_eq!(predicted_finish(&full, Some(100.0), None, true), None);
    }

    #[test]
    fn a_retry_avoids_its_last_gpu_and_never_waits_for_it() {
        let fleet = [at("slow", 0, 1.0, None), at("fast", 1, 4.0, None)];
        assert_eq!(
            predicted_finish(&fleet, Some(3600.0), Some("fast"), true),
            Some(Choice::Slot(0))
        );
        let busy_fast = [at("slow", 0, 1.0, None), at("fast", 4, 4.0, Some(1.0))];
        assert_eq!(
            predicted_finish(&busy_fast, Some(3600.0), Some("fast"), true),
            Some(Choice::Slot(0))
        );
        // Alone, it is still used.
        assert_eq!(
            predicted_finish(&fleet[1..], Some(3600.0), Some("fast"), true),
            Some(Choice::Slot(0))
        );
    }
}

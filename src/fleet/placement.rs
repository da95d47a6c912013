//! The placement policy: which GPU a task goes to, as a pure function of the GPUs that can take
//! work now (docs/contracts.md, promise of least-loaded placement).
//!
//! The slot matrix decides who is a candidate (up, not drained or retired, a usable slot free);
//! this decides among them, so a policy can be read and unit-tested without health, ramp-up or
//! drains in the way. Rule: the lowest share of busy slots wins (a 2-slot GPU with one task is as
//! loaded as a 4-slot GPU with two); ties go to the first candidate in rotation order, which the
//! matrix starts one past its last choice so that an idle fleet does not send every first task to
//! `g0`; the GPU where a retried task last failed is chosen only when it is the only candidate.

/// A GPU that can take a task now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate<'a> {
    pub(crate) id: &'a str,
    /// Slots held now.
    pub(crate) busy: usize,
    /// Slots it may use now (its count, or fewer while ramping up); above `busy`.
    pub(crate) usable: usize,
}

/// The index in `candidates` (given in rotation order) of the GPU to use, avoiding `avoid` (the
/// GPU of the task's previous attempt) while another candidate exists. `None` only when there is
/// no candidate.
pub(crate) fn least_loaded(candidates: &[Candidate<'_>], avoid: Option<&str>) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut fallback = None;
    for (i, c) in candidates.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, busy: usize, usable: usize) -> Candidate<'_> {
        Candidate { id, busy, usable }
    }

    #[test]
    fn lowest_share_wins_whatever_the_slot_count() {
        // g0 is half busy with 2 slots, g1 a quarter busy with 4.
        assert_eq!(least_loaded(&[c("g0", 1, 2), c("g1", 1, 4)], None), Some(1));
        // Equal shares: the first in rotation order.
        assert_eq!(least_loaded(&[c("g0", 1, 2), c("g1", 2, 4)], None), Some(0));
        assert_eq!(least_loaded(&[c("g1", 2, 4), c("g0", 1, 2)], None), Some(0));
    }

    #[test]
    fn the_previous_gpu_only_when_alone() {
        let both = [c("g0", 0, 4), c("g1", 3, 4)];
        assert_eq!(least_loaded(&both, Some("g0")), Some(1));
        assert_eq!(least_loaded(&both[..1], Some("g0")), Some(0));
        assert_eq!(least_loaded(&[], Some("g0")), None);
        assert_eq!(least_loaded(&[], None), None);
    }
}

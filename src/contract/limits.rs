//! Limits on values that arrive from outside (the config, MySQL rows, peers' slot events) and
//! size what qsysd allocates: written once, checked wherever such a value enters.

/// Most slots one GPU may have (`gpu.slots`): the bound on any slot index the matrix accepts, from
/// the config, MySQL or another instance, so a bad index cannot make it allocate without limit.
pub(crate) const MAX_SLOTS: usize = 1024;

//! The retention thread (`qsys-retention`): keeps the counts cheap and the tables bounded.
//!
//! - Every [`ROLL_UP`], the terminal rows that ended a while ago are rolled up into the totals
//!   ([`crate::store::Store::roll_up`]), so `/status` and `/metrics` count the same with 100 rows
//!   or 100 million.
//! - Every [`PRUNE`], on one instance at a time (a named MySQL lock), tasks past their state's
//!   retention are deleted with their attempts and results, [`crate::store`]'s batches of at most
//!   1,000 rows with a pause after each twice as long as the batch took (at least 20 ms), so a
//!   backlog of millions keeps MySQL busy a third of the time at most and holds no lock a claim
//!   needs for longer than one batch; then the rows of instances dead for a day.
//!
//! On its own thread: a prune of a large backlog takes minutes, and nothing else waits for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shared::Shared;
use crate::store::Store;

/// How often the counts are rolled up.
const ROLL_UP: Duration = Duration::from_secs(5);
/// How often tasks past their retention are looked for.
const PRUNE: Duration = Duration::from_secs(60);
/// The shortest pause after a prune batch.
const PACE: Duration = Duration::from_millis(20);
/// The pause after a prune batch, as a multiple of the time the batch took: a prune then keeps
/// MySQL busy a third of the time at most, however slow its batches are (pages on disk, a busy
/// server), and the task flow's transactions go first.
const PACE_RATIO: u32 = 2;

pub(crate) fn run(shared: Arc<Shared>) {
    let mut rolled: Option<Instant> = None;
    let mut pruned: Option<Instant> = None;
    loop {
        shared.tick("qsys-retention");
        if !shared.problems().contains_key("mysql") {
            if rolled.is_none_or(|t| t.elapsed() >= ROLL_UP) {
                rolled = Some(Instant::now());
                roll_up(&shared.store);
            }
            if pruned.is_none_or(|t| t.elapsed() >= PRUNE) {
                pruned = Some(Instant::now());
                let retention = shared.config().retention;
                let mut batch_began = Instant::now();
                let pace = |_: u64| {
                    let pause = (batch_began.elapsed() * PACE_RATIO).max(PACE);
                    shared.tick("qsys-retention");
                    if rolled.is_none_or(|t| t.elapsed() >= ROLL_UP) {
                        rolled = Some(Instant::now());
                        roll_up(&shared.store);
                    }
                    let stopped = shared.stop.sleep(pause);
                    batch_began = Instant::now();
                    !stopped
                };
                let store = &shared.store;
                match store.with_prune_lock(|| store.prune(&retention, pace)) {
                    Ok(Some(Ok(by_state))) => {
                        for (state, n) in by_state.into_iter().filter(|(_, n)| *n > 0) {
                            log::info!(state = state.as_str(), tasks = n;
                                "pruned tasks past their retention");
                        }
                    }
                    Ok(None) => {}
                    Ok(Some(Err(e))) | Err(e) => {
                        log::warn!(error:% = e; "prune failed; again in a minute")
                    }
                }
            }
        }
        if shared.stop.sleep(Duration::from_secs(1)) {
            break;
        }
    }
    log::debug!("retention stopped");
}

fn roll_up(store: &Store) {
    if let Err(e) = store.roll_up() {
        log::warn!(error:% = e; "cannot roll up task counts");
    }
}

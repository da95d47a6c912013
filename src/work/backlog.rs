//! Each pool's backlog and time to drain, worked out by the maintenance thread every second
//! ([`Backlog::update`]) for `/status`, `/metrics` and `qsys-push --wait`.
//!
//! A pool's backlog is the work it has not done yet, in its cost units: what its running
//! attempts have left (by their sizes and their GPUs' speeds), what waits in MySQL (`pending`
//! rows, read every [`PENDING_EVERY`]), and what waits in Redis. Redis lists are not read whole:
//! each queue's first elements are (up to [`SAMPLE`], about 256 KiB, in the pipeline that
//! measures its depth), and the rest is taken to be like them, so the estimate costs the same for
//! a thousand tasks or ten million and is exact for a queue no longer than the sample. (Sizes
//! have a long tail, an hour-long file among a hundred calls: a sample of a few dozen would
//! swing the estimate by a third from one second to the next.) A task of unknown size counts as
//! its pool's median; with no size known in a pool, unknown sizes count as nothing.
//!
//! Time to drain is the backlog over the pool's capacity: its GPUs up, each at its learned speed
//! times its usable slots. Learned speeds are written to MySQL and read back every
//! [`PERSIST_EVERY`] (a GPU this instance has measured little takes what a peer or an earlier
//! run learned); the pools' numbers are published there too, for `qsys-push`.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::config::Handler;
use crate::fleet::{PoolDrain, PoolView};
use crate::shared::Shared;
use crate::store::{PendingWork, PoolStat};
use crate::sync::Locked;

/// Elements read from the head of each queue to estimate its work.
pub(crate) const SAMPLE: usize = 1000;
/// How often the `pending` rows' sizes are read: with the queues, since a scheduler's hand (up
/// to 80 tasks) and a busy pool's overflow are part of the backlog too.
const PENDING_EVERY: Duration = Duration::from_secs(1);
/// How often the mean sizes of a busy pool's let-go rows are read (a row read each: they may be
/// a whole backlog); counted every [`PENDING_EVERY`].
const LET_GO_SIZES_EVERY: Duration = Duration::from_secs(30);
/// How often speeds and pool numbers go to MySQL (and peers' speeds come back).
const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// One queue as measured: its depth and the type and size of its first elements.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct QueueSample {
    pub(crate) depth: u64,
    pub(crate) sizes: Vec<(String, Option<f64>)>,
}

/// The maintenance thread's memory for the backlog.
#[derive(Default)]
pub(crate) struct Backlog {
    pending: Vec<PendingWork>,
    pending_read: Option<Instant>,
    /// Mean size of the let-go rows by type (`None`: none of known size), and when read.
    let_go_sizes: HashMap<String, Option<f64>>,
    let_go_read: Option<Instant>,
    persisted: Option<Instant>,
    /// The queues as last measured, kept while Redis does not answer.
    queues: Vec<QueueSample>,
}

/// The pool of each GPU task type.
fn pools_of(types: &BTreeMap<String, Handler>) -> HashMap<&str, &str> {
    types
        .iter()
        .filter_map(|(name, h)| match h {
            Handler::Gpu { pool } => Some((name.as_str(), pool.as_str())),
            _ => None,
        })
        .collect()
}

/// The work in one queue, by pool: its `depth` elements taken to be like its first ones,
/// `sample` (their type and size).
fn queued(
    depth: u64,
    sample: &[(String, Option<f64>)],
    pools: &HashMap<&str, &str>,
    medians: &HashMap<&str, f64>,
    into: &mut HashMap<String, f64>,
) {
    if sample.is_empty() {
        return;
    }
    let scale = depth.max(sample.len() as u64) as f64 / sample.len() as f64;
    for (kind, size) in sample {
        let Some(pool) = pools.get(kind.as_str()) else {
            continue;
        };
        let size = size.or_else(|| medians.get(pool).copied()).unwrap_or(0.0);
        *into.entry(pool.to_string()).or_default() += size * scale;
    }
}

/// Every pool's backlog and time to drain, from the matrix's pools, the queues (depth and head
/// sample) and the `pending` rows. Pure.
fn drains(
    views: Vec<PoolView>,
    queues: &[QueueSample],
    pending: &[PendingWork],
    types: &BTreeMap<String, Handler>,
) -> Vec<PoolDrain> {
    let pools = pools_of(types);
    let medians: HashMap<&str, f64> = views
        .iter()
        .filter_map(|v| Some((v.pool.as_str(), v.median_cost?)))
        .collect();
    let mut waiting: HashMap<String, f64> = HashMap::new();
    for q in queues {
        queued(q.depth, &q.sizes, &pools, &medians, &mut waiting);
    }
    for p in pending {
        let Some(pool) = pools.get(p.kind.as_str()) else {
            continue;
        };
        let unknown = p.tasks.saturating_sub(p.sized) as f64;
        let median = medians.get(pool).copied().unwrap_or(0.0);
        *waiting.entry(pool.to_string()).or_default() += p.size + unknown * median;
    }
    views
        .into_iter()
        .map(|view| {
            let backlog_cost = view.running_cost + waiting.get(&view.pool).copied().unwrap_or(0.0);
            let drain_s = match view.capacity {
                _ if backlog_cost <= 0.0 => Some(0.0),
                Some(c) if c > 0.0 => Some(backlog_cost / c),
                _ => None,
            };
            PoolDrain {
                view,
                backlog_cost,
                drain_s,
            }
        })
        .collect()
}

/// The type and size of each sampled queue element (an element that does not parse has
/// neither, and counts in no pool).
pub(crate) fn sample_sizes(elements: &[Vec<u8>]) -> Vec<(String, Option<f64>)> {
    elements
        .iter()
        .filter_map(|raw| {
            let m = crate::contract::message::parse(raw, String::new).ok()?;
            let size = m.cost();
            Some((m.kind, size))
        })
        .collect()
}

impl Backlog {
    /// Works out every pool's backlog from the queues just measured (depth and head sample per
    /// queue), reading MySQL when due; persists speeds and publishes the pools when due.
    /// `queues` is `None` when Redis did not answer: the last measure stands meanwhile.
    pub(crate) fn update(&mut self, shared: &Shared, queues: Option<Vec<QueueSample>>) {
        if let Some(q) = queues {
            self.queues = q;
        }
        let mysql_ok = !shared.problems().contains_key("mysql");
        if mysql_ok {
            self.read_pending(shared);
        }
        let views = shared.slots().pools();
        let drains = drains(views, &self.queues, &self.pending, &shared.config().types);
        if mysql_ok && self.persisted.is_none_or(|t| t.elapsed() >= PERSIST_EVERY) {
            self.persisted = Some(Instant::now());
            persist(shared, &drains);
        }
        *shared.pools.locked() = drains;
    }
}

impl Backlog {
    /// The `pending` rows' work, when due: counts and sizes every [`PENDING_EVERY`], a busy
    /// pool's rows taken at the mean size of their type, read every [`LET_GO_SIZES_EVERY`] (and
    /// as soon as a type without one has rows waiting).
    fn read_pending(&mut self, shared: &Shared) {
        if self
            .pending_read
            .is_some_and(|t| t.elapsed() < PENDING_EVERY)
        {
            return;
        }
        self.pending_read = Some(Instant::now());
        let mut pending = match shared.store.pending_work() {
            Ok(p) => p,
            Err(e) => return log::warn!(error:% = e; "cannot read the pending tasks' sizes"),
        };
        let unknown = pending
            .iter()
            .any(|w| w.let_go && !self.let_go_sizes.contains_key(&w.kind));
        if unknown
            || self
                .let_go_read
                .is_none_or(|t| t.elapsed() >= LET_GO_SIZES_EVERY)
        {
            self.let_go_read = Some(Instant::now());
            match shared.store.let_go_sizes() {
                Ok(s) => self.let_go_sizes = s,
                Err(e) => log::warn!(error:% = e; "cannot read the waiting tasks' sizes"),
            }
        }
        for w in pending.iter_mut().filter(|w| w.let_go) {
            if let Some(Some(mean)) = self.let_go_sizes.get(&w.kind) {
                (w.sized, w.size) = (w.tasks, mean * w.tasks as f64);
            }
        }
        self.pending = pending;
    }
}

/// Writes the speeds learned since they were last written (also at a stop, so a restart starts
/// from all that was learned).
pub(crate) fn save_speeds(shared: &Shared) {
    let unsaved = shared.slots().unsaved_speeds();
    if let Err(e) = shared.store.save_speeds(&unsaved) {
        log::warn!(error:% = e; "cannot save learned gpu speeds");
    }
}

/// Learned speeds to MySQL and back, and the pools' numbers out.
fn persist(shared: &Shared, drains: &[PoolDrain]) {
    save_speeds(shared);
    match shared.store.speeds() {
        Ok(s) => shared.slots().reseed(&s),
        Err(e) => log::warn!(error:% = e; "cannot read learned gpu speeds"),
    }
    let config = shared.config();
    let stats: Vec<PoolStat> = drains
        .iter()
        .map(|d| {
            let types: Vec<&str> = config
                .types
                .iter()
                .filter(|(_, h)| matches!(h, Handler::Gpu { pool } if *pool == d.view.pool))
                .map(|(name, _)| name.as_str())
                .collect();
            PoolStat {
                pool: d.view.pool.clone(),
                backlog_cost: d.backlog_cost,
                capacity: d.view.capacity,
                drain_s: d.drain_s,
                types: serde_json::Value::from(types).to_string(),
            }
        })
        .collect();
    drop(config);
    if let Err(e) = shared.store.save_pool_stats(&stats) {
        log::warn!(error:% = e; "cannot publish the pools' backlog");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pool: &str, capacity: Option<f64>, running: f64, median: Option<f64>) -> PoolView {
        PoolView {
            pool: pool.into(),
            gpus: 1,
            gpus_up: 1,
            slots_busy: 0,
            slots_up: 4,
            capacity,
            running_cost: running,
            median_cost: median,
        }
    }

    fn types() -> BTreeMap<String, Handler> {
        BTreeMap::from([
            ("asr".to_string(), Handler::Gpu { pool: "a".into() }),
            ("diar".to_string(), Handler::Gpu { pool: "b".into() }),
            (
                "email".to_string(),
                Handler::Exec {
                    command: vec!["/bin/true".into()],
                    timeout: Duration::from_secs(1),
                    env: Vec::new(),
                },
            ),
        ])
    }

    #[test]
    fn a_queue_longer_than_its_sample_is_taken_to_be_like_it() {
        let sample = vec![
            ("asr".to_string(), Some(10.0)),
            ("asr".to_string(), None),
            ("diar".to_string(), Some(100.0)),
            ("email".to_string(), None),
        ];
        let views = vec![
            view("a", Some(2.0), 5.0, Some(30.0)),
            view("b", None, 0.0, None),
        ];
        // 400 elements like these 4: 100 of each kind.
        let queue = QueueSample {
            depth: 400,
            sizes: sample,
        };
        let d = drains(views, &[queue], &[], &types());
        // a: running 5 + 100 x 10 + 100 x the median 30.
        assert_eq!(d[0].backlog_cost, 4005.0);
        assert_eq!(d[0].drain_s, Some(4005.0 / 2.0));
        // b: no capacity known, no time to drain.
        assert_eq!(d[1].backlog_cost, 10_000.0);
        assert_eq!(d[1].drain_s, None);
    }

    #[test]
    fn pending_rows_count_with_their_sizes_and_an_empty_pool_drains_now() {
        let pending = vec![PendingWork {
            kind: "asr".into(),
            tasks: 3,
            sized: 2,
            size: 50.0,
            let_go: false,
        }];
        let views = vec![
            view("a", Some(10.0), 0.0, Some(20.0)),
            view("b", Some(1.0), 0.0, None),
        ];
        let d = drains(views, &[], &pending, &types());
        assert_eq!(d[0].backlog_cost, 70.0);
        assert_eq!(d[0].drain_s, Some(7.0));
        assert_eq!(d[1].drain_s, Some(0.0));
    }

    #[test]
    fn sampled_elements_give_their_type_and_size() {
        let raw: Vec<Vec<u8>> = [
            r#"{"type":"asr","cost":12}"#,
            r#"{"type":"asr","data":{"audio_seconds":30.5}}"#,
            r#"{"type":"asr","data":{"duration_s":"long"}}"#,
            "not json",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        assert_eq!(
            sample_sizes(&raw),
            [
                ("asr".to_string(), Some(12.0)),
                ("asr".to_string(), Some(30.5)),
                ("asr".to_string(), None),
            ]
        );
    }
}

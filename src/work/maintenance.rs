//! The maintenance thread (`qsys-maintenance`): the slow, periodic work.
//!
//! - Leases: an attempt with no completion by its deadline (`gpu.task_timeout`, the task's
//!   `timeout_s`, or an exec/http handler's timeout plus a margin; sooner, `heartbeat_timeout`
//!   after the last word from a GPU that must heartbeat) ends as `expired`; its slot frees and
//!   the task is retried (preferring another GPU) or fails after its attempts (or is
//!   `cancelled`, if an operator cancelled it). A late callback for it then gets 409.
//! - Health probes: a GPU whose ejection cooldown is over gets a `GET` of its `health_url`; any
//!   answer below 500 readmits it with one slot, anything else ejects it again for longer.
//! - Heartbeat: on a thread of its own ([`run_heartbeat`]), so nothing here can delay it.
//! - Queue depths and ages: one pipelined `LLEN` and `LRANGE` of the first elements per queue
//!   each second, for `STATUS=`, `/status` and `qsys_queue_oldest_seconds` (the head's
//!   `enqueued_at`, else when this instance first saw it there), and for each pool's backlog and
//!   time to drain ([`crate::work::backlog`]), which also keeps the learned speeds in MySQL.
//! - Failover: an instance silent for `daemon.instance_timeout` is dead. Its in-hand lists go back
//!   to the head of their queues, its `pending` tasks go back to Redis, and its attempts' leases are
//!   expired here on schedule (callbacks for them apply wherever they land).
//! - Slot resync: every few seconds the slot mirror is compared with MySQL, the authority, in case
//!   a slot event between instances was lost.
//! - Drains: the GPUs an operator drained (`gpu_state` in MySQL, set by `qsysd drain` from any
//!   host), applied to the slot matrix within a second; paused queues and types (`qsysd pause`)
//!   likewise, to the poller and the scheduler.
//!
//! Every call here is bounded (MySQL and HTTP timeouts), and the loop ends with the stop.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fleet::HealthChange;
use crate::obs::trouble::Trouble;
use crate::shared::Shared;
use crate::store::Ending;
use crate::sync::Locked;
use crate::work::backlog::{sample_sizes, QueueSample, SAMPLE};

/// How often the loop runs.
const TICK: Duration = Duration::from_millis(250);
/// How often the slot mirror is checked against MySQL and dead instances are looked for.
const RESYNC: Duration = Duration::from_secs(2);
/// A claim this young may not be committed yet: resync leaves it alone.
const CLAIM_GRACE: Duration = Duration::from_secs(2);

/// How long one health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn run(shared: Arc<Shared>, client: redis::Client) {
    let agent = crate::net::http::agent();
    let mut last_beat: Option<Instant> = None;
    let mut redis: Option<redis::Connection> = None;
    let mut last_sync: Option<Instant> = None;
    let mut backlog = crate::work::backlog::Backlog::default();
    let mut sample_len: HashMap<String, usize> = HashMap::new();
    // Work first, then wait: queue depths are there from the start.
    loop {
        shared.tick("qsys-maintenance");
        if last_beat.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_beat = Some(Instant::now());
            let samples = measure_queues(&shared, &client, &mut redis, &mut sample_len);
            backlog.update(&shared, samples);
            // While MySQL does not answer there is nothing to do; the heartbeat thread finds out
            // every second, so no round trip of its own here.
            if !shared.problems().contains_key("mysql") {
                watch_peers(&shared);
                expire_leases(&shared);
                if last_sync.is_none_or(|t| t.elapsed() >= RESYNC) {
                    last_sync = Some(Instant::now());
                    recover_dead(&shared, &client);
                    resync_slots(&shared);
                }
                match shared.store.drained() {
                    Ok(d) => shared.slots().set_drained(&d),
                    Err(e) => log::warn!(error:% = e; "cannot read drained gpus"),
                }
                match shared.store.paused() {
                    Ok(p) => shared.set_paused(p),
                    Err(e) => log::warn!(error:% = e; "cannot read paused queues and types"),
                }
            }
        }
        probe_due(&shared, &agent);
        if shared.stop.sleep(TICK) {
            break;
        }
    }
    // What was learned since the last save is not lost with a stop.
    crate::work::backlog::save_speeds(&shared);
    log::debug!("maintenance stopped");
}

/// The heartbeat thread (`qsys-heartbeat`): this instance's row in `instances`, every second,
/// and whether MySQL answers (`/healthz`). Alone on its thread: the maintenance loop also waits
/// on Redis (up to 11 s), GPU probes and lease expiry, and a heartbeat late by
/// `daemon.instance_timeout` makes peers recover a live instance's work.
/// It beats until the stop's closing stage, not its start: during a graceful stop the calls in
/// flight are still this instance's, and peers must not recover them.
pub(crate) fn run_heartbeat(shared: Arc<Shared>) {
    while !shared.stop.is_closing() {
        shared.tick("qsys-heartbeat");
        match shared.store.heartbeat() {
            Ok(()) => shared.cleared(Trouble::Mysql),
            Err(e) => outage!(warn, shared, Trouble::Mysql, e; "mysql unavailable"),
        }
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next && !shared.stop.is_closing() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    log::debug!("heartbeat stopped");
}

/// Each queue's depth and head age, for status and metrics; returned, each queue's depth and
/// the type and size of its first elements, for the pools' backlog (empty when Redis did not
/// answer). How many elements are read adapts per queue (`sample_len`) so that a sample is about
/// [`SAMPLE_BYTES`], up to [`SAMPLE`] elements: big elements are sampled fewer at a time.
fn measure_queues(
    shared: &Shared,
    client: &redis::Client,
    conn: &mut Option<redis::Connection>,
    sample_len: &mut HashMap<String, usize>,
) -> Option<Vec<QueueSample>> {
    let queues = shared.config().redis.queues.clone();
    let c = match conn {
        Some(c) => c,
        None => match crate::work::poller::connect(client, Duration::from_secs(1)) {
            Ok(c) => conn.insert(c),
            // The poller reports Redis trouble; nothing to add here.
            Err(_) => return None,
        },
    };
    let mut pipe = redis::pipe();
    for q in &queues {
        let n = *sample_len.entry(q.clone()).or_insert(SAMPLE_FIRST);
        pipe.cmd("LLEN")
            .arg(q)
            .cmd("LINDEX")
            .arg(q)
            .arg(0)
            .cmd("LRANGE")
            .arg(q)
            .arg(0)
            .arg(n - 1);
    }
    let mut samples = Vec::with_capacity(queues.len());
    match pipe.query::<Vec<redis::Value>>(c) {
        Ok(replies) => {
            let mut depths = Vec::with_capacity(queues.len());
            let mut ages = BTreeMap::new();
            let mut heads = shared.heads.locked();
            let mut replies = replies.into_iter();
            for q in queues {
                let (Some(len), Some(head), Some(first)) =
                    (replies.next(), replies.next(), replies.next())
                else {
                    break;
                };
                let depth: u64 = redis::from_redis_value(len).unwrap_or(0);
                let head: Option<Vec<u8>> = redis::from_redis_value(head).ok().flatten();
                ages.insert(q.clone(), head_age(&mut heads, &q, head.as_deref()));
                let first: Vec<Vec<u8>> = redis::from_redis_value(first).unwrap_or_default();
                let bytes: usize = first.iter().map(Vec::len).sum();
                if let Some(n) = sample_len.get_mut(&q) {
                    *n = next_sample_len(*n, first.len(), bytes);
                }
                samples.push(QueueSample {
                    depth,
                    sizes: sample_sizes(&first),
                });
                depths.push((q, depth));
            }
            drop(heads);
            *shared.queue_depths.locked() = depths;
            *shared.queue_ages.locked() = ages;
            Some(samples)
        }
        Err(_) => {
            *conn = None;
            None
        }
    }
}

/// Elements sampled from a queue the first time.
const SAMPLE_FIRST: usize = 100;
/// About how many bytes a queue's sample reads each second.
const SAMPLE_BYTES: usize = 256 << 10;

/// The next sample's length after one of `got` elements and `bytes`: as many as fit
/// [`SAMPLE_BYTES`] at their mean size, at most double the last and at most [`SAMPLE`].
fn next_sample_len(last: usize, got: usize, bytes: usize) -> usize {
    if got == 0 {
        return last;
    }
    let mean = (bytes / got).max(1);
    (SAMPLE_BYTES / mean).clamp(1, (last * 2).min(SAMPLE))
}

/// How long the task at the head of `queue` has waited, in seconds: from its `enqueued_at`
/// (stamped by `qsys-push`), else from when this instance first saw it there (`heads`). 0 for an
/// empty queue.
fn head_age(heads: &mut BTreeMap<String, (u64, Instant)>, queue: &str, head: Option<&[u8]>) -> f64 {
    let Some(raw) = head else {
        heads.remove(queue);
        return 0.0;
    };
    #[derive(serde::Deserialize)]
    struct Stamp {
        enqueued_at: Option<serde_json::Value>,
    }
    let stamped = serde_json::from_slice::<Stamp>(raw)
        .ok()
        .and_then(|s| s.enqueued_at)
        .and_then(|v| crate::contract::time::unix_seconds(&v).ok());
    if let Some(at) = stamped {
        heads.remove(queue);
        return (crate::contract::time::now_unix() - at).max(0.0);
    }
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        raw.hash(&mut h);
        h.finish()
    };
    match heads.get(queue) {
        Some((seen, since)) if *seen == hash => since.elapsed().as_secs_f64(),
        _ => {
            heads.insert(queue.to_string(), (hash, Instant::now()));
            0.0
        }
    }
}

fn resync_slots(shared: &Shared) {
    match shared.store.held_slots() {
        Ok(held) => {
            let held = held
                .into_iter()
                .map(|h| ((h.gpu_id, h.slot_index), (h.task_id, h.attempt)))
                .collect();
            let changed = shared.slots().resync(&held, CLAIM_GRACE);
            if changed > 0 {
                log::info!(cells = changed; "slot mirror corrected from mysql");
                shared.wake_scheduler();
            }
        }
        Err(e) => log::warn!(error:% = e; "cannot resync slots"),
    }
}

/// Notes whether other instances are alive, so slot events are published only when they are.
fn watch_peers(shared: &Shared) {
    let dead_after = shared.config().daemon.instance_timeout;
    match shared.store.live_peers(dead_after) {
        Ok(n) => {
            let before = shared
                .peers
                .swap(n > 0, std::sync::atomic::Ordering::Relaxed);
            if !before && n > 0 {
                // A newcomer built its mirror from MySQL a moment ago; claims made since then
                // were not published: publish every slot held now.
                log::info!(peers = n; "other instances are live: publishing slot events");
                let view = shared.slots().view();
                for gpu in view {
                    for (slot, h) in gpu.cells.iter().enumerate() {
                        if let Some(h) = h {
                            shared.announce(true, &gpu.id, slot, &h.task_id, h.attempt);
                        }
                    }
                }
            } else if before && n == 0 {
                log::info!("no other live instance: slot events paused");
            }
        }
        Err(e) => log::warn!(error:% = e; "cannot count live instances"),
    }
}

/// Gives a dead instance's tasks back to the fleet: its in-hand lists and its `pending` tasks go
/// back to the head of their queues.
fn recover_dead(shared: &Shared, client: &redis::Client) {
    let config = shared.config();
    let dead = match shared.store.dead_instances(config.daemon.instance_timeout) {
        Ok(d) => d,
        Err(e) => {
            log::warn!(error:% = e; "cannot look for dead instances");
            return;
        }
    };
    for instance in dead {
        let moved = crate::work::poller::recover_instance(shared, client, &config, &instance);
        match moved {
            Ok(n) => {
                if n > 0 {
                    log::warn!(instance = instance.as_str(), tasks = n;
                        "instance stopped heartbeating: its tasks went back to their queues");
                }
                // Recovered: retired, not checked again every few seconds.
                match shared
                    .store
                    .retire_instance(&instance, config.daemon.instance_timeout)
                {
                    Ok(true) => log::info!(instance = instance.as_str(); "dead instance retired"),
                    Ok(false) => {}
                    Err(e) => log::warn!(instance = instance.as_str(), error:% = e;
                        "cannot retire a dead instance"),
                }
            }
            Err(e) => log::warn!(instance = instance.as_str(), error:% = e;
                "cannot recover a dead instance's tasks"),
        }
    }
}

fn expire_leases(shared: &Shared) {
    let dead_after = shared.config().daemon.instance_timeout;
    let expired = match shared.store.expired(100, dead_after) {
        Ok(e) => e,
        Err(e) => {
            log::warn!(error:% = e; "cannot look for expired leases");
            return;
        }
    };
    let config = shared.config();
    for e in expired {
        let error = match &e.gpu_id {
            Some(g) if e.silent => {
                let timeout = config
                    .gpus
                    .iter()
                    .find(|ep| &ep.id == g)
                    .and_then(|ep| ep.heartbeat_timeout)
                    .map(crate::config::format_duration)
                    .unwrap_or_else(|| "its heartbeat timeout".into());
                format!("no heartbeat from gpu {g} for {timeout}")
            }
            Some(g) => format!("no completion from gpu {g} before the lease ran out"),
            None => "the handler did not finish before its lease ran out".to_string(),
        };
        if let Err(err) = shared.end_attempt(
            &e.task_id,
            e.attempt,
            Ending::Expired { error: &error },
            "lease",
        ) {
            log::warn!(task_id = e.task_id.as_str(), error:% = err; "cannot expire lease");
            return;
        }
    }
}

fn probe_due(shared: &Shared, agent: &ureq::Agent) {
    let due = shared.slots().take_due_probes(Instant::now());
    let policy = shared.config().health;
    for ep in due {
        let ok = probe(agent, &ep.health_url, ep.bearer_token.as_ref());
        let change = shared
            .slots()
            .probe_result(&ep.id, ok, Instant::now(), &policy);
        match change {
            HealthChange::Ejected { cooldown } => log::warn!(gpu = ep.id.as_str(),
                cooldown:? = cooldown; "gpu still down; next probe after cooldown"),
            _ => log::info!(gpu = ep.id.as_str(); "gpu answered its probe: readmitted with 1 slot"),
        }
        shared.wake_scheduler();
    }
}

/// Whether `url` answers a GET with a status below 500.
pub(crate) fn probe(agent: &ureq::Agent, url: &str, token: Option<&crate::config::Secret>) -> bool {
    let req = agent
        .get(url)
        .config()
        .timeout_global(Some(PROBE_TIMEOUT))
        .build();
    let req = crate::net::http::authorize(req, token);
    matches!(req.call(), Ok(r) if r.status().as_u16() < 500)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_elements_are_sampled_fewer_at_a_time() {
        // Small elements: the sample grows to its cap, doubling.
        assert_eq!(next_sample_len(10, 10, 3_000), 20);
        assert_eq!(next_sample_len(800, 800, 80_000), SAMPLE);
        // 1 MiB elements: one at a time; an empty queue changes nothing.
        assert_eq!(next_sample_len(10, 10, 10 << 20), 1);
        assert_eq!(next_sample_len(1, 0, 0), 1);
        // 64 KiB elements: four at a time.
        assert_eq!(next_sample_len(10, 10, 640 << 10), 4);
    }

    #[test]
    fn a_heads_age_is_its_stamp_else_since_it_was_first_seen() {
        let mut heads = BTreeMap::new();
        let now = crate::contract::time::now_unix();
        let stamped = format!(r#"{{"type":"x","enqueued_at":{}}}"#, now - 90.0);
        let age = head_age(&mut heads, "q", Some(stamped.as_bytes()));
        assert!((89.0..=91.0).contains(&age), "{age}");
        // Unstamped: 0 when first seen, then counting while the same element stays at the head.
        assert_eq!(head_age(&mut heads, "q", Some(b"{\"type\":\"x\"}")), 0.0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(head_age(&mut heads, "q", Some(b"{\"type\":\"x\"}")) >= 0.02);
        assert_eq!(head_age(&mut heads, "q", Some(b"{\"type\":\"y\"}")), 0.0);
        assert_eq!(head_age(&mut heads, "q", None), 0.0);
        assert!(heads.is_empty());
    }
}

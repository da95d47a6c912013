//! GPU pools and work-aware placement (issue 18): pools keep their own slots and one pool's
//! backlog never blocks another's; speeds are learned from finished attempts and survive a
//! restart; placement by predicted finish sends long files to the fast GPU and never exceeds a
//! slot limit; a reload moves a GPU between pools without losing or doubling a task.

mod common;

use std::time::Duration;

use common::{call, stop, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use serde_json::Value;

/// `toml` with `pool = "..."` (and any other lines) added to endpoint `gN`'s entry.
fn endpoint_lines(toml: &str, gpu: usize, lines: &str) -> String {
    let id = format!("id = \"g{gpu}\"\n");
    assert!(toml.contains(&id), "no endpoint g{gpu}");
    toml.replacen(&id, &format!("{id}{lines}\n"), 1)
}

/// `n` tasks of `kind` with ids `{tag}-{i}`, each `audio` seconds long.
fn tasks(kind: &str, tag: &str, n: usize, audio: f64) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(r#"{{"type": "{kind}", "data": {{"task_id": "{tag}-{i}", "audio_seconds": {audio}}}}}"#)
        })
        .collect()
}

fn status(daemon: &qsys::Daemon) -> Value {
    let (code, body) = call(daemon.admin_addr(), "GET", "/status", "");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

const TWO_POOLS: &str = r#"
[types.asr_big]
handler = "gpu"
pool = "big"
[types.asr_small]
handler = "gpu"
pool = "small"
"#;

/// A daemon with pools `big` (g0, drained) and `small` (g1, up), and what its test needs.
struct TwoPools {
    env: TestEnv,
    fleet: Fleet,
    daemon: qsys::Daemon,
    store: qsys::Store,
    toml: String,
}

/// [`TwoPools`], the fleet working `ms` milliseconds (a range) per task.
fn two_pools_big_drained(tag: &str, ms: (u64, u64)) -> TwoPools {
    let env = TestEnv::new(tag);
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_millis(ms.0), Duration::from_millis(ms.1)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), TWO_POOLS);
    let toml = endpoint_lines(&toml, 0, "pool = \"big\"");
    let toml = endpoint_lines(&toml, 1, "pool = \"small\"");
    let daemon = env.start(&toml);
    let store = qsys::Store::connect(&env.mysql_url(), false, "test", 1).expect("connect");
    store.set_drained("g0", true, "test").expect("drain g0");
    assert!(wait_for(Duration::from_secs(5), || daemon.slots()[0].drained));
    TwoPools {
        env,
        fleet,
        daemon,
        store,
        toml,
    }
}

/// Pool `big` has one GPU, drained; pool `small` one GPU, up. 200 `big` tasks are pushed ahead
/// of 20 `small` ones on the same queue: far more than the scheduler's hand, so without the
/// let-go the small tasks would wait behind them for as long as `big` is down.
#[test]
fn a_pool_with_no_gpu_up_waits_and_does_not_block_another_pool() {
    let TwoPools {
        env,
        fleet,
        daemon,
        store,
        ..
    } = two_pools_big_drained("poolhol", (20, 40));
    env.push_raw("q1", &tasks("asr_big", "big", 200, 30.0));
    env.push_raw("q1", &tasks("asr_small", "small", 20, 30.0));
    assert!(
        wait_for(Duration::from_secs(20), || env
            .count("task_id LIKE 'small-%' AND state = 'finished'")
            == 20),
        "small tasks stuck behind a pool with no gpu up: {:?}",
        env.states()
    );
    // The big ones wait: none failed, none ran, every one is still somewhere.
    assert_eq!(fleet.stats().received(0), 0);
    assert_eq!(env.count("task_id LIKE 'big-%' AND state <> 'pending'"), 0);
    assert!(
        wait_for(Duration::from_secs(5), || {
            env.count("task_id LIKE 'big-%'") as usize + env.llen("q1") == 200
        }),
        "a big task was lost"
    );
    // 200 tasks of 30 s of audio wait for it (Redis and MySQL together); /status's pools are
    // worked out every second.
    assert!(
        wait_for(Duration::from_secs(5), || {
            let doc = status(&daemon);
            let b = &doc["pools"][0];
            b["pool"] == "big"
                && b["gpus_up"] == 0
                && b["backlog_cost"]
                    .as_f64()
                    .is_some_and(|c| (c - 6000.0).abs() < 0.1)
        }),
        "{}",
        status(&daemon)["pools"]
    );
    // Back up: every big task runs, once.
    store.set_drained("g0", false, "test").expect("undrain g0");
    assert!(
        wait_for(Duration::from_secs(60), || env
            .count("task_id LIKE 'big-%' AND state = 'finished'")
            == 200),
        "{:?}",
        env.states()
    );
    assert!(fleet.stats().seen().values().all(|&n| n == 1));
    assert_eq!(
        fleet.stats().received(1),
        20,
        "small's gpu ran only small tasks"
    );
    assert!(fleet.stats().max_running(0) <= 4 && fleet.stats().max_running(1) <= 4);
    stop(daemon);
}

/// The tasks a busy pool let go wait in MySQL for room in their pool; a reload that moves their
/// type to a pool with room runs them there (none is left waiting for a pool it no longer has).
#[test]
fn tasks_let_go_by_a_busy_pool_run_after_a_reload_moves_their_type() {
    let TwoPools {
        env,
        fleet,
        daemon,
        toml,
        ..
    } = two_pools_big_drained("poolwake", (10, 20));
    env.push_raw("q1", &tasks("asr_big", "big", 150, 30.0));
    env.push_raw("q1", &tasks("asr_small", "small", 10, 30.0));
    assert!(wait_for(Duration::from_secs(20), || env
        .count("task_id LIKE 'small-%' AND state = 'finished'")
        == 10));
    // Most of the big ones now wait in MySQL, held by nobody.
    assert!(wait_for(Duration::from_secs(10), || env.count(
        "task_id LIKE 'big-%' AND instance_id IS NULL AND not_before > '9000-01-01'"
    ) >= 100));
    let moved = toml.replace(
        "[types.asr_big]\nhandler = \"gpu\"\npool = \"big\"",
        "[types.asr_big]\nhandler = \"gpu\"\npool = \"small\"",
    );
    assert_ne!(moved, toml);
    daemon.apply_config(env.config(&moved));
    assert!(
        wait_for(Duration::from_secs(60), || env
            .count("task_id LIKE 'big-%' AND state = 'finished'")
            == 150),
        "{:?}",
        env.states()
    );
    assert_eq!(fleet.stats().received(0), 0, "the drained gpu ran nothing");
    assert!(fleet.stats().seen().values().all(|&n| n == 1));
    stop(daemon);
}

/// A fleet of a slow GPU (g0, 1x) and a fast one (g1, 4x): 1 ms of work per second of audio at
/// 1x, so 1,000 cost units a second per attempt on g0 and 4,000 on g1 (less their overheads).
fn mixed_fleet() -> Fleet {
    Fleet::start(FleetConfig {
        gpus: 2,
        speeds: vec![1.0, 4.0],
        per_cost: Some(Duration::from_millis(1)),
        ..FleetConfig::default()
    })
    .expect("fleet")
}

#[test]
fn speed_is_learned_from_finished_attempts_and_survives_a_restart() {
    let env = TestEnv::new("speed");
    let fleet = mixed_fleet();
    let toml = env.config_toml(fleet.urls(), "[gpu]\nplacement = \"least_loaded\"\n");
    let daemon = env.start(&toml);
    assert!(daemon.slots().iter().all(|g| g.speed.is_none()));
    // 200 ms of work on g0, 50 ms on g1.
    env.push_raw("q1", &tasks("start_transcribe", "sp", 40, 200.0));
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'finished'")
        == 40));
    let speeds: Vec<f64> = daemon
        .slots()
        .iter()
        .map(|g| g.speed.expect("learned"))
        .collect();
    println!(
        "learned speeds: g0 {:.0}/s, g1 {:.0}/s",
        speeds[0], speeds[1]
    );
    assert!(speeds[0] > 500.0 && speeds[0] <= 1000.0, "{speeds:?}");
    assert!(speeds[1] > 2.5 * speeds[0], "{speeds:?}");
    // In /status and /metrics too.
    let doc = status(&daemon);
    assert!(doc["gpus"][1]["speed"].as_f64().is_some_and(|s| s > 0.0));
    assert!(wait_for(Duration::from_secs(5), || status(&daemon)
        ["pools"][0]["capacity"]
        .as_f64()
        .is_some_and(|c| c > 0.0)));
    let (_, metrics) = call(daemon.admin_addr(), "GET", "/metrics", "");
    assert!(metrics.contains("qsys_gpu_speed{gpu=\"g1\"}"), "{metrics}");
    assert!(wait_for(Duration::from_secs(5), || {
        let (_, m) = call(daemon.admin_addr(), "GET", "/metrics", "");
        m.contains("qsys_time_to_drain_seconds{pool=\"default\"} 0.000")
    }));
    // Persisted within a few seconds; a new instance starts from it before running anything.
    assert!(wait_for(Duration::from_secs(10), || {
        env.query::<u64>("SELECT COUNT(*) FROM gpu_speeds") == [2]
    }));
    stop(daemon);
    let again = env.start(&toml);
    let restarted: Vec<Option<f64>> = again.slots().iter().map(|g| g.speed).collect();
    assert!(
        restarted.iter().all(Option::is_some),
        "speeds after a restart: {restarted:?}"
    );
    assert!(restarted[1] > restarted[0]);
    stop(again);
}

#[test]
fn predicted_finish_sends_long_files_to_the_fast_gpu_and_never_exceeds_a_slot() {
    let env = TestEnv::new("predict");
    let fleet = mixed_fleet();
    // Seeded speeds, so the first placements already know; 2 slots each.
    let toml = env.config_toml(fleet.urls(), "[gpu]\nslots = 2\n");
    let toml = endpoint_lines(&toml, 0, "speed = 1000.0");
    let toml = endpoint_lines(&toml, 1, "speed = 4000.0");
    let daemon = env.start(&toml);
    // Four hour-long files (3.6 s on g0, 0.9 s on g1) among forty short calls (100 ms on g0).
    // The fast GPU's two slots end all four by 1.8 s, sooner than one on g0: each waits for
    // it (least-loaded would have sent about half to g0, 2.7 s later), while the short calls
    // fill g0. The short calls are long enough that the round trip (milliseconds, more on a
    // loaded machine) does not hide g1's speed from what is learned before a long file ends:
    // at 20 ms a call, a slow machine measured both GPUs alike and sent long files to g0.
    let mut all = Vec::new();
    let long = tasks("start_transcribe", "long", 4, 3600.0);
    let mut short = tasks("start_transcribe", "short", 40, 100.0).into_iter();
    for l in long {
        all.push(l);
        all.extend(short.by_ref().take(10));
    }
    env.push_raw("q1", &all);
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            == 44),
        "{:?}",
        env.states()
    );
    let on_fast = env.count("task_id LIKE 'long-%' AND gpu_id = 'g1'");
    println!("long files on the fast gpu: {on_fast}/4");
    assert_eq!(on_fast, 4, "a long file ran on the slow gpu");
    assert!(env.count("task_id LIKE 'short-%' AND gpu_id = 'g0'") > 0);
    assert!(fleet.stats().max_running(0) <= 2 && fleet.stats().max_running(1) <= 2);
    assert!(fleet.stats().seen().values().all(|&n| n == 1));
    stop(daemon);
}

/// g1 moves from pool `b` to pool `a` with tasks of both pools running: every task runs once,
/// no GPU runs more than its slots, and after the reload g1 takes only pool `a`'s work.
#[test]
fn a_reload_moves_a_gpu_between_pools_without_losing_or_doubling_a_task() {
    let env = TestEnv::new("poolmove");
    let fleet = Fleet::start(FleetConfig {
        gpus: 3,
        delay: (Duration::from_millis(150), Duration::from_millis(250)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let types = "[types.asr]\nhandler = \"gpu\"\npool = \"a\"\n\
                 [types.diar]\nhandler = \"gpu\"\npool = \"b\"\n";
    let base = env.config_toml(fleet.urls(), types);
    let before = endpoint_lines(&base, 0, "pool = \"a\"");
    let before = endpoint_lines(&before, 1, "pool = \"b\"");
    let before = endpoint_lines(&before, 2, "pool = \"b\"");
    let daemon = env.start(&before);
    env.push_raw("q1", &tasks("asr", "asr", 60, 10.0));
    env.push_raw("q2", &tasks("diar", "diar", 60, 10.0));
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().running(1) > 0 && env.count("state = 'finished'") >= 10
    }));
    let moved_at: Vec<String> = env.query("SELECT CAST(NOW(3) AS CHAR)");
    let after = endpoint_lines(&base, 0, "pool = \"a\"");
    let after = endpoint_lines(&after, 1, "pool = \"a\"");
    let after = endpoint_lines(&after, 2, "pool = \"b\"");
    daemon.apply_config(env.config(&after));
    assert_eq!(daemon.slots()[1].pool, "a");
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            == 120),
        "{:?}",
        env.states()
    );
    assert_eq!(env.count("attempts = 1"), 120, "a task ran twice");
    assert!(fleet.stats().seen().values().all(|&n| n == 1));
    assert!((0..3).all(|g| fleet.stats().max_running(g) <= 4));
    // Claimed after the reload (a margin for the claims already in flight): only asr on g1.
    let late_diar_on_g1 = env.count(&format!(
        "task_id LIKE 'diar-%' AND gpu_id = 'g1' AND dispatched_at > '{}' + INTERVAL 1 SECOND",
        moved_at[0]
    ));
    assert_eq!(late_diar_on_g1, 0);
    assert!(
        env.count(&format!(
            "task_id LIKE 'asr-%' AND gpu_id = 'g1' AND dispatched_at > '{}'",
            moved_at[0]
        )) > 0
    );
    stop(daemon);
}

//! The fault suite (promises 1-6 of the design): 500-task runs with the fake fleet while something
//! goes wrong — `kill -9` of qsysd, a Redis restart, a MariaDB restart, a GPU gone for good, lost
//! callbacks, 500s, duplicated callbacks. Each ends with the same checks: every task terminal (and
//! here finished), none missing, no GPU ever above its slots, no slot held by a terminal task.
//!
//! Everything stays on loopback and every wait is bounded. Redis and MariaDB restarts use servers
//! the test owns (on free ports, data in a temp dir), so other tests are not disturbed.

mod common;

use std::time::{Duration, Instant};

use common::{transcriptions, wait_for, OwnServer, TestEnv, SECRET};
use fakefleet::{Fleet, FleetConfig};
use qsys::Health;
use qsys::Secret;
use qsys::Signer;

const N: usize = 500;

/// Short leases and retries, so lost work comes back within the test's patience.
const FAULT_CONFIG: &str = r#"
[gpu]
slots = 4
request_timeout = "1s"
task_timeout = "2s"
eject_after = 3
eject_cooldown = "300ms"
eject_cooldown_max = "2s"
[retry]
max_attempts = 10
backoff = "50ms"
backoff_max = "500ms"
"#;

/// Four GPUs (`FleetConfig::default` works 5-50 ms per task).
fn fleet(cfg: FleetConfig) -> Fleet {
    Fleet::start(FleetConfig { gpus: 4, ..cfg }).expect("fleet")
}

/// The checks every scenario ends with.
fn assert_all_settled(env: &TestEnv, fleet: &Fleet, tag: &str, limit: Duration) {
    let done = wait_for(limit, || {
        env.count(&format!("task_id LIKE '{tag}-%' AND state = 'finished'")) == N as u64
    });
    if !done {
        type Row = (String, String, Option<String>, u32, Option<String>);
        let stuck: Vec<Row> = env.query(
            "SELECT task_id, state, instance_id, attempts, error FROM tasks \
             WHERE state <> 'finished' LIMIT 20",
        );
        panic!("not all finished: {:?}\n{stuck:#?}", env.states());
    }
    let rows = env.count(&format!("task_id LIKE '{tag}-%'"));
    assert_eq!(rows, N as u64, "none missing, none invented");
    let seen = fleet.stats().seen();
    for i in 0..N {
        assert!(
            seen.contains_key(&format!("{tag}-{i}")),
            "{tag}-{i} never ran"
        );
    }
    for g in 0..4 {
        let max = fleet.stats().max_running(g);
        assert!(max <= 4, "gpu {g} ran {max} tasks at once");
    }
    let held_by_terminal: Vec<u64> = env.query(
        "SELECT COUNT(*) FROM gpu_slots s JOIN tasks t ON s.task_id = t.task_id \
         WHERE t.state IN ('finished', 'failed')",
    );
    assert_eq!(held_by_terminal[0], 0, "a terminal task holds a slot");
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0, "slots leaked");
    assert_eq!(env.llen("q1"), 0);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let agent = qsys::http::agent();
    match agent.get(format!("http://{addr}{path}")).call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// `kill -9`, then a restart under a new `instance_id`: nothing of the old instance's is resumed
/// by its own restart, so only failover (its in-hand lists, its `pending` rows, its leases) can
/// bring its work back. Once recovered, the dead instance is retired.
#[test]
fn a_restart_under_a_new_id_recovers_everything_by_failover() {
    let env = TestEnv::new("newid");
    let fleet = fleet(FleetConfig {
        delay: (Duration::from_millis(50), Duration::from_millis(150)),
        ..FleetConfig::default()
    });
    let toml = env.config_toml(fleet.urls(), FAULT_CONFIG);
    let as_id = |id: &str| {
        toml.replace(
            "instance_id = \"test\"",
            &format!("instance_id = \"{id}\"\ninstance_timeout = \"2s\""),
        )
    };
    let (old_cfg, new_cfg) = (env.dir.join("old.toml"), env.dir.join("new.toml"));
    std::fs::write(&old_cfg, as_id("old")).expect("config");
    std::fs::write(&new_cfg, as_id("new")).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut old = common::spawn_qsysd(&old_cfg, &log, &[]);
    assert!(common::wait_log(
        &log,
        "qsysd starting",
        Duration::from_secs(20)
    ));
    env.push_raw("q1", &transcriptions("ni", N));
    wait_for(Duration::from_secs(20), || {
        env.count("state = 'finished'") >= 100
    });
    old.kill().expect("kill -9");
    old.wait().expect("reap");
    let held: Vec<u64> = env.query(
        "SELECT COUNT(*) FROM tasks WHERE instance_id = 'old' AND state IN ('pending', 'processing')",
    );
    assert!(held[0] > 0, "the kill came after the run: make it slower");
    let mut new = common::spawn_qsysd(&new_cfg, &log, &[]);
    assert_all_settled(&env, &fleet, "ni", Duration::from_secs(120));
    assert!(
        wait_for(Duration::from_secs(20), || {
            env.query::<u64>("SELECT COUNT(*) FROM instances WHERE instance_id = 'old'") == [0]
        }),
        "the dead instance was never retired"
    );
    let _ = new.kill();
    let _ = new.wait();
}

#[test]
fn kill_9_five_times_loses_nothing() {
    let env = TestEnv::new("kill9");
    // Slow enough that the run spans all five kills (16 slots x ~100 ms: about 3 s of work).
    let fleet = fleet(FleetConfig {
        delay: (Duration::from_millis(50), Duration::from_millis(150)),
        ..FleetConfig::default()
    });
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, env.config_toml(fleet.urls(), FAULT_CONFIG)).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut child = common::spawn_qsysd(&cfg, &log, &[]);
    assert!(common::wait_log(
        &log,
        "qsysd starting",
        Duration::from_secs(20)
    ));
    env.push_raw("q1", &transcriptions("k9", N));
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    for k in 1..=5u64 {
        // Each kill lands mid-run: after some progress, at a random instant.
        wait_for(Duration::from_secs(20), || {
            env.count("state = 'finished'") >= k * 60
        });
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        std::thread::sleep(Duration::from_millis(rng_state % 300));
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        child = common::spawn_qsysd(&cfg, &log, &[]);
    }
    let unfinished_at_last_kill = N as u64 - env.count("state = 'finished'");
    assert_all_settled(&env, &fleet, "k9", Duration::from_secs(120));
    let _ = child.kill();
    let _ = child.wait();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(log_text.matches("qsysd starting").count(), 6, "{log_text}");
    assert!(
        unfinished_at_last_kill > 0,
        "the kills came after the run: make it slower"
    );
    let twice = fleet.stats().seen().values().filter(|&&n| n > 1).count();
    eprintln!(
        "kill -9 x5: {unfinished_at_last_kill} tasks unfinished at the last kill, \
         {twice} dispatched more than once"
    );
}

#[test]
fn redis_restart_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("qsys-own-redis-{}", std::process::id()));
    let mut redis = OwnServer::redis(&dir);
    let env = TestEnv::on("redisrs", &redis.url(), "mysql://root@127.0.0.1:3306");
    let fleet = fleet(FleetConfig {
        delay: (Duration::from_millis(20), Duration::from_millis(60)),
        ..FleetConfig::default()
    });
    let daemon = env.start(&env.config_toml(fleet.urls(), FAULT_CONFIG));
    env.push_raw("q1", &transcriptions("rr", N));
    assert!(wait_for(Duration::from_secs(30), || {
        env.count("state = 'finished'") >= 100
    }));
    redis.stop();
    // While Redis is down, /healthz says so.
    let addr = daemon.callback_addr();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let (code, body) = http_get(addr, "/healthz");
            code == 503 && body.contains("redis")
        }),
        "{:?}",
        http_get(addr, "/healthz")
    );
    std::thread::sleep(Duration::from_millis(500));
    redis.start_again();
    assert_all_settled(&env, &fleet, "rr", Duration::from_secs(60));
    assert!(wait_for(Duration::from_secs(10), || http_get(
        addr, "/healthz"
    )
    .0 == 200));
    common::stop(daemon);
    drop(env);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mariadb_restart_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("qsys-own-mariadb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut db = OwnServer::mariadb(&dir);
    let env = TestEnv::on("mariadbrs", "redis://127.0.0.1:6379/0", &db.url());
    let fleet = fleet(FleetConfig {
        delay: (Duration::from_millis(20), Duration::from_millis(60)),
        ..FleetConfig::default()
    });
    let daemon = env.start(&env.config_toml(fleet.urls(), FAULT_CONFIG));
    env.push_raw("q1", &transcriptions("mr", N));
    assert!(wait_for(Duration::from_secs(30), || {
        env.count("state = 'finished'") >= 100
    }));
    db.stop();
    let addr = daemon.callback_addr();
    // A callback that arrives while MySQL is down is refused with 503 (the GPU retries later) and
    // /healthz says what is wrong.
    let signer = Signer::new(Secret::new(SECRET), "http://unused/callback");
    let url = signer.callback_url("mr-1", 1);
    let target = &url[url.find("/callback").expect("path")..];
    let reply = qsys::http::post_json(
        &qsys::http::agent(),
        &format!("http://{addr}{target}"),
        None,
        r#"{"task_id":"mr-1","status":"finished"}"#,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .expect("callback answered");
    assert_eq!(reply.status, 503, "{}", reply.body);
    let (code, body) = http_get(addr, "/healthz");
    assert_eq!(code, 503);
    assert!(body.contains("mysql"), "{body}");
    std::thread::sleep(Duration::from_secs(1));
    db.start_again();
    assert_all_settled(&env, &fleet, "mr", Duration::from_secs(90));
    common::stop(daemon);
    drop(env);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_gpu_gone_for_good_fails_no_task() {
    let env = TestEnv::new("gpugone");
    // Long enough a run (about 8 s) that the lost GPU's four attempts expire (2 s leases) while
    // work remains, so its freed slots are tried, fail, and get it ejected.
    let fleet = fleet(FleetConfig {
        delay: (Duration::from_millis(100), Duration::from_millis(300)),
        ..FleetConfig::default()
    });
    let daemon = env.start(&env.config_toml(fleet.urls(), FAULT_CONFIG));
    env.push_raw("q1", &transcriptions("gg", N));
    assert!(wait_for(Duration::from_secs(30), || {
        env.count("state = 'finished'") >= 50
    }));
    fleet.vanish(2);
    let t0 = Instant::now();
    assert_all_settled(&env, &fleet, "gg", Duration::from_secs(90));
    assert_eq!(env.count("state = 'failed'"), 0);
    let view = daemon.slots();
    assert_ne!(
        view[2].health,
        Health::Up,
        "the dead gpu is ejected: {view:?}"
    );
    assert!(view.iter().filter(|g| g.health == Health::Up).count() >= 3);
    eprintln!("gpu gone: settled {:?} after the loss", t0.elapsed());
    common::stop(daemon);
}

#[test]
fn lost_callbacks_expire_and_retry() {
    let env = TestEnv::new("lostcb");
    let fleet = fleet(FleetConfig {
        lose_rate: 0.1,
        ..FleetConfig::default()
    });
    let daemon = env.start(&env.config_toml(fleet.urls(), FAULT_CONFIG));
    env.push_raw("q1", &transcriptions("lc", N));
    assert_all_settled(&env, &fleet, "lc", Duration::from_secs(90));
    let expired: Vec<u64> =
        env.query("SELECT COUNT(*) FROM task_attempts WHERE outcome = 'expired'");
    assert!(
        expired[0] > 10,
        "about 50 leases should have expired, saw {}",
        expired[0]
    );
    common::stop(daemon);
}

#[test]
fn dispatch_500s_are_retried() {
    let env = TestEnv::new("err500");
    let fleet = fleet(FleetConfig {
        fail_rate: 0.1,
        ..FleetConfig::default()
    });
    let daemon = env.start(&env.config_toml(fleet.urls(), FAULT_CONFIG));
    env.push_raw("q1", &transcriptions("e5", N));
    assert_all_settled(&env, &fleet, "e5", Duration::from_secs(90));
    let failed: Vec<(u64, u64)> = env.query(
        "SELECT COUNT(*), COUNT(DISTINCT task_id) FROM task_attempts WHERE outcome = 'failed' \
         AND error LIKE '%HTTP 500%'",
    );
    assert!(
        failed[0].0 > 10,
        "about 55 attempts should have met a 500: {failed:?}"
    );
    common::stop(daemon);
}

#[test]
fn duplicate_callbacks_change_nothing() {
    let env = TestEnv::new("dupcb");
    let fleet = fleet(FleetConfig {
        duplicate_callbacks: true,
        ..FleetConfig::default()
    });
    let daemon = env.start(&env.config_toml(fleet.urls(), FAULT_CONFIG));
    env.push_raw("q1", &transcriptions("dc", N));
    assert_all_settled(&env, &fleet, "dc", Duration::from_secs(60));
    assert!(wait_for(Duration::from_secs(10), || {
        fleet.stats().callback_replies().get(&200).copied() == Some(2 * N as u32)
    }));
    let once: Vec<u64> = env.query("SELECT COUNT(*) FROM tasks WHERE attempts = 1");
    assert_eq!(once[0], N as u64, "nothing ran twice");
    common::stop(daemon);
}

//! Running for months (issue 17): retention deletes what is past it and nothing of a live task,
//! with counts that stay exact; delayed tasks wait in MySQL held by nobody and run on time across
//! a restart and a failover; the queue's oldest age; pausing a queue or a type on two instances.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{as_instance, call, spawn_qsysd, stop, transcriptions, wait_for, Spawned, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use serde_json::Value;

const QSYSD: &str = env!("CARGO_BIN_EXE_qsysd");
const PUSH: &str = env!("CARGO_BIN_EXE_qsys-push");

fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("stdin");
    }
    drop(input);
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(env: &TestEnv, name: &str, toml: &str) -> String {
    let p = env.config_file(name, toml);
    p.to_str().expect("utf8").to_string()
}

/// `/status`'s counts by state.
fn status_states(addr: std::net::SocketAddr) -> HashMap<String, u64> {
    let (code, body) = call(addr, "GET", "/status", "");
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("json");
    doc["states"]
        .as_object()
        .expect("states")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect()
}

/// The counts `/status` shows are the table's, state by state.
fn counts_are_exact(env: &TestEnv, addr: std::net::SocketAddr) {
    let shown = status_states(addr);
    let table = env.states();
    for state in ["pending", "processing", "finished", "failed", "cancelled"] {
        assert_eq!(
            shown.get(state).copied().unwrap_or(0),
            table.get(state).copied().unwrap_or(0),
            "{state}: /status {shown:?}, table {table:?}"
        );
    }
}

#[test]
fn prune_deletes_only_what_is_past_retention_and_the_counts_stay_exact() {
    let env = TestEnv::new("retention");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        result_bytes: 100,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "");
    let cfg = write_config(&env, "qsysd.toml", &toml);
    let daemon = env.start(&toml);
    env.push_raw("q1", &transcriptions("r", 12));
    assert!(wait_for(Duration::from_secs(30), || {
        env.count("state = 'finished'") == 12
    }));
    counts_are_exact(&env, daemon.admin_addr());
    stop(daemon);
    // Back-dated by hand, as months of running would leave them (the defaults: finished 14
    // days, failed and cancelled 90).
    for (ids, sql) in [
        (
            "'r-0','r-1','r-2','r-3'",
            "finished_at = NOW(3) - INTERVAL 15 DAY",
        ),
        ("'r-4','r-5'", "finished_at = NOW(3) - INTERVAL 13 DAY"),
        (
            "'r-6','r-7'",
            "state = 'failed', finished_at = NOW(3) - INTERVAL 30 DAY",
        ),
        (
            "'r-8'",
            "state = 'failed', finished_at = NOW(3) - INTERVAL 100 DAY",
        ),
        (
            "'r-9'",
            "state = 'cancelled', finished_at = NOW(3) - INTERVAL 100 DAY",
        ),
        // A live task, however old: never deleted.
        (
            "'r-10'",
            "state = 'processing', finished_at = NOW(3) - INTERVAL 200 DAY, \
             created_at = NOW(3) - INTERVAL 200 DAY",
        ),
    ] {
        env.query::<u64>(&format!("UPDATE tasks SET {sql} WHERE task_id IN ({ids})"));
    }
    // Moving rows into the past behind the counts' back: counted again from scratch.
    env.query::<u64>("DELETE FROM task_totals");
    env.query::<u64>("UPDATE task_totals_mark SET through = '1970-01-01'");
    let (code, out, err) = run(QSYSD, &["--config", &cfg, "prune", "--dry-run"], None);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "finished            4 would delete",
        "failed              1",
        "cancelled           1",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    assert_eq!(env.count("1 = 1"), 12, "a dry run deletes nothing");
    let (code, out, err) = run(QSYSD, &["--config", &cfg, "prune"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("finished            4 deleted"), "{out}");
    let left: Vec<String> = env.query("SELECT task_id FROM tasks ORDER BY task_id");
    assert_eq!(left, ["r-10", "r-11", "r-4", "r-5", "r-6", "r-7"]);
    // Their attempts and results went with them; the others keep theirs.
    let gone = "task_id IN ('r-0','r-1','r-2','r-3','r-8','r-9')";
    for table in ["task_attempts", "task_results"] {
        let n: Vec<u64> = env.query(&format!("SELECT COUNT(*) FROM {table} WHERE {gone}"));
        assert_eq!(n, [0], "{table}");
    }
    let kept: Vec<u64> = env.query("SELECT COUNT(*) FROM task_results WHERE task_id = 'r-4'");
    assert_eq!(kept, [1]);
    // The live one ends now, as it would.
    env.query::<u64>(
        "UPDATE tasks SET state = 'finished', finished_at = NOW(3) WHERE task_id = 'r-10'",
    );
    // Counts after the prune, and after a requeue of a rolled-up task, are still the table's.
    let daemon = env.start(&toml);
    counts_are_exact(&env, daemon.admin_addr());
    assert!(qsys::ops::requeue(
        &qsys::ops::store(&env.config(&toml)).expect("store"),
        &env.redis_client(),
        "r-4"
    )
    .expect("requeue"));
    assert!(wait_for(Duration::from_secs(20), || {
        env.count(
            "task_id = 'r-4' AND state = 'finished' AND finished_at > NOW() - INTERVAL 1 MINUTE",
        ) == 1
    }));
    counts_are_exact(&env, daemon.admin_addr());
    stop(daemon);
}

/// Delayed tasks (`qsys-push --in`, `--at`) are recorded `pending` with their due time, held by
/// no instance (nothing in memory), and run at their time, within a second, after a restart.
#[test]
fn delayed_tasks_run_on_time_across_a_restart() {
    let env = TestEnv::new("delayed");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "");
    let cfg = write_config(&env, "qsysd.toml", &toml);
    let daemon = env.start(&toml);
    let pushed = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let tasks = |prefix: &str| -> String {
        (0..3)
            .map(|i| {
                format!(
                    "{{\"type\":\"start_transcribe\",\"data\":{{\"task_id\":\"{prefix}-{i}\"}}}}\n"
                )
            })
            .collect()
    };
    let (code, _, err) = run(PUSH, &["--config", &cfg, "--in", "4s"], Some(&tasks("in")));
    assert_eq!(code, 0, "{err}");
    let at = format!("{:.3}", now + 5.0);
    let (code, _, err) = run(PUSH, &["--config", &cfg, "--at", &at], Some(&tasks("at")));
    assert_eq!(code, 0, "{err}");
    assert!(wait_for(Duration::from_secs(3), || {
        env.count("state = 'pending' AND instance_id IS NULL AND not_before > NOW(3)") == 6
    }));
    assert!(fleet.stats().seen().is_empty(), "a delayed task ran early");
    // A restart while they wait.
    stop(daemon);
    let daemon = env.start(&toml);
    assert!(wait_for(Duration::from_secs(15), || env
        .count("state = 'finished'")
        == 6));
    let received = fleet.stats().received_at();
    for (prefix, due) in [("in", 4.0), ("at", 5.0)] {
        for i in 0..3 {
            let ran = received[&format!("{prefix}-{i}")]
                .duration_since(pushed)
                .as_secs_f64();
            println!("{prefix}-{i}: due {due}s after the push, ran at {ran:.2}s");
            assert!(
                (due - 0.2..=due + 1.5).contains(&ran),
                "{prefix}-{i} ran at {ran:.2}s"
            );
        }
    }
    stop(daemon);
}

/// A delayed task recorded by an instance that is then killed (`kill -9`) runs on time on
/// another: it was never held by the dead one. 100,000 delayed tasks hold no memory: none is
/// held by an instance, and the daemon's RSS is printed before and after.
#[test]
fn delayed_tasks_survive_a_failover_and_cost_no_memory() {
    let env = TestEnv::new("delayfail");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "");
    let a_cfg = write_config(&env, "a.toml", &as_instance(&toml, "delay-a", "10s"));
    let log = env.dir.join("a.log");
    let mut a = Spawned(spawn_qsysd(Path::new(&a_cfg), &log, &[]));
    assert!(common::wait_log(
        &log,
        "qsysd starting",
        Duration::from_secs(20)
    ));
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse().ok())
            .expect("VmRSS")
    };
    std::thread::sleep(Duration::from_secs(1));
    let before = rss(a.id());
    let n = 100_000;
    let many: String = (0..n)
        .map(|i| {
            format!("{{\"type\":\"start_transcribe\",\"data\":{{\"task_id\":\"later-{i}\"}}}}\n")
        })
        .collect();
    let (code, _, err) = run(PUSH, &["--config", &a_cfg, "--in", "1h"], Some(&many));
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_for(Duration::from_secs(120), || env
            .count("task_id LIKE 'later-%'")
            == n),
        "{:?}",
        env.states()
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = rss(a.id());
    println!(
        "{n} delayed tasks: the daemon's RSS {} KiB before, {} KiB after",
        before, after
    );
    assert_eq!(
        env.count("task_id LIKE 'later-%' AND instance_id IS NULL"),
        n
    );
    // Two due in 3 s; the instance that took them dies.
    let soon = "{\"type\":\"start_transcribe\",\"data\":{\"task_id\":\"soon-0\"}}\n\
                {\"type\":\"start_transcribe\",\"data\":{\"task_id\":\"soon-1\"}}\n";
    let pushed = Instant::now();
    let (code, _, err) = run(PUSH, &["--config", &a_cfg, "--in", "3s"], Some(soon));
    assert_eq!(code, 0, "{err}");
    assert!(wait_for(Duration::from_secs(3), || env
        .count("task_id LIKE 'soon-%'")
        == 2));
    a.0.kill().expect("kill -9");
    a.0.wait().expect("reap");
    let b = env.start(&as_instance(&toml, "delay-b", "10s"));
    assert!(wait_for(Duration::from_secs(15), || {
        env.count("task_id LIKE 'soon-%' AND state = 'finished'") == 2
    }));
    let received = fleet.stats().received_at();
    for id in ["soon-0", "soon-1"] {
        let ran = received[id].duration_since(pushed).as_secs_f64();
        assert!((2.8..=4.5).contains(&ran), "{id} ran at {ran:.2}s");
    }
    assert_eq!(env.count("task_id LIKE 'later-%' AND state = 'pending'"), n);
    stop(b);
}

/// Pausing a queue on one instance stops both from taking from it within a second; resuming on
/// the other starts them again. A paused type's tasks wait in MySQL held by nobody (no worker,
/// no memory) while the others run; resumed, they run.
#[test]
fn pause_and_resume_a_queue_and_a_type_across_two_instances() {
    let env = TestEnv::new("pause");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let out = env.dir.join("ran");
    std::fs::create_dir_all(&out).expect("dir");
    let extra = format!(
        "[types.start_transcribe]\nhandler = \"gpu\"\n[types.cleanup]\nhandler = \"exec\"\n\
         command = [\"/bin/sh\", \"-c\", \"touch {}/$QSYS_TASK_ID\"]\n",
        out.display()
    );
    let toml = env.config_toml(fleet.urls(), &extra);
    let cfg = write_config(&env, "qsysd.toml", &toml);
    let a = env.start(&as_instance(&toml, "pause-a", "10s"));
    let b = env.start(&as_instance(&toml, "pause-b", "10s"));
    let q1 = env.queue("q1");
    let (code, body) = call(a.admin_addr(), "POST", &format!("/queues/{q1}/pause"), "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        call(a.admin_addr(), "POST", "/queues/nope/pause", "").0,
        404
    );
    std::thread::sleep(Duration::from_millis(1200));
    let tasks = transcriptions("pq", 6);
    env.push_raw("q1", &tasks[..5]);
    env.push_raw("q2", &tasks[5..]);
    assert!(wait_for(Duration::from_secs(10), || {
        env.count("task_id = 'pq-5' AND state = 'finished'") == 1
    }));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(env.llen("q1"), 5, "a paused queue is not taken from");
    let (_, status) = call(b.admin_addr(), "GET", "/status", "");
    assert!(status.contains("\"paused\":true"), "{status}");
    let (code, _) = call(b.admin_addr(), "POST", &format!("/queues/{q1}/resume"), "");
    assert_eq!(code, 200);
    assert!(wait_for(Duration::from_secs(10), || {
        env.count("task_id LIKE 'pq-%' AND state = 'finished'") == 6
    }));
    // A type, from the CLI: its tasks wait in MySQL, held by nobody, the others run.
    let (code, stdout, err) = run(
        QSYSD,
        &["--config", &cfg, "pause", "--type", "cleanup"],
        None,
    );
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("type cleanup paused"), "{stdout}");
    std::thread::sleep(Duration::from_millis(1200));
    let cleanups: Vec<String> = (0..200)
        .map(|i| format!(r#"{{"type":"cleanup","data":{{"task_id":"c-{i}"}}}}"#))
        .collect();
    env.push_raw("q1", &cleanups);
    env.push_raw("q1", &transcriptions("after", 3));
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("task_id LIKE 'after-%' AND state = 'finished'") == 3
    }));
    assert!(wait_for(Duration::from_secs(10), || {
        env.count("task_id LIKE 'c-%' AND state = 'pending' AND instance_id IS NULL") == 200
    }));
    assert_eq!(
        std::fs::read_dir(&out).expect("dir").count(),
        0,
        "a paused type ran"
    );
    let (code, stdout, err) = run(
        QSYSD,
        &["--config", &cfg, "resume", "--type", "cleanup"],
        None,
    );
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(wait_for(Duration::from_secs(30), || {
        env.count("task_id LIKE 'c-%' AND state = 'finished'") == 200
    }));
    assert_eq!(std::fs::read_dir(&out).expect("dir").count(), 200);
    let (code, _, err) = run(QSYSD, &["--config", &cfg, "pause", "--type", "nope"], None);
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");
    stop(a);
    stop(b);
}

/// `qsys_queue_oldest_seconds` and `/status` give the age of the task at the head of each
/// queue: from its `enqueued_at`, else from when qsysd first saw it.
#[test]
fn the_oldest_age_of_a_queue_is_its_heads() {
    let env = TestEnv::new("oldest");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    let admin = daemon.admin_addr();
    // Paused, so their heads stay where they are.
    for q in ["q1", "q2"] {
        let (code, _) = call(
            admin,
            "POST",
            &format!("/queues/{}/pause", env.queue(q)),
            "",
        );
        assert_eq!(code, 200);
    }
    std::thread::sleep(Duration::from_millis(1200));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    env.push_raw(
        "q2",
        &[
            format!(
                r#"{{"type":"start_transcribe","enqueued_at":{},"data":{{"task_id":"old"}}}}"#,
                now - 120.0
            ),
            format!(
                r#"{{"type":"start_transcribe","enqueued_at":{now},"data":{{"task_id":"new"}}}}"#
            ),
        ],
    );
    env.push_raw("q1", &transcriptions("unstamped", 1));
    let age = |q: &str| -> Option<f64> {
        let (_, text) = call(admin, "GET", "/metrics", "");
        let key = format!("qsys_queue_oldest_seconds{{queue=\"{}\"}} ", env.queue(q));
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
    };
    assert!(
        wait_for(Duration::from_secs(5), || {
            age("q2").is_some_and(|a| (119.0..=130.0).contains(&a))
        }),
        "{:?}",
        age("q2")
    );
    // Unstamped: counted from when it was first seen at the head, so it grows.
    assert!(wait_for(Duration::from_secs(6), || age("q1")
        .is_some_and(|a| a >= 2.0)));
    let (_, body) = call(admin, "GET", "/status", "");
    let doc: Value = serde_json::from_str(&body).expect("json");
    let q2 = doc["queues"][1]["oldest_s"].as_f64().expect("oldest_s");
    assert!((119.0..=130.0).contains(&q2), "{q2}");
    // Taken, the queue's age falls back.
    call(
        admin,
        "POST",
        &format!("/queues/{}/resume", env.queue("q2")),
        "",
    );
    assert!(wait_for(Duration::from_secs(10), || age("q2") == Some(0.0)));
    stop(daemon);
}

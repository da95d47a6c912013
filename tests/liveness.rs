//! Heartbeats and results (issue 16): a GPU proves a long attempt alive and reports progress; one
//! that falls silent loses the attempt within its `heartbeat_timeout` and the task runs elsewhere;
//! heartbeats never stretch an attempt past its lease; results are kept exactly as sent; forged,
//! stale, malformed and oversized heartbeats and results change nothing.

mod common;

use std::time::{Duration, Instant};

use common::{
    call, callback_target, daemon_awaiting_callbacks, stop, transcriptions, wait_for, TestEnv,
};
use fakefleet::{Fleet, FleetConfig};
use serde_json::Value;

/// `/tasks/<id>` of the admin API: `null` until the task has its row.
fn task_doc(addr: std::net::SocketAddr, id: &str) -> Value {
    let (code, body) = call(addr, "GET", &format!("/tasks/{id}"), "");
    match code {
        200 => serde_json::from_str(&body).expect("json"),
        404 => Value::Null,
        _ => panic!("/tasks/{id}: {code} {body}"),
    }
}

fn state(env: &TestEnv, id: &str) -> Option<String> {
    env.task(id).map(|t| t.0)
}

#[test]
fn a_gpu_that_falls_silent_loses_its_attempt_within_the_heartbeat_timeout() {
    let env = TestEnv::new("silent");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_secs(4), Duration::from_secs(4)),
        heartbeat: Some(Duration::from_millis(200)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(
        fleet.urls(),
        "[gpu]\nslots = 1\nheartbeat_timeout = \"2s\"\ntask_timeout = \"10m\"\n",
    ));
    env.push_raw("q1", &transcriptions("sil", 1));
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().running(0) + fleet.stats().running(1) == 1
    }));
    let silent = if fleet.stats().running(0) == 1 { 0 } else { 1 };
    // Heartbeats were arriving: the attempt is alive past its first deadline only through them.
    assert!(wait_for(Duration::from_secs(5), || {
        env.count("task_id = 'sil-0' AND heartbeat_at IS NOT NULL") == 1
    }));
    fleet.fall_silent(silent);
    let fell = Instant::now();
    assert!(wait_for(Duration::from_secs(10), || {
        env.count("task_id = 'sil-0' AND attempts >= 1 AND state <> 'processing'") == 1
            || env.count("task_id = 'sil-0' AND attempts = 2") == 1
    }));
    let freed = fell.elapsed();
    println!("silent gpu's attempt ended {freed:?} after its last heartbeat could have come");
    assert!(freed < Duration::from_secs(4), "{freed:?}");
    let error: Vec<Option<String>> = env.query(
        "SELECT error FROM task_attempts WHERE task_id = 'sil-0' AND attempt = 1 \
         AND outcome = 'expired'",
    );
    assert!(
        error[0]
            .as_deref()
            .is_some_and(|e| e.contains("no heartbeat")),
        "{error:?}"
    );
    // The retry goes to the other GPU and finishes there.
    assert!(wait_for(Duration::from_secs(20), || {
        state(&env, "sil-0").as_deref() == Some("finished")
    }));
    let gpu: Vec<Option<String>> = env.query("SELECT gpu_id FROM tasks WHERE task_id = 'sil-0'");
    assert_eq!(gpu[0].as_deref(), Some(format!("g{}", 1 - silent).as_str()));
    stop(daemon);
}

#[test]
fn heartbeats_show_progress_keep_an_attempt_alive_and_never_stretch_its_lease() {
    let env = TestEnv::new("heartbeat");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_secs(3), Duration::from_secs(3)),
        heartbeat: Some(Duration::from_millis(200)),
        result_bytes: 300,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "[gpu]\nheartbeat_timeout = \"1s\"\n");
    let cfg = env.config_file("qsysd.toml", &toml);
    let daemon = env.start(&toml);
    // hb-1's own lease (timeout_s) ends before its work does: heartbeats cannot save it.
    env.push_raw(
        "q1",
        &[
            r#"{"type":"start_transcribe","data":{"task_id":"hb-0"}}"#.to_string(),
            r#"{"type":"start_transcribe","timeout_s":2,"max_attempts":1,"data":{"task_id":"hb-1"}}"#
                .to_string(),
        ],
    );
    assert!(wait_for(Duration::from_secs(10), || {
        task_doc(daemon.admin_addr(), "hb-0")["task"]["progress"]
            .as_f64()
            .is_some_and(|p| p > 0.2)
    }));
    let doc = task_doc(daemon.admin_addr(), "hb-0");
    assert_eq!(doc["task"]["state"], "processing");
    assert_eq!(doc["task"]["progress_message"], "transcribing");
    assert!(doc["task"]["heartbeat_at"].is_string(), "{doc}");
    let (_, status) = call(daemon.admin_addr(), "GET", "/status", "");
    let status: Value = serde_json::from_str(&status).expect("json");
    let cells = status["gpus"][0]["cells"]
        .as_array()
        .expect("cells")
        .clone();
    assert!(
        cells.iter().any(|c| c["task_id"] == "hb-0"
            && c["progress"].is_number()
            && c["message"] == "transcribing"),
        "{cells:?}"
    );
    // Past its 1 s heartbeat timeout three times over, on heartbeats alone: finished, once.
    assert!(wait_for(Duration::from_secs(15), || {
        state(&env, "hb-0").as_deref() == Some("finished")
    }));
    assert_eq!(env.count("task_id = 'hb-0' AND attempts = 1"), 1);
    let sent = fleet.stats().result_of("hb-0").expect("a result was sent");
    let doc = task_doc(daemon.admin_addr(), "hb-0");
    assert_eq!(doc["task"]["result"], sent);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qsysd"))
        .args(["--config", cfg.to_str().expect("utf8"), "task", "hb-0"])
        .output()
        .expect("qsysd task");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("result    {") && text.contains("heartbeat "),
        "{text}"
    );
    // hb-1's lease ran out at 2 s, heartbeats or not.
    assert!(wait_for(Duration::from_secs(15), || {
        state(&env, "hb-1").as_deref() == Some("failed")
    }));
    let (_, error) = env.task("hb-1").expect("row");
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains("before the lease ran out")),
        "{error:?}"
    );
    stop(daemon);
}

#[test]
fn forged_stale_malformed_and_oversized_heartbeats_and_results_change_nothing() {
    let env = TestEnv::new("hbforged");
    let (daemon, _fleet) = daemon_awaiting_callbacks(&env, "hbf", 1, 1);
    let addr = daemon.callback_addr();
    let t1 = callback_target("hbf-0", 1);
    let beat = r#"{"task_id":"hbf-0","status":"running","progress":0.5,"message":"half"}"#;
    let untouched =
        || env.count("task_id = 'hbf-0' AND state = 'processing' AND heartbeat_at IS NULL") == 1;
    let forged = format!("/callback?attempt=1&token={}", "ab".repeat(32));
    assert_eq!(call(addr, "POST", "/callback", beat).0, 401);
    assert_eq!(call(addr, "POST", &forged, beat).0, 401);
    assert_eq!(
        call(addr, "POST", &callback_target("hbf-0", 2), beat).0,
        409
    );
    for bad in [
        r#"{"task_id":"hbf-0","status":"running","progress":1.5}"#.to_string(),
        r#"{"task_id":"hbf-0","status":"running","progress":"half"}"#.to_string(),
        format!(
            r#"{{"task_id":"hbf-0","status":"running","message":"{}"}}"#,
            "m".repeat(1001)
        ),
    ] {
        assert_eq!(call(addr, "POST", &t1, &bad).0, 400, "{bad}");
    }
    let huge = format!(
        r#"{{"task_id":"hbf-0","status":"running","message":"{}"}}"#,
        "m".repeat(140_000)
    );
    assert_eq!(call(addr, "POST", &t1, &huge).0, 413);
    assert!(untouched());
    // A result over callback.max_result_bytes (64 KiB by default): 413, nothing changes.
    let big = format!(
        r#"{{"task_id":"hbf-0","status":"finished","result":{{"text":"{}"}}}}"#,
        "w".repeat(70_000)
    );
    let (code, body) = call(addr, "POST", &t1, &big);
    assert_eq!(code, 413, "{body}");
    assert!(untouched());
    assert_eq!(
        env.count("1 = 1 AND task_id IN (SELECT task_id FROM task_results)"),
        0
    );
    // The genuine heartbeat is recorded, answered after its commit.
    let (code, body) = call(addr, "POST", &t1, beat);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        env.count("task_id = 'hbf-0' AND progress = 0.5 AND progress_message = 'half'"),
        1
    );
    // The result is kept exactly as the GPU wrote it, key order and spacing inside included.
    let result = r#"{"words": 3, "text": "hello world", "segments": [[0.0, 1.5]]}"#;
    let done = format!(r#"{{"task_id":"hbf-0","status":"finished","result":{result}}}"#);
    assert_eq!(call(addr, "POST", &t1, &done).0, 200);
    let stored: Vec<String> = env.query("SELECT result FROM task_results WHERE task_id = 'hbf-0'");
    assert_eq!(stored, [result]);
    // Once finished, a heartbeat is a conflict and changes nothing.
    let (code, body) = call(addr, "POST", &t1, beat);
    assert_eq!(code, 409, "{body}");
    assert_eq!(state(&env, "hbf-0").as_deref(), Some("finished"));
    stop(daemon);
}

/// MySQL's server-wide commit and statement counters.
fn counters(env: &TestEnv) -> (u64, u64) {
    let rows: Vec<(String, u64)> =
        env.query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Questions')");
    let get = |n: &str| rows.iter().find(|(k, _)| k == n).map_or(0, |r| r.1);
    (get("Com_commit"), get("Questions"))
}

/// 64 busy slots heartbeating every second (issue 16's fleet): every heartbeat is answered
/// 200, no slot limit is passed, every task finishes once. Prints what MySQL did per heartbeat,
/// over and above the idle daemon's own rounds (server-wide counters: run this test alone for a
/// clean figure).
#[test]
fn heartbeats_under_load() {
    let env = TestEnv::new("hbload");
    let fleet = Fleet::start(FleetConfig {
        gpus: 16,
        delay: (Duration::from_secs(12), Duration::from_secs(12)),
        heartbeat: Some(Duration::from_secs(1)),
        callers: 64,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), "[gpu]\nheartbeat_timeout = \"5s\"\n"));
    let window = Duration::from_secs(5);
    let idle = counters(&env);
    std::thread::sleep(window);
    let idle = {
        let now = counters(&env);
        (now.0 - idle.0, now.1 - idle.1)
    };
    let n = 64;
    env.push_raw("q1", &transcriptions("load", n));
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("state = 'processing' AND heartbeat_at IS NOT NULL") == n as u64
    }));
    let (before, beats_before) = (counters(&env), fleet.stats().heartbeats());
    std::thread::sleep(window);
    let (after, beats) = (counters(&env), fleet.stats().heartbeats() - beats_before);
    let (commits, statements) = (
        (after.0 - before.0).saturating_sub(idle.0),
        (after.1 - before.1).saturating_sub(idle.1),
    );
    println!(
        "{beats} heartbeats in {window:?} from {n} slots; mysql beyond the idle daemon \
         ({} commits, {} statements per {window:?}): {commits} commits, {statements} statements: \
         {:.3} commits and {:.3} statements per heartbeat",
        idle.0,
        idle.1,
        commits as f64 / beats.max(1) as f64,
        statements as f64 / beats.max(1) as f64,
    );
    assert!(
        beats >= n * 3,
        "each slot heartbeats about once a second: {beats}"
    );
    assert!(wait_for(Duration::from_secs(30), || {
        env.count("state = 'finished'") == n as u64
    }));
    let replies = fleet.stats().heartbeat_replies();
    let answered: u32 = replies
        .iter()
        .filter(|(c, _)| **c == 200 || **c == 409)
        .map(|(_, n)| n)
        .sum();
    // Answered, every one: recorded, or (in the instant its task ends) a conflict.
    assert_eq!(answered as usize, fleet.stats().heartbeats(), "{replies:?}");
    for g in 0..16 {
        assert!(fleet.stats().max_running(g) <= 4, "gpu {g}");
    }
    assert_eq!(
        env.count("task_id LIKE 'load-%' AND attempts = 1"),
        n as u64
    );
    stop(daemon);
}

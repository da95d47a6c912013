//! The callback endpoint over real sockets: every reply code of design §5, and proof that forged,
//! duplicate, stale and conflicting callbacks change nothing.

mod common;

use std::time::Duration;

use common::{call, callback_target, silent_fleet, stop, transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};

#[test]
fn every_reply_code_and_nothing_changes_without_authority() {
    let env = TestEnv::new("callbacks");
    // The GPU accepts but never calls back: this test plays the GPU's part.
    let fleet = silent_fleet(1);
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    let addr = daemon.callback_addr();
    env.push_raw("q1", &transcriptions("cb", 1));
    // The row turns `processing` when the slot is claimed, just before the request goes out.
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().body("cb-0").is_some()
    }));
    // The URL the GPU received is the one we can sign ourselves.
    let sent = fleet.stats().body("cb-0").expect("dispatched")["callback_url"]
        .as_str()
        .expect("url")
        .to_string();
    assert!(sent.ends_with(&callback_target("cb-0", 1)), "{sent}");
    let finished = r#"{"task_id":"cb-0","status":"finished"}"#;
    let processing = || env.task("cb-0").map(|t| t.0).as_deref() == Some("processing");

    // No token, a forged token, a token for another task: 401, nothing changes.
    assert_eq!(call(addr, "POST", "/callback", finished).0, 401);
    let forged = format!("/callback?attempt=1&token={}", "ab".repeat(32));
    assert_eq!(call(addr, "POST", &forged, finished).0, 401);
    assert_eq!(
        call(addr, "POST", &callback_target("other", 1), finished).0,
        401
    );
    assert!(processing());
    // Malformed, too large, wrong method.
    let t1 = callback_target("cb-0", 1);
    assert_eq!(call(addr, "POST", &t1, "{not json").0, 400);
    assert_eq!(
        call(addr, "POST", &t1, r#"{"task_id":"cb-0","status":"done"}"#).0,
        400
    );
    let huge = format!(
        r#"{{"task_id":"cb-0","status":"finished","x":"{}"}}"#,
        "a".repeat(140_000)
    );
    assert_eq!(call(addr, "POST", &t1, &huge).0, 413);
    assert_eq!(call(addr, "GET", "/callback", "").0, 405);
    assert_eq!(call(addr, "GET", "/nowhere", "").0, 404);
    // A correctly signed token for an attempt that is not the current one: stale.
    let (code, body) = call(addr, "POST", &callback_target("cb-0", 2), finished);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("stale"));
    assert!(processing());
    // Unknown task (valid token for an id nobody pushed).
    assert_eq!(
        call(
            addr,
            "POST",
            &callback_target("ghost", 1),
            r#"{"task_id":"ghost","status":"finished"}"#
        )
        .0,
        404
    );
    assert!(processing());

    // The real one applies and frees the slot.
    let (code, body) = call(addr, "POST", &t1, finished);
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("duplicate"));
    assert_eq!(env.task("cb-0").map(|t| t.0).as_deref(), Some("finished"));
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0);
    assert_eq!(daemon.busy_slots(), 0);
    // Repeat: 200 duplicate. Conflicting status: 409. The task stays finished.
    let (code, body) = call(addr, "POST", &t1, finished);
    assert_eq!(
        (code, body.contains("\"duplicate\":true")),
        (200, true),
        "{body}"
    );
    let (code, _) = call(
        addr,
        "POST",
        &t1,
        r#"{"task_id":"cb-0","status":"failed","error":"late"}"#,
    );
    assert_eq!(code, 409);
    let (state, error) = env.task("cb-0").expect("row");
    assert_eq!((state.as_str(), error), ("finished", None));

    // /healthz answers while MySQL does.
    let (code, body) = call(addr, "GET", "/healthz", "");
    assert_eq!(code, 200, "{body}");
    stop(daemon);
}

#[test]
fn failed_callback_records_the_error() {
    let env = TestEnv::new("cbfail");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        task_fail_rate: 1.0,
        duplicate_callbacks: true,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.push_raw("q1", &transcriptions("f", 20));
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'failed'")
        == 20));
    // Every callback was sent twice: the second of each is a 200 duplicate, never a change.
    assert!(
        wait_for(Duration::from_secs(10), || {
            fleet.stats().callback_replies().get(&200).copied() == Some(40)
        }),
        "{:?}",
        fleet.stats().callback_replies()
    );
    assert_eq!(
        env.count("state = 'failed' AND error = 'injected task failure'"),
        20
    );
    stop(daemon);
}

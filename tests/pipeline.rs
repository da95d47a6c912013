//! End to end against the real Redis and MariaDB and the fake GPU fleet: tasks in, rows out.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{call, callback_target, silent_fleet, stop, transcriptions, wait_for, TestEnv};
use fakefleet::Completion;
use fakefleet::{Fleet, FleetConfig};

#[test]
fn two_hundred_tasks_over_four_gpus_all_finish_within_slots_and_fairly() {
    let env = TestEnv::new("e2e200");
    let fleet = Fleet::start(FleetConfig {
        gpus: 4,
        delay: (Duration::from_millis(5), Duration::from_millis(40)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.push_raw("q1", &transcriptions("e2e", 200));

    let done = wait_for(Duration::from_secs(90), || {
        env.count("state = 'finished'") == 200
    });
    assert!(done, "not all finished: {:?}", env.states());

    let stats = fleet.stats();
    let seen = stats.seen();
    assert_eq!(seen.len(), 200, "the fleet saw every task");
    assert!(seen.values().all(|&n| n == 1), "no task dispatched twice");
    for g in 0..4 {
        assert!(
            stats.max_running(g) <= 4,
            "gpu {g} ran {}",
            stats.max_running(g)
        );
        let got = stats.received(g);
        assert!((25..=75).contains(&got), "gpu {g} got {got} of 200");
    }
    // The rows tell the truth: each finished task names the GPU and slot it ran on.
    let bad: Vec<(String, Option<String>, Option<u32>)> = env.query(
        "SELECT task_id, gpu_id, slot_index FROM tasks \
         WHERE gpu_id NOT IN ('g0','g1','g2','g3') OR slot_index NOT BETWEEN 0 AND 3 \
         OR attempts <> 1 OR finished_at IS NULL",
    );
    assert!(bad.is_empty(), "{bad:?}");
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0, "no slot held after the run");
    assert_eq!(daemon.busy_slots(), 0);
    let slots: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots");
    assert_eq!(slots[0], 16);
    // The seed's monitoring query still works (and shows nothing running).
    let running: Vec<(String, u64)> = env.query(
        "SELECT gpu_id, COUNT(*) as active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id",
    );
    assert!(running.is_empty());
    stop(daemon);
}

#[test]
fn response_mode_finishes_on_the_answer() {
    let env = TestEnv::new("respmode");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        completion: Completion::Response,
        delay: (Duration::from_millis(20), Duration::from_millis(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = "[gpu]\nslots = 2\ncompletion = \"response\"\nrequest_timeout = \"2s\"\n";
    let daemon = env.start(&env.config_toml(fleet.urls(), extra));
    env.push_raw("q1", &transcriptions("resp", 30));
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            == 30),
        "{:?}",
        env.states()
    );
    for g in 0..2 {
        assert!(fleet.stats().max_running(g) <= 2);
    }
    stop(daemon);
}

#[test]
fn seed_producer_messages_are_taken_as_written() {
    let env = TestEnv::new("seedfmt");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    // Exactly what Python's json.dumps produced in the seed's producer.
    env.push_raw(
        "q1",
        &[
            r#"{"type": "start_transcribe", "data": {"s3_bucket": "esales-et-callrecordings", "s3_key": "recordings/audio.wav", "call_session": "1751353080.711222", "task_id": "seed-in-data"}}"#.into(),
            r#"{"type": "start_transcribe", "task_id": "seed-top-level", "data": {"s3_bucket": "b", "s3_key": "k2"}}"#.into(),
            r#"{"type": "start_transcribe", "data": {"s3_bucket": "b", "s3_key": "no-id.wav", "pii_entities": "email,phone_number,address"}}"#.into(),
        ],
    );
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'finished'")
        == 3));
    assert_eq!(
        env.task("seed-in-data").map(|t| t.0).as_deref(),
        Some("finished")
    );
    assert_eq!(
        env.task("seed-top-level").map(|t| t.0).as_deref(),
        Some("finished")
    );
    // The id qsysd assigned is a UUID, recorded, and sent to the GPU.
    let ids: Vec<String> = env.query("SELECT task_id FROM tasks WHERE payload LIKE '%no-id.wav%'");
    assert_eq!(ids.len(), 1);
    assert!(uuid::Uuid::parse_str(&ids[0]).is_ok(), "{}", ids[0]);
    // The GPU got data + task_id + callback_url (design §5).
    let body = fleet.stats().body("seed-in-data").expect("dispatched");
    assert_eq!(body["s3_key"], "recordings/audio.wav");
    assert_eq!(body["call_session"], "1751353080.711222");
    assert_eq!(body["task_id"], "seed-in-data");
    let cb = body["callback_url"].as_str().expect("callback_url");
    assert!(cb.contains("/callback?attempt=1&token="), "{cb}");
    let body = fleet.stats().body(&ids[0]).expect("dispatched");
    assert_eq!(body["pii_entities"], "email,phone_number,address");
    stop(daemon);
}

#[test]
fn malformed_elements_fail_with_a_reason_and_the_poller_goes_on() {
    let env = TestEnv::new("malformed");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    let mut items: Vec<String> = vec![
        "not json at all".into(),
        r#"{"data": {"task_id": "m-no-type"}}"#.into(),
        "[1, 2, 3]".into(),
        r#"{"type": "start_transcribe", "data": "a string"}"#.into(),
    ];
    items.extend(transcriptions("ok", 2));
    env.push_raw("q1", &items);
    assert!(
        wait_for(Duration::from_secs(30), || {
            env.count("state = 'finished'") == 2 && env.count("state = 'failed'") == 4
        }),
        "{:?}",
        env.states()
    );
    let (state, error) = env.task("m-no-type").expect("row for the readable id");
    assert_eq!(state, "failed");
    assert!(error.unwrap_or_default().contains("missing \"type\""));
    let errors: Vec<(String, String)> =
        env.query("SELECT payload, error FROM tasks WHERE state = 'failed' ORDER BY payload");
    assert!(errors
        .iter()
        .any(|(p, e)| p == "not json at all" && e.contains("not valid JSON")));
    assert!(errors
        .iter()
        .any(|(p, e)| p == "[1, 2, 3]" && e.contains("expected a JSON object")));
    assert!(errors
        .iter()
        .any(|(_, e)| e.contains("data must be an object")));
    assert_eq!(
        fleet.stats().seen().len(),
        2,
        "malformed elements never reach a GPU"
    );
    stop(daemon);
}

#[test]
fn unknown_type_fails_and_known_ids_are_not_reset() {
    let env = TestEnv::new("unknown");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.push_raw(
        "q1",
        &[r#"{"type": "make_coffee", "data": {"task_id": "coffee-1"}}"#.into()],
    );
    env.push_raw("q1", &transcriptions("once", 1));
    assert!(wait_for(Duration::from_secs(30), || {
        env.task("coffee-1").is_some_and(|t| t.0 == "failed")
            && env.task("once-0").is_some_and(|t| t.0 == "finished")
    }));
    let (_, err) = env.task("coffee-1").expect("row");
    assert!(err
        .unwrap_or_default()
        .contains("unknown task type \"make_coffee\""));
    // The seed reset a finished task when its id came again; qsysd drops the copy.
    env.push_raw("q1", &transcriptions("once", 1));
    assert!(wait_for(Duration::from_secs(10), || env.llen("q1") == 0));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.task("once-0").map(|t| t.0).as_deref(), Some("finished"));
    assert_eq!(fleet.stats().seen()["once-0"], 1);
    stop(daemon);
}

#[test]
fn earlier_queue_wins_and_each_queue_is_fifo() {
    let env = TestEnv::new("priority");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        completion: Completion::Response,
        delay: (Duration::from_millis(30), Duration::from_millis(30)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    // Pushed before the daemon starts, so the order of taking is all that matters.
    env.push_raw("q2", &transcriptions("low", 3));
    env.push_raw("q1", &transcriptions("high", 3));
    let extra = "[gpu]\nslots = 1\ncompletion = \"response\"\n";
    let daemon = env.start(&env.config_toml(fleet.urls(), extra));
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'finished'")
        == 6));
    let order: Vec<String> = env.query("SELECT task_id FROM tasks ORDER BY dispatched_at, task_id");
    assert_eq!(
        order,
        ["high-0", "high-1", "high-2", "low-0", "low-1", "low-2"]
    );
    stop(daemon);
}

#[test]
fn full_fleet_leaves_tasks_in_redis_and_a_stop_hands_back_the_rest() {
    let env = TestEnv::new("backpress");
    // Every task takes a minute: the two slots fill and stay full.
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_secs(60), Duration::from_secs(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = "[gpu]\nslots = 2\n";
    let daemon = env.start(&env.config_toml(fleet.urls(), extra));
    // Well beyond what qsysd may hold, so the bound below means something.
    const N: usize = 400;
    env.push_raw("q1", &transcriptions("bp", N));
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("state = 'processing'") == 2
    }));
    std::thread::sleep(Duration::from_millis(1500));
    let in_redis = env.llen("q1");
    let in_mysql = env.count("1 = 1") as usize;
    // What qsysd holds: 2 running, the scheduler's hand (it takes a whole batch while below its
    // prefetch: at most PREFETCH - 1 + TAKE_BATCH), and one batch at the poller, waiting to hand
    // it over: 191 (README, promise 6).
    let hand = qsys::PREFETCH - 1 + 2 * qsys::TAKE_BATCH;
    assert_eq!(hand, 191);
    assert!(in_redis >= N - 2 - hand, "only {in_redis} left in redis");
    assert_eq!(in_redis + in_mysql, N, "every taken task is recorded");
    stop(daemon);
    // At a stop the tasks in hand go back to the head of the queue, in order; running ones stay.
    assert_eq!(env.llen("q1"), N - 2);
    let head = env.lrange("q1");
    let first: serde_json::Value = serde_json::from_str(&head[0]).expect("json");
    assert_eq!(first["data"]["task_id"], "bp-2");
    let ids: HashSet<String> = head
        .iter()
        .map(|s| {
            let v: serde_json::Value = serde_json::from_str(s).expect("json");
            v["data"]["task_id"].as_str().expect("id").to_string()
        })
        .collect();
    assert_eq!(ids.len(), N - 2);
    assert_eq!(env.count("state = 'processing'"), 2);
    // A restart takes the handed-back tasks over (their rows were pending) and keeps the slots of
    // the two still awaiting callbacks; with a second, fast GPU beside the full one, every
    // handed-back task then runs.
    let fast = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fast fleet");
    let urls = [fleet.urls()[0].clone(), fast.urls()[0].clone()];
    let daemon = env.start(&env.config_toml(&urls, extra));
    assert_eq!(daemon.busy_slots(), 2);
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            == (N - 2) as u64),
        "{:?}",
        env.states()
    );
    assert_eq!(
        env.count("state = 'processing'"),
        2,
        "slots survive the restart"
    );
    assert_eq!(fast.stats().seen().len(), N - 2);
    assert_eq!(env.llen("q1"), 0);
    stop(daemon);
}

#[test]
fn per_endpoint_slot_counts_are_honoured() {
    let env = TestEnv::new("slotcount");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_millis(20), Duration::from_millis(80)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    // g0 gets 1 slot, g1 keeps the default 3.
    let text = env
        .config_toml(fleet.urls(), "[gpu]\nslots = 3\n")
        .replacen("id = \"g0\"\n", "id = \"g0\"\nslots = 1\n", 1);
    let daemon = env.start(&text);
    env.push_raw("q1", &transcriptions("sc", 80));
    assert!(wait_for(Duration::from_secs(60), || env
        .count("state = 'finished'")
        == 80));
    let stats = fleet.stats();
    assert_eq!(stats.max_running(0), 1);
    assert!(stats.max_running(1) <= 3 && stats.max_running(1) >= 2);
    // Load follows capacity: the 3-slot GPU does most of the work.
    assert!(
        stats.received(1) > 2 * stats.received(0),
        "{} vs {}",
        stats.received(1),
        stats.received(0)
    );
    let slots: Vec<(String, u64)> =
        env.query("SELECT gpu_id, COUNT(*) FROM gpu_slots GROUP BY gpu_id ORDER BY gpu_id");
    assert_eq!(slots, [("g0".to_string(), 1), ("g1".to_string(), 3)]);
    stop(daemon);
}

/// Issue 20: a task that finds a free slot is claimed in its record's transaction; at
/// saturation, an ending's own transaction claims the slot it frees for the next task, so by the
/// time the GPU's callback is answered the next task is already `processing` on that slot: one
/// commit, no wait for the scheduler. The GPU never calls back by itself; the test's callbacks
/// end each task in turn.
#[test]
fn a_freed_slot_goes_to_the_next_task_in_the_ending_s_own_transaction() {
    let env = TestEnv::new("handover");
    let fleet = silent_fleet(1);
    let daemon = env.start(&env.config_toml(fleet.urls(), "[gpu]\nslots = 1\n"));
    env.push_raw("q1", &transcriptions("hand", 4));
    assert!(
        wait_for(Duration::from_secs(20), || {
            env.count("task_id = 'hand-0' AND state = 'processing'") == 1
                && env.count("state = 'pending'") == 3
        }),
        "{:?}",
        env.query::<(String, String, u32, Option<String>)>(
            "SELECT task_id, state, attempts, error FROM tasks"
        )
    );
    let on_slot = |id: &str| {
        env.count(&format!(
            "task_id = '{id}' AND state = 'processing' AND attempts = 1 \
             AND gpu_id = 'g0' AND slot_index = 0"
        ))
    };
    for i in 0..3 {
        let (id, next) = (format!("hand-{i}"), format!("hand-{}", i + 1));
        let body = format!(r#"{{"task_id":"{id}","status":"finished"}}"#);
        let (code, answer) = call(
            daemon.callback_addr(),
            "POST",
            &callback_target(&id, 1),
            &body,
        );
        assert_eq!(code, 200, "{answer}");
        // Read at once: the claim was committed with the ending, before the answer.
        assert_eq!(
            on_slot(&next),
            1,
            "{next} took the slot: {:?}",
            env.states()
        );
        let held: Vec<String> =
            env.query("SELECT task_id FROM gpu_slots WHERE task_id IS NOT NULL");
        assert_eq!(held, std::slice::from_ref(&next));
    }
    // The first started with its record (the slot was free); each next one with the ending
    // before it.
    let (_, metrics) = call(daemon.admin_addr(), "GET", "/metrics", "");
    for line in [
        r#"qsys_slot_claims_total{by="intake"} 1"#,
        r#"qsys_slot_claims_total{by="ending"} 3"#,
        r#"qsys_slot_claims_total{by="scheduler"} 0"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    let last = r#"{"task_id":"hand-3","status":"finished"}"#;
    assert_eq!(
        call(
            daemon.callback_addr(),
            "POST",
            &callback_target("hand-3", 1),
            last
        )
        .0,
        200
    );
    assert!(wait_for(Duration::from_secs(10), || fleet
        .stats()
        .seen()
        .len()
        == 4));
    let stats = fleet.stats();
    assert!(stats.seen().values().all(|&n| n == 1), "each sent once");
    assert_eq!(env.count("state = 'finished' AND attempts = 1"), 4);
    assert!(wait_for(Duration::from_secs(5), || daemon.busy_slots() == 0));
    stop(daemon);
}

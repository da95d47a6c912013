//! Poison queue elements (issue 13): every kind of element a careless or hostile producer can
//! push, between good tasks, against a running daemon on the real servers. Every good task
//! finishes, in every queue; every element ends as exactly one row; nothing is retried forever.

mod common;

use std::time::Duration;

use common::{stop, transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use mysql::prelude::Queryable;

/// (marker, element, what the row's error must say). The marker is the task id where the
/// element has one that can be read, else a string inside the element.
fn poison() -> Vec<(String, Vec<u8>, &'static str)> {
    let t = |id: &str, rest: &str| {
        format!(r#"{{"type":"start_transcribe","data":{{"task_id":"{id}"}}{rest}}}"#).into_bytes()
    };
    let mut deep = String::from(r#"{"type":"start_transcribe","data":{"task_id":"p-deep","x":"#);
    deep.push_str(&"[".repeat(500));
    deep.push_str(&"]".repeat(500));
    deep.push_str("}}");
    let mut bad_utf8 = br#"{"type":"start_transcribe","data":{"task_id":"p-utf8","x":""#.to_vec();
    bad_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    bad_utf8.extend_from_slice(br#""}}"#);
    vec![
        ("p-timeout-huge".into(), t("p-timeout-huge", r#","timeout_s":3000000000"#), "timeout_s"),
        ("p-timeout-neg".into(), t("p-timeout-neg", r#","timeout_s":-5"#), "timeout_s"),
        ("p-timeout-zero".into(), t("p-timeout-zero", r#","timeout_s":0"#), "timeout_s"),
        ("p-attempts-big".into(), t("p-attempts-big", r#","max_attempts":1001"#), "max_attempts"),
        ("p-attempts-str".into(), t("p-attempts-str", r#","max_attempts":"3""#), "max_attempts"),
        ("p-attempts-float".into(), t("p-attempts-float", r#","max_attempts":2.5"#), "max_attempts"),
        (
            "p-type-long".into(),
            format!(r#"{{"type":"{}","data":{{"task_id":"p-type-long"}}}}"#, "t".repeat(101))
                .into_bytes(),
            "type longer",
        ),
        (
            "p-type-ctl".into(),
            br#"{"type":"a\nb","data":{"task_id":"p-type-ctl"}}"#.to_vec(),
            "control characters",
        ),
        (
            "p-type-num".into(),
            br#"{"type":7,"data":{"task_id":"p-type-num"}}"#.to_vec(),
            "type must be a string",
        ),
        // The id is too long to be the row's id: the row gets a fresh one, the element says why.
        (
            "id-too-long-marker".into(),
            format!(
                r#"{{"type":"start_transcribe","m":"id-too-long-marker","data":{{"task_id":"{}"}}}}"#,
                "i".repeat(256)
            )
            .into_bytes(),
            "task_id longer",
        ),
        ("p-deep".into(), deep.into_bytes(), "recursion limit"),
        // Not UTF-8: no id can be read, and the row keeps the bytes as base64.
        ("base64:".into(), bad_utf8, "not valid JSON"),
        (
            "huge-marker".into(),
            format!(
                r#"{{"type":"start_transcribe","m":"huge-marker","data":{{"task_id":"p-huge","x":"{}"}}}}"#,
                "h".repeat(2 << 20)
            )
            .into_bytes(),
            "larger than daemon.max_message_bytes",
        ),
        // MySQL itself refuses this one (a CHECK constraint an operator added): only it fails.
        ("p-refused".into(), t("p-refused", ""), "mysql refused the task"),
    ]
}

#[test]
fn poison_elements_fail_once_and_every_good_task_finishes() {
    let env = TestEnv::new("poison");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.mysql()
        .query_drop(
            "ALTER TABLE tasks ADD CONSTRAINT qsys_test_refuse CHECK (task_id <> 'p-refused')",
        )
        .expect("check constraint");
    let poison = poison();
    let good = transcriptions("good", 40);
    let mut conn = env.redis_conn();
    // Each poison element sits between good tasks, in the high-priority queue; more good tasks
    // wait in the low one and must not be starved by a stuck q1.
    for (i, (_, raw, _)) in poison.iter().enumerate() {
        let _: () = redis::cmd("RPUSH")
            .arg(env.queue("q1"))
            .arg(&good[2 * i])
            .arg(raw.as_slice())
            .arg(&good[2 * i + 1])
            .query(&mut conn)
            .expect("push");
    }
    env.push_raw("q2", &good[2 * poison.len()..]);
    let total = good.len() + poison.len();
    assert!(
        wait_for(Duration::from_secs(60), || {
            env.count("state = 'finished'") == good.len() as u64
                && env.count("state = 'failed'") == poison.len() as u64
        }),
        "{:?}; q1 {} q2 {} left; failed: {:?}",
        env.states(),
        env.llen("q1"),
        env.llen("q2"),
        env.query::<(String, String)>(
            "SELECT task_id, LEFT(error, 80) FROM tasks WHERE state = 'failed'"
        )
    );
    // Exactly one row per element, and each says why.
    let rows: Vec<(String, Option<String>, String)> =
        env.query("SELECT task_id, payload, COALESCE(error, '') FROM tasks WHERE state = 'failed'");
    for (marker, _, want) in &poison {
        let hits: Vec<_> = rows
            .iter()
            .filter(|(id, payload, _)| {
                id == marker
                    || payload
                        .as_deref()
                        .is_some_and(|p| p.contains(marker.as_str()))
            })
            .collect();
        assert_eq!(hits.len(), 1, "{marker}: {hits:?}");
        assert!(hits[0].2.contains(want), "{marker}: {}", hits[0].2);
    }
    assert_eq!(env.count("1 = 1"), total as u64);
    // Each poison element is kept whole in the queue's dead-letter list.
    let dead: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(format!(
            "{}:dead:{}",
            env.prefix.trim_end_matches(':'),
            env.queue("q1")
        ))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("dead letters");
    for (marker, raw, _) in &poison {
        assert!(dead.contains(raw), "{marker} not in the dead-letter list");
    }
    assert_eq!(fleet.stats().seen().len(), good.len());
    stop(daemon);
}

/// A batch whose insert waits on a row lock past MySQL's lock wait timeout goes back to Redis and
/// is retried. Its malformed element is recorded once, not once per try, and its id-less task has
/// its id before anything is recorded (the in-hand copy carries it), so a retake is the same task.
#[test]
fn a_retried_batch_records_nothing_twice() {
    let env = TestEnv::new("retrybatch");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.push_raw("q1", &transcriptions("lock", 1));
    assert!(wait_for(Duration::from_secs(20), || env
        .count("state = 'finished'")
        == 1));
    // Hold the finished row's lock, then push a batch that touches it (its id again).
    let mut holder = env.mysql();
    holder.query_drop("START TRANSACTION").expect("begin");
    holder
        .query_drop("SELECT * FROM tasks WHERE task_id = 'lock-0' FOR UPDATE")
        .expect("lock");
    let idless = r#"{"type":"start_transcribe","data":{"m":"idless-marker"}}"#.to_string();
    let batch = vec![
        "not json: retry-marker".to_string(),
        idless.clone(),
        transcriptions("lock", 1).remove(0),
        transcriptions("after", 1).remove(0),
    ];
    env.push_raw("q1", &batch);
    // While the insert waits on the lock, the id-less element in hand already has its id.
    let in_hand = format!(
        "{}:inhand:test:{}",
        env.prefix.trim_end_matches(':'),
        env.queue("q1")
    );
    assert!(
        wait_for(Duration::from_secs(5), || env
            .lrange_key(&in_hand)
            .iter()
            .any(|e| e.contains("idless-marker") && e.contains("task_id"))),
        "{:?}",
        env.lrange_key(&in_hand)
    );
    // One lock wait timeout (10 s) fails the insert: the batch goes back and is retried.
    std::thread::sleep(Duration::from_secs(12));
    holder.query_drop("ROLLBACK").expect("release");
    assert!(
        wait_for(Duration::from_secs(30), || env.count("state = 'finished'")
            == 3),
        "{:?}",
        env.states()
    );
    assert_eq!(env.count("payload LIKE '%retry-marker%'"), 1);
    assert_eq!(env.count("payload LIKE '%idless-marker%'"), 1);
    assert_eq!(env.count("1 = 1"), 4);
    stop(daemon);
}

//! Property tests for everything that parses outside input: queue messages and callback bodies
//! (pure, no I/O), then the same garbage sent to a running daemon's callback endpoint, which must
//! answer 4xx and change nothing.

mod common;

use std::time::Duration;

use common::{stop, transcriptions, wait_for, TestEnv, SECRET};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use qsys::callback::parse_report;
use qsys::config::Secret;
use qsys::fakegpu::{Fleet, FleetConfig};
use qsys::message::parse;
use qsys::token::Signer;

/// JSON-ish text: mostly structure characters and the field names that matter, so the parsers'
/// interesting branches are reached far more often than with uniform bytes.
fn jsonish() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("{".to_string()),
            Just("}".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just(":".to_string()),
            Just(",".to_string()),
            Just("\"type\"".to_string()),
            Just("\"data\"".to_string()),
            Just("\"task_id\"".to_string()),
            Just("\"status\"".to_string()),
            Just("\"finished\"".to_string()),
            Just("\"max_attempts\"".to_string()),
            Just("null".to_string()),
            Just("-1".to_string()),
            Just("1e999".to_string()),
            "\"[a-z\\\\\\u{0}-\\u{1f}é]{0,6}\"".prop_map(|s| s),
            "[0-9]{1,25}".prop_map(|s| s),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn message_parser_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse(&raw, || "id".into());
    }

    #[test]
    fn message_parser_on_jsonish(text in jsonish()) {
        if let Ok(m) = parse(text.as_bytes(), || "id".into()) {
            // Whatever it accepts has a usable id and type, and survives a round trip.
            prop_assert!(!m.task_id.is_empty() && !m.kind.is_empty());
            let again = parse(m.to_json().as_bytes(), || unreachable!()).expect("round trip");
            prop_assert_eq!(again.task_id, m.task_id);
        }
    }

    #[test]
    fn valid_messages_are_taken(kind in "[a-z_]{1,30}", id in "[A-Za-z0-9-]{1,60}",
                                key in "[a-z]{1,10}", value in any::<i64>()) {
        let raw = format!(r#"{{"type": "{kind}", "data": {{"{key}": {value}, "task_id": "{id}"}}}}"#);
        let m = parse(raw.as_bytes(), || unreachable!()).expect("valid");
        prop_assert_eq!(m.task_id, id);
        prop_assert_eq!(m.kind, kind);
    }

    #[test]
    fn callback_parser_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_report(&raw);
    }

    #[test]
    fn callback_parser_on_jsonish(text in jsonish()) {
        let _ = parse_report(text.as_bytes());
    }
}

#[test]
fn garbage_callbacks_change_nothing() {
    let env = TestEnv::new("fuzzcb");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        lose_rate: 1.0,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.push_raw("q1", &transcriptions("fz", 2));
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("state = 'processing'") == 2
    }));
    let snapshot = || -> Vec<(String, String, u32)> {
        env.query("SELECT task_id, state, attempts FROM tasks ORDER BY task_id")
    };
    let before = snapshot();
    let signer = Signer::new(Secret::new(SECRET), "http://unused/callback");
    let url = signer.callback_url("fz-0", 1);
    let good = format!(
        "http://{}{}",
        daemon.callback_addr(),
        &url[url.find("/callback").expect("path")..]
    );
    let forged = format!(
        "http://{}/callback?attempt=1&token={}",
        daemon.callback_addr(),
        "0".repeat(64)
    );
    let agent = qsys::http::agent();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = jsonish();
    for i in 0..300 {
        let body = strategy.new_tree(&mut runner).expect("value").current();
        let target = if i % 2 == 0 { &good } else { &forged };
        let r = qsys::http::post_json(
            &agent,
            target,
            None,
            &body,
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .expect("answered");
        // A well-formed finished/failed for fz-0 with the good token is a real callback, not
        // garbage; everything else must be refused.
        let real = parse_report(body.as_bytes()).is_ok_and(|rep| rep.task_id == "fz-0");
        if !(real && i % 2 == 0) {
            assert!((400..500).contains(&r.status), "{body:?} got {}", r.status);
        }
    }
    let after = snapshot();
    if after[0].1 == "processing" {
        assert_eq!(before, after);
    } else {
        // The generator happened to produce a valid callback for fz-0: only fz-0 changed.
        assert_eq!(before[1], after[1]);
    }
    stop(daemon);
}

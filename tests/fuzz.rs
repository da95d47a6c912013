//! Property tests for everything that parses outside input: queue messages and callback bodies
//! (pure, no I/O), then the same garbage sent to a running daemon's callback endpoint, which must
//! answer 4xx and change nothing.

mod common;

use std::time::Duration;

use common::{callback_target, daemon_awaiting_callbacks, stop, TestEnv};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use qsys::parse_message as parse;
use qsys::parse_report;

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
    let (daemon, _fleet) = daemon_awaiting_callbacks(&env, "fz", 2, 1);
    let snapshot = || -> Vec<(String, String, u32)> {
        env.query("SELECT task_id, state, attempts FROM tasks ORDER BY task_id")
    };
    let before = snapshot();
    let good = format!(
        "http://{}{}",
        daemon.callback_addr(),
        callback_target("fz-0", 1)
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

/// A number for `max_attempts` / `timeout_s` near every edge a column or the parser has.
fn edge_number() -> impl Strategy<Value = String> {
    let edges = prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("-1".to_string()),
        Just("1000".to_string()),
        Just("1001".to_string()),
        Just("2592000".to_string()),
        Just("2592001".to_string()),
        Just("2147483647".to_string()),
        Just("2147483648".to_string()),
        Just("4294967296".to_string()),
        Just("18446744073709551615".to_string()),
        Just("18446744073709551616".to_string()),
        Just("1.5".to_string()),
        Just("1e3".to_string()),
        Just("\"5\"".to_string()),
        Just("null".to_string()),
        (1u64..5_000_000).prop_map(|n| n.to_string()),
    ];
    // Mostly ordinary, so that a case often passes the parser and reaches MySQL.
    prop_oneof![3 => (1u64..1000).prop_map(|n| n.to_string()), 1 => edges]
}

/// Values the database would refuse: whatever the parser accepts, MySQL stores. Each case is a
/// message with edge values in every numeric and length field, recorded for real.
#[test]
fn whatever_the_parser_accepts_mysql_stores() {
    let env = TestEnv::new("fuzzdb");
    let store = qsys::Store::connect(&env.mysql_url(), false, "fuzz", 2).expect("connect");
    store.migrate().expect("migrate");
    let strategy = (
        edge_number(),
        edge_number(),
        prop_oneof![0usize..250, 250usize..300],
        prop_oneof![1usize..90, 90usize..110],
        prop_oneof![Just('a'), Just('é'), Just('🎙'), Just(' ')],
        // A work size, in `cost` and in `data.audio_seconds`, near a DOUBLE's edges too.
        prop_oneof![
            3 => edge_number(),
            1 => prop_oneof![
                Just("1e9".to_string()),
                Just("1.0000001e9".to_string()),
                Just("1e308".to_string()),
                Just("-0.0".to_string()),
                Just("5e-324".to_string()),
            ]
        ],
    );
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut stored = 0;
    for n in 0..300 {
        let (attempts, timeout, id_len, type_len, ch, cost) =
            strategy.new_tree(&mut runner).expect("value").current();
        let id: String = format!("{n}-{}", ch.to_string().repeat(id_len));
        let kind: String = "t".repeat(type_len);
        let raw = format!(
            r#"{{"type":{},"max_attempts":{attempts},"timeout_s":{timeout},"cost":{cost},"data":{{"task_id":{},"note":"{ch}","audio_seconds":{cost}}}}}"#,
            serde_json::Value::String(kind),
            serde_json::Value::String(id),
        );
        let Ok(m) = parse(raw.as_bytes(), || unreachable!("the id is given")) else {
            continue;
        };
        let payload = m.to_json();
        let row = qsys::NewTask {
            task_id: &m.task_id,
            kind: &m.kind,
            payload: &payload,
            max_attempts: m.max_attempts,
            timeout_s: m.timeout_s,
            wait: None,
            cost: m.cost(),
        };
        store
            .accept("q", &[row])
            .unwrap_or_else(|e| panic!("parser accepted what mysql refuses: {raw}: {e}"));
        stored += 1;
    }
    // The generator reaches both sides of the checks.
    assert!(stored > 20 && stored < 290, "{stored} of 300 stored");
}

/// One generated request head: a method and target, then header lines that are often framing
/// headers with hostile values, sometimes very long.
fn hostile_head() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("-1".to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("chunked".to_string()),
        Just("gzip, chunked".to_string()),
        Just("chunked, gzip".to_string()),
        Just("100-continue".to_string()),
        Just("close".to_string()),
        Just(String::new()),
        "[ -~]{0,40}",
        (0usize..40_000).prop_map(|n| "v".repeat(n)),
    ];
    let name = prop_oneof![
        Just("Content-Length".to_string()),
        Just("Transfer-Encoding".to_string()),
        Just("Expect".to_string()),
        Just("Connection".to_string()),
        Just("Host".to_string()),
        "[A-Za-z-]{1,20}",
        Just("Bad Header".to_string()),
        Just(String::new()),
    ];
    (
        prop_oneof![Just("POST"), Just("GET"), Just("PUT"), Just("BREW")],
        prop_oneof![
            Just("/callback".to_string()),
            Just("/healthz".to_string()),
            "/[ -~]{0,60}",
        ],
        prop_oneof![
            Just("HTTP/1.1"),
            Just("HTTP/1.0"),
            Just("HTTP/2.0"),
            Just("HTTP/9")
        ],
        proptest::collection::vec((name, value), 0..120),
        "[ -~]{0,200}",
    )
        .prop_map(|(method, path, version, headers, body)| {
            let mut raw = format!("{method} {path} {version}\r\n");
            for (n, v) in headers {
                raw.push_str(&format!("{n}: {v}\r\n"));
            }
            raw.push_str("\r\n");
            raw.push_str(&body);
            raw.into_bytes()
        })
}

/// Generated heads against a running daemon's callback listener: each gets an answer or a closed
/// connection in bounded time, and afterwards a genuine callback is still applied.
#[test]
fn garbage_heads_are_answered_and_change_nothing() {
    use std::io::{Read, Write};
    let env = TestEnv::new("fuzzhead");
    let (daemon, _fleet) = daemon_awaiting_callbacks(&env, "fh", 1, 1);
    let addr = daemon.callback_addr();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = hostile_head();
    for _ in 0..200 {
        let raw = strategy.new_tree(&mut runner).expect("value").current();
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(40)))
            .expect("timeout");
        let _ = s.write_all(&raw);
        // Half-close: a request waiting for more body sees the end at once.
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut got = Vec::new();
        let started = std::time::Instant::now();
        let _ = s.read_to_end(&mut got);
        assert!(
            started.elapsed() < Duration::from_secs(35),
            "no end for {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        );
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.is_empty() || text.starts_with("HTTP/"),
            "{text:?} for {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(300)])
        );
    }
    assert_eq!(env.count("state = 'processing'"), 1);
    let target = format!("http://{addr}{}", callback_target("fh-0", 1));
    let r = qsys::http::post_json(
        &qsys::http::agent(),
        &target,
        None,
        r#"{"task_id":"fh-0","status":"finished"}"#,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .expect("answered");
    assert_eq!(r.status, 200);
    stop(daemon);
}

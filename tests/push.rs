//! `qsys-push` as producers run it, the real binary against the real Redis (and MariaDB for
//! `--wait`): every input form and event shape lands in the seed's exact format, bad input is
//! refused whole, Redis failures exit 1, `--wait` follows tasks through a running qsysd, and the
//! Lambda custom runtime works against a fake Runtime API.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::{stop, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use serde_json::{json, Value};

const PUSH: &str = env!("CARGO_BIN_EXE_qsys-push");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ids(&self) -> Vec<String> {
        self.stdout.lines().map(str::to_string).collect()
    }
}

/// Runs `qsys-push` with a clean environment plus `envs`, feeding `stdin`.
fn push(args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> Out {
    let mut child = Command::new(PUSH)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qsys-push");
    let mut pipe = child.stdin.take().expect("stdin");
    let text = stdin.to_string();
    // Written from a thread: a large input must not deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().expect("qsys-push output");
    writer.join().expect("stdin writer");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// A producer's config file `name` for this test (queues q1, q2), plus `extra`.
fn config(env: &TestEnv, name: &str, extra: &str) -> PathBuf {
    write(&env.dir, name, &env.config_toml(&[], extra))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The list's elements, checked to be exactly the seed's format plus the `enqueued_at` stamp
/// (issue 17: a top-level field the seed's worker ignores), a moment ago; `(type, data)` of each.
fn seed_elements(env: &TestEnv, queue: &str) -> Vec<(String, Value)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    env.lrange(queue)
        .iter()
        .map(|raw| {
            let v: Value = serde_json::from_str(raw).expect("json element");
            let obj = v.as_object().expect("object");
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                ["data", "enqueued_at", "type"],
                "exactly the seed's fields and the stamp: {raw}"
            );
            let stamp = v["enqueued_at"].as_f64().expect("a number");
            assert!(
                (now - 120.0..=now + 1.0).contains(&stamp),
                "stamped at the push: {raw}"
            );
            assert!(
                raw.starts_with("{\"type\":"),
                "type first, as the seed: {raw}"
            );
            let data = v["data"].clone();
            assert!(data["task_id"].is_string(), "{raw}");
            (v["type"].as_str().expect("type").to_string(), data)
        })
        .collect()
}

fn task(kind: &str, key: &str) -> Value {
    json!({"type": kind, "data": {"s3_bucket": "b", "s3_key": key}})
}

#[test]
fn every_form_and_event_shape_pushes_the_seed_format() {
    let env = TestEnv::new("pushshapes");
    let cfg = config(&env, "producer.toml", "");
    let cfg = path(&cfg);
    let batch = json!({"tasks": [task("start_transcribe", "b1"), task("send_email", "b2")]});
    let batch_file = write(&env.dir, "batch.json", &batch.to_string());
    let ndjson = format!(
        "{}\n{}\n\n{}\n",
        task("start_transcribe", "n1"),
        task("cleanup", "n2"),
        task("generate_report", "n3")
    );
    let ndjson_file = write(&env.dir, "tasks.ndjson", &ndjson);
    let b64 = base64::engine::general_purpose::STANDARD.encode(task("a", "api64").to_string());
    let cases: Vec<(&str, Vec<&str>, String, Vec<&str>)> = vec![
        (
            "--type/--data",
            vec!["--type", "start_transcribe", "--data", r#"{"s3_key":"args"}"#],
            String::new(),
            vec!["args"],
        ),
        (
            "single task on stdin",
            vec![],
            task("start_transcribe", "single").to_string(),
            vec!["single"],
        ),
        (
            "pretty-printed task on stdin",
            vec![],
            serde_json::to_string_pretty(&task("x", "pretty")).expect("json"),
            vec!["pretty"],
        ),
        (
            "batch in --file",
            vec!["--file", path(&batch_file)],
            String::new(),
            vec!["b1", "b2"],
        ),
        (
            "API Gateway proxy event",
            vec![],
            json!({"resource": "/tasks", "httpMethod": "POST", "headers": {"Content-Type": "application/json"},
                   "requestContext": {"stage": "prod"}, "body": batch.to_string().replace("b1", "api1").replace("b2", "api2"),
                   "isBase64Encoded": false})
            .to_string(),
            vec!["api1", "api2"],
        ),
        (
            "API Gateway proxy event, base64 body",
            vec![],
            json!({"version": "2.0", "routeKey": "POST /tasks", "body": b64, "isBase64Encoded": true})
                .to_string(),
            vec!["api64"],
        ),
        (
            "SQS event",
            vec![],
            json!({"Records": [
                {"messageId": "1", "eventSource": "aws:sqs", "body": task("a", "sqs1").to_string()},
                {"messageId": "2", "eventSource": "aws:sqs",
                 "body": json!({"tasks": [task("a", "sqs2"), task("b", "sqs3")]}).to_string()}
            ]})
            .to_string(),
            vec!["sqs1", "sqs2", "sqs3"],
        ),
        (
            "EventBridge event",
            vec![],
            json!({"version": "0", "id": "e", "detail-type": "task", "source": "app", "account": "1",
                   "time": "2025-07-01T00:00:00Z", "region": "eu-west-2", "resources": [],
                   "detail": task("a", "eb")})
            .to_string(),
            vec!["eb"],
        ),
        ("NDJSON on stdin", vec![], ndjson.clone(), vec!["n1", "n2", "n3"]),
        (
            "NDJSON in --file",
            vec!["--file", path(&ndjson_file)],
            String::new(),
            vec!["n1", "n2", "n3"],
        ),
    ];
    let mut want_ids = Vec::new();
    let mut want_keys = Vec::new();
    for (what, args, stdin, keys) in &cases {
        let mut all = vec!["--config", cfg];
        all.extend(args);
        let out = push(&all, stdin, &[]);
        assert_eq!(out.code, 0, "{what}: {}", out.stderr);
        let ids = out.ids();
        assert_eq!(ids.len(), keys.len(), "{what}: {}", out.stdout);
        for id in &ids {
            let v = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("{what}: {id}"));
            assert_eq!(v.get_version_num(), 4, "{what}");
        }
        want_ids.extend(ids);
        want_keys.extend(keys.iter().copied());
    }
    let got = seed_elements(&env, "q1");
    let got_ids: Vec<&str> = got
        .iter()
        .map(|(_, d)| d["task_id"].as_str().expect("id"))
        .collect();
    assert_eq!(got_ids, want_ids, "printed ids, in push order");
    let got_keys: Vec<&str> = got
        .iter()
        .map(|(_, d)| d["s3_key"].as_str().expect("s3_key"))
        .collect();
    assert_eq!(got_keys, want_keys);
    assert_eq!(got[0].0, "start_transcribe");
    assert_eq!(env.llen("q2"), 0);
}

#[test]
fn ids_and_queues_come_from_the_event_the_flags_or_the_environment() {
    let env = TestEnv::new("pushqueues");
    let cfg = config(&env, "producer.toml", "");
    let cfg = path(&cfg);
    let (q1, q2) = (env.queue("q1"), env.queue("q2"));
    // --queue and --task-id.
    let out = push(
        &[
            "--config",
            cfg,
            "--type",
            "cleanup",
            "--task-id",
            "c-1",
            "--queue",
            &q2,
        ],
        "",
        &[],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "c-1\n"),
        "{}",
        out.stderr
    );
    // QUEUE_NAME (the seed producer's variable) beats the config's first queue.
    let out = push(
        &["--config", cfg],
        &task("a", "env").to_string(),
        &[("QUEUE_NAME", &q2)],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    // The event's queue_name beats --queue; a task's beats its batch's; ids given are kept.
    let event = json!({"queue_name": q2, "tasks": [
        {"type": "a", "data": {"task_id": "in-data"}},
        {"type": "a", "task_id": "top-level", "data": {}, "queue_name": q1},
    ]});
    let out = push(
        &["--config", cfg, "--queue", &q1, "--json"],
        &event.to_string(),
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let receipts: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(
        receipts,
        [
            json!({"task_id": "in-data", "queue": q2, "type": "a"}),
            json!({"task_id": "top-level", "queue": q1, "type": "a"}),
        ]
    );
    assert!(
        out.stdout
            .starts_with("{\"task_id\":\"in-data\",\"queue\":"),
        "{}",
        out.stdout
    );
    let q2_ids: Vec<String> = seed_elements(&env, "q2")
        .into_iter()
        .map(|(_, d)| d["task_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(q2_ids.len(), 3);
    assert_eq!(q2_ids[0], "c-1");
    assert_eq!(q2_ids[2], "in-data");
    let q1_items = seed_elements(&env, "q1");
    assert_eq!(q1_items.len(), 1);
    assert_eq!(q1_items[0].1["task_id"], "top-level");
    // Optional fields the daemon honours pass through.
    let out = push(
        &["--config", cfg],
        r#"{"type": "a", "data": {}, "max_attempts": 2, "timeout_s": 30}"#,
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let last: Value = serde_json::from_str(env.lrange("q1").last().expect("pushed")).expect("json");
    assert_eq!(
        (last["max_attempts"].clone(), last["timeout_s"].clone()),
        (json!(2), json!(30))
    );
}

#[test]
fn bad_input_of_every_kind_is_refused_whole() {
    let env = TestEnv::new("pushbad");
    let cfg = config(&env, "producer.toml", "");
    let typed = config(
        &env,
        "typed.toml",
        "\n[types.start_transcribe]\nhandler = \"gpu\"\n",
    );
    let (cfg, typed) = (path(&cfg), path(&typed));
    let good = task("start_transcribe", "ok");
    let cases: Vec<(&str, Vec<&str>, String, &str)> = vec![
        (
            "the Lambda console's sample event",
            vec![],
            json!({"key1": "value1", "key2": "value2", "key3": "value3"}).to_string(),
            "event: unrecognised shape (fields: key1, key2, key3)",
        ),
        (
            "an S3 notification",
            vec![],
            json!({"Records": [{"eventSource": "aws:s3", "s3": {"object": {"key": "a.wav"}}}]})
                .to_string(),
            "Records[0].eventSource: \"aws:s3\" is not supported",
        ),
        (
            "one bad task in a batch",
            vec![],
            json!({"tasks": [good, good, {"type": "", "data": {}}]}).to_string(),
            "tasks[2].type: must be a non-empty string",
        ),
        (
            "data not an object",
            vec![],
            json!({"tasks": [good, {"type": "a", "data": "s3://b/k"}]}).to_string(),
            "tasks[1].data: must be an object, got a string",
        ),
        (
            "--data not an object",
            vec!["--type", "a", "--data", "[1]"],
            String::new(),
            "data: must be an object, got an array",
        ),
        (
            "an API Gateway body that is not JSON",
            vec![],
            json!({"httpMethod": "POST", "body": "type=a&data=1"}).to_string(),
            "body: not valid JSON",
        ),
        (
            "an API Gateway body that is not base64",
            vec![],
            json!({"body": "%%%", "isBase64Encoded": true}).to_string(),
            "body: not valid base64",
        ),
        (
            "an SQS record with a bad task",
            vec![],
            json!({"Records": [
                {"eventSource": "aws:sqs", "body": good.to_string()},
                {"eventSource": "aws:sqs", "body": json!({"type": "a"}).to_string()}
            ]})
            .to_string(),
            "Records[1].body.data: missing",
        ),
        (
            "an EventBridge detail that is no task",
            vec![],
            json!({"detail-type": "x", "source": "y", "detail": {"instance-id": "i-1"}})
                .to_string(),
            "detail: expected a task",
        ),
        (
            "a bad NDJSON line",
            vec![],
            format!("{good}\n{good}\n{{\"type\": \"a\", \"data\": \n"),
            "line 3: not valid JSON",
        ),
        (
            "a repeated task id",
            vec![],
            format!(
                "{}\n{}\n",
                json!({"type": "a", "data": {"task_id": "dup"}}),
                json!({"type": "a", "data": {"task_id": "dup"}})
            ),
            "line 2.task_id: \"dup\" is given to more than one task",
        ),
        (
            "a type the config does not know",
            vec!["--config", typed],
            json!({"tasks": [good, task("make_coffee", "x")]}).to_string(),
            "tasks[1].type: unknown task type \"make_coffee\" (the config knows: start_transcribe)",
        ),
        (
            "a queue name with a space",
            vec!["--queue", "my queue"],
            good.to_string(),
            "--queue: \"my queue\": a queue name must be non-empty",
        ),
        (
            "a negative --cost",
            vec!["--cost=-1"],
            good.to_string(),
            "--cost: cost must be a number from 0 to 1000000000",
        ),
        (
            "a --cost that is no number",
            vec!["--cost", "nan"],
            good.to_string(),
            "--cost: cost must be a number",
        ),
        (
            "a --cost past 1e9",
            vec!["--cost", "1e10"],
            good.to_string(),
            "--cost: cost must be a number",
        ),
        (
            "a task's cost that is a string",
            vec![],
            json!({"type": "a", "data": {}, "cost": "1h"}).to_string(),
            "cost: cost must be a number",
        ),
        ("no input", vec![], String::new(), "input: no tasks"),
        (
            "a missing file",
            vec!["--file", "/nonexistent/tasks.ndjson"],
            String::new(),
            "cannot read /nonexistent/tasks.ndjson",
        ),
    ];
    for (what, args, stdin, want) in &cases {
        let mut all = args.clone();
        if !all.contains(&"--config") {
            all.extend(["--config", cfg]);
        }
        let out = push(&all, stdin, &[]);
        assert_eq!(out.code, 2, "{what}: {}{}", out.stdout, out.stderr);
        assert!(out.stderr.contains(want), "{what}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{what}: {}", out.stdout);
        assert!(
            out.stderr.contains("nothing was pushed"),
            "{what}: {}",
            out.stderr
        );
    }
    assert_eq!((env.llen("q1"), env.llen("q2")), (0, 0));
    // A bad config is exit 2 too, naming the key.
    let bad = write(&env.dir, "bad.toml", "[redis]\nurl = \"http://x\"\n");
    let out = push(&["--config", path(&bad), "--type", "a"], "", &[]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("redis.url"), "{}", out.stderr);
}

#[test]
fn redis_failures_exit_1_and_a_batch_never_lands_in_part() {
    let env = TestEnv::new("pushredis");
    let cfg = config(&env, "producer.toml", "");
    let cfg = path(&cfg);
    let port = common::free_port().to_string();
    let out = push(
        &["--config", cfg, "--type", "a"],
        "",
        &[("REDIS_PORT", &port)],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.starts_with("qsys-push: redis:"),
        "{}",
        out.stderr
    );
    // A batch over two queues where the second cannot take it: the first gets nothing either.
    let mut c = env.redis_conn();
    let _: () = redis::cmd("SET")
        .arg(env.queue("q2"))
        .arg("not a list")
        .query(&mut c)
        .expect("set");
    let event = json!({"tasks": [task("a", "1"), {"type": "a", "data": {}, "queue_name": env.queue("q2")}]});
    let out = push(&["--config", cfg], &event.to_string(), &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("holds a string, not a list"),
        "{}",
        out.stderr
    );
    assert_eq!(env.llen("q1"), 0);
}

#[test]
fn a_large_ndjson_batch_lands_whole_and_in_order_over_two_queues() {
    let env = TestEnv::new("pushlarge");
    let cfg = config(&env, "producer.toml", "");
    let q2 = env.queue("q2");
    // 25,000 tasks: more than two 10k chunks in q1, the odd hundreds in q2.
    let mut text = String::new();
    for i in 0..25_000 {
        let t = if i % 100 == 0 {
            json!({"type": "start_transcribe", "data": {"s3_key": format!("k{i}")}, "queue_name": q2})
        } else {
            json!({"type": "start_transcribe", "data": {"s3_key": format!("k{i}")}})
        };
        text.push_str(&t.to_string());
        text.push('\n');
    }
    let out = push(&["--config", path(&cfg)], &text, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ids = out.ids();
    assert_eq!(ids.len(), 25_000);
    let q1 = seed_elements(&env, "q1");
    let q2 = seed_elements(&env, "q2");
    assert_eq!((q1.len(), q2.len()), (24_750, 250));
    let key = |d: &Value| d["s3_key"].as_str().expect("key").to_string();
    let want_q1: Vec<String> = (0..25_000)
        .filter(|i| i % 100 != 0)
        .map(|i| format!("k{i}"))
        .collect();
    assert_eq!(q1.iter().map(|(_, d)| key(d)).collect::<Vec<_>>(), want_q1);
    assert_eq!(key(&q2[249].1), "k24900");
    assert_eq!(q1[0].1["task_id"].as_str(), Some(ids[1].as_str()));
}

/// A daemon with the fake fleet, and a producer config file for it.
fn daemon_setup(env: &TestEnv, fleet: &Fleet) -> (qsys::Daemon, PathBuf) {
    let toml = env.config_toml(fleet.urls(), "");
    let cfg = write(&env.dir, "qsysd.toml", &toml);
    (env.start(&toml), cfg)
}

#[test]
fn wait_follows_tasks_through_qsysd_to_finished() {
    let env = TestEnv::new("pushwait");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_millis(10), Duration::from_millis(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let (daemon, cfg) = daemon_setup(&env, &fleet);
    let text: String = (0..30)
        .map(|i| format!("{}\n", task("start_transcribe", &format!("w{i}"))))
        .collect();
    let out = push(
        &["--config", path(&cfg), "--wait", "--timeout", "90s"],
        &text,
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids().len(), 30);
    assert!(
        out.stderr
            .contains("30 tasks: 30 finished, 0 failed, 0 not done"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains('\r'),
        "no progress bar without a terminal"
    );
    for id in out.ids() {
        assert_eq!(env.task(&id).map(|t| t.0).as_deref(), Some("finished"));
    }
    assert_eq!(fleet.stats().seen().len(), 30);
    stop(daemon);
}

/// Issue 18: on a terminal, `--wait`'s progress line shows an ETA: the time to drain that qsysd
/// publishes for the pools of the tasks' types (`pool_stats`, every 5 s). `script` gives
/// qsys-push a terminal; 16 tasks of 2 s each on one GPU of 4 slots keep the wait past a publish.
#[test]
fn wait_on_a_terminal_shows_the_pools_eta() {
    let env = TestEnv::new("pusheta");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        per_cost: Some(Duration::from_millis(1)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "").replacen(
        "id = \"g0\"\n",
        "id = \"g0\"\nspeed = 1000.0\n",
        1,
    );
    let cfg = write(&env.dir, "qsysd.toml", &toml);
    let daemon = env.start(&toml);
    let tasks: String = (0..16)
        .map(|i| {
            format!(
                "{{\"type\":\"start_transcribe\",\"data\":{{\"task_id\":\"eta-{i}\",\"audio_seconds\":2000}}}}\n"
            )
        })
        .collect();
    let file = write(&env.dir, "tasks.ndjson", &tasks);
    let command = format!(
        "{PUSH} --config {} --file {} --wait --timeout 60s",
        path(&cfg),
        path(&file)
    );
    let out = Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TERM", "dumb")
        .output()
        .expect("run script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("16 tasks: 16 finished"), "{text}");
    // The bar, redrawn on one line, said how long the pool would take at some point.
    assert!(
        text.contains("s  eta "),
        "no ETA on the progress line: {text}"
    );
    stop(daemon);
}

/// Issue 16: `--wait --json` prints one line per task once it has ended: its state, error and the
/// endpoint's result, which round-trips unchanged; a task cancelled before qsysd took it is
/// reported cancelled and the exit status says not all finished.
#[test]
fn wait_json_prints_each_tasks_end_with_its_result() {
    let env = TestEnv::new("pushresults");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_millis(10), Duration::from_millis(60)),
        result_bytes: 500,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let (daemon, cfg) = daemon_setup(&env, &fleet);
    let store =
        qsys::ops::store(&env.config(&std::fs::read_to_string(&cfg).expect("cfg"))).expect("store");
    qsys::ops::cancel(&store, "r-3", Some("not this one")).expect("cancel");
    let text: String = (0..4)
        .map(|i| format!("{}\n", with_id(&format!("r-{i}"))))
        .collect();
    let out = push(
        &[
            "--config",
            path(&cfg),
            "--wait",
            "--json",
            "--timeout",
            "60s",
        ],
        &text,
        &[],
    );
    assert_eq!(out.code, 1, "one task was cancelled: {}", out.stderr);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 4, "{}", out.stdout);
    for (i, line) in lines.iter().enumerate() {
        let id = format!("r-{i}");
        assert_eq!(line["task_id"], id.as_str());
        assert_eq!(line["type"], "start_transcribe");
        if i == 3 {
            // Cancelled before the push: the row was there first, so the copy is already known.
            assert_eq!(line["state"], "cancelled", "{line}");
            continue;
        }
        assert_eq!(line["state"], "finished", "{line}");
        assert_eq!(line["error"], Value::Null);
        let sent = fleet.stats().result_of(&id).expect("the gpu sent a result");
        assert_eq!(line["result"], sent, "{line}");
    }
    assert!(
        out.stderr
            .contains("4 tasks: 3 finished, 0 failed, 0 not done, 1 already known"),
        "{}",
        out.stderr
    );
    stop(daemon);
}

fn with_id(id: &str) -> Value {
    json!({"type": "start_transcribe", "data": {"task_id": id}})
}

/// Issue 14: a reused id whose task already finished is dropped by qsysd as a duplicate; `--wait`
/// says so and exits 1 instead of reporting the old row as this push's result.
#[test]
fn wait_reports_a_reused_id_as_already_known() {
    let env = TestEnv::new("pushreuse");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let (daemon, cfg) = daemon_setup(&env, &fleet);
    let first = push(
        &["--config", path(&cfg), "--wait", "--timeout", "60s"],
        &format!("{}\n", with_id("reused")),
        &[],
    );
    assert_eq!(first.code, 0, "{}", first.stderr);
    let text = format!("{}\n{}\n", with_id("reused"), with_id("fresh"));
    let again = push(
        &["--config", path(&cfg), "--wait", "--timeout", "60s"],
        &text,
        &[],
    );
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(
        again
            .stderr
            .contains("2 tasks: 1 finished, 0 failed, 0 not done, 1 already known"),
        "{}",
        again.stderr
    );
    assert!(
        again
            .stderr
            .contains("already known, not run again: reused (finished)"),
        "{}",
        again.stderr
    );
    assert_eq!(fleet.stats().seen().get("reused"), Some(&1));
    stop(daemon);
}

#[test]
fn wait_exits_1_when_a_task_fails_or_time_runs_out() {
    let env = TestEnv::new("pushwaitfail");
    // Before any daemon made the database: waiting, not an error, until the timeout.
    let early = config(&env, "early.toml", "");
    let out = push(
        &[
            "--config",
            path(&early),
            "--type",
            "a",
            "--wait",
            "--timeout",
            "1s",
        ],
        "",
        &[],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("1 tasks: 0 finished, 0 failed, 1 not done")
            && out.stderr.contains("timed out after 1s")
            && out
                .stderr
                .contains(&format!("not done: {}", out.stdout.trim())),
        "{}",
        out.stderr
    );
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let (daemon, cfg) = daemon_setup(&env, &fleet);
    let cfg = path(&cfg);
    // The config has no [types] table, so the producer cannot check types; qsysd fails it.
    let event = json!({"tasks": [task("start_transcribe", "fine"),
                                 {"type": "make_coffee", "data": {"task_id": "coffee"}}]});
    let out = push(
        &["--config", cfg, "--wait", "--timeout", "60s"],
        &event.to_string(),
        &[],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("2 tasks: 1 finished, 1 failed, 0 not done"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("failed: coffee: unknown task type \"make_coffee\""),
        "{}",
        out.stderr
    );
    // A queue no daemon reads: the wait ends at its timeout.
    let nobody = env.queue("nobody");
    let out = push(
        &[
            "--config",
            cfg,
            "--type",
            "start_transcribe",
            "--queue",
            &nobody,
            "--wait",
            "--timeout",
            "1s",
        ],
        "",
        &[],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("timed out after 1s"), "{}", out.stderr);
    assert_eq!(env.llen("nobody"), 1);
    stop(daemon);
}

/// A fake Lambda Runtime API: hands out `events` in order, then holds `next` open; records every
/// result post as `(path, body)`.
struct FakeRuntime {
    addr: String,
    posts: crossbeam_channel::Receiver<(String, Value)>,
    stopping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeRuntime {
    fn start(events: Vec<Value>) -> FakeRuntime {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
        let addr = server.server_addr().to_ip().expect("ip").to_string();
        let (tx, posts) = crossbeam_channel::unbounded();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let thread = std::thread::spawn(move || {
            let mut events = events.into_iter().enumerate();
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                let url = req.url().to_string();
                if url == "/2018-06-01/runtime/invocation/next" {
                    match events.next() {
                        Some((i, event)) => {
                            let id = tiny_http::Header::from_bytes(
                                "Lambda-Runtime-Aws-Request-Id",
                                format!("req-{i}"),
                            )
                            .expect("header");
                            let _ = req.respond(
                                tiny_http::Response::from_string(event.to_string()).with_header(id),
                            );
                        }
                        // The real API blocks until the next event; so does this one.
                        None => held.push(req),
                    }
                } else {
                    let mut body = String::new();
                    let _ = req.as_reader().read_to_string(&mut body);
                    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
                    let _ = tx.send((url, body));
                    let _ = req.respond(
                        tiny_http::Response::from_string("{\"status\":\"OK\"}")
                            .with_status_code(202),
                    );
                }
            }
        });
        FakeRuntime {
            addr,
            posts,
            stopping,
            thread: Some(thread),
        }
    }

    fn post(&self) -> (String, Value) {
        self.posts
            .recv_timeout(Duration::from_secs(20))
            .expect("a result post from the runtime")
    }
}

impl Drop for FakeRuntime {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn lambda_runtime_pushes_good_events_and_reports_bad_ones() {
    let env = TestEnv::new("pushlambda");
    let cfg = config(&env, "producer.toml", "");
    let q2 = env.queue("q2");
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(json!({"tasks": [task("a", "api1"), task("b", "api2")]}).to_string());
    let runtime = FakeRuntime::start(vec![
        json!({"Records": [
            {"eventSource": "aws:sqs", "body": task("start_transcribe", "sqs1").to_string()},
            {"eventSource": "aws:sqs", "body": json!({"type": "send_email", "data": {"task_id": "mail-1"}}).to_string()}
        ]}),
        json!({"key1": "value1", "key2": "value2", "key3": "value3"}),
        json!({"tasks": [task("a", "ok"), {"type": "a", "data": []}]}),
        json!({"httpMethod": "POST", "body": b64, "isBase64Encoded": true}),
    ]);
    let mut child = Command::new(PUSH)
        .args(["--config", path(&cfg)])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_LAMBDA_RUNTIME_API", &runtime.addr)
        .env("QUEUE_NAME", &q2)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the runtime");

    let (url, body) = runtime.post();
    assert_eq!(url, "/2018-06-01/runtime/invocation/req-0/response");
    assert_eq!(body["statusCode"], 200);
    let receipts = body["body"].as_array().expect("body: the pushed tasks");
    assert_eq!(receipts.len(), 2);
    assert_eq!(receipts[0]["queue"], q2.as_str());
    assert_eq!(receipts[0]["type"], "start_transcribe");
    assert_eq!(
        receipts[1],
        json!({"task_id": "mail-1", "queue": q2, "type": "send_email"})
    );

    let (url, body) = runtime.post();
    assert_eq!(url, "/2018-06-01/runtime/invocation/req-1/error");
    assert_eq!(body["errorType"], "InvalidEvent");
    let msg = body["errorMessage"].as_str().expect("message");
    assert!(
        msg.contains("unrecognised shape (fields: key1, key2, key3)"),
        "{msg}"
    );

    let (url, body) = runtime.post();
    assert_eq!(url, "/2018-06-01/runtime/invocation/req-2/error");
    assert!(
        body["errorMessage"]
            .as_str()
            .is_some_and(|m| m.contains("tasks[1].data: must be an object")),
        "{body}"
    );

    let (url, body) = runtime.post();
    assert_eq!(url, "/2018-06-01/runtime/invocation/req-3/response");
    let api: Value =
        serde_json::from_str(body["body"].as_str().expect("API Gateway: a string body"))
            .expect("json body");
    assert_eq!(api.as_array().map(Vec::len), Some(2));

    // Still running, blocked on the next invocation.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the runtime exited"
    );
    child.kill().expect("kill the runtime");
    let out = child.wait_with_output().expect("runtime output");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("request req-0: pushed 2 tasks"), "{log}");

    let items = seed_elements(&env, "q2");
    let keys: Vec<Value> = items.iter().map(|(_, d)| d["s3_key"].clone()).collect();
    assert_eq!(
        keys,
        [json!("sqs1"), Value::Null, json!("api1"), json!("api2")],
        "the good events, and nothing of the bad ones"
    );
    assert_eq!(items[0].1["task_id"], receipts[0]["task_id"]);
    assert_eq!(items[1].1["task_id"], "mail-1");
    assert_eq!(env.llen("q1"), 0);
}

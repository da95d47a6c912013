//! Operations against a running daemon: `/metrics` (checked by `promtool`), `/status`,
//! `/tasks/<id>`, the admin token, and the `qsysd status | drain | undrain | requeue | task`
//! commands, with drains surviving a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{stop, transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};

const QSYSD: &str = env!("CARGO_BIN_EXE_qsysd");

fn qsysd(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(QSYSD)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_clear()
        .output()
        .expect("run qsysd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = qsys::http::agent().get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    match req.call() {
        Ok(mut r) => (
            r.status().as_u16(),
            r.body_mut().read_to_string().unwrap_or_default(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// A config file for the CLI that points at the running daemon's admin address.
fn cli_config(env: &TestEnv, text: &str, admin: std::net::SocketAddr) -> std::path::PathBuf {
    let p = env.dir.join("cli.toml");
    std::fs::write(
        &p,
        text.replace(
            "127.0.0.1:0\"\n\n[daemon]",
            &format!("{admin}\"\n\n[daemon]"),
        ),
    )
    .expect("config");
    p
}

/// The Grafana dashboard shipped in `packaging/grafana/qsysd.json`: every panel's query is valid
/// PromQL (`promtool check rules`, each query as a recording rule) and names only metrics that
/// `exported` (a daemon's `/metrics`) has, so the dashboard cannot rot with the metrics.
fn dashboard_queries_are_valid_and_use_these_metrics(env: &TestEnv, exported: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/grafana/qsysd.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut rules = String::from("groups:\n  - name: qsysd_dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: qsysd_dashboard_{i}\n        expr: {}\n",
            serde_json::Value::String(e.clone())
        ));
        for name in e
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("qsys_"))
        {
            assert!(
                exported.contains(&format!("\n{name}"))
                    || exported.contains(&format!("\n{name}{{")),
                "the dashboard queries {name}, which /metrics does not export"
            );
        }
    }
    let file = env.dir.join("dashboard-rules.yml");
    std::fs::write(&file, rules).expect("rules");
    promtool_accepts_rules(&file);
}

/// `promtool check rules FILE` succeeds.
fn promtool_accepts_rules(file: &std::path::Path) {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(file)
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alert rules shipped in `packaging/prometheus/qsysd-alerts.yml` (issue 17): `promtool check
/// rules` accepts them and every `qsys_` metric they use is one `exported` has.
fn alert_rules_are_valid_and_use_these_metrics(exported: &str) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/prometheus/qsysd-alerts.yml"
    );
    let text = std::fs::read_to_string(path).expect("alert rules");
    assert!(
        text.contains("qsys_queue_oldest_seconds"),
        "the latency alert"
    );
    for name in text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("qsys_"))
    {
        assert!(
            exported.contains(&format!("\n{name}{{")) || exported.contains(&format!("\n{name} ")),
            "the alert rules use {name}, which /metrics does not export"
        );
    }
    promtool_accepts_rules(std::path::Path::new(path));
}

#[test]
fn metrics_pass_promtool_and_status_shows_everything() {
    let env = TestEnv::new("metrics");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        fail_rate: 0.2,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), "[retry]\nbackoff = \"50ms\"\n"));
    env.push_raw("q1", &transcriptions("m", 40));
    assert!(wait_for(Duration::from_secs(60), || {
        env.count("state IN ('finished','failed')") == 40
    }));
    let admin = daemon.admin_addr();
    let (code, text) = get(&format!("http://{admin}/metrics"), None);
    assert_eq!(code, 200);
    for want in [
        "qsys_tasks{state=\"finished\",type=\"start_transcribe\"}",
        "qsys_queue_depth{queue=",
        "qsys_gpu_slots{gpu=\"g0\"} 4",
        "qsys_gpu_slots_busy{gpu=\"g1\"}",
        "qsys_gpu_up{gpu=\"g0\"}",
        "qsys_dispatch_duration_seconds_bucket{le=\"+Inf\"}",
        "qsys_task_duration_seconds_count",
        "qsys_callbacks_total{result=\"applied\"}",
        "qsys_retries_total",
        "qsys_errors_total{kind=\"dispatch\"}",
    ] {
        assert!(text.contains(want), "no {want} in\n{text}");
    }
    dashboard_queries_are_valid_and_use_these_metrics(&env, &text);
    alert_rules_are_valid_and_use_these_metrics(&text);
    let metrics = env.dir.join("metrics.txt");
    std::fs::write(&metrics, &text).expect("write");
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&metrics).expect("open"))
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    assert!(
        promtool.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&promtool.stdout),
        String::from_utf8_lossy(&promtool.stderr)
    );
    // /status and the CLI's table.
    let (code, body) = get(&format!("http://{admin}/status"), None);
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(doc["gpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(doc["gpus"][0]["cells"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        doc["states"]["finished"].as_u64().unwrap_or(0)
            + doc["states"]["failed"].as_u64().unwrap_or(0),
        40
    );
    let cfg = cli_config(&env, &env.config_toml(fleet.urls(), ""), admin);
    let (code, out, err) = qsysd(&cfg, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("g0") && out.contains("g1") && out.contains("DISPATCHED"),
        "{out}"
    );
    assert!(out.contains(&env.queue("q1")), "{out}");
    let (code, out, _) = qsysd(&cfg, &["status", "--json"]);
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok());
    // /tasks/<id> and `qsysd task`.
    let (code, body) = get(&format!("http://{admin}/tasks/m-0"), None);
    assert_eq!(code, 200);
    let t: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(t["task"]["task_id"], "m-0");
    assert!(!t["attempts"].as_array().expect("attempts").is_empty());
    assert_eq!(get(&format!("http://{admin}/tasks/nope"), None).0, 404);
    let (code, out, _) = qsysd(&cfg, &["task", "m-0"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("task      m-0") && out.contains("OUTCOME"),
        "{out}"
    );
    let (code, _, err) = qsysd(&cfg, &["task", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown task"), "{err}");
    stop(daemon);
}

#[test]
fn admin_token_protects_everything_but_healthz() {
    let env = TestEnv::new("admintok");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let text = env
        .config_toml(fleet.urls(), "")
        .replace("[admin]\n", "[admin]\ntoken = \"admin-token-123\"\n");
    let daemon = env.start(&text);
    let admin = daemon.admin_addr();
    assert_eq!(get(&format!("http://{admin}/status"), None).0, 401);
    assert_eq!(
        get(&format!("http://{admin}/metrics"), Some("wrong")).0,
        401
    );
    assert_eq!(
        get(&format!("http://{admin}/status"), Some("admin-token-123")).0,
        200
    );
    assert_eq!(get(&format!("http://{admin}/healthz"), None).0, 200);
    // The CLI sends the token from the config.
    let cfg = cli_config(&env, &text, admin);
    let (code, out, err) = qsysd(&cfg, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("g0"));
    stop(daemon);
}

#[test]
fn drain_and_undrain_persist_across_a_restart() {
    let env = TestEnv::new("drain");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let text = env.config_toml(fleet.urls(), "");
    let daemon = env.start(&text);
    let cfg = cli_config(&env, &text, daemon.admin_addr());
    let (code, out, err) = qsysd(&cfg, &["drain", "g1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("g1 drained"));
    assert_eq!(qsysd(&cfg, &["drain", "g9"]).0, 1, "unknown gpu");
    // Within a second the running daemon honours it: everything goes to g0.
    assert!(wait_for(Duration::from_secs(5), || daemon.slots()[1].drained));
    env.push_raw("q1", &transcriptions("d1", 30));
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'finished'")
        == 30));
    assert_eq!(
        fleet.stats().received(1),
        0,
        "a drained gpu takes nothing new"
    );
    // Across a restart.
    stop(daemon);
    let daemon = env.start(&text);
    assert!(daemon.slots()[1].drained, "drain survives a restart");
    let cfg = cli_config(&env, &text, daemon.admin_addr());
    let (_, out, _) = qsysd(&cfg, &["status"]);
    assert!(out.contains("drained"), "{out}");
    // Undrain through the admin API this time.
    let r = qsys::http::agent()
        .post(format!("http://{}/gpus/g1/undrain", daemon.admin_addr()))
        .send_empty()
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    assert!(!daemon.slots()[1].drained);
    env.push_raw("q1", &transcriptions("d2", 30));
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'finished'")
        == 60));
    assert!(fleet.stats().received(1) > 0, "undrained gpu works again");
    stop(daemon);
}

#[test]
fn requeue_failed_tasks_with_a_fresh_attempt_count() {
    let env = TestEnv::new("requeue");
    let marker = env.dir.join("broken");
    std::fs::write(&marker, "").expect("marker");
    let extra = format!(
        "[retry]\nmax_attempts = 2\nbackoff = \"50ms\"\n[types.flaky]\nhandler = \"exec\"\n\
         command = [\"/bin/sh\", \"-c\", \"test ! -e {}\"]\n",
        marker.display()
    );
    let text = env.config_toml(&[], &extra);
    let daemon = env.start(&text);
    let items: Vec<String> = (0..4)
        .map(|i| format!(r#"{{"type": "flaky", "data": {{"task_id": "f-{i}"}}}}"#))
        .collect();
    env.push_raw("q1", &items);
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'failed'")
        == 4));
    std::fs::remove_file(&marker).expect("fix the handler");
    let cfg = cli_config(&env, &text, daemon.admin_addr());
    // One by id, the rest by state and age.
    let (code, out, err) = qsysd(&cfg, &["requeue", "f-0"]);
    assert_eq!((code, out.trim()), (0, "f-0"), "{err}");
    assert!(wait_for(Duration::from_secs(20), || {
        env.task("f-0").is_some_and(|t| t.0 == "finished")
    }));
    let (code, out, err) = qsysd(&cfg, &["requeue", "--state", "failed", "--since", "1h"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(wait_for(Duration::from_secs(20), || env
        .count("state = 'finished'")
        == 4));
    // A finished task is not requeued again by accident; bad arguments exit 2.
    let (code, _, err) = qsysd(&cfg, &["requeue", "f-0", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        qsysd(&cfg, &["requeue", "--state", "pending", "--since", "1h"]).0,
        2
    );
    assert_eq!(qsysd(&cfg, &["requeue"]).0, 2);
    // The history keeps every attempt: two failed, then the one that finished.
    let tries: Vec<(u32, String)> = env
        .query("SELECT attempt, outcome FROM task_attempts WHERE task_id = 'f-1' ORDER BY attempt");
    assert_eq!(
        tries,
        [
            (1, "failed".into()),
            (2, "failed".into()),
            (3, "finished".into())
        ]
    );
    let requeues: Vec<u32> = env.query("SELECT requeues FROM tasks WHERE task_id = 'f-1'");
    assert_eq!(requeues, [1]);
    let (_, out, _) = qsysd(&cfg, &["task", "f-1"]);
    assert!(
        out.contains("requeued 1 times") && out.contains("finished"),
        "{out}"
    );
    stop(daemon);
}

/// A daemon on one fake GPU whose admin listener wants `token`.
fn daemon_with_admin_token(env: &TestEnv, token: &str) -> (qsys::Daemon, Fleet) {
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(
        &env.config_toml(fleet.urls(), "")
            .replace("[admin]\n", &format!("[admin]\ntoken = \"{token}\"\n")),
    );
    (daemon, fleet)
}

/// `docs/openapi.json` and the daemon agree: the served document is the file; every documented
/// operation, called as documented (on its listener, with the token), answers a status the
/// document lists for it; and paths it does not document are 404 on both listeners.
#[test]
fn the_openapi_document_and_the_routes_agree() {
    let env = TestEnv::new("openapi");
    let token = "admin-token-0123456789abcdef";
    let (daemon, _fleet) = daemon_with_admin_token(&env, token);
    env.push_raw("q1", &transcriptions("oa", 1));
    assert!(wait_for(Duration::from_secs(20), || env
        .count("state = 'finished'")
        == 1));
    let admin = daemon.admin_addr();
    let callback = daemon.callback_addr();
    let file: serde_json::Value = serde_json::from_str(include_str!("../docs/openapi.json"))
        .expect("docs/openapi.json is JSON");
    let (code, served) = get(&format!("http://{admin}/openapi.json"), Some(token));
    assert_eq!(code, 200);
    let served: serde_json::Value = serde_json::from_str(&served).expect("served JSON");
    assert_eq!(served, file, "the served document is docs/openapi.json");
    assert_eq!(file["openapi"], "3.1.0");
    let agent = qsys::http::agent();
    let paths = file["paths"].as_object().expect("paths");
    let mut called = 0;
    for (path, item) in paths {
        let concrete = path
            .replace("{id}", "oa-0")
            .replace("{gpu}", "g0")
            .replace("{queue}", &env.queue("q1"))
            .replace("{type}", "start_transcribe");
        let on_callback = item["servers"].as_array().is_some_and(|s| {
            s.iter()
                .any(|v| v["url"].as_str().is_some_and(|u| u.contains("{callback}")))
        });
        let on_admin = item["servers"].as_array().is_none_or(|s| {
            s.iter()
                .any(|v| v["url"].as_str().is_some_and(|u| u.contains("{admin}")))
        });
        for (method, op) in item.as_object().expect("path item") {
            if !["get", "post"].contains(&method.as_str()) {
                continue;
            }
            let listed: Vec<u16> = op["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .map(|k| k.parse().expect("status code"))
                .collect();
            let mut hosts = Vec::new();
            if on_admin {
                hosts.push(admin);
            }
            if on_callback {
                hosts.push(callback);
            }
            for host in hosts {
                let url = format!("http://{host}{concrete}");
                let mut req = match method.as_str() {
                    "get" => agent
                        .get(&url)
                        .header("Authorization", format!("Bearer {token}"))
                        .call(),
                    _ => agent
                        .post(&url)
                        .header("Authorization", format!("Bearer {token}"))
                        .header("Content-Type", "application/json")
                        .send("{}"),
                };
                let status = req.as_mut().map(|r| r.status().as_u16()).unwrap_or(0);
                assert!(
                    listed.contains(&status),
                    "{} {url} answered {status}, not one of {listed:?}",
                    method.to_uppercase()
                );
                called += 1;
            }
        }
    }
    assert!(called >= 11, "{called} operations called");
    for (host, path) in [
        (admin, "/nowhere"),
        (admin, "/tasks"),
        (callback, "/status"),
        (callback, "/metrics"),
    ] {
        let (code, _) = get(&format!("http://{host}{path}"), Some(token));
        assert_eq!(
            code, 404,
            "{path} on {host} is not documented, so it must not exist"
        );
    }
    stop(daemon);
}

/// schemathesis (from PyPI; `scripts/test.sh` installs it under `target/schemathesis`) against a
/// running daemon, each listener with the operations it serves, a fixed seed and a bounded number
/// of examples: no 5xx, no crash, every reply as `docs/openapi.json` documents it.
#[test]
fn schemathesis_finds_nothing_on_either_listener() {
    let st = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/schemathesis/bin/st");
    assert!(
        st.exists(),
        "schemathesis is not installed at {}: run scripts/test.sh, which installs it from PyPI",
        st.display()
    );
    let env = TestEnv::new("schemathesis");
    let token = "st-admin-token-0123456789";
    let (daemon, _fleet) = daemon_with_admin_token(&env, token);
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
    let auth = format!("Authorization: Bearer {token}");
    let admin_url = format!("http://{}", daemon.admin_addr());
    let callback_url = format!("http://{}", daemon.callback_addr());
    let runs: [Vec<&str>; 2] = [
        vec![
            "--url",
            &admin_url,
            "--exclude-path",
            "/callback",
            "-H",
            &auth,
            "--max-examples",
            "10",
        ],
        vec![
            "--url",
            &callback_url,
            "--include-path-regex",
            "^/(callback|healthz)$",
            "--max-examples",
            "30",
        ],
    ];
    for args in runs {
        let out = Command::new(&st)
            .args(["run", spec, "--seed", "1", "--no-color"])
            .args(&args)
            .output()
            .expect("run schemathesis");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis {args:?} found problems:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop(daemon);
}

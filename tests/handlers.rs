//! `exec` and `http` handlers for the non-GPU task types, against real processes and a real HTTP
//! server; none of them ever takes a GPU slot.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{stop, wait_for, Spawned, TestEnv};
use fakefleet::{Fleet, FleetConfig};

/// A report service on port 0: records bodies and answers 500 when the data says so.
fn report_server() -> (String, Arc<Mutex<HashMap<String, serde_json::Value>>>) {
    let server = tiny_http::Server::http("127.0.0.1:0").expect("bind");
    let url = format!(
        "http://{}/generate",
        server.server_addr().to_ip().expect("ip")
    );
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let seen2 = Arc::clone(&seen);
    std::thread::spawn(move || {
        for mut req in server.incoming_requests() {
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let id = v["task_id"].as_str().unwrap_or("").to_string();
            let code = if v["data"]["report_type"] == "broken" {
                500
            } else {
                200
            };
            seen2.lock().expect("lock").insert(id, v);
            let _ = req.respond(tiny_http::Response::from_string("nope").with_status_code(code));
        }
    });
    (url, seen)
}

#[test]
fn exec_and_http_handlers_run_outside_gpu_slots() {
    let env = TestEnv::new("handlers");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let out = env.dir.join("out");
    std::fs::create_dir_all(&out).expect("out dir");
    let script = env.dir.join("handler.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
input=$(cat)
case "$QSYS_TASK_TYPE" in
  send_email) printf '%s\n%s\n' "$QSYS_TASK_ID" "$input" > "$1/$QSYS_TASK_ID" ;;
  cleanup) echo "cleanup: user 789 is locked" >&2; exit 3 ;;
  slow) sleep 60 & echo $! > "$1/child.pid"; sleep 60 ;;
esac
"#,
    )
    .expect("script");
    let (report_url, reports) = report_server();
    // A password in the handler's URL is never shown in a task's error.
    let report_url = report_url.replace("http://", "http://reports:pw-Hx93@");
    let sh = |t: &str| {
        format!(
            "[types.{t}]\nhandler = \"exec\"\ncommand = [\"/bin/sh\", \"{}\", \"{}\"]\n",
            script.display(),
            out.display()
        )
    };
    let extra = format!(
        "{}{}{}[types.slow]\nhandler = \"exec\"\ncommand = [\"/bin/sh\", \"{}\", \"{}\"]\ntimeout = \"1s\"\n\
         [types.generate_report]\nhandler = \"http\"\nurl = \"{report_url}\"\n\
         [types.start_transcribe]\nhandler = \"gpu\"\n",
        sh("send_email"),
        sh("cleanup"),
        "",
        script.display(),
        out.display()
    );
    let daemon = env.start(&env.config_toml(fleet.urls(), &extra));
    env.push_raw(
        "q1",
        &[
            r#"{"type": "send_email", "data": {"user_id": 123, "email": "user@example.com", "subject": "Test Email", "task_id": "mail-1"}}"#.into(),
            r#"{"type": "cleanup", "data": {"user_id": 789, "task_id": "clean-1"}}"#.into(),
            r#"{"type": "slow", "data": {"task_id": "slow-1"}}"#.into(),
            r#"{"type": "generate_report", "data": {"user_id": 456, "report_type": "monthly", "task_id": "rep-1"}}"#.into(),
            r#"{"type": "generate_report", "data": {"user_id": 456, "report_type": "broken", "task_id": "rep-2"}}"#.into(),
        ],
    );
    let terminal = |id: &str| {
        env.task(id)
            .is_some_and(|t| t.0 == "finished" || t.0 == "failed")
    };
    assert!(
        wait_for(Duration::from_secs(30), || {
            ["mail-1", "clean-1", "slow-1", "rep-1", "rep-2"]
                .iter()
                .all(|id| terminal(id))
        }),
        "{:?}",
        env.states()
    );

    // exec: stdin has the task JSON, the environment the id and type; exit 0 = finished.
    assert_eq!(env.task("mail-1").map(|t| t.0).as_deref(), Some("finished"));
    let written = std::fs::read_to_string(out.join("mail-1")).expect("handler output");
    let mut lines = written.lines();
    assert_eq!(lines.next(), Some("mail-1"));
    let input: serde_json::Value = serde_json::from_str(lines.next().expect("json")).expect("json");
    assert_eq!(input["type"], "send_email");
    assert_eq!(input["data"]["email"], "user@example.com");
    assert_eq!(input["attempt"], 1);
    // A non-zero exit keeps the tail of stderr as the error.
    let (state, error) = env.task("clean-1").expect("row");
    let error = error.unwrap_or_default();
    assert_eq!(state, "failed");
    assert!(
        error.contains("exit status 3") && error.contains("user 789 is locked"),
        "{error}"
    );
    // A timeout kills the whole process group, the handler's own children included.
    let (state, error) = env.task("slow-1").expect("row");
    assert_eq!(state, "failed");
    assert!(error.unwrap_or_default().contains("timed out after 1s"));
    let pid: i32 = std::fs::read_to_string(out.join("child.pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        wait_for(Duration::from_secs(5), || unsafe { libc::kill(pid, 0) }
            != 0),
        "the handler's child {pid} survived the timeout"
    );
    // http: 2xx finished, anything else failed with the status.
    assert_eq!(env.task("rep-1").map(|t| t.0).as_deref(), Some("finished"));
    let (state, error) = env.task("rep-2").expect("row");
    assert_eq!(state, "failed");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("HTTP 500") && error.contains("reports:***@") && !error.contains("pw-Hx93"),
        "{error}"
    );
    assert_eq!(
        reports.lock().expect("lock")["rep-1"]["data"]["user_id"],
        456
    );
    // None of them touched a GPU.
    assert!(fleet.stats().seen().is_empty());
    let gpu_rows: Vec<u64> = env.query("SELECT COUNT(*) FROM tasks WHERE gpu_id IS NOT NULL");
    assert_eq!(gpu_rows[0], 0);
    stop(daemon);
}

#[test]
fn handler_tasks_flow_while_every_gpu_slot_is_busy() {
    let env = TestEnv::new("hflow");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_secs(60), Duration::from_secs(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = "[gpu]\nslots = 1\n[types.start_transcribe]\nhandler = \"gpu\"\n\
                 [types.cleanup]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n";
    let daemon = env.start(&env.config_toml(fleet.urls(), extra));
    let mut items = common::transcriptions("busy", 3);
    items.extend(
        (0..20).map(|i| format!(r#"{{"type": "cleanup", "data": {{"task_id": "c-{i}"}}}}"#)),
    );
    env.push_raw("q1", &items);
    assert!(
        wait_for(Duration::from_secs(30), || {
            env.count("state = 'finished' AND type = 'cleanup'") == 20
        }),
        "{:?}",
        env.states()
    );
    assert_eq!(
        env.task("busy-0").map(|t| t.0).as_deref(),
        Some("processing")
    );
    stop(daemon);
}

/// Threads of process `pid` now.
fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Kills the processes whose pids are listed in a file, when the test ends however it ends.
struct KillListed(std::path::PathBuf);

impl Drop for KillListed {
    fn drop(&mut self) {
        for pid in std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: signalling a process this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Waits for a spawned daemon to be up (its schema exists from then on).
fn started(log: &std::path::Path) {
    assert!(
        common::wait_log(log, "qsysd starting", Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// An `exec` program sees the daemon's PATH and LANG, the variables its type's `env` lists (those
/// set), its QSYS_* variables, and nothing else: none of the daemon's secrets, set or empty.
#[test]
fn exec_programs_get_only_a_minimal_environment() {
    let env = TestEnv::new("hexecenv");
    let out = env.dir.join("environ");
    let extra = format!(
        "[types.showenv]\nhandler = \"exec\"\n\
         command = ['/bin/sh', '-c', 'cat /proc/$$/environ > \"$0\"', '{}']\n\
         env = [\"HANDLER_REGION\", \"HTTPS_PROXY\"]\n",
        out.display()
    );
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, env.config_toml(&[], &extra)).expect("config");
    let log = env.dir.join("qsysd.log");
    let daemon_env = [
        ("PATH", "/usr/bin:/bin"),
        ("LANG", "C.UTF-8"),
        ("HOME", "/root"),
        ("BEARER_TOKEN", "bearer-secret"),
        ("AWS_SECRET_ACCESS_KEY", "aws-secret"),
        // Empty: the config ignores them, a child must not see them either.
        ("DB_PASSWORD", ""),
        ("REDIS_PASSWORD", ""),
        ("HANDLER_REGION", "eu-west-2"),
    ];
    let envs: Vec<(&str, String)> = daemon_env
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    let mut child = Spawned(common::spawn_qsysd(&cfg, &log, &envs));
    started(&log);
    env.push_raw(
        "q1",
        &[r#"{"type": "showenv", "data": {"task_id": "env-1"}}"#.into()],
    );
    let finished = wait_for(Duration::from_secs(30), || {
        env.task("env-1").is_some_and(|t| t.0 == "finished")
    });
    assert!(child.sigterm().success());
    assert!(
        finished,
        "{:?}\n{}",
        env.task("env-1"),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let seen: std::collections::BTreeMap<String, String> = std::fs::read(&out)
        .expect("the program wrote its environment")
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').expect("NAME=value");
            (k.to_string(), v.to_string())
        })
        .collect();
    let expected: std::collections::BTreeMap<String, String> = [
        ("PATH", "/usr/bin:/bin"),
        ("LANG", "C.UTF-8"),
        ("HANDLER_REGION", "eu-west-2"),
        ("QSYS_TASK_ID", "env-1"),
        ("QSYS_TASK_TYPE", "showenv"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(seen, expected);
}

/// A program whose descendants keep its stdin and stderr open (in its process group, or in a
/// session of their own, as a daemon does), with more input than a pipe holds, so that nothing
/// reads it: each task still ends within its timeout plus the 1 s pipe grace, and the daemon is
/// left with no thread more than before (reader and feeder threads used to block until the
/// descendants died).
#[test]
fn descendants_holding_the_pipes_hold_neither_worker_nor_thread() {
    let env = TestEnv::new("hpipes");
    let pids = env.dir.join("pids");
    let _cleanup = KillListed(pids.clone());
    let script = env.dir.join("hold.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
# $1: where descendants' pids go. Each keeps stdin (as fd 3) and stderr open for 1000 s.
exec 3<&0
case "$QSYS_TASK_ID" in
  bg-*) sleep 1000 0<&3 & echo $! >> "$1"; echo "left a child" >&2 ;;
  daemon-*) setsid sleep 1000 0<&3 & echo $! >> "$1"; exit 4 ;;
  hang-*) setsid sleep 1000 0<&3 & echo $! >> "$1"; sleep 1000 ;;
  *) exit 0 ;;
esac
"#,
    )
    .expect("script");
    let extra = format!(
        "[types.hold]\nhandler = \"exec\"\ncommand = [\"/bin/sh\", \"{}\", \"{}\"]\n\
         timeout = \"1s\"\n[retry]\nmax_attempts = 1\n",
        script.display(),
        pids.display()
    );
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, env.config_toml(&[], &extra)).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut child = Spawned(common::spawn_qsysd(
        &cfg,
        &log,
        &[("PATH", "/usr/bin:/bin".into())],
    ));
    started(&log);
    let task = |id: &str| {
        format!(
            r#"{{"type": "hold", "data": {{"task_id": "{id}", "blob": "{}"}}}}"#,
            "x".repeat(200_000)
        )
    };
    // A plain run first, so that whatever the daemon starts on first use is running.
    env.push_raw("q1", &[task("warm-up")]);
    assert!(
        wait_for(Duration::from_secs(30), || env
            .task("warm-up")
            .is_some_and(|t| t.0 == "finished")),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let before = threads(child.id());
    let ids: Vec<String> = ["bg", "daemon", "hang"]
        .iter()
        .flat_map(|kind| (0..2).map(move |i| format!("{kind}-{i}")))
        .collect();
    env.push_raw("q1", &ids.iter().map(|id| task(id)).collect::<Vec<_>>());
    let ended = |id: &str| {
        env.task(id)
            .is_some_and(|t| t.0 == "finished" || t.0 == "failed")
    };
    let all_ended = wait_for(Duration::from_secs(30), || ids.iter().all(|id| ended(id)));
    let leaked = !wait_for(Duration::from_secs(3), || threads(child.id()) <= before);
    let after = threads(child.id());
    assert!(child.sigterm().success());
    assert!(all_ended, "{:?}", env.states());
    assert!(!leaked, "qsysd had {before} threads, then {after}");
    for id in &ids {
        let (state, error) = env.task(id).expect("row");
        let error = error.unwrap_or_default();
        match &id[..id.find('-').expect("kind-n")] {
            "bg" => assert_eq!(state, "finished", "{id}: {error}"),
            "daemon" => assert!(error.starts_with("exit status 4"), "{id}: {error}"),
            _ => assert!(error.starts_with("timed out after 1s"), "{id}: {error}"),
        }
    }
    // Each ran for its timeout (1 s, the hanging ones) and the pipe grace (1 s) at most, with a
    // margin for a busy machine.
    let took: Vec<(String, f64)> = env.query(
        "SELECT task_id, TIMESTAMPDIFF(MICROSECOND, started_at, ended_at) / 1e6 \
         FROM task_attempts WHERE task_id <> 'warm-up'",
    );
    assert_eq!(took.len(), ids.len());
    for (id, secs) in &took {
        assert!(*secs < 3.5, "{id} took {secs} s");
    }
    // The grandchildren were started (the test holds what it claims to).
    let listed = std::fs::read_to_string(&pids).unwrap_or_default();
    assert_eq!(listed.split_whitespace().count(), ids.len(), "{listed}");
}

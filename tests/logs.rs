//! Logs: no secret ever appears in a log line, and under journald every record of a task carries
//! its `TASK_ID=`, `GPU=` and `QUEUE=` fields.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{transcriptions, wait_for, wait_log, OwnServer, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use mysql::prelude::Queryable;
use qsys::Secret;
use qsys::Signer;

fn sigterm(child: &mut Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn no_secret_in_any_log_line() {
    const REDIS_PW: &str = "redis-pw-Zq81kX";
    const DB_PW: &str = "db-pw-Lm42vQ";
    const CALLBACK_SECRET: &str = "callback-secret-Hy77pW0123";
    const GPU_TOKEN: &str = "gpu-token-Rt55nB";
    const WRONG_TOKEN: &str = "wrong-token-Kc19dD";
    let dir = std::env::temp_dir().join(format!("qsys-logs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = OwnServer::redis_with_password(&dir, REDIS_PW);
    let env = TestEnv::on(
        "logsecret",
        &format!("redis://:{REDIS_PW}@127.0.0.1:{}/0", redis.port),
        "mysql://root@127.0.0.1:3306",
    );
    // A MySQL user with a password, for this test only.
    let user = format!("qsys_log_{}", std::process::id());
    let mut root =
        mysql::Conn::new(mysql::Opts::from_url("mysql://root@127.0.0.1:3306").expect("url"))
            .expect("mysql");
    for host in ["%", "localhost"] {
        root.query_drop(format!(
            "CREATE USER IF NOT EXISTS '{user}'@'{host}' IDENTIFIED BY '{DB_PW}'"
        ))
        .expect("create user");
        root.query_drop(format!(
            "GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'{host}'",
            env.db
        ))
        .expect("grant");
    }
    let good = Fleet::start(FleetConfig {
        gpus: 1,
        token: Some(GPU_TOKEN.into()),
        lose_rate: 0.3,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let text = env
        .config_toml(good.urls(), "")
        .replace("secret = \"", "# ")
        .replace(
            "[callback]",
            &format!("[callback]\nsecret = \"{CALLBACK_SECRET}\""),
        )
        .replace("mysql://root@", &format!("mysql://{user}:{DB_PW}@"))
        .replace(
            "[daemon]",
            &format!(
                "[gpu]\nbearer_token = \"{GPU_TOKEN}\"\ntask_timeout = \"1s\"\n\
                 [retry]\nmax_attempts = 2\nbackoff = \"50ms\"\n\
                 [daemon]\nlog_level = \"trace\"\nlog_target = \"stderr\""
            ),
        )
        // A second endpoint with the wrong token: its dispatches fail with 401.
        + &format!(
            "\n[[gpu.endpoints]]\nid = \"bad\"\nurl = \"{}\"\nbearer_token = \"{WRONG_TOKEN}\"\n",
            good.urls()[0]
        );
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, &text).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut child = common::spawn_qsysd(&cfg, &log, &[]);
    assert!(
        wait_log(&log, "qsysd starting", Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    env.push_raw("q1", &transcriptions("sec", 30));
    assert!(
        wait_for(Duration::from_secs(60), || {
            env.count("state IN ('finished', 'failed')") == 30
        }),
        "{:?}",
        env.states()
    );
    sigterm(&mut child);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("TRACE") || text.contains("DEBUG"),
        "ran at trace level"
    );
    assert!(
        text.contains("HTTP 401"),
        "the wrong token's failures are logged"
    );
    let signer = Signer::new(Secret::new(CALLBACK_SECRET), "http://x/callback");
    let mut secrets = vec![
        REDIS_PW.to_string(),
        DB_PW.to_string(),
        CALLBACK_SECRET.to_string(),
        GPU_TOKEN.to_string(),
        WRONG_TOKEN.to_string(),
    ];
    for i in 0..30 {
        for attempt in 1..=2 {
            secrets.push(signer.token(&format!("sec-{i}"), attempt));
        }
    }
    for s in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "a secret ({}…) appears in the log",
            &s[..6]
        );
    }
    for host in ["%", "localhost"] {
        let _ = root.query_drop(format!("DROP USER IF EXISTS '{user}'@'{host}'"));
    }
    drop(env);
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Task ids a client may send in a callback, each trying to start a log line of its own.
const FORGED_IDS: &[&str] = &[
    "x\nERROR\tqsys::daemon:forged",
    "x\r\nINFO qsys::callback: forged",
    "x\u{2028}forged",
    "\u{1b}[2K\rforged",
];

/// `text` with the callback listener on `port` (a spawned daemon's port must be known).
fn with_callback_port(text: &str, port: u16) -> String {
    text.replacen(
        "[callback]\nlisten = \"127.0.0.1:0\"",
        &format!("[callback]\nlisten = \"127.0.0.1:{port}\""),
        1,
    )
}

/// Posts a callback for `task_id` with a wrong token: refused (401), and logged.
fn forge_callback(port: u16, task_id: &str) {
    let body = serde_json::json!({ "task_id": task_id, "status": "finished" }).to_string();
    let reply = qsys::http::post_json(
        &qsys::http::agent(),
        &format!("http://127.0.0.1:{port}/callback?attempt=1&token=forged"),
        None,
        &body,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .expect("callback");
    assert_eq!(reply.status, 401, "{}", reply.body);
}

/// A refused callback's task id, chosen by whoever sends it, is logged on its own line, its
/// control characters escaped: it cannot forge a record.
#[test]
fn a_hostile_task_id_cannot_forge_a_log_line() {
    let env = TestEnv::new("forgelog");
    let port = common::free_port();
    let text = with_callback_port(
        &env.config_toml(&["http://127.0.0.1:1/g0".into()], "")
            .replace("[daemon]", "[daemon]\nlog_target = \"stderr\""),
        port,
    );
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, text).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut child = common::Spawned(common::spawn_qsysd(&cfg, &log, &[]));
    assert!(
        wait_log(&log, "qsysd starting", Duration::from_secs(20)),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    for id in FORGED_IDS {
        forge_callback(port, id);
    }
    assert!(child.sigterm().success());
    let text = std::fs::read_to_string(&log).expect("log");
    let refused: Vec<&str> = text.lines().filter(|l| l.contains("forged")).collect();
    assert_eq!(refused.len(), FORGED_IDS.len(), "{text}");
    for (line, id) in refused.iter().zip(FORGED_IDS) {
        assert!(
            line.starts_with("WARN  qsys::callback: callback with an invalid token refused "),
            "a forged line: {line:?}"
        );
        assert!(line.contains(&format!("task_id={id:?}")), "{line:?}");
    }
    assert!(!text.contains('\u{1b}') && !text.contains('\r') && !text.contains('\u{2028}'));
}

/// journald, started for the test when none runs (as on a CI machine without systemd).
struct Journald(Option<Child>);

impl Journald {
    fn alive() -> bool {
        std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.connect("/run/systemd/journal/socket"))
            .is_ok()
    }

    fn ensure() -> Journald {
        if Journald::alive() {
            return Journald(None);
        }
        // Its stderr is kept: when it does not start, it says why (no /sys/fs/cgroup, say).
        let err = std::env::temp_dir().join(format!("qsys-journald-{}.err", std::process::id()));
        let mut child = Command::new("/lib/systemd/systemd-journald")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("journald stderr file"))
            .spawn()
            .expect("start systemd-journald");
        if !wait_for(Duration::from_secs(10), Journald::alive) {
            let _ = child.kill();
            let status = child.wait().ok();
            panic!(
                "journald did not start ({status:?}); it said: {}",
                std::fs::read_to_string(&err).unwrap_or_default().trim()
            );
        }
        let _ = std::fs::remove_file(&err);
        Journald(Some(child))
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn journald_fields_trace_one_task() {
    let _journald = Journald::ensure();
    let env = TestEnv::new("journal");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let port = common::free_port();
    let text = with_callback_port(
        &env.config_toml(fleet.urls(), "").replace(
            "[daemon]",
            "[daemon]\nlog_target = \"journal\"\nlog_level = \"debug\"",
        ),
        port,
    );
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, text).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut child = common::spawn_qsysd(&cfg, &log, &[]);
    let id = format!("journal-{}", std::process::id());
    // Started once its slot table exists (it logs nothing to stderr).
    assert!(wait_for(Duration::from_secs(20), || env.schema_ready()));
    env.push_raw(
        "q1",
        &[format!(
            r#"{{"type": "start_transcribe", "data": {{"task_id": "{id}"}}}}"#
        )],
    );
    assert!(wait_for(Duration::from_secs(30), || {
        env.task(&id).is_some_and(|t| t.0 == "finished")
    }));
    // A hostile task id goes to the journal escaped, like every field and message.
    let forged = format!("{id}-\nforged");
    forge_callback(port, &forged);
    sigterm(&mut child);
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !stderr.contains("slot claimed"),
        "records went to the journal, not stderr: {stderr}"
    );
    let mut entries = Vec::new();
    assert!(wait_for(Duration::from_secs(10), || {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "json", &format!("TASK_ID={id}")])
            .output()
            .expect("journalctl");
        entries = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        entries.len() >= 2
    }));
    let claimed = entries
        .iter()
        .find(|e| e["MESSAGE"] == "slot claimed")
        .unwrap_or_else(|| panic!("no 'slot claimed' entry: {entries:?}"));
    assert!(
        claimed["GPU"] == "g0" || claimed["GPU"] == "g1",
        "{claimed}"
    );
    assert_eq!(claimed["QUEUE"], env.queue("q1"));
    // systemd-journal-logger maps info to priority 5 (notice).
    assert_eq!(claimed["PRIORITY"], "5");
    assert_eq!(claimed["SYSLOG_IDENTIFIER"], "qsysd");
    assert!(entries.iter().any(|e| e["MESSAGE"] == "task finished"));
    let escaped = format!("{id}-\\nforged");
    assert!(wait_for(Duration::from_secs(10), || {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "json", &format!("TASK_ID={escaped}")])
            .output()
            .expect("journalctl");
        String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|e| {
                e["MESSAGE"] == "callback with an invalid token refused" && e["TASK_ID"] == escaped
            })
        })
    }));
}

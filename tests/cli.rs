//! The binaries as an operator runs them: `qsysd --check-config`, exit codes, SIGTERM, `qsys-push`,
//! and the shipped `etc/qsysd.toml`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use qsys::{Completion, Config, Env, Handler};

const QSYSD: &str = env!("CARGO_BIN_EXE_qsysd");
const PUSH: &str = env!("CARGO_BIN_EXE_qsys-push");

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_config_is_valid() {
    let dir = std::env::temp_dir().join(format!("qsys-etc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    write(
        &dir,
        "callback.secret",
        "0123456789abcdef0123456789abcdef\n",
    );
    write(&dir, "gpu.token", "gpu-token\n");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/qsysd.toml"))
        .expect("etc/qsysd.toml")
        .replace("/etc/qsysd/", &format!("{}/", dir.display()));
    let c = Config::from_toml(&text, Path::new("etc/qsysd.toml"), &Env::new())
        .unwrap_or_else(|e| panic!("etc/qsysd.toml is invalid: {e}"));
    assert_eq!(c.gpus.len(), 4);
    assert_eq!(c.total_slots(), 16);
    assert_eq!(c.gpus[0].completion, Completion::Callback);
    // No token by default, so a fresh install validates; uncommenting the line enables it.
    assert_eq!(c.gpus[0].bearer_token, None);
    let with_token = text.replacen("# bearer_token_file = \"", "bearer_token_file = \"", 1);
    let c = Config::from_toml(&with_token, Path::new("etc/qsysd.toml"), &Env::new())
        .unwrap_or_else(|e| panic!("etc/qsysd.toml with its token line is invalid: {e}"));
    assert_eq!(
        c.gpus[0].bearer_token.as_ref().map(|s| s.expose()),
        Some("gpu-token")
    );
    // The commented env example of [types.send_email] is valid as it stands.
    let with_env = text.replacen("# env = [", "env = [", 1);
    let c = Config::from_toml(&with_env, Path::new("etc/qsysd.toml"), &Env::new())
        .unwrap_or_else(|e| panic!("etc/qsysd.toml with its env line is invalid: {e}"));
    assert!(
        matches!(&c.types["send_email"], Handler::Exec { env, .. } if env == &["HTTPS_PROXY", "AWS_REGION"]),
        "{:?}",
        c.types["send_email"]
    );
    assert_eq!(c.redis.queues, ["task_queue_1", "task_queue_2"]);
    for t in [
        "start_transcribe",
        "send_email",
        "generate_report",
        "cleanup",
    ] {
        assert!(c.types.contains_key(t), "type {t}");
    }
    // And the binary agrees.
    let p = write(&dir, "qsysd.toml", &text);
    let (code, out, err) = run(
        QSYSD,
        &["--config", p.to_str().expect("utf8"), "--check-config"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("gpus: 4 endpoints, 16 slots"), "{out}");
    assert!(!out.contains("0123456789abcdef0123456789abcdef") && !out.contains("gpu-token"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_config_exits_2_naming_key_and_value() {
    let env = TestEnv::new("badcfg");
    let good = env.config_toml(&["http://127.0.0.1:1/g0".into()], "");
    let cases = [
        (good.replace("[daemon]", "[daemon]\nthreads = 4"), "threads"),
        (
            good.replace("[daemon]", "[gpu]\ntask_timeout = \"soon\"\n[daemon]"),
            "gpu.task_timeout",
        ),
        (
            good.replace("127.0.0.1:0", "127.0.0.1:99999"),
            "callback.listen",
        ),
        (
            good.replace("[daemon]", "[retry]\nmax_attempts = 0\n[daemon]"),
            "retry.max_attempts",
        ),
        ("this is not toml".to_string(), "qsysd.toml"),
    ];
    for (text, key) in cases {
        let p = write(&env.dir, "qsysd.toml", &text);
        let (code, _, err) = run(
            QSYSD,
            &["--config", p.to_str().expect("utf8"), "--check-config"],
        );
        assert_eq!(code, 2, "{key}: {err}");
        assert!(err.contains(key), "error does not name {key}: {err}");
    }
    let (code, _, err) = run(QSYSD, &["--config", "/nonexistent/qsysd.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/qsysd.toml"), "{err}");
    let (code, _, _) = run(QSYSD, &["--no-such-flag"]);
    assert_eq!(code, 2);
}

/// A config error about a URL names the key and shows the URL, but never its password; nor does
/// `--check-config`'s summary.
#[test]
fn config_errors_and_summary_hide_url_passwords() {
    const PW: &str = "Pw-3xq9Lk";
    let env = TestEnv::new("cfgpw");
    let good = env.config_toml(&["http://127.0.0.1:1/g0".into()], "");
    // The [redis] url line, replaced whole.
    let redis = |line: &str| {
        good.lines()
            .map(|l| {
                if l.starts_with("url = \"redis") {
                    line
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let cases = [
        (
            redis(&format!("url = \"redis://:{PW}@127.0.0.1:port/0\"")),
            "redis.url",
        ),
        (
            redis(&format!("url = \"rediss://u:{PW}@[::1/0\"")),
            "redis.url",
        ),
        (
            good.replacen("mysql://root@", &format!("mysql://root:{PW}@"), 1)
                .replacen(&env.db, "bad-name", 1),
            "mysql.url",
        ),
        (
            good.replacen("http://127.0.0.1:1/g0", &format!("ftp://u:{PW}@h/g0"), 1),
            "gpu.endpoints[0].url",
        ),
        // Not TOML at all (the string is not closed): the parser quotes the line.
        (redis(&format!("url = \"redis://:{PW}@h:1/0")), "qsysd.toml"),
    ];
    for (text, key) in cases {
        assert!(text.contains(PW), "the case holds the password:\n{text}");
        let p = write(&env.dir, "qsysd.toml", &text);
        let (code, out, err) = run(
            QSYSD,
            &["--config", p.to_str().expect("utf8"), "--check-config"],
        );
        assert_eq!(code, 2, "{key}: {err}");
        assert!(err.contains(key) && err.contains("***"), "{key}: {err}");
        assert!(!err.contains(PW) && !out.contains(PW), "{key}: {err}");
    }
    let with_token = good.replacen("http://127.0.0.1:1/g0", &format!("https://u:{PW}@h/g0"), 1);
    let p = write(&env.dir, "qsysd.toml", &with_token);
    let (code, out, err) = run(
        QSYSD,
        &["--config", p.to_str().expect("utf8"), "--check-config"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("https://u:***@h/g0") && !out.contains(PW),
        "{out}"
    );
}

#[test]
fn sigterm_finishes_calls_in_flight_and_exits_zero() {
    let env = TestEnv::new("sigterm");
    // Response mode, 2 s per task: four calls are in flight when the signal comes.
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        completion: fakefleet::Completion::Response,
        delay: (Duration::from_secs(2), Duration::from_secs(2)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = "[gpu]\ncompletion = \"response\"\n";
    let p = write(
        &env.dir,
        "qsysd.toml",
        &env.config_toml(fleet.urls(), extra),
    );
    let log = env.dir.join("qsysd.log");
    let mut child = common::spawn_qsysd(&p, &log, &[]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_for(Duration::from_secs(20), || log_text()
            .contains("qsysd starting")),
        "{}",
        log_text()
    );
    env.push_raw("q1", &transcriptions("term", 10));
    let started = wait_for(Duration::from_secs(20), || {
        env.count("state = 'processing'") == 4
    });
    assert!(started, "{}", log_text());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", log_text());
    // The four in flight were allowed to finish; the rest went back to Redis, rows pending.
    assert_eq!(env.count("state = 'finished'"), 4, "{}", log_text());
    assert_eq!(env.count("state = 'processing'"), 0);
    assert_eq!(env.llen("q1"), 6);
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0);
}

#[test]
fn qsys_push_writes_the_seed_format() {
    let env = TestEnv::new("push");
    let p = write(
        &env.dir,
        "qsysd.toml",
        &env.config_toml(&["http://127.0.0.1:1/g0".into()], ""),
    );
    let cfg = p.to_str().expect("utf8");
    let (code, out, err) = run(
        PUSH,
        &[
            "--config",
            cfg,
            "--type",
            "send_email",
            "--data",
            r#"{"email":"a@b.c"}"#,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{out}");
    let items = env.lrange("q1");
    assert_eq!(items.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&items[0]).expect("json");
    assert_eq!(v["type"], "send_email");
    assert_eq!(v["data"]["email"], "a@b.c");
    assert_eq!(v["data"]["task_id"], id);
    // An explicit id and queue.
    let (code, out, _) = run(
        PUSH,
        &[
            "--config",
            cfg,
            "--type",
            "cleanup",
            "--task-id",
            "c-1",
            "--queue",
            &env.queue("q2"),
        ],
    );
    assert_eq!((code, out.trim()), (0, "c-1"));
    assert_eq!(env.llen("q2"), 1);
    // Bad input: exit 2, nothing pushed.
    let (code, _, err) = run(PUSH, &["--config", cfg, "--type", "x", "--data", "[1]"]);
    assert_eq!(code, 2);
    assert!(err.contains("data"), "{err}");
    assert_eq!(env.llen("q1"), 1);
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(t0.elapsed() < limit, "qsysd did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn second_signal_exits_at_once() {
    let env = TestEnv::new("sigtwice");
    // A call that would take a minute, and a grace period longer than that.
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        completion: fakefleet::Completion::Response,
        delay: (Duration::from_secs(60), Duration::from_secs(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = "[gpu]\ncompletion = \"response\"\n";
    let text = env
        .config_toml(fleet.urls(), extra)
        .replace("shutdown_grace = \"10s\"", "shutdown_grace = \"5m\"");
    let p = write(&env.dir, "qsysd.toml", &text);
    let log = env.dir.join("qsysd.log");
    let mut child = common::spawn_qsysd(&p, &log, &[]);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(wait_for(Duration::from_secs(20), || log_text()
        .contains("qsysd starting")));
    env.push_raw("q1", &transcriptions("twice", 1));
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().running(0) == 1
    }));
    let pid = child.id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(wait_for(Duration::from_secs(5), || log_text()
        .contains("stop requested")));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "waits for the call in flight"
    );
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{}", log_text());
}

#[test]
fn systemd_notifications() {
    use std::os::unix::net::UnixDatagram;
    let env = TestEnv::new("notify");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        ..FleetConfig::default()
    })
    .expect("fleet");
    // A dispatch that hangs is retried after 2 s, not the default 30 s.
    let p = write(
        &env.dir,
        "qsysd.toml",
        &env.config_toml(fleet.urls(), "[gpu]\nrequest_timeout = \"2s\"\n"),
    );
    let sock_path = env.dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let log = env.dir.join("qsysd.log");
    let mut child = common::spawn_qsysd(
        &p,
        &log,
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "1000000".into()),
        ],
    );
    // Reads notifications until `want` arrives, then forgets everything up to it, so each call
    // waits for a notification newer than the previous one found.
    let mut got = String::new();
    let mut read_until = |want: &str, limit: Duration| {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        while !got.contains(want) && t0.elapsed() < limit {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
                got.push('\n');
            }
        }
        let at = got
            .find(want)
            .unwrap_or_else(|| panic!("no {want} in {got:?}"));
        got = got[at + want.len()..].to_string();
    };
    read_until("READY=1", Duration::from_secs(20));
    read_until(
        "STATUS=0/8 GPU slots busy, 0 tasks waiting, 0 GPUs down",
        Duration::from_secs(5),
    );
    read_until("WATCHDOG=1", Duration::from_secs(5));
    let pid = child.id() as i32;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // SIGHUP with a broken file: RELOADING, then READY again with the old config kept.
    std::fs::write(&p, "[gpu]\nslots = \"many\"\n").expect("break config");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    read_until("RELOADING=1", Duration::from_secs(5));
    read_until("READY=1", Duration::from_secs(5));
    assert!(
        common::wait_log(&log, "reload refused", Duration::from_secs(5)),
        "{}",
        log_text()
    );
    assert!(
        child.try_wait().expect("wait").is_none(),
        "a bad reload must not stop qsysd"
    );
    // SIGHUP with a good file that adds a slot per GPU.
    let bigger = env.config_toml(fleet.urls(), "[gpu]\nslots = 5\nrequest_timeout = \"2s\"\n");
    std::fs::write(&p, bigger).expect("config");
    unsafe { libc::kill(pid, libc::SIGHUP) };
    read_until("RELOADING=1", Duration::from_secs(5));
    read_until("READY=1", Duration::from_secs(5));
    read_until("STATUS=0/10 GPU slots busy", Duration::from_secs(5));
    assert!(common::wait_log(
        &log,
        "configuration reloaded",
        Duration::from_secs(5)
    ));
    env.push_raw("q1", &transcriptions("afterhup", 20));
    assert!(
        wait_for(Duration::from_secs(30), || env.count("state = 'finished'")
            == 20),
        "{:?} in redis {} replies {:?} received {} running {}\n{}",
        env.states(),
        env.llen("q1"),
        fleet.stats().callback_replies(),
        fleet.stats().received(0) + fleet.stats().received(1),
        fleet.stats().running(0) + fleet.stats().running(1),
        log_text()
    );
    unsafe { libc::kill(pid, libc::SIGTERM) };
    read_until("STOPPING=1", Duration::from_secs(5));
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(15)).code(),
        Some(0)
    );
}

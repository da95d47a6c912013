//! Test harness: every test gets its own MySQL database and Redis key prefix on the real local
//! servers, so tests run in parallel. If a server cannot be reached the test fails with a message
//! that says so; nothing is ever skipped.
//!
//! `QSYS_TEST_REDIS_URL` and `QSYS_TEST_MYSQL_URL` (a URL without a database) point the tests at
//! other servers.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use qsys::Daemon;
use qsys::{Config, Env};

pub const SECRET: &str = "test-callback-secret-0123456789";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn redis_url() -> String {
    std::env::var("QSYS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn mysql_base() -> String {
    std::env::var("QSYS_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

pub struct TestEnv {
    pub db: String,
    pub prefix: String,
    pub redis: redis::Client,
    pub dir: std::path::PathBuf,
    redis_url: String,
    mysql_base: String,
}

impl TestEnv {
    /// A fresh database and key prefix on the shared local servers. `tag`: a short name of the
    /// test, letters and digits.
    pub fn new(tag: &str) -> TestEnv {
        TestEnv::on(tag, &redis_url(), &mysql_base())
    }

    /// The same on given servers (a test's own Redis or MariaDB, which it may restart).
    pub fn on(tag: &str, redis_url: &str, mysql_base: &str) -> TestEnv {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let db = format!("qsys_t_{tag}_{pid}_{n}");
        let prefix = format!("qsys-test:{tag}:{pid}:{n}:");
        let redis = redis::Client::open(redis_url).expect("valid redis url");
        let mut conn = redis
            .get_connection_with_timeout(Duration::from_secs(3))
            .unwrap_or_else(|e| {
                panic!(
                    "Redis at {} is unreachable ({e}). The tests need a real Redis: \
                     run `bash scripts/services.sh` (see README) and try again.",
                    redis_url
                )
            });
        let _: String = redis::cmd("PING").query(&mut conn).expect("redis PING");
        let mut my = mysql::Conn::new(mysql::Opts::from_url(mysql_base).expect("valid mysql url"))
            .unwrap_or_else(|e| {
                panic!(
                    "MariaDB/MySQL at {} is unreachable ({e}). The tests need a real server: \
                 run `bash scripts/services.sh` (see README) and try again.",
                    mysql_base
                )
            });
        my.query_drop(format!("DROP DATABASE IF EXISTS `{db}`"))
            .expect("drop old test db");
        let dir = std::env::temp_dir().join(format!("qsys-test-{tag}-{pid}-{n}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TestEnv {
            db,
            prefix,
            redis,
            dir,
            redis_url: redis_url.to_string(),
            mysql_base: mysql_base.to_string(),
        }
    }

    pub fn queue(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn mysql_url(&self) -> String {
        format!("{}/{}", self.mysql_base, self.db)
    }

    /// A config for this test: queues `q1` (high) and `q2`, one endpoint per URL, then `extra`.
    pub fn config_toml(&self, gpu_urls: &[String], extra: &str) -> String {
        let mut s = format!(
            r#"
[redis]
url = "{redis}"
queues = ["{q1}", "{q2}"]
key_prefix = "{prefix}"

[mysql]
url = "{mysql}"

[callback]
listen = "127.0.0.1:0"
secret = "{SECRET}"

[admin]
listen = "127.0.0.1:0"

[daemon]
instance_id = "test"
shutdown_grace = "10s"
"#,
            redis = self.redis_url,
            q1 = self.queue("q1"),
            q2 = self.queue("q2"),
            prefix = self.prefix.trim_end_matches(':'),
            mysql = self.mysql_url(),
        );
        s.push_str(extra);
        for (i, url) in gpu_urls.iter().enumerate() {
            s.push_str(&format!(
                "\n[[gpu.endpoints]]\nid = \"g{i}\"\nurl = \"{url}\"\n"
            ));
        }
        s
    }

    pub fn config(&self, toml: &str) -> Config {
        Config::from_toml(toml, Path::new("test.toml"), &Env::new())
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"))
    }

    /// `toml` written to `name` in the test's directory, for the binaries' `--config`.
    pub fn config_file(&self, name: &str, toml: &str) -> std::path::PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, toml).expect("write config");
        p
    }

    pub fn start(&self, toml: &str) -> Daemon {
        Daemon::start(self.config(toml)).unwrap_or_else(|e| panic!("daemon start: {e}"))
    }

    pub fn redis_client(&self) -> redis::Client {
        redis::Client::open(self.redis_url.as_str()).expect("valid redis url")
    }

    pub fn redis_conn(&self) -> redis::Connection {
        let c = self
            .redis
            .get_connection_with_timeout(Duration::from_secs(3))
            .expect("redis connection");
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        c
    }

    /// RPUSH raw elements, exactly as given.
    pub fn push_raw(&self, queue: &str, items: &[String]) {
        let mut c = self.redis_conn();
        let _: () = redis::cmd("RPUSH")
            .arg(self.queue(queue))
            .arg(items)
            .query(&mut c)
            .expect("rpush");
    }

    pub fn llen(&self, queue: &str) -> usize {
        redis::cmd("LLEN")
            .arg(self.queue(queue))
            .query(&mut self.redis_conn())
            .expect("llen")
    }

    /// Every element of the list at `key` (a full key, not a queue name).
    pub fn lrange_key(&self, key: &str) -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut self.redis_conn())
            .expect("lrange")
    }

    pub fn lrange(&self, queue: &str) -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(self.queue(queue))
            .arg(0)
            .arg(-1)
            .query(&mut self.redis_conn())
            .expect("lrange")
    }

    pub fn mysql(&self) -> mysql::Conn {
        mysql::Conn::new(mysql::Opts::from_url(&self.mysql_url()).expect("url")).expect("mysql")
    }

    /// Whether a daemon has created this test's schema yet (queried without the database, which
    /// may not exist yet).
    pub fn schema_ready(&self) -> bool {
        let Ok(mut c) = mysql::Conn::new(mysql::Opts::from_url(&self.mysql_base).expect("url"))
        else {
            return false;
        };
        let n: Option<u64> = c
            .exec_first(
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = ? AND table_name = 'gpu_slots'",
                (&self.db,),
            )
            .unwrap_or(None);
        n == Some(1)
    }

    /// Rows of a query on this test's database.
    pub fn query<T: mysql::prelude::FromRow>(&self, sql: &str) -> Vec<T> {
        self.mysql().query(sql).expect(sql)
    }

    pub fn count(&self, sql_where: &str) -> u64 {
        let n: Vec<u64> = self.query(&format!("SELECT COUNT(*) FROM tasks WHERE {sql_where}"));
        n[0]
    }

    /// `state -> count` over all tasks.
    pub fn states(&self) -> HashMap<String, u64> {
        self.query::<(String, u64)>("SELECT state, COUNT(*) FROM tasks GROUP BY state")
            .into_iter()
            .collect()
    }

    /// A task's `(state, error)`.
    pub fn task(&self, id: &str) -> Option<(String, Option<String>)> {
        let mut c = self.mysql();
        c.exec_first("SELECT state, error FROM tasks WHERE task_id = ?", (id,))
            .expect("select task")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Ok(mut my) =
            mysql::Conn::new(mysql::Opts::from_url(&mysql_base()).expect("valid mysql url"))
        {
            let _ = my.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.db));
        }
        if let Ok(mut c) = self
            .redis
            .get_connection_with_timeout(Duration::from_secs(3))
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.prefix))
                .query(&mut c)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut c);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it holds or `timeout` passes; true if it held.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// Waits until the log file at `path` contains `needle`; true if it did within `timeout`.
pub fn wait_log(path: &Path, needle: &str, timeout: Duration) -> bool {
    wait_for(timeout, || {
        std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle))
    })
}

/// Starts the `qsysd` binary on `config` with only `envs` in its environment, stderr appended to
/// `log` (a restarted daemon keeps one log).
pub fn spawn_qsysd(config: &Path, log: &Path, envs: &[(&str, String)]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_qsysd"))
        .arg("--config")
        .arg(config)
        .env_clear()
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log"),
        )
        .spawn()
        .expect("spawn qsysd")
}

/// A spawned `qsysd` that does not outlive its test: killed when dropped (after a failed
/// assertion, say) unless [`Spawned::sigterm`] stopped it first.
pub struct Spawned(pub std::process::Child);

impl Spawned {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, as systemd stops the service; its exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait().expect("wait for qsysd")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `gpus` fake GPUs that accept every task and never call back: the test's own callbacks end
/// what they run.
pub fn silent_fleet(gpus: usize) -> fakefleet::Fleet {
    fakefleet::Fleet::start(fakefleet::FleetConfig {
        gpus,
        lose_rate: 1.0,
        ..fakefleet::FleetConfig::default()
    })
    .expect("fleet")
}

/// A daemon on `gpus` fake GPUs that accept every task and never call back, with `n` tasks of
/// ids `{tag}-{i}` processing: the test's own callbacks are what ends them.
pub fn daemon_awaiting_callbacks(
    env: &TestEnv,
    tag: &str,
    n: usize,
    gpus: usize,
) -> (Daemon, fakefleet::Fleet) {
    let fleet = silent_fleet(gpus);
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    env.push_raw("q1", &transcriptions(tag, n));
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("state = 'processing'") == n as u64
    }));
    (daemon, fleet)
}

/// The path and query of attempt `attempt`'s genuine callback URL for `task_id` (the tests'
/// secret), to send to a daemon's callback listener.
pub fn callback_target(task_id: &str, attempt: u32) -> String {
    let signer = qsys::Signer::new(qsys::Secret::new(SECRET), "http://unused/callback");
    let url = signer.callback_url(task_id, attempt);
    url[url.find("/callback").expect("path")..].to_string()
}

/// A raw HTTP/1.1 exchange with a listener of the daemon; returns (status, body).
pub fn call(addr: std::net::SocketAddr, method: &str, target: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `toml` (from [`TestEnv::config_toml`]) as instance `id` with a shutdown grace of `grace`.
pub fn as_instance(toml: &str, id: &str, grace: &str) -> String {
    toml.replace("instance_id = \"test\"", &format!("instance_id = \"{id}\""))
        .replace(
            "shutdown_grace = \"10s\"",
            &format!("shutdown_grace = \"{grace}\""),
        )
}

/// Stops a daemon and waits for it, failing the test if a thread died.
pub fn stop(d: Daemon) {
    d.stop();
    d.wait().expect("daemon stopped cleanly");
}

/// Seed-format messages for `n` transcription tasks with ids `{tag}-{i}`.
pub fn transcriptions(tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"type": "start_transcribe", "data": {{"s3_bucket": "b", "s3_key": "rec/{i}.wav", "task_id": "{tag}-{i}"}}}}"#
            )
        })
        .collect()
}

/// A free TCP port on loopback (bound and released: good enough for a test's own server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A server process a test owns and may restart: its own Redis or MariaDB on a free port, with its
/// data in a temp directory, so restarting it disturbs no other test.
pub struct OwnServer {
    pub port: u16,
    dir: std::path::PathBuf,
    kind: ServerKind,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Redis,
    Mariadb,
}

impl OwnServer {
    /// A Redis that keeps every write on disk (AOF, fsync always), so a restart loses nothing.
    pub fn redis(dir: &Path) -> OwnServer {
        OwnServer::start(dir.join("redis"), ServerKind::Redis, &[])
    }

    /// The same, requiring `password`.
    pub fn redis_with_password(dir: &Path, password: &str) -> OwnServer {
        OwnServer::start(
            dir.join("redis"),
            ServerKind::Redis,
            &["--requirepass", password],
        )
    }

    /// A MariaDB with durable commits (`innodb_flush_log_at_trx_commit=1`, the default).
    pub fn mariadb(dir: &Path) -> OwnServer {
        let data = dir.join("mariadb");
        std::fs::create_dir_all(&data).expect("mariadb dir");
        let out = std::process::Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=normal",
            ])
            .arg("--skip-test-db")
            .arg(format!("--datadir={}", data.join("data").display()))
            .output()
            .expect("mariadb-install-db (apt-get install mariadb-server)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        OwnServer::start(data, ServerKind::Mariadb, &[])
    }

    fn start(dir: std::path::PathBuf, kind: ServerKind, args: &[&str]) -> OwnServer {
        std::fs::create_dir_all(&dir).expect("server dir");
        let mut s = OwnServer {
            port: free_port(),
            dir,
            kind,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        match self.kind {
            ServerKind::Redis => format!("redis://127.0.0.1:{}/0", self.port),
            ServerKind::Mariadb => format!("mysql://root@127.0.0.1:{}", self.port),
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log");
        let mut cmd = match self.kind {
            ServerKind::Redis => {
                let mut c = std::process::Command::new("redis-server");
                c.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
                    .args(["--appendfsync", "always", "--port", &self.port.to_string()])
                    .arg("--dir")
                    .arg(&self.dir);
                c
            }
            ServerKind::Mariadb => {
                let mut c = std::process::Command::new("/usr/sbin/mariadbd");
                c.args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1"])
                    .arg(format!("--port={}", self.port))
                    .arg(format!("--datadir={}", self.dir.join("data").display()))
                    .arg(format!("--socket={}", self.dir.join("sock").display()))
                    .arg(format!("--pid-file={}", self.dir.join("pid").display()))
                    .args(["--skip-log-bin", "--innodb-buffer-pool-size=64M"]);
                c
            }
        };
        let child = cmd
            .args(&self.args)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start server");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_for(Duration::from_secs(30), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "own server on port {port} did not come up"
        );
    }

    /// Stops the server (SIGTERM, as a service restart does) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        self.spawn();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

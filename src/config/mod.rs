//! Configuration: `/etc/qsysd.toml` (or `--config PATH`), the seed's environment variables on top, then a
//! validation step that turns the loose serde structs into typed values.
//!
//! Read once at start (and on reload, later) by the main thread; the validated [`Config`] is shared
//! read-only with every other thread. Every error names the key and the offending value so that an
//! operator can fix the file without reading code; the binary maps any [`ConfigError`] to exit code 2.
//!
//! Why two layers: serde gives us unknown-key detection and defaults, but a `String` that should be a
//! duration or a URL is only known to be good after we have looked at it. Keeping the raw layer private
//! means nothing downstream can ever see an unvalidated value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::obs::logging::{redact_url, redact_urls};

mod duration;
mod env;
mod producer;
mod raw;
mod secret;
mod tls;
mod validate;

pub use crate::secret::Secret;
pub(crate) use duration::format_span;
pub use duration::{format_duration, parse_duration};
pub(crate) use env::hostname;
pub use env::{process_env, producer_env, Env};
pub(crate) use producer::ProducerConfig;
pub(crate) use tls::TlsFiles;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/qsysd.toml";

/// What went wrong with a configuration. `Display` always names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// An invalid value. URL passwords in the value or the reason are hidden: a config error is shown
/// on a terminal and in the journal. (Callers with a URL value pass it through
/// [`redact_url`] first, which also copes with white space in the password.)
fn invalid(
    key: impl Into<String>,
    value: impl fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: redact_urls(&value.to_string()).into_owned(),
        reason: redact_urls(&reason.into()).into_owned(),
    }
}

/// A file TOML cannot read. Its message quotes the offending line, which may hold a URL with a
/// password.
fn parse_error(path: &Path, e: &toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        message: redact_urls(e.to_string().trim_end()).into_owned(),
    }
}

/// How a GPU endpoint reports completion (docs/contracts.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// 2xx means accepted; the result arrives later at the callback URL.
    Callback,
    /// The endpoint answers when the work is done; 2xx means finished.
    Response,
}

#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    /// Full connection URL, password already folded in.
    pub url: String,
    /// Prefix of every key qsysd itself owns (in-hand lists); queues are named as configured.
    pub key_prefix: String,
    /// Earlier queues win over later ones.
    pub queues: Vec<String>,
    /// How long one blocking pop waits; bounds how fast the poller notices a stop.
    pub pop_timeout: Duration,
}

#[derive(Clone, PartialEq, Eq)]
pub(crate) struct MysqlConfig {
    pub url: String,
    /// Connect over TLS (verified against the system's web PKI roots or the URL's `root_cert_path`).
    pub tls: bool,
}

// The URLs hold passwords: their `Debug`, like [`Secret`]'s, never prints them.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("queues", &self.queues)
            .field("pop_timeout", &self.pop_timeout)
            .finish()
    }
}

impl fmt::Debug for MysqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MysqlConfig")
            .field("url", &redact_url(&self.url))
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallbackConfig {
    pub listen: SocketAddr,
    /// `None`: derived from the bound address at start (only allowed for a specific listen IP).
    pub public_url: Option<String>,
    pub secret: Secret,
    pub max_body: usize,
    /// Largest `result` a `finished` callback may carry (its bytes as sent); over it, 413.
    pub max_result_bytes: usize,
    /// HTTPS instead of HTTP (`tls_cert`, `tls_key`); the files are read again at a reload.
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    /// What the health probe GETs after an ejection (default: `url`).
    pub health_url: String,
    pub slots: usize,
    pub completion: Completion,
    pub bearer_token: Option<Secret>,
    pub request_timeout: Duration,
    pub task_timeout: Duration,
    /// With heartbeats on: an attempt not heard of (dispatch, heartbeat) for this long expires,
    /// however long `task_timeout` is. `None`: only the lease counts.
    pub heartbeat_timeout: Option<Duration>,
    /// Where a cancel of a running attempt is POSTed (`{"task_id", "attempt"}`); `None`: the
    /// attempt's slot waits for its callback or its lease.
    pub cancel_url: Option<String>,
    /// The pool it serves: only task types of this pool run on it (`pool`, default `"default"`).
    pub pool: String,
    /// A first guess at its speed (cost units per second of wall time per attempt), until
    /// finished attempts teach qsysd better (`speed`; `None`: unknown until then).
    pub speed: Option<f64>,
}

/// How the scheduler chooses among a pool's GPUs with a free slot (`gpu.placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Where the task is predicted to finish first, by its cost and each GPU's learned speed;
    /// least-loaded when the cost or a speed is unknown.
    PredictedFinish,
    /// The lowest share of busy slots, whatever the task.
    LeastLoaded,
}

/// How a task type is run.
#[derive(Debug, Clone)]
pub enum Handler {
    /// On a slot of a GPU of `pool`.
    Gpu { pool: String },
    /// A local command: task JSON on stdin, exit 0 = finished.
    Exec {
        command: Vec<String>,
        timeout: Duration,
        /// Names of the daemon's environment variables the program also gets (`env`, default none).
        /// Besides them it sees only `PATH`, `LANG`, `LC_ALL` and the `QSYS_*` variables qsysd
        /// sets, so the daemon's secrets (`DB_PASSWORD`, `REDIS_PASSWORD`, `BEARER_TOKEN`, ...)
        /// never reach it.
        env: Vec<String>,
    },
    /// An HTTP POST of the task JSON: 2xx = finished.
    Http {
        url: String,
        timeout: Duration,
        bearer_token: Option<Secret>,
    },
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub instance_id: String,
    /// An instance whose heartbeat is older than this is dead: others recover its tasks.
    pub instance_timeout: Duration,
    pub shutdown_grace: Duration,
    pub handler_threads: usize,
    /// Dispatch threads for callback-mode GPUs; response-mode slots get one each on top.
    pub dispatch_threads: usize,
    pub log_level: log::LevelFilter,
    pub log_target: crate::obs::logging::Target,
    /// Largest queue element taken as a task (default 1 MiB, at most 8 MiB); a larger one is
    /// recorded `failed` and kept in the dead-letter list.
    pub max_message_bytes: usize,
}

/// The admin listener: `/metrics`, `/status`, `/tasks/<id>`, the dashboard and its actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdminConfig {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer` on every admin request but `/healthz` when set; must be
    /// set when `listen` is not a loopback address.
    pub token: Option<Secret>,
    /// HTTPS instead of HTTP (`tls_cert`, `tls_key`); the files are read again at a reload.
    pub tls: Option<TlsFiles>,
}

/// When a failed attempt is tried again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryConfig {
    /// Attempts per task, unless the message says otherwise.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per attempt, with jitter.
    pub backoff: Duration,
    pub backoff_max: Duration,
}

/// When to eject a GPU and for how long (`[gpu]` `eject_*`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HealthPolicy {
    pub eject_after: u32,
    pub cooldown: Duration,
    pub cooldown_max: Duration,
}

impl HealthPolicy {
    /// The cooldown after the `n`-th ejection in a row (0-based): doubles up to the cap.
    pub(crate) fn cooldown_for(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        self.cooldown.saturating_mul(factor).min(self.cooldown_max)
    }
}

/// The validated configuration. Every field holds a value that has been checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis: RedisConfig,
    pub(crate) mysql: MysqlConfig,
    pub(crate) callback: CallbackConfig,
    pub(crate) admin: AdminConfig,
    pub gpus: Vec<Arc<Endpoint>>,
    pub(crate) health: HealthPolicy,
    pub(crate) placement: Placement,
    pub(crate) retry: RetryConfig,
    /// How long terminal tasks are kept (`[retention]`).
    pub(crate) retention: crate::store::Retention,
    pub types: BTreeMap<String, Handler>,
    pub daemon: DaemonConfig,
}

/// Largest config file read: far above any real one, so a path that names `/dev/zero` or a huge
/// file is an error, not a start-up that never ends.
const MAX_CONFIG_FILE: u64 = 4 << 20;

/// The file at `path` as text, if it is at most `max` bytes: every file the config names (the
/// config itself, secrets, TLS files) is read through here.
pub(crate) fn read_capped(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {max} bytes"),
        ));
    }
    Ok(text)
}

/// The config file at `path`, for the daemon and the producer alike.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    read_capped(path, MAX_CONFIG_FILE).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Config {
    /// Reads, overrides and validates the file at `path`.
    pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let text = read_config_file(path)?;
        Config::from_toml(&text, path, env)
    }

    /// Parses `text` (named `path` in errors), applies `env` and validates.
    pub fn from_toml(text: &str, path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let raw: raw::Raw = toml::from_str(text).map_err(|e| parse_error(path, &e))?;
        validate::validate(raw, env)
    }

    /// Keeps from `old` what cannot change while the daemon runs (connections, the listener, the
    /// callback secret that signs tokens already handed out, the instance id, thread counts) and
    /// names each such key that `self` tried to change.
    pub(crate) fn keep_fixed(&mut self, old: &Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        if self.redis != old.redis {
            self.redis = old.redis.clone();
            kept.push("redis");
        }
        if self.mysql != old.mysql {
            self.mysql = old.mysql.clone();
            kept.push("mysql");
        }
        if self.admin != old.admin {
            self.admin = old.admin.clone();
            kept.push("admin");
        }
        // The listener reads bodies up to `max_body` before qsysd sees them, so it is fixed
        // with the listener.
        if self.callback != old.callback {
            self.callback = old.callback.clone();
            kept.push(
                "callback (listen, public_url, secret, max_body, max_result_bytes, tls_cert, \
                 tls_key)",
            );
        }
        let d = &mut self.daemon;
        let o = &old.daemon;
        if d.instance_id != o.instance_id
            || d.dispatch_threads != o.dispatch_threads
            || d.handler_threads != o.handler_threads
            || d.log_target != o.log_target
        {
            d.instance_id = o.instance_id.clone();
            d.dispatch_threads = o.dispatch_threads;
            d.handler_threads = o.handler_threads;
            d.log_target = o.log_target;
            kept.push("daemon (instance_id, dispatch_threads, handler_threads, log_target)");
        }
        kept
    }

    /// Total GPU slots over every endpoint.
    pub fn total_slots(&self) -> usize {
        self.gpus.iter().map(|g| g.slots).sum()
    }

    /// Dispatch workers needed: `daemon.dispatch_threads` for callback-mode dispatches (each a
    /// short request), plus one per response-mode slot, whose call lasts as long as the task. So
    /// a claimed response-mode slot never waits for a thread while its lease runs.
    pub(crate) fn dispatch_workers(&self) -> usize {
        let response: usize = self
            .gpus
            .iter()
            .filter(|g| g.completion == Completion::Response)
            .map(|g| g.slots)
            .sum();
        self.daemon.dispatch_threads + response
    }

    /// A short human summary for `qsysd --check-config`. Never prints a secret.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "instance: {}", self.daemon.instance_id);
        let _ = writeln!(
            s,
            "queues (priority order): {}",
            self.redis.queues.join(", ")
        );
        let _ = writeln!(
            s,
            "gpus: {} endpoints, {} slots",
            self.gpus.len(),
            self.total_slots()
        );
        for g in &self.gpus {
            let mode = match g.completion {
                Completion::Callback => "callback",
                Completion::Response => "response",
            };
            let _ = writeln!(
                s,
                "  {:<8} {} slots  pool {:<8} {:<8} timeout {}  {}",
                g.id,
                g.slots,
                g.pool,
                mode,
                format_duration(g.task_timeout),
                redact_url(&g.url)
            );
        }
        let _ = writeln!(s, "types:");
        for (name, h) in &self.types {
            let what = match h {
                Handler::Gpu { pool } => format!("gpu (pool {pool})"),
                Handler::Exec { command, .. } => format!("exec {}", command.join(" ")),
                Handler::Http { url, .. } => format!("http {}", redact_url(url)),
            };
            let _ = writeln!(s, "  {name:<20} {what}");
        }
        let _ = writeln!(s, "callback: listen {}", self.callback.listen);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::validate::hash_tag;
    use super::*;

    const MINIMAL: &str = r#"
        [callback]
        listen = "127.0.0.1:8000"
        secret = "0123456789abcdef"
        [[gpu.endpoints]]
        id = "g0"
        url = "http://127.0.0.1:9000/run"
    "#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), &Env::new())
    }

    fn err(text: &str) -> String {
        load(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load(MINIMAL).expect("minimal config is valid");
        assert_eq!(c.redis.queues, ["task_queue_1", "task_queue_2"]);
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.mysql.url, "mysql://root@127.0.0.1:3306/queue_system");
        assert_eq!(c.gpus[0].slots, 4);
        assert_eq!(c.gpus[0].completion, Completion::Callback);
        assert_eq!(c.gpus[0].request_timeout, Duration::from_secs(30));
        assert_eq!(c.gpus[0].task_timeout, Duration::from_secs(1800));
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.retry.backoff, Duration::from_secs(1));
        assert_eq!(c.health.eject_after, 3);
        assert_eq!(c.gpus[0].health_url, c.gpus[0].url);
        assert_eq!(c.redis.key_prefix, "qsys");
        assert!(matches!(&c.types["start_transcribe"], Handler::Gpu { pool } if pool == "default"));
        assert_eq!(c.callback.public_url, None);
        assert_eq!(c.daemon.dispatch_threads, 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{MINIMAL}\n[retry]\nmax_attempt = 3\n"));
        assert!(e.contains("max_attempt"), "{e}");
        let e = err(&format!("{MINIMAL}\n[gpu]\nslotz = 3\n"));
        assert!(e.contains("slotz") || e.contains("duplicate"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_value() {
        let e = err(&MINIMAL.replace("id = \"g0\"", "id = \"g0\"\nslots = 0"));
        assert!(
            e.contains("gpu.endpoints[0].slots") && e.contains('0'),
            "{e}"
        );
        let e = err(&MINIMAL.replace("id = \"g0\"", "id = \"g0\"\nslots = 1025"));
        assert!(
            e.contains("gpu.endpoints[0].slots") && e.contains("1025") && e.contains("1024"),
            "{e}"
        );
        let e = err(&format!("[gpu]\nslots = 100000\n{MINIMAL}"));
        assert!(e.contains("gpu.slots") && e.contains("100000"), "{e}");
        assert!(load(&MINIMAL.replace("id = \"g0\"", "id = \"g0\"\nslots = 1024")).is_ok());
        let e = err(&MINIMAL.replace("http://127.0.0.1:9000/run", "ftp://x"));
        assert!(
            e.contains("gpu.endpoints[0].url") && e.contains("ftp://x"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\n[gpu.endpoints.0]\n"));
        assert!(!e.is_empty());
        let text = MINIMAL.replace(
            "[[gpu.endpoints]]",
            "[gpu]\ntask_timeout = \"10 minutes\"\n[[gpu.endpoints]]",
        );
        let e = err(&text);
        assert!(
            e.contains("gpu.task_timeout") && e.contains("10 minutes"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("127.0.0.1:8000", "localhost"));
        assert!(
            e.contains("callback.listen") && e.contains("localhost"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("0123456789abcdef", "short"));
        assert!(e.contains("callback.secret") && !e.contains("short"), "{e}");
    }

    /// The limits this issue added, at their edges: below, at, and above each bound.
    #[test]
    fn message_and_body_limits_at_their_bounds() {
        let with = |section: &str, line: &str| {
            MINIMAL.replace("[callback]", &format!("[{section}]\n{line}\n[callback]"))
        };
        for (n, ok) in [
            (1023, false),
            (1024, true),
            (8 << 20, true),
            ((8 << 20) + 1, false),
        ] {
            let text = with("daemon", &format!("max_message_bytes = {n}"));
            match load(&text) {
                Ok(c) => {
                    assert!(ok, "max_message_bytes = {n} taken");
                    assert_eq!(c.daemon.max_message_bytes, n);
                }
                Err(e) => {
                    assert!(!ok, "max_message_bytes = {n} refused: {e}");
                    let e = e.to_string();
                    assert!(e.contains("daemon.max_message_bytes") && e.contains(&n.to_string()));
                }
            }
        }
        assert_eq!(
            load(MINIMAL).expect("default").daemon.max_message_bytes,
            1 << 20
        );
        let body = |n: usize| MINIMAL.replace("secret = ", &format!("max_body = {n}\nsecret = "));
        assert!(load(&body(16 << 20)).is_ok());
        let e = err(&body((16 << 20) + 1));
        assert!(
            e.contains("callback.max_body") && e.contains("16777217"),
            "{e}"
        );
        let e = err(&body(0));
        assert!(e.contains("callback.max_body"), "{e}");
        // The default body has room for the largest result plus the rest of the callback.
        let c = load(MINIMAL).expect("default");
        assert_eq!(c.callback.max_result_bytes, 65_536);
        assert_eq!(c.callback.max_body, 131_072);
        let results =
            |n: usize| MINIMAL.replace("secret = ", &format!("max_result_bytes = {n}\nsecret = "));
        assert_eq!(
            load(&results(1 << 20)).expect("1 MiB").callback.max_body,
            (1 << 20) + 65_536
        );
        let e = err(&results((4 << 20) + 1));
        assert!(
            e.contains("callback.max_result_bytes") && e.contains("4194305"),
            "{e}"
        );
        let e = err(&body(1000));
        assert!(
            e.contains("callback.max_body") && e.contains("max_result_bytes"),
            "{e}"
        );
    }

    /// `[retention]`: the defaults, `"0"` to keep for ever, nothing under an hour.
    #[test]
    fn retention_defaults_forever_and_the_minimum() {
        let day = |n: u64| Some(Duration::from_secs(n * 86_400));
        let r = load(MINIMAL).expect("default").retention;
        assert_eq!(
            (r.finished, r.failed, r.cancelled),
            (day(14), day(90), day(90))
        );
        let r = load(&format!(
            "{MINIMAL}\n[retention]\nfinished = \"2h\"\nfailed = \"0\"\n"
        ))
        .expect("valid")
        .retention;
        assert_eq!(r.finished, Some(Duration::from_secs(7200)));
        assert_eq!(r.failed, None);
        assert_eq!(r.states().len(), 2);
        let e = err(&format!("{MINIMAL}\n[retention]\ncancelled = \"5m\"\n"));
        assert!(e.contains("retention.cancelled") && e.contains("5m"), "{e}");
        let e = err(&format!("{MINIMAL}\n[retention]\nkept = \"1d\"\n"));
        assert!(e.contains("kept"), "{e}");
    }

    /// Heartbeat timeouts and cancel URLs: set in `[gpu]` for all, overridden per endpoint,
    /// `"0"` turns heartbeats off.
    #[test]
    fn heartbeat_timeouts_and_cancel_urls_default_from_gpu() {
        let text = MINIMAL
            .replace(
                "[[gpu.endpoints]]",
                "[gpu]\nheartbeat_timeout = \"20s\"\ncancel_url = \"http://127.0.0.1:9000/cancel\"\n\
                 [[gpu.endpoints]]",
            )
            .replace(
                "url = \"http://127.0.0.1:9000/run\"",
                "url = \"http://127.0.0.1:9000/run\"\n[[gpu.endpoints]]\nid = \"g1\"\n\
                 url = \"http://127.0.0.1:9001/run\"\nheartbeat_timeout = \"0\"\n\
                 cancel_url = \"http://127.0.0.1:9001/stop\"",
            );
        let c = load(&text).expect("valid");
        assert_eq!(c.gpus[0].heartbeat_timeout, Some(Duration::from_secs(20)));
        assert_eq!(
            c.gpus[0].cancel_url.as_deref(),
            Some("http://127.0.0.1:9000/cancel")
        );
        assert_eq!(c.gpus[1].heartbeat_timeout, None);
        assert_eq!(
            c.gpus[1].cancel_url.as_deref(),
            Some("http://127.0.0.1:9001/stop")
        );
        assert_eq!(
            load(MINIMAL).expect("default").gpus[0].heartbeat_timeout,
            None
        );
        let e = err(&text.replace(
            "heartbeat_timeout = \"20s\"",
            "heartbeat_timeout = \"soon\"",
        ));
        assert!(
            e.contains("gpu.heartbeat_timeout") && e.contains("soon"),
            "{e}"
        );
        let e = err(&text.replace("http://127.0.0.1:9001/stop", "ftp://x/stop"));
        assert!(e.contains("gpu.endpoints[1].cancel_url"), "{e}");
        // A response-mode endpoint ends its attempt with its answer: [gpu]'s timeout skips it,
        // its own is refused.
        let response = text.replace("heartbeat_timeout = \"0\"", "completion = \"response\"");
        assert_eq!(
            load(&response).expect("valid").gpus[1].heartbeat_timeout,
            None
        );
        let e = err(&text.replace(
            "heartbeat_timeout = \"0\"",
            "completion = \"response\"\nheartbeat_timeout = \"5s\"",
        ));
        assert!(
            e.contains("gpu.endpoints[1].heartbeat_timeout") && e.contains("response"),
            "{e}"
        );
    }

    /// Every response-mode slot has a dispatch thread of its own, beside the callback-mode share.
    #[test]
    fn dispatch_workers_cover_every_response_slot() {
        let text = MINIMAL.replace(
            "url = \"http://127.0.0.1:9000/run\"",
            "url = \"http://127.0.0.1:9000/run\"\ncompletion = \"response\"\nslots = 80\n\
             [[gpu.endpoints]]\nid = \"g1\"\nurl = \"http://127.0.0.1:9001/run\"",
        );
        let c = load(&text).expect("valid");
        // g1: 4 callback-mode slots, so 4 callback threads; plus 80 for g0's response slots.
        assert_eq!(c.daemon.dispatch_threads, 4);
        assert_eq!(c.dispatch_workers(), 84);
    }

    #[test]
    fn errors_never_show_a_url_password() {
        let cases = [
            (
                "[redis]\nurl = \"redis://:hunter2@host:port/0\"\n",
                "redis.url",
            ),
            ("[redis]\nurl = \"http://:hunter2@host/0\"\n", "redis.url"),
            (
                "[mysql]\nurl = \"mysql://app:hunter2@db:3306/bad-name\"\n",
                "mysql.url",
            ),
            (
                "[mysql]\nurl = \"mysql://app:hun ter2@db:x/q\"\n",
                "mysql.url",
            ),
            (
                "[types.r]\nhandler = \"http\"\nurl = \"ftp://u:hunter2@r/\"\n",
                "types.r.url",
            ),
            ("[redis]\nurl = \"redis://:hunter2@host\n", "test.toml"),
        ];
        for (table, key) in cases {
            let e = err(&format!("{table}{MINIMAL}"));
            assert!(e.contains(key) && e.contains("***"), "{e}");
            assert!(!e.contains("hunter2") && !e.contains("ter2"), "{e}");
        }
        let text = MINIMAL.replace("http://127.0.0.1:9000/run", "https://u:hunter2@h/run");
        let summary = load(&text).expect("valid").summary();
        assert!(
            summary.contains("https://u:***@h/run") && !summary.contains("hunter2"),
            "{summary}"
        );
    }

    #[test]
    fn cluster_hash_tags_must_agree() {
        assert_eq!(hash_tag("{qsys}:inhand"), Some("qsys"));
        assert_eq!(hash_tag("plain"), None);
        assert_eq!(hash_tag("{}x"), None);
        let ok = format!(
            "[redis]\nkey_prefix = \"{{q}}\"\nqueues = [\"{{q}}:a\", \"{{q}}:b\"]\n{MINIMAL}"
        );
        assert!(load(&ok).is_ok());
        let e = err(&format!(
            "[redis]\nkey_prefix = \"{{q}}\"\nqueues = [\"{{q}}:a\", \"b\"]\n{MINIMAL}"
        ));
        assert!(
            e.contains("redis.queues[1]") && e.contains("hash tag"),
            "{e}"
        );
    }

    #[test]
    fn wildcard_listen_needs_public_url() {
        let e = err(&MINIMAL.replace("127.0.0.1:8000", "0.0.0.0:8000"));
        assert!(e.contains("callback.public_url"), "{e}");
        let ok = MINIMAL.replace(
            "127.0.0.1:8000\"",
            "0.0.0.0:8000\"\npublic_url = \"http://10.0.0.5:8000/callback\"",
        );
        assert!(load(&ok).is_ok());
    }

    #[test]
    fn type_handlers_are_checked() {
        let e = err(&format!(
            "{MINIMAL}\n[types.send_email]\nhandler = \"exec\"\n"
        ));
        assert!(e.contains("types.send_email.command"), "{e}");
        let e = err(&format!("{MINIMAL}\n[types.x]\nhandler = \"smtp\"\n"));
        assert!(e.contains("types.x.handler") && e.contains("smtp"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[types.x]\nhandler = \"gpu\"\nurl = \"http://a/\"\n"
        ));
        assert!(e.contains("types.x.url"), "{e}");
        let exec = |env: &str| {
            format!("{MINIMAL}\n[types.x]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n{env}")
        };
        let c =
            load(&exec("env = [\"HTTPS_PROXY\", \"AWS_REGION\", \"_x1\"]\n")).expect("valid env");
        assert!(
            matches!(&c.types["x"], Handler::Exec { env, .. } if env == &["HTTPS_PROXY", "AWS_REGION", "_x1"])
        );
        let c = load(&exec("")).expect("no env");
        assert!(matches!(&c.types["x"], Handler::Exec { env, .. } if env.is_empty()));
        for (list, bad) in [
            ("[\"A\", \"B=1\"]", "types.x.env[1] = \"B=1\""),
            ("[\"\"]", "types.x.env[0] = \"\""),
            ("[\"1A\"]", "types.x.env[0] = \"1A\""),
            ("[\"A B\"]", "types.x.env[0] = \"A B\""),
            ("[\"QSYS_TASK_ID\"]", "types.x.env[0] = \"QSYS_TASK_ID\""),
            ("[\"A\", \"A\"]", "types.x.env[1] = \"A\""),
        ] {
            let e = err(&exec(&format!("env = {list}\n")));
            assert!(e.starts_with(bad), "{e}");
        }
        let e = err(&format!(
            "{MINIMAL}\n[types.x]\nhandler = \"http\"\nurl = \"http://a/\"\nenv = [\"A\"]\n"
        ));
        assert!(e.contains("types.x.env"), "{e}");
        let c = load(&format!(
            "{MINIMAL}\n[types.r]\nhandler = \"http\"\nurl = \"http://r:9/g\"\ntimeout = \"10s\"\n"
        ))
        .expect("valid http type");
        assert!(
            matches!(&c.types["r"], Handler::Http { timeout, .. } if *timeout == Duration::from_secs(10))
        );
        // An explicit [types] table replaces the default, so start_transcribe is now unknown.
        assert!(!c.types.contains_key("start_transcribe"));
    }

    #[test]
    fn gpu_type_without_endpoints_is_refused() {
        let text = "[callback]\nlisten = \"127.0.0.1:1\"\nsecret = \"0123456789abcdef\"\n";
        let e = err(text);
        assert!(
            e.contains("gpu.endpoints") && e.contains("start_transcribe"),
            "{e}"
        );
    }

    #[test]
    fn pools_speeds_and_placement() {
        let c = load(MINIMAL).expect("valid");
        assert_eq!(c.gpus[0].pool, "default");
        assert_eq!(c.gpus[0].speed, None);
        assert_eq!(c.placement, Placement::PredictedFinish);
        let text = MINIMAL.replace(
            "[[gpu.endpoints]]",
            "[gpu]\npool = \"large\"\nplacement = \"least_loaded\"\n\
             [types.asr]\nhandler = \"gpu\"\npool = \"large\"\n[[gpu.endpoints]]",
        ) + "speed = 2.5\n[[gpu.endpoints]]\nid = \"g1\"\nurl = \"http://h/g1\"\npool = \"small\"\n";
        let c = load(&text).expect("valid");
        assert_eq!(
            (c.gpus[0].pool.as_str(), c.gpus[0].speed),
            ("large", Some(2.5))
        );
        assert_eq!(c.gpus[1].pool, "small");
        assert_eq!(c.placement, Placement::LeastLoaded);
        assert!(matches!(&c.types["asr"], Handler::Gpu { pool } if pool == "large"));
        // Each error names its key and value.
        for (bad, key, value) in [
            (
                "[gpu]\nplacement = \"fastest\"\n",
                "gpu.placement",
                "fastest",
            ),
            ("[gpu]\nspeed = 2.0\n", "gpu.speed", "2"),
            ("[gpu]\npool = \"a b\"\n", "gpu.pool", "a b"),
            (
                "[types.asr]\nhandler = \"gpu\"\npool = \"nowhere\"\n",
                "types.asr.pool",
                "nowhere",
            ),
            (
                "[types.mail]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\npool = \"x\"\n",
                "types.mail.pool",
                "",
            ),
        ] {
            let e = err(&MINIMAL.replace("[[gpu.endpoints]]", &format!("{bad}[[gpu.endpoints]]")));
            assert!(e.contains(key) && e.contains(value), "{bad}: {e}");
        }
        for (line, key) in [
            ("speed = 0.0", "speed"),
            ("speed = -1.0", "speed"),
            ("speed = nan", "speed"),
            ("speed = inf", "speed"),
            ("pool = \"\"", "pool"),
            ("placement = \"least_loaded\"", "placement"),
        ] {
            let e = err(&format!("{MINIMAL}{line}\n"));
            assert!(
                e.contains(&format!("gpu.endpoints[0].{key}")),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn endpoint_overrides_defaults() {
        let text = MINIMAL.replace(
            "[[gpu.endpoints]]",
            "[gpu]\nslots = 2\ncompletion = \"response\"\nbearer_token = \"tok\"\n[[gpu.endpoints]]",
        ) + "slots = 3\n[[gpu.endpoints]]\nid = \"g1\"\nurl = \"https://h/g1\"\ncompletion = \"callback\"\n";
        let c = load(&text).expect("valid");
        assert_eq!((c.gpus[0].slots, c.gpus[1].slots), (3, 2));
        assert_eq!(c.gpus[0].completion, Completion::Response);
        assert_eq!(c.gpus[1].completion, Completion::Callback);
        assert_eq!(c.gpus[1].bearer_token, Some(Secret::new("tok")));
        assert_eq!(c.total_slots(), 5);
        let e =
            err(&(MINIMAL.to_string() + "[[gpu.endpoints]]\nid = \"g0\"\nurl = \"http://h/\"\n"));
        assert!(
            e.contains("gpu.endpoints[1].id") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn seed_environment_overrides_file() {
        let env: Env = [
            ("REDIS_HOST", "redis.internal"),
            ("REDIS_PORT", "6380"),
            ("REDIS_PASSWORD", "p@ss"),
            ("DB_HOST", "db.internal"),
            ("DB_PORT", "3307"),
            ("DB_NAME", "qs"),
            ("DB_USER", "app"),
            ("DB_PASSWORD", "dbpw"),
            ("TASK_QUEUES", "a, b,c"),
            ("CALLBACK_URL", "http://10.1.1.1:8000/callback"),
            ("BEARER_TOKEN", "envtok"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::from_toml(MINIMAL, Path::new("t"), &env).expect("valid");
        assert_eq!(c.redis.url, "redis://:p%40ss@redis.internal:6380/0");
        assert_eq!(c.mysql.url, "mysql://app:dbpw@db.internal:3307/qs");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("p%40ss") && !debug.contains("dbpw"),
            "{debug}"
        );
        assert!(
            debug.contains("mysql://app:***@db.internal:3307/qs"),
            "{debug}"
        );
        assert_eq!(c.redis.queues, ["a", "b", "c"]);
        assert_eq!(
            c.callback.public_url.as_deref(),
            Some("http://10.1.1.1:8000/callback")
        );
        assert_eq!(c.gpus[0].bearer_token, Some(Secret::new("envtok")));
        let bad: Env = [("REDIS_PORT".to_string(), "sixty".to_string())].into();
        let e = Config::from_toml(MINIMAL, Path::new("t"), &bad)
            .expect_err("bad port")
            .to_string();
        assert!(e.contains("REDIS_PORT") && e.contains("sixty"), "{e}");
    }

    #[test]
    fn a_producer_reads_redis_types_and_mysql_on_demand_only() {
        let dir = std::env::temp_dir().join(format!("qsys-prod-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let f = dir.join("qsysd.toml");
        // The daemon's tables, even unreadable secrets and unknown keys, are none of its business.
        let text = "[redis]\nqueues = [\"hi\", \"lo\"]\n[mysql]\nurl = \"mysql://u@db:3306/qs\"\n\
                    password_file = \"/nonexistent/pw\"\n[callback]\nsecret_file = \"/nonexistent/s\"\n\
                    [gpu]\nwhatever = 1\n[types.send_email]\nhandler = \"exec\"\n[types.cleanup]\n";
        std::fs::write(&f, text).expect("write");
        let env: Env = [("REDIS_HOST", "r.internal"), ("DB_USER", "app")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let c = ProducerConfig::load(Some(&f), &env).expect("producer config");
        assert_eq!(c.redis.url, "redis://r.internal:6379/0");
        assert_eq!(c.default_queue, "hi");
        let types: Vec<&str> = c.types.iter().flatten().map(String::as_str).collect();
        assert_eq!(types, ["cleanup", "send_email"]);
        let e = c.mysql().expect_err("password file unreadable").to_string();
        assert!(e.contains("mysql.password_file"), "{e}");

        std::fs::write(&f, "[mysql]\nurl = \"mysql://u@db:3306/qs\"\n").expect("write");
        let mut env = env;
        env.insert("QUEUE_NAME".into(), "seed_queue".into());
        env.insert("DB_PASSWORD".into(), "pw".into());
        let c = ProducerConfig::load(Some(&f), &env).expect("producer config");
        assert_eq!(c.default_queue, "seed_queue");
        assert_eq!(c.types, None, "no [types] table: any type");
        assert_eq!(c.mysql().expect("mysql").url, "mysql://app:pw@db:3306/qs");

        std::fs::write(&f, "[redis]\nqueue = \"x\"\n").expect("write");
        let e = ProducerConfig::load(Some(&f), &Env::new())
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("queue"), "{e}");
        let bad: Env = [("QUEUE_NAME".to_string(), "a b".to_string())].into();
        std::fs::write(&f, "").expect("write");
        let e = ProducerConfig::load(Some(&f), &bad)
            .expect_err("bad queue")
            .to_string();
        assert!(e.contains("QUEUE_NAME") && e.contains("a b"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn files_that_never_end_are_refused_not_read_forever() {
        let e = Config::load(Path::new("/dev/zero"), &Env::new()).expect_err("refused");
        assert!(e.to_string().contains("larger than"), "{e}");
        let e = err(&MINIMAL.replace(
            "secret = \"0123456789abcdef\"",
            "secret_file = \"/dev/zero\"",
        ));
        assert!(e.starts_with("callback.secret_file = \"/dev/zero\""), "{e}");
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn secrets_from_files_and_never_in_debug() {
        let dir = std::env::temp_dir().join(format!("qsys-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let f = dir.join("secret");
        std::fs::write(&f, "abcdefghijklmnopqrstuvwxyz\n").expect("write");
        let text = MINIMAL.replace(
            "secret = \"0123456789abcdef\"",
            &format!("secret_file = \"{}\"", f.display()),
        );
        let c = load(&text).expect("valid");
        assert_eq!(c.callback.secret.expose(), "abcdefghijklmnopqrstuvwxyz");
        assert!(!format!("{c:?}").contains("abcdefghijklmnopqrstuvwxyz"));
        let both = MINIMAL.replace(
            "secret = \"0123456789abcdef\"",
            &format!(
                "secret = \"0123456789abcdef\"\nsecret_file = \"{}\"",
                f.display()
            ),
        );
        assert!(err(&both).contains("callback.secret_file"));
        let missing = MINIMAL.replace(
            "secret = \"0123456789abcdef\"",
            "secret_file = \"/nonexistent/qsys\"",
        );
        let e = err(&missing);
        assert!(
            e.contains("callback.secret_file") && e.contains("/nonexistent/qsys"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

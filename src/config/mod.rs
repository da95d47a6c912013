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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::obs::logging::{redact_url, redact_urls};

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

/// A secret string (token, password, HMAC key). Its `Debug` never prints the value, so a config dump
/// or a panic message cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
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
}

/// How a task type is run.
#[derive(Debug, Clone)]
pub enum Handler {
    /// On a GPU slot.
    Gpu,
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

/// The validated configuration. Every field holds a value that has been checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub redis: RedisConfig,
    pub(crate) mysql: MysqlConfig,
    pub(crate) callback: CallbackConfig,
    pub(crate) admin: AdminConfig,
    pub gpus: Vec<Arc<Endpoint>>,
    pub(crate) health: crate::fleet::HealthPolicy,
    pub(crate) retry: RetryConfig,
    pub types: BTreeMap<String, Handler>,
    pub daemon: DaemonConfig,
}

// ---------------------------------------------------------------------------------------------------
// The raw layer: exactly what the TOML file may contain. Defaults are documented in etc/qsysd.toml.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    mysql: RawMysql,
    #[serde(default)]
    callback: RawCallback,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    gpu: RawGpu,
    #[serde(default)]
    retry: RawRetry,
    types: Option<BTreeMap<String, RawType>>,
    #[serde(default)]
    daemon: RawDaemon,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    key_prefix: Option<String>,
    password_file: Option<PathBuf>,
    queues: Option<Vec<String>>,
    pop_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMysql {
    url: Option<String>,
    password_file: Option<PathBuf>,
    tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCallback {
    listen: Option<String>,
    public_url: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    max_body: Option<usize>,
}

/// `[gpu]` (the defaults) and each `[[gpu.endpoints]]` share one shape, so an endpoint can override any
/// default. `id`, `url` and `endpoints` are only meaningful at one of the two levels; validation refuses
/// them at the other. (serde's `flatten` would lose `deny_unknown_fields`.)
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    id: Option<String>,
    url: Option<String>,
    health_url: Option<String>,
    eject_after: Option<u32>,
    eject_cooldown: Option<String>,
    eject_cooldown_max: Option<String>,
    slots: Option<usize>,
    completion: Option<String>,
    bearer_token: Option<String>,
    bearer_token_file: Option<PathBuf>,
    request_timeout: Option<String>,
    task_timeout: Option<String>,
    endpoints: Option<Vec<RawGpu>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    backoff: Option<String>,
    backoff_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    handler: String,
    command: Option<Vec<String>>,
    url: Option<String>,
    timeout: Option<String>,
    bearer_token: Option<String>,
    bearer_token_file: Option<PathBuf>,
    env: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    instance_id: Option<String>,
    instance_timeout: Option<String>,
    shutdown_grace: Option<String>,
    handler_threads: Option<usize>,
    dispatch_threads: Option<usize>,
    log_level: Option<String>,
    log_target: Option<String>,
    max_message_bytes: Option<usize>,
}

// ---------------------------------------------------------------------------------------------------

/// The environment as the loader sees it: injectable so tests never touch the process environment.
pub type Env = BTreeMap<String, String>;

/// The seed's environment variables that override the file (docs/contracts.md §6).
pub(crate) const ENV_KEYS: &[&str] = &[
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "DB_HOST",
    "DB_PORT",
    "DB_NAME",
    "DB_USER",
    "DB_PASSWORD",
    "TASK_QUEUES",
    "CALLBACK_URL",
    "BEARER_TOKEN",
];

/// The seed's variables as currently set in this process. Empty values count as unset, as a `.env`
/// line `REDIS_PASSWORD=` meant "no password" in the seed.
pub fn process_env() -> Env {
    env_of(ENV_KEYS)
}

/// The variables a producer reads: the seed's, plus `QUEUE_NAME`, the seed producer's queue.
pub fn producer_env() -> Env {
    let mut env = env_of(&["QUEUE_NAME"]);
    env.extend(process_env());
    env
}

fn env_of(keys: &[&str]) -> Env {
    keys.iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v))
        })
        .collect()
}

impl Config {
    /// Reads, overrides and validates the file at `path`.
    pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path, env)
    }

    /// Parses `text` (named `path` in errors), applies `env` and validates.
    pub fn from_toml(text: &str, path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| parse_error(path, &e))?;
        validate(raw, env)
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
            kept.push("callback (listen, public_url, secret, max_body)");
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
                "  {:<8} {} slots  {:<8} timeout {}  {}",
                g.id,
                g.slots,
                mode,
                format_duration(g.task_timeout),
                redact_url(&g.url)
            );
        }
        let _ = writeln!(s, "types:");
        for (name, h) in &self.types {
            let what = match h {
                Handler::Gpu => "gpu".to_string(),
                Handler::Exec { command, .. } => format!("exec {}", command.join(" ")),
                Handler::Http { url, .. } => format!("http {}", redact_url(url)),
            };
            let _ = writeln!(s, "  {name:<20} {what}");
        }
        let _ = writeln!(s, "callback: listen {}", self.callback.listen);
        s
    }
}

/// What a producer (`qsys-push`) reads of a config: `[redis]`, the names in `[types]`, and `[mysql]`
/// only when asked (for `--wait`). Other tables are not read and `[mysql]`'s password file only on
/// demand, so a producer needs none of the daemon's secrets.
#[derive(Debug)]
pub(crate) struct ProducerConfig {
    pub redis: RedisConfig,
    /// Where a task that names no queue goes: `QUEUE_NAME`, else the first of the queues.
    pub default_queue: String,
    /// The task types of the file's `[types]` table. `None` (no file, or no table) accepts any
    /// type: a producer without the daemon's config cannot know them.
    pub types: Option<BTreeSet<String>>,
    mysql: RawMysql,
    env: Env,
}

impl ProducerConfig {
    /// Reads `path`, else [`DEFAULT_PATH`] when it exists, else only `env` and the defaults.
    pub(crate) fn load(path: Option<&Path>, env: &Env) -> Result<ProducerConfig, ConfigError> {
        // Lenient at the top (the daemon's tables are skipped), strict inside what is read.
        #[derive(Default, Deserialize)]
        struct ProducerOnly {
            #[serde(default)]
            redis: RawRedis,
            #[serde(default)]
            mysql: RawMysql,
            types: Option<toml::Table>,
        }
        let default = Path::new(DEFAULT_PATH);
        let path = path.or_else(|| default.exists().then_some(default));
        let raw: ProducerOnly = match path {
            None => ProducerOnly::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| parse_error(path, &e))?
            }
        };
        let redis = redis_config(&raw.redis, env)?;
        let default_queue = match env.get("QUEUE_NAME") {
            Some(q) if q.chars().any(char::is_whitespace) => {
                return Err(invalid(
                    "QUEUE_NAME",
                    q,
                    "queue names must contain no white space",
                ))
            }
            Some(q) => q.clone(),
            // redis_config refuses an empty list.
            None => redis.queues[0].clone(),
        };
        Ok(ProducerConfig {
            redis,
            default_queue,
            types: raw.types.map(|t| t.keys().cloned().collect()),
            mysql: raw.mysql,
            env: env.clone(),
        })
    }

    /// The `[mysql]` settings with the seed's `DB_*` variables applied, as the daemon builds them.
    pub(crate) fn mysql(&self) -> Result<MysqlConfig, ConfigError> {
        Ok(MysqlConfig {
            url: mysql_url(&self.mysql, &self.env)?,
            tls: self.mysql.tls.unwrap_or(false),
        })
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`: a whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "missing unit (use ms, s, m, h or d)".to_string())?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err("expected a whole number followed by ms, s, m, h or d".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("unknown unit {unit:?} (use ms, s, m, h or d)")),
    }
    .ok_or_else(|| "duration too large".to_string())?;
    Ok(Duration::from_millis(ms))
}

/// The inverse of [`parse_duration`], for summaries: the largest unit that divides exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

fn duration(key: &str, value: Option<&String>, default: &str) -> Result<Duration, ConfigError> {
    let v = value.map(String::as_str).unwrap_or(default);
    let d = parse_duration(v).map_err(|reason| invalid(key, v, reason))?;
    if d.is_zero() {
        return Err(invalid(key, v, "must be greater than zero"));
    }
    Ok(d)
}

/// A secret given inline or in a file; both at once is ambiguous and refused.
fn read_secret(
    key: &str,
    inline: Option<String>,
    file: Option<&PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(f)) => Err(invalid(
            format!("{key}_file"),
            f.display(),
            format!("set either {key} or {key}_file, not both"),
        )),
        (Some(s), None) if s.is_empty() => Err(invalid(key, "", "must not be empty")),
        (Some(s), None) => Ok(Some(Secret(s))),
        (None, Some(f)) => read_secret_file(&format!("{key}_file"), f).map(Some),
        (None, None) => Ok(None),
    }
}

fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, path.display(), format!("cannot read: {e}")))?;
    let s = text.trim_end_matches(['\n', '\r']).to_string();
    if s.is_empty() {
        return Err(invalid(key, path.display(), "file is empty"));
    }
    Ok(Secret(s))
}

fn http_url(key: &str, s: &str) -> Result<String, ConfigError> {
    let shown = redact_url(s);
    let u = url::Url::parse(s).map_err(|e| invalid(key, &shown, e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(invalid(key, &shown, "expected an http:// or https:// URL"));
    }
    Ok(s.to_string())
}

/// Applies the `REDIS_*` variables and `password_file` to the Redis URL.
fn redis_url(raw: &RawRedis, env: &Env) -> Result<String, ConfigError> {
    let base = raw.url.as_deref().unwrap_or("redis://127.0.0.1:6379/0");
    let shown = redact_url(base);
    let mut u = url::Url::parse(base).map_err(|e| invalid("redis.url", &shown, e.to_string()))?;
    if !matches!(u.scheme(), "redis" | "rediss") {
        return Err(invalid(
            "redis.url",
            &shown,
            "expected a redis:// or rediss:// URL",
        ));
    }
    if let Some(h) = env.get("REDIS_HOST") {
        u.set_host(Some(h))
            .map_err(|e| invalid("REDIS_HOST", h, e.to_string()))?;
    }
    if let Some(p) = env.get("REDIS_PORT") {
        let port: u16 = p
            .parse()
            .map_err(|_| invalid("REDIS_PORT", p, "expected a port number"))?;
        let _ = u.set_port(Some(port));
    }
    let password = match (env.get("REDIS_PASSWORD"), &raw.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_secret_file("redis.password_file", f)?.0),
        (None, None) => None,
    };
    if let Some(p) = password {
        let _ = u.set_password(Some(&p));
    }
    Ok(u.to_string())
}

/// Applies the `DB_*` variables and `password_file` to the MySQL URL.
fn mysql_url(raw: &RawMysql, env: &Env) -> Result<String, ConfigError> {
    let base = raw
        .url
        .as_deref()
        .unwrap_or("mysql://root@127.0.0.1:3306/queue_system");
    let shown = redact_url(base);
    let mut u = url::Url::parse(base).map_err(|e| invalid("mysql.url", &shown, e.to_string()))?;
    if u.scheme() != "mysql" {
        return Err(invalid("mysql.url", &shown, "expected a mysql:// URL"));
    }
    if let Some(h) = env.get("DB_HOST") {
        u.set_host(Some(h))
            .map_err(|e| invalid("DB_HOST", h, e.to_string()))?;
    }
    if let Some(p) = env.get("DB_PORT") {
        let port: u16 = p
            .parse()
            .map_err(|_| invalid("DB_PORT", p, "expected a port number"))?;
        let _ = u.set_port(Some(port));
    }
    if let Some(user) = env.get("DB_USER") {
        let _ = u.set_username(user);
    }
    if let Some(name) = env.get("DB_NAME") {
        u.set_path(&format!("/{name}"));
    }
    let password = match (env.get("DB_PASSWORD"), &raw.password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => Some(read_secret_file("mysql.password_file", f)?.0),
        (None, None) => None,
    };
    if let Some(p) = password {
        let _ = u.set_password(Some(&p));
    }
    let db = u.path().trim_start_matches('/');
    if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            "mysql.url",
            &shown,
            "the database name must be non-empty and only letters, digits and _",
        ));
    }
    Ok(u.to_string())
}

fn completion(key: &str, v: &str) -> Result<Completion, ConfigError> {
    match v {
        "callback" => Ok(Completion::Callback),
        "response" => Ok(Completion::Response),
        _ => Err(invalid(key, v, "expected \"callback\" or \"response\"")),
    }
}

/// Largest `callback.max_body`.
const MAX_CALLBACK_BODY: usize = 16 << 20;

fn positive(key: &str, v: usize) -> Result<usize, ConfigError> {
    if v == 0 {
        return Err(invalid(key, v, "must be at least 1"));
    }
    Ok(v)
}

/// The names of an `exec` type's `env` list: environment variable names, each once, none of the
/// `QSYS_*` names qsysd sets itself.
fn env_names(key: &str, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for (i, name) in names.iter().enumerate() {
        let k = || format!("{key}[{i}]");
        let well_formed = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed {
            return Err(invalid(
                k(),
                name,
                "expected an environment variable name: letters, digits and _, not starting with a digit",
            ));
        }
        if name.starts_with("QSYS_") {
            return Err(invalid(k(), name, "QSYS_* variables are set by qsysd"));
        }
        if names[..i].contains(name) {
            return Err(invalid(k(), name, "listed twice"));
        }
    }
    Ok(names)
}

/// A GPU's slot count: at least 1, at most what the slot matrix accepts.
fn slot_count(key: &str, v: usize) -> Result<usize, ConfigError> {
    if v > crate::fleet::MAX_SLOTS {
        return Err(invalid(
            key,
            v,
            format!("at most {} slots per gpu", crate::fleet::MAX_SLOTS),
        ));
    }
    positive(key, v)
}

/// The Redis Cluster hash tag of a key: the text between the first `{` and the next `}`, if any.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

fn redis_config(raw: &RawRedis, env: &Env) -> Result<RedisConfig, ConfigError> {
    let queues = match env.get("TASK_QUEUES") {
        Some(q) => q
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None => raw
            .queues
            .clone()
            .unwrap_or_else(|| vec!["task_queue_1".into(), "task_queue_2".into()]),
    };
    let queues_key = if env.contains_key("TASK_QUEUES") {
        "TASK_QUEUES"
    } else {
        "redis.queues"
    };
    if queues.is_empty() {
        return Err(invalid(queues_key, "[]", "at least one queue is required"));
    }
    for (i, q) in queues.iter().enumerate() {
        if q.is_empty() || q.chars().any(|c| c.is_whitespace()) {
            return Err(invalid(
                format!("{queues_key}[{i}]"),
                q,
                "queue names must be non-empty and contain no white space",
            ));
        }
        if queues[..i].contains(q) {
            return Err(invalid(format!("{queues_key}[{i}]"), q, "listed twice"));
        }
    }
    let key_prefix = raw.key_prefix.clone().unwrap_or_else(|| "qsys".into());
    if key_prefix.is_empty() || key_prefix.chars().any(char::is_whitespace) {
        return Err(invalid(
            "redis.key_prefix",
            &key_prefix,
            "must be non-empty and contain no white space",
        ));
    }
    // Redis Cluster: the priority script touches every queue and in-hand list at once, so they must
    // share the prefix's hash tag (one slot).
    if let Some(tag) = hash_tag(&key_prefix) {
        for (i, q) in queues.iter().enumerate() {
            if hash_tag(q) != Some(tag) {
                return Err(invalid(
                    format!("{queues_key}[{i}]"),
                    q,
                    format!("redis.key_prefix has the hash tag {{{tag}}}: every queue name must carry it too (Redis Cluster keeps them in one slot)"),
                ));
            }
        }
    }
    let redis = RedisConfig {
        key_prefix,
        url: redis_url(raw, env)?,
        queues,
        pop_timeout: duration("redis.pop_timeout", raw.pop_timeout.as_ref(), "1s")?,
    };
    if redis.pop_timeout < Duration::from_secs(1) || redis.pop_timeout.subsec_millis() != 0 {
        // BLPOP's timeout is in whole seconds on the Redis versions we support.
        return Err(invalid(
            "redis.pop_timeout",
            raw.pop_timeout.as_deref().unwrap_or(""),
            "must be a whole number of seconds, at least 1s",
        ));
    }
    Ok(redis)
}

fn validate(raw: Raw, env: &Env) -> Result<Config, ConfigError> {
    let redis = redis_config(&raw.redis, env)?;

    let mysql = MysqlConfig {
        url: mysql_url(&raw.mysql, env)?,
        tls: raw.mysql.tls.unwrap_or(false),
    };

    // Callback
    let listen_s = raw.callback.listen.as_deref().unwrap_or("0.0.0.0:8000");
    let listen: SocketAddr = listen_s
        .parse()
        .map_err(|_| invalid("callback.listen", listen_s, "expected IP:PORT"))?;
    let public_url = match env.get("CALLBACK_URL").or(raw.callback.public_url.as_ref()) {
        Some(u) => {
            let key = if env.contains_key("CALLBACK_URL") {
                "CALLBACK_URL"
            } else {
                "callback.public_url"
            };
            Some(http_url(key, u)?)
        }
        None if listen.ip().is_unspecified() => {
            return Err(invalid(
                "callback.public_url",
                "",
                format!(
                    "required when callback.listen ({listen}) is a wildcard address: \
                     set the URL GPU endpoints can reach"
                ),
            ))
        }
        None => None,
    };
    let secret = read_secret(
        "callback.secret",
        raw.callback.secret,
        raw.callback.secret_file.as_ref(),
    )?
    .ok_or_else(|| {
        invalid(
            "callback.secret",
            "",
            "not set: set callback.secret or callback.secret_file",
        )
    })?;
    if secret.0.len() < 16 {
        return Err(invalid(
            "callback.secret",
            "***",
            "must be at least 16 characters",
        ));
    }
    let callback = CallbackConfig {
        listen,
        public_url,
        secret,
        max_body: match raw.callback.max_body.unwrap_or(65_536) {
            // Bodies are read into memory before they are judged; a callback is a few hundred
            // bytes, so 16 MiB is room for any result an endpoint adds.
            n if n > MAX_CALLBACK_BODY => {
                return Err(invalid("callback.max_body", n, "must be at most 16777216"))
            }
            n => positive("callback.max_body", n)?,
        },
    };

    let admin_s = raw.admin.listen.as_deref().unwrap_or("127.0.0.1:8001");
    let admin = AdminConfig {
        listen: admin_s
            .parse()
            .map_err(|_| invalid("admin.listen", admin_s, "expected IP:PORT"))?,
        token: read_secret(
            "admin.token",
            raw.admin.token,
            raw.admin.token_file.as_ref(),
        )?,
    };
    if !admin.listen.ip().is_loopback() && admin.token.is_none() {
        return Err(invalid(
            "admin.listen",
            admin_s,
            "not a loopback address: set admin.token or admin.token_file to protect task data",
        ));
    }

    // GPUs: [gpu] gives defaults, BEARER_TOKEN overrides the default token.
    let mut d = raw.gpu;
    if d.id.is_some() || d.url.is_some() || d.health_url.is_some() {
        let (key, value) = match (&d.id, &d.url) {
            (Some(id), _) => ("gpu.id", id.clone()),
            (None, Some(url)) => ("gpu.url", url.clone()),
            (None, None) => ("gpu.health_url", d.health_url.clone().unwrap_or_default()),
        };
        return Err(invalid(
            key,
            value,
            "belongs in a [[gpu.endpoints]] entry, not in [gpu]",
        ));
    }
    let endpoints = d.endpoints.take().unwrap_or_default();
    let default_slots = slot_count("gpu.slots", d.slots.unwrap_or(4))?;
    let default_completion = completion(
        "gpu.completion",
        d.completion.as_deref().unwrap_or("callback"),
    )?;
    let default_token = match env.get("BEARER_TOKEN") {
        Some(t) => Some(Secret(t.clone())),
        None => read_secret(
            "gpu.bearer_token",
            d.bearer_token.clone(),
            d.bearer_token_file.as_ref(),
        )?,
    };
    let default_request = duration("gpu.request_timeout", d.request_timeout.as_ref(), "30s")?;
    let default_task = duration("gpu.task_timeout", d.task_timeout.as_ref(), "30m")?;
    let health = crate::fleet::HealthPolicy {
        eject_after: match d.eject_after.unwrap_or(3) {
            0 => return Err(invalid("gpu.eject_after", 0, "must be at least 1")),
            n => n,
        },
        cooldown: duration("gpu.eject_cooldown", d.eject_cooldown.as_ref(), "10s")?,
        cooldown_max: duration(
            "gpu.eject_cooldown_max",
            d.eject_cooldown_max.as_ref(),
            "5m",
        )?,
    };

    let mut gpus = Vec::with_capacity(endpoints.len());
    for (i, e) in endpoints.into_iter().enumerate() {
        let k = |f: &str| format!("gpu.endpoints[{i}].{f}");
        if e.endpoints.is_some() {
            return Err(invalid(k("endpoints"), "[...]", "endpoints do not nest"));
        }
        for (field, set) in [
            ("eject_after", e.eject_after.is_some()),
            ("eject_cooldown", e.eject_cooldown.is_some()),
            ("eject_cooldown_max", e.eject_cooldown_max.is_some()),
        ] {
            if set {
                return Err(invalid(k(field), "…", "set in [gpu] for the whole fleet"));
            }
        }
        let id =
            e.id.ok_or_else(|| invalid(k("id"), "", "every endpoint needs an id"))?;
        if id.is_empty()
            || id.len() > 64
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(invalid(
                k("id"),
                &id,
                "1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        if gpus.iter().any(|g: &Arc<Endpoint>| g.id == id) {
            return Err(invalid(k("id"), &id, "duplicate endpoint id"));
        }
        let url = e
            .url
            .as_deref()
            .ok_or_else(|| invalid(k("url"), "", "every endpoint needs a url"))?;
        let token = read_secret(
            &k("bearer_token"),
            e.bearer_token.clone(),
            e.bearer_token_file.as_ref(),
        )?;
        gpus.push(Arc::new(Endpoint {
            url: http_url(&k("url"), url)?,
            health_url: match &e.health_url {
                Some(h) => http_url(&k("health_url"), h)?,
                None => url.to_string(),
            },
            slots: match e.slots {
                Some(n) => slot_count(&k("slots"), n)?,
                None => default_slots,
            },
            completion: match &e.completion {
                Some(c) => completion(&k("completion"), c)?,
                None => default_completion,
            },
            bearer_token: token.or_else(|| default_token.clone()),
            request_timeout: match &e.request_timeout {
                Some(_) => duration(&k("request_timeout"), e.request_timeout.as_ref(), "")?,
                None => default_request,
            },
            task_timeout: match &e.task_timeout {
                Some(_) => duration(&k("task_timeout"), e.task_timeout.as_ref(), "")?,
                None => default_task,
            },
            id,
        }));
    }

    let retry = RetryConfig {
        max_attempts: match raw.retry.max_attempts.unwrap_or(3) {
            0 => return Err(invalid("retry.max_attempts", 0, "must be at least 1")),
            n => n,
        },
        backoff: duration("retry.backoff", raw.retry.backoff.as_ref(), "1s")?,
        backoff_max: duration("retry.backoff_max", raw.retry.backoff_max.as_ref(), "1m")?,
    };

    // Task types. Without a [types] table the seed's GPU type is the only one known.
    let raw_types = raw.types.unwrap_or_else(|| {
        BTreeMap::from([(
            "start_transcribe".to_string(),
            RawType {
                handler: "gpu".into(),
                ..RawType::default()
            },
        )])
    });
    let mut types = BTreeMap::new();
    for (name, t) in raw_types {
        let k = |f: &str| format!("types.{name}.{f}");
        let refuse = |field: &str, present: bool| -> Result<(), ConfigError> {
            if present {
                Err(invalid(
                    k(field),
                    "…",
                    format!("not used by handler \"{}\"", t.handler),
                ))
            } else {
                Ok(())
            }
        };
        let handler = match t.handler.as_str() {
            "gpu" => {
                refuse("command", t.command.is_some())?;
                refuse("url", t.url.is_some())?;
                refuse("timeout", t.timeout.is_some())?;
                refuse("bearer_token", t.bearer_token.is_some())?;
                refuse("bearer_token_file", t.bearer_token_file.is_some())?;
                refuse("env", t.env.is_some())?;
                Handler::Gpu
            }
            "exec" => {
                refuse("url", t.url.is_some())?;
                refuse("bearer_token", t.bearer_token.is_some())?;
                refuse("bearer_token_file", t.bearer_token_file.is_some())?;
                let command = t.command.clone().unwrap_or_default();
                if command.is_empty() || command[0].is_empty() {
                    return Err(invalid(
                        k("command"),
                        format!("{command:?}"),
                        "handler \"exec\" needs a command: [\"/path/to/program\", \"arg\", ...]",
                    ));
                }
                Handler::Exec {
                    command,
                    timeout: duration(&k("timeout"), t.timeout.as_ref(), "5m")?,
                    env: env_names(&k("env"), t.env.clone().unwrap_or_default())?,
                }
            }
            "http" => {
                refuse("command", t.command.is_some())?;
                refuse("env", t.env.is_some())?;
                let url = t
                    .url
                    .as_deref()
                    .ok_or_else(|| invalid(k("url"), "", "handler \"http\" needs a url"))?;
                Handler::Http {
                    url: http_url(&k("url"), url)?,
                    timeout: duration(&k("timeout"), t.timeout.as_ref(), "5m")?,
                    bearer_token: read_secret(
                        &k("bearer_token"),
                        t.bearer_token.clone(),
                        t.bearer_token_file.as_ref(),
                    )?,
                }
            }
            other => {
                return Err(invalid(
                    k("handler"),
                    other,
                    "expected \"gpu\", \"exec\" or \"http\"",
                ))
            }
        };
        types.insert(name, handler);
    }
    if gpus.is_empty() {
        if let Some(name) = types
            .iter()
            .find(|(_, h)| matches!(h, Handler::Gpu))
            .map(|(n, _)| n)
        {
            return Err(invalid(
                "gpu.endpoints",
                "[]",
                format!("task type {name:?} uses handler \"gpu\" but no [[gpu.endpoints]] is configured"),
            ));
        }
    }

    // Daemon
    let rd = raw.daemon;
    let instance_id = match rd.instance_id {
        Some(id) => id,
        None => hostname(),
    };
    if instance_id.is_empty() || instance_id.len() > 64 {
        return Err(invalid(
            "daemon.instance_id",
            &instance_id,
            "1 to 64 characters",
        ));
    }
    let callback_slots: usize = gpus
        .iter()
        .filter(|g| g.completion == Completion::Callback)
        .map(|g| g.slots)
        .sum();
    let log_level_s = rd.log_level.as_deref().unwrap_or("info");
    let log_target_s = rd.log_target.as_deref().unwrap_or("auto");
    let daemon = DaemonConfig {
        instance_id,
        instance_timeout: duration(
            "daemon.instance_timeout",
            rd.instance_timeout.as_ref(),
            "10s",
        )?,
        shutdown_grace: duration("daemon.shutdown_grace", rd.shutdown_grace.as_ref(), "30s")?,
        handler_threads: positive("daemon.handler_threads", rd.handler_threads.unwrap_or(4))?,
        // For callback-mode dispatches: a thread per slot keeps a slow endpoint from holding up
        // the others. Response-mode slots get a thread each on top (`Config::dispatch_workers`).
        dispatch_threads: positive(
            "daemon.dispatch_threads",
            rd.dispatch_threads.unwrap_or(callback_slots.clamp(1, 64)),
        )?,
        log_level: log_level_s.parse().map_err(|_| {
            invalid(
                "daemon.log_level",
                log_level_s,
                "expected error, warn, info, debug or trace",
            )
        })?,
        log_target: log_target_s.parse().map_err(|_| {
            invalid(
                "daemon.log_target",
                log_target_s,
                "expected auto, journal, stderr or syslog",
            )
        })?,
        max_message_bytes: match rd.max_message_bytes.unwrap_or(1 << 20) {
            // The payload column holds 16 MiB; half of it leaves room for what re-encoding adds.
            n if !(1024..=8 << 20).contains(&n) => {
                return Err(invalid(
                    "daemon.max_message_bytes",
                    n,
                    "must be between 1024 and 8388608",
                ))
            }
            n => n,
        },
    };

    Ok(Config {
        redis,
        mysql,
        callback,
        admin,
        gpus,
        health,
        retry,
        types,
        daemon,
    })
}

/// This host's name, the default instance id.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "qsysd".to_string())
}

#[cfg(test)]
mod tests {
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
        assert!(matches!(c.types["start_transcribe"], Handler::Gpu));
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

//! The seed's environment variables (docs/contracts.md §6): which are read, and how they fold into
//! the Redis and MySQL URLs. The environment is passed in, never read here, so tests never touch
//! the process's own.

use std::collections::BTreeMap;

use super::raw::{RawMysql, RawRedis};
use super::secret::read_secret_file;
use super::{invalid, ConfigError};
use crate::obs::logging::redact_url;

/// The environment as the loader sees it: injectable so tests never touch the process environment.
pub type Env = BTreeMap<String, String>;

/// The seed's environment variables that override the file (docs/contracts.md §6).
const ENV_KEYS: &[&str] = &[
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

/// Applies the `REDIS_*` variables and `password_file` to the Redis URL.
pub(super) fn redis_url(raw: &RawRedis, env: &Env) -> Result<String, ConfigError> {
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
        (None, Some(f)) => Some(
            read_secret_file("redis.password_file", f)?
                .expose()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(p) = password {
        let _ = u.set_password(Some(&p));
    }
    Ok(u.to_string())
}

/// Applies the `DB_*` variables and `password_file` to the MySQL URL.
pub(super) fn mysql_url(raw: &RawMysql, env: &Env) -> Result<String, ConfigError> {
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
        (None, Some(f)) => Some(
            read_secret_file("mysql.password_file", f)?
                .expose()
                .to_string(),
        ),
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

/// This host's name, the default instance id.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "qsysd".to_string())
}

//! Validation: from the raw layer to the typed [`Config`], one function per section. Every error
//! names the key and the offending value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::duration::{duration, optional_duration};
use super::env::{hostname, mysql_url, redis_url};
use super::raw::{
    Raw, RawAdmin, RawCallback, RawDaemon, RawGpu, RawRedis, RawRetention, RawRetry, RawType,
};
use super::secret::read_secret;
use super::tls::tls_files;
use super::{
    invalid, AdminConfig, CallbackConfig, Completion, Config, ConfigError, DaemonConfig, Endpoint,
    Env, Handler, HealthPolicy, MysqlConfig, Placement, RedisConfig, RetryConfig, Secret,
};
use crate::contract::limits::MAX_SLOTS;
use crate::contract::names::{is_key_name, NAME_RULE};
use crate::obs::logging::redact_url;

fn http_url(key: &str, s: &str) -> Result<String, ConfigError> {
    let shown = redact_url(s);
    let u = url::Url::parse(s).map_err(|e| invalid(key, &shown, e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(invalid(key, &shown, "expected an http:// or https:// URL"));
    }
    Ok(s.to_string())
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
/// Largest `callback.max_result_bytes`: the callback writer commits up to this much result text
/// per transaction, which must stay well inside MySQL's default 16 MiB packet.
pub(crate) const MAX_RESULT_BYTES: usize = 4 << 20;
/// Room in a callback body beyond its result, for the default `callback.max_body`.
const BODY_BEYOND_RESULT: usize = 64 << 10;

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
    if v > MAX_SLOTS {
        return Err(invalid(
            key,
            v,
            format!("at most {} slots per gpu", MAX_SLOTS),
        ));
    }
    positive(key, v)
}

/// The Redis Cluster hash tag of a key: the text between the first `{` and the next `}`, if any.
pub(super) fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let len = key[open + 1..].find('}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

pub(super) fn redis_config(raw: &RawRedis, env: &Env) -> Result<RedisConfig, ConfigError> {
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
        if !is_key_name(q) {
            return Err(invalid(format!("{queues_key}[{i}]"), q, NAME_RULE));
        }
        if queues[..i].contains(q) {
            return Err(invalid(format!("{queues_key}[{i}]"), q, "listed twice"));
        }
    }
    let key_prefix = raw.key_prefix.clone().unwrap_or_else(|| "qsys".into());
    if !is_key_name(&key_prefix) {
        return Err(invalid("redis.key_prefix", &key_prefix, NAME_RULE));
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

pub(super) fn validate(raw: Raw, env: &Env) -> Result<Config, ConfigError> {
    let redis = redis_config(&raw.redis, env)?;
    let mysql = MysqlConfig {
        url: mysql_url(&raw.mysql, env)?,
        tls: raw.mysql.tls.unwrap_or(false),
    };
    let callback = callback_config(raw.callback, env)?;
    let admin = admin_config(raw.admin)?;
    let (gpus, health, placement) = gpu_config(raw.gpu, env)?;
    let retry = retry_config(&raw.retry)?;
    let retention = retention_config(&raw.retention)?;
    let types = types_config(raw.types, &gpus)?;
    let daemon = daemon_config(raw.daemon, &gpus)?;
    Ok(Config {
        redis,
        mysql,
        callback,
        admin,
        gpus,
        health,
        placement,
        retry,
        retention,
        types,
        daemon,
    })
}

/// Shortest retention: the counts roll a row up within a minute of its end, and only rolled-up
/// rows are deleted.
const MIN_RETENTION: Duration = Duration::from_secs(3600);

/// `[retention]`: each terminal state's retention, `"0"` to keep for ever; at least an hour.
fn retention_config(raw: &RawRetention) -> Result<crate::store::Retention, ConfigError> {
    let keep = |key: &str, value: &Option<String>, default: &str| {
        let value = value.clone().unwrap_or_else(|| default.to_string());
        match optional_duration(key, Some(&value))? {
            Some(d) if d < MIN_RETENTION => Err(invalid(
                key,
                &value,
                "must be at least 1h (or \"0\": keep for ever)",
            )),
            d => Ok(d),
        }
    };
    Ok(crate::store::Retention {
        finished: keep("retention.finished", &raw.finished, "14d")?,
        failed: keep("retention.failed", &raw.failed, "90d")?,
        cancelled: keep("retention.cancelled", &raw.cancelled, "90d")?,
    })
}

/// `[callback]`, with `CALLBACK_URL` over `public_url`.
fn callback_config(raw: RawCallback, env: &Env) -> Result<CallbackConfig, ConfigError> {
    let listen_s = raw.listen.as_deref().unwrap_or("0.0.0.0:8000");
    let listen: SocketAddr = listen_s
        .parse()
        .map_err(|_| invalid("callback.listen", listen_s, "expected IP:PORT"))?;
    let public_url = match env.get("CALLBACK_URL").or(raw.public_url.as_ref()) {
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
    let secret =
        read_secret("callback.secret", raw.secret, raw.secret_file.as_ref())?.ok_or_else(|| {
            invalid(
                "callback.secret",
                "",
                "not set: set callback.secret or callback.secret_file",
            )
        })?;
    if secret.expose().len() < 16 {
        return Err(invalid(
            "callback.secret",
            "***",
            "must be at least 16 characters",
        ));
    }
    let max_result_bytes = match raw.max_result_bytes.unwrap_or(65_536) {
        n if n > MAX_RESULT_BYTES => {
            return Err(invalid(
                "callback.max_result_bytes",
                n,
                format!("must be at most {MAX_RESULT_BYTES}"),
            ))
        }
        n => positive("callback.max_result_bytes", n)?,
    };
    // Bodies are read into memory before they are judged: a callback is a few hundred bytes
    // plus its result.
    let max_body = match raw.max_body {
        Some(n) if n > MAX_CALLBACK_BODY => {
            return Err(invalid("callback.max_body", n, "must be at most 16777216"))
        }
        Some(n) if n < max_result_bytes => {
            return Err(invalid(
                "callback.max_body",
                n,
                format!(
                    "must be at least callback.max_result_bytes ({max_result_bytes}): \
                     a callback carries its result"
                ),
            ))
        }
        Some(n) => n,
        None => max_result_bytes + BODY_BEYOND_RESULT,
    };
    Ok(CallbackConfig {
        listen,
        public_url,
        secret,
        max_body,
        max_result_bytes,
        tls: tls_files("callback", raw.tls_cert, raw.tls_key)?,
    })
}

/// `[admin]`: a token is required off loopback.
fn admin_config(raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
    let admin_s = raw.listen.as_deref().unwrap_or("127.0.0.1:8001");
    let admin = AdminConfig {
        listen: admin_s
            .parse()
            .map_err(|_| invalid("admin.listen", admin_s, "expected IP:PORT"))?,
        token: read_secret("admin.token", raw.token, raw.token_file.as_ref())?,
        tls: tls_files("admin", raw.tls_cert, raw.tls_key)?,
    };
    if !admin.listen.ip().is_loopback() && admin.token.is_none() {
        return Err(invalid(
            "admin.listen",
            admin_s,
            "not a loopback address: set admin.token or admin.token_file to protect task data",
        ));
    }
    Ok(admin)
}

/// The defaults `[gpu]` gives every endpoint.
struct GpuDefaults {
    slots: usize,
    completion: Completion,
    token: Option<Secret>,
    request_timeout: Duration,
    task_timeout: Duration,
    heartbeat_timeout: Option<Duration>,
    cancel_url: Option<String>,
    pool: String,
}

/// The keys of `[gpu]` that are the fleet's, not defaults for endpoints: the placement, and the
/// refusal of an endpoint's own keys there.
fn fleet_keys(d: &RawGpu) -> Result<Placement, ConfigError> {
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
    if let Some(speed) = d.speed {
        return Err(invalid(
            "gpu.speed",
            speed,
            "a GPU's own: set it in its [[gpu.endpoints]] entry",
        ));
    }
    match d.placement.as_deref().unwrap_or("predicted_finish") {
        "predicted_finish" => Ok(Placement::PredictedFinish),
        "least_loaded" => Ok(Placement::LeastLoaded),
        other => Err(invalid(
            "gpu.placement",
            other,
            "expected \"predicted_finish\" or \"least_loaded\"",
        )),
    }
}

/// `[gpu]` and its `[[gpu.endpoints]]`; `BEARER_TOKEN` overrides the default token.
fn gpu_config(
    mut d: RawGpu,
    env: &Env,
) -> Result<(Vec<Arc<Endpoint>>, HealthPolicy, Placement), ConfigError> {
    let placement = fleet_keys(&d)?;
    let endpoints = d.endpoints.take().unwrap_or_default();
    let default_slots = slot_count("gpu.slots", d.slots.unwrap_or(4))?;
    let default_completion = completion(
        "gpu.completion",
        d.completion.as_deref().unwrap_or("callback"),
    )?;
    let default_token = match env.get("BEARER_TOKEN") {
        Some(t) => Some(Secret::new(t.clone())),
        None => read_secret(
            "gpu.bearer_token",
            d.bearer_token.clone(),
            d.bearer_token_file.as_ref(),
        )?,
    };
    let default_request = duration("gpu.request_timeout", d.request_timeout.as_ref(), "30s")?;
    let default_task = duration("gpu.task_timeout", d.task_timeout.as_ref(), "30m")?;
    let health = HealthPolicy {
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

    let defaults = GpuDefaults {
        slots: default_slots,
        completion: default_completion,
        token: default_token,
        request_timeout: default_request,
        task_timeout: default_task,
        heartbeat_timeout: optional_duration(
            "gpu.heartbeat_timeout",
            d.heartbeat_timeout.as_ref(),
        )?,
        cancel_url: match &d.cancel_url {
            Some(u) => Some(http_url("gpu.cancel_url", u)?),
            None => None,
        },
        pool: match &d.pool {
            Some(p) => label("gpu.pool", p)?,
            None => DEFAULT_POOL.to_string(),
        },
    };
    let mut gpus: Vec<Arc<Endpoint>> = Vec::with_capacity(endpoints.len());
    for (i, e) in endpoints.into_iter().enumerate() {
        let endpoint = endpoint(i, e, &defaults)?;
        if gpus.iter().any(|g| g.id == endpoint.id) {
            return Err(invalid(
                format!("gpu.endpoints[{i}].id"),
                &endpoint.id,
                "duplicate endpoint id",
            ));
        }
        gpus.push(Arc::new(endpoint));
    }
    Ok((gpus, health, placement))
}

/// The pool of a GPU or a type that names none.
pub(crate) const DEFAULT_POOL: &str = "default";

/// A GPU's id or a pool's name: either labels metrics and `/status` lines.
fn label(key: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(invalid(
            key,
            name,
            "1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(name.to_string())
}

/// A GPU's seed speed: finite and above zero (cost units per second of wall time per attempt).
fn speed(key: &str, speed: Option<f64>) -> Result<Option<f64>, ConfigError> {
    match speed {
        Some(s) if !(s.is_finite() && s > 0.0 && s <= 1e9) => Err(invalid(
            key,
            s,
            "a speed above 0 and at most 1e9 (cost units per second per attempt)",
        )),
        s => Ok(s),
    }
}

/// `[[gpu.endpoints]]` entry `i`, its unset keys taken from `[gpu]`.
fn endpoint(i: usize, e: RawGpu, d: &GpuDefaults) -> Result<Endpoint, ConfigError> {
    let k = |f: &str| format!("gpu.endpoints[{i}].{f}");
    if e.endpoints.is_some() {
        return Err(invalid(k("endpoints"), "[...]", "endpoints do not nest"));
    }
    for (field, set) in [
        ("placement", e.placement.is_some()),
        ("eject_after", e.eject_after.is_some()),
        ("eject_cooldown", e.eject_cooldown.is_some()),
        ("eject_cooldown_max", e.eject_cooldown_max.is_some()),
    ] {
        if set {
            return Err(invalid(k(field), "…", "set in [gpu] for the whole fleet"));
        }
    }
    let id = label(
        &k("id"),
        &e.id
            .ok_or_else(|| invalid(k("id"), "", "every endpoint needs an id"))?,
    )?;
    let url = e
        .url
        .as_deref()
        .ok_or_else(|| invalid(k("url"), "", "every endpoint needs a url"))?;
    let token = read_secret(
        &k("bearer_token"),
        e.bearer_token.clone(),
        e.bearer_token_file.as_ref(),
    )?;
    let completion_mode = match &e.completion {
        Some(c) => completion(&k("completion"), c)?,
        None => d.completion,
    };
    let heartbeat = heartbeat_timeout(&k, e.heartbeat_timeout.as_ref(), completion_mode, d)?;
    Ok(Endpoint {
        url: http_url(&k("url"), url)?,
        health_url: match &e.health_url {
            Some(h) => http_url(&k("health_url"), h)?,
            None => url.to_string(),
        },
        slots: match e.slots {
            Some(n) => slot_count(&k("slots"), n)?,
            None => d.slots,
        },
        completion: completion_mode,
        bearer_token: token.or_else(|| d.token.clone()),
        request_timeout: match &e.request_timeout {
            Some(_) => duration(&k("request_timeout"), e.request_timeout.as_ref(), "")?,
            None => d.request_timeout,
        },
        task_timeout: match &e.task_timeout {
            Some(_) => duration(&k("task_timeout"), e.task_timeout.as_ref(), "")?,
            None => d.task_timeout,
        },
        heartbeat_timeout: heartbeat,
        cancel_url: match &e.cancel_url {
            Some(u) => Some(http_url(&k("cancel_url"), u)?),
            None => d.cancel_url.clone(),
        },
        pool: match &e.pool {
            Some(p) => label(&k("pool"), p)?,
            None => d.pool.clone(),
        },
        speed: speed(&k("speed"), e.speed)?,
        id,
    })
}

/// An endpoint's heartbeat timeout: its own, else `[gpu]`'s. Only for `callback` mode: a
/// `response`-mode attempt ends with its answer, and one expired while its call still runs would
/// be retried beside it, one task too many on that GPU; `[gpu]`'s does not reach such an endpoint,
/// and its own is refused.
fn heartbeat_timeout(
    k: &impl Fn(&str) -> String,
    value: Option<&String>,
    mode: Completion,
    d: &GpuDefaults,
) -> Result<Option<Duration>, ConfigError> {
    let own = optional_duration(&k("heartbeat_timeout"), value)?;
    match (mode, own) {
        (Completion::Response, Some(_)) => Err(invalid(
            k("heartbeat_timeout"),
            value.map_or("", String::as_str),
            "only for completion = \"callback\": a response-mode attempt ends with its answer",
        )),
        (Completion::Response, None) => Ok(None),
        (Completion::Callback, Some(t)) => Ok(Some(t)),
        (Completion::Callback, None) if value.is_some() => Ok(None),
        (Completion::Callback, None) => Ok(d.heartbeat_timeout),
    }
}

/// `[retry]`.
fn retry_config(raw: &RawRetry) -> Result<RetryConfig, ConfigError> {
    Ok(RetryConfig {
        max_attempts: match raw.max_attempts.unwrap_or(3) {
            0 => return Err(invalid("retry.max_attempts", 0, "must be at least 1")),
            n => n,
        },
        backoff: duration("retry.backoff", raw.backoff.as_ref(), "1s")?,
        backoff_max: duration("retry.backoff_max", raw.backoff_max.as_ref(), "1m")?,
    })
}

/// `[types]`: without the table the seed's GPU type is the only one known. A type that runs on
/// GPUs needs an endpoint.
fn types_config(
    raw: Option<BTreeMap<String, RawType>>,
    gpus: &[Arc<Endpoint>],
) -> Result<BTreeMap<String, Handler>, ConfigError> {
    let raw_types = raw.unwrap_or_else(|| {
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
        let handler = handler(&name, &t)?;
        if let Handler::Gpu { pool } = &handler {
            if gpus.is_empty() {
                return Err(invalid(
                    "gpu.endpoints",
                    "[]",
                    format!("task type {name:?} uses handler \"gpu\" but no [[gpu.endpoints]] is configured"),
                ));
            }
            if !gpus.iter().any(|g| &g.pool == pool) {
                return Err(invalid(
                    format!("types.{name}.pool"),
                    pool,
                    "no [[gpu.endpoints]] entry serves this pool",
                ));
            }
        }
        types.insert(name, handler);
    }
    Ok(types)
}

/// `[types.NAME]`: the handler and only the keys it uses.
fn handler(name: &str, t: &RawType) -> Result<Handler, ConfigError> {
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
    Ok(match t.handler.as_str() {
        "gpu" => {
            refuse("command", t.command.is_some())?;
            refuse("url", t.url.is_some())?;
            refuse("timeout", t.timeout.is_some())?;
            refuse("bearer_token", t.bearer_token.is_some())?;
            refuse("bearer_token_file", t.bearer_token_file.is_some())?;
            refuse("env", t.env.is_some())?;
            Handler::Gpu {
                pool: match &t.pool {
                    Some(p) => label(&k("pool"), p)?,
                    None => DEFAULT_POOL.to_string(),
                },
            }
        }
        "exec" => {
            refuse("pool", t.pool.is_some())?;
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
            refuse("pool", t.pool.is_some())?;
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
    })
}

/// `[daemon]`; the dispatch threads default to one per callback-mode slot.
fn daemon_config(rd: RawDaemon, gpus: &[Arc<Endpoint>]) -> Result<DaemonConfig, ConfigError> {
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
    Ok(DaemonConfig {
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
    })
}

//! The operator's commands (`qsysd status`, `drain`, `undrain`, `requeue`, `cancel`, `task`), run by the
//! `qsysd` binary in the operator's shell, not by the daemon.
//!
//! `status` asks the running daemon's admin API (live slot and health state exists only there);
//! the others work on MySQL (and Redis, for requeue) directly, so they also work while no daemon
//! runs, and every running instance picks the change up within a second (drains) or when it next
//! pops the queue (requeues), or within a second (cancels of running attempts). The daemon's admin
//! API calls [`requeue`] and [`cancel`] too.

use std::fmt::Write;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::store::{AttemptRecord, Cancel, PauseKind, State, Store, StoreError, TaskRecord};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("mysql: {0}")]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("admin api at {url}: {reason}")]
    Admin { url: String, reason: String },
    #[error("unknown {what} {id:?}")]
    NotFound { what: &'static str, id: String },
    /// Not a task id qsysd could ever have recorded (empty, over 255 bytes, control characters).
    #[error("task id {id:?}: {reason}")]
    BadTaskId { id: String, reason: String },
    #[error("{0}")]
    Busy(&'static str),
}

/// Makes a terminal task pending again and pushes it back to the tail of its queue. False if the
/// task is unknown or not terminal.
pub fn requeue(store: &Store, client: &redis::Client, task_id: &str) -> Result<bool, OpsError> {
    let Some((queue, payload)) = store.requeue(task_id)? else {
        return Ok(false);
    };
    let mut conn = crate::net::redis::connect(client, crate::net::redis::Timeouts::SHORT)?;
    redis::cmd("RPUSH")
        .arg(&queue)
        .arg(&payload)
        .query::<()>(&mut conn)?;
    Ok(true)
}

/// Longest cancel reason kept: it becomes the task's error.
pub const MAX_REASON: usize = 1000;

/// Whether each of `task_ids` can be a cancel's: checked before anything is cancelled, so a bad
/// one in a list leaves the others untouched. An id no element could carry (empty, over 255
/// bytes, control characters) is the caller's mistake, not MySQL's to refuse.
pub fn check_cancel(task_ids: &[&str]) -> Result<(), OpsError> {
    for id in task_ids {
        crate::contract::message::check_task_id(id).map_err(|reason| OpsError::BadTaskId {
            id: id.to_string(),
            reason,
        })?;
    }
    Ok(())
}

/// Cancels a task (see [`Cancel`]); `reason` (an operator's words, cut at [`MAX_REASON`]
/// bytes) becomes its error as `cancelled: <reason>`.
pub fn cancel(store: &Store, task_id: &str, reason: Option<&str>) -> Result<Cancel, OpsError> {
    check_cancel(&[task_id])?;
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    let reason = crate::store::truncate(reason.unwrap_or("by an operator"), MAX_REASON);
    Ok(store.cancel(task_id, &format!("cancelled: {reason}"))?)
}

/// What a cancel did, in words, for the CLI.
pub fn describe_cancel(outcome: &Cancel) -> String {
    match outcome {
        Cancel::Cancelled { was: None } => "cancelled before qsysd took it: it will not run".into(),
        Cancel::Cancelled { was: Some(_) } => "cancelled: it had not started".into(),
        Cancel::Requested => "cancel requested: its running attempt is being stopped".into(),
        Cancel::Terminal { state } => format!("already {state}; not cancelled"),
    }
}

/// The admin API's answer to a cancel: 200 cancelled, 202 being stopped, 409 already terminal.
pub(crate) fn cancel_reply(task_id: &str, outcome: &Cancel) -> (u16, Value) {
    match outcome {
        Cancel::Cancelled { was } => (
            200,
            serde_json::json!({ "task_id": task_id, "state": State::Cancelled.as_str(),
                                "was": was.map_or("unknown", State::as_str) }),
        ),
        Cancel::Requested => (
            202,
            serde_json::json!({ "task_id": task_id, "state": State::Processing.as_str(),
                                "cancel_requested": true }),
        ),
        Cancel::Terminal { state } => (
            409,
            serde_json::json!({ "error": "task is already terminal", "task_id": task_id,
                                "state": state }),
        ),
    }
}

/// The admin API's base URL for a config (a wildcard listen address is reached on loopback).
pub(crate) fn admin_url(config: &Config) -> String {
    let mut addr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if config.admin.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{addr}")
}

/// The client for the admin API: over TLS it trusts the certificates of `admin.tls_cert`, so the
/// operator needs no CA set up for a listener on loopback.
fn admin_agent(config: &Config) -> Result<ureq::Agent, String> {
    let Some(tls) = &config.admin.tls else {
        return Ok(crate::net::http::agent());
    };
    let pem = crate::config::read_capped(&tls.cert, 1 << 20)
        .map_err(|e| format!("{}: {e}", tls.cert.display()))?;
    Ok(crate::net::http::agent_trusting(pem.as_bytes()))
}

/// `GET <admin>/status` of the running daemon.
pub fn fetch_status(config: &Config) -> Result<Value, OpsError> {
    let url = format!("{}/status", admin_url(config));
    let admin_err = |reason: String| OpsError::Admin {
        url: url.clone(),
        reason,
    };
    let agent = admin_agent(config).map_err(admin_err)?;
    let req = agent
        .get(&url)
        .config()
        .timeout_global(Some(Duration::from_secs(10)))
        .build();
    let req = crate::net::http::authorize(req, config.admin.token.as_ref());
    let mut resp = req.call().map_err(|e| {
        admin_err(format!(
            "{} (is qsysd running?)",
            crate::net::http::describe(&e)
        ))
    })?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| admin_err(e.to_string()))?;
    if status != 200 {
        return Err(admin_err(format!("HTTP {status}: {text}")));
    }
    serde_json::from_str(&text).map_err(|e| admin_err(format!("not JSON: {e}")))
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A number with at most `decimals`, or `-` for none.
fn num(v: &Value, decimals: usize) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.decimals$}"))
}

/// The pools: GPUs up, capacity, backlog and time to drain.
fn pool_rows(doc: &Value, out: &mut String) {
    let _ = writeln!(
        out,
        "\n{:<12} {:>7} {:>9} {:>11} {:>12} {:>9}",
        "POOL", "GPUS UP", "BUSY", "CAPACITY/S", "BACKLOG", "DRAIN"
    );
    for p in doc["pools"].as_array().into_iter().flatten() {
        let drain = match p["time_to_drain_s"].as_f64() {
            Some(d) => crate::config::format_span(std::time::Duration::from_secs(d as u64)),
            None => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<12} {:>7} {:>9} {:>11} {:>12} {:>9}",
            s(&p["pool"]),
            format!("{}/{}", s(&p["gpus_up"]), s(&p["gpus"])),
            format!("{}/{}", s(&p["slots_busy"]), s(&p["slots_up"])),
            num(&p["capacity"], 2),
            num(&p["backlog_cost"], 0),
            drain
        );
    }
}

/// `qsysd status` as a table.
pub fn status_table(doc: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}  ({})", s(&doc["instance"]), s(&doc["summary"]));
    let _ = writeln!(
        out,
        "\n{:<12} {:<10} {:<9} {:>9} {:>8} {:>11} {:>9}  LAST ERROR",
        "GPU", "POOL", "HEALTH", "BUSY", "SPEED", "DISPATCHED", "FAILURES"
    );
    for g in doc["gpus"].as_array().into_iter().flatten() {
        let mut health = s(&g["health"]);
        if g["drained"] == true {
            health = "drained".into();
        }
        if g["retired"] == true {
            health = "removed".into();
        }
        let _ = writeln!(
            out,
            "{:<12} {:<10} {:<9} {:>9} {:>8} {:>11} {:>9}  {}",
            s(&g["id"]),
            s(&g["pool"]),
            health,
            format!("{}/{}", s(&g["busy"]), s(&g["slots"])),
            num(&g["speed"], 2),
            s(&g["dispatched"]),
            s(&g["failures"]),
            s(&g["last_error"])
        );
    }
    pool_rows(doc, &mut out);
    let _ = writeln!(out, "\n{:<32} {:>9} {:>9}", "QUEUE", "WAITING", "OLDEST");
    for q in doc["queues"].as_array().into_iter().flatten() {
        let oldest = match (q["depth"].as_u64(), q["oldest_s"].as_f64()) {
            (Some(d), Some(a)) if d > 0 => {
                crate::config::format_duration(std::time::Duration::from_secs(a as u64))
            }
            _ => "-".into(),
        };
        let paused = if q["paused"] == true { "  paused" } else { "" };
        let _ = writeln!(
            out,
            "{:<32} {:>9} {:>9}{paused}",
            s(&q["name"]),
            s(&q["depth"]),
            oldest
        );
    }
    let paused: Vec<String> = doc["types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["paused"] == true)
        .map(|t| s(&t["name"]))
        .collect();
    if !paused.is_empty() {
        let _ = writeln!(out, "\nPAUSED TYPES  {}", paused.join(", "));
    }
    let _ = writeln!(out, "\n{:<12} {:>9}", "STATE", "TASKS");
    if let Some(states) = doc["states"].as_object() {
        for (k, v) in states {
            let _ = writeln!(out, "{k:<12} {:>9}", s(v));
        }
    }
    if let Some(p) = doc["problems"].as_object().filter(|p| !p.is_empty()) {
        let _ = writeln!(out, "\nPROBLEMS");
        for (k, v) in p {
            let _ = writeln!(out, "{k}: {}", s(v));
        }
    }
    out
}

/// `qsysd task <id>`: one task's whole story.
pub fn task_report(task: &TaskRecord, attempts: &[AttemptRecord]) -> String {
    let o = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let _ = writeln!(out, "task      {}", task.task_id);
    let _ = writeln!(out, "type      {}", o(&task.kind));
    let _ = writeln!(out, "queue     {}", o(&task.queue));
    let _ = writeln!(out, "state     {}", o(&task.state));
    let _ = writeln!(
        out,
        "attempts  {} (requeued {} times)",
        task.attempts, task.requeues
    );
    let _ = writeln!(out, "created   {}", o(&task.created_at));
    let _ = writeln!(out, "finished  {}", o(&task.finished_at));
    if let Some(e) = &task.error {
        let _ = writeln!(out, "error     {e}");
    }
    if let Some(at) = &task.cancel_requested_at {
        let _ = writeln!(out, "cancel    asked {at}");
    }
    if let Some(at) = &task.heartbeat_at {
        let progress = task
            .progress
            .map(|p| format!("{:.0}%", p * 100.0))
            .unwrap_or_else(|| "-".into());
        let message = task.progress_message.as_deref().unwrap_or("");
        let _ = writeln!(out, "heartbeat {at}  progress {progress}  {message}");
    }
    if let Some(r) = &task.result {
        let _ = writeln!(out, "result    {r}");
    }
    let _ = writeln!(
        out,
        "\n{:>3} {:<10} {:>4} {:<23} {:<23} {:<9} ERROR",
        "#", "GPU", "SLOT", "STARTED", "ENDED", "OUTCOME"
    );
    for a in attempts {
        let _ = writeln!(
            out,
            "{:>3} {:<10} {:>4} {:<23} {:<23} {:<9} {}",
            a.attempt,
            o(&a.gpu_id),
            a.slot_index.map(|n| n.to_string()).unwrap_or("-".into()),
            o(&a.started_at),
            o(&a.ended_at),
            a.outcome,
            o(&a.error)
        );
    }
    out
}

/// Looks a task and its attempts up.
pub fn task(store: &Store, task_id: &str) -> Result<(TaskRecord, Vec<AttemptRecord>), OpsError> {
    let t = store.task(task_id)?.ok_or_else(|| OpsError::NotFound {
        what: "task",
        id: task_id.to_string(),
    })?;
    Ok((t, store.attempts(task_id)?))
}

/// Connects to the config's MySQL for a one-off command.
pub fn store(config: &Config) -> Result<Store, OpsError> {
    let store = Store::connect(
        &config.mysql.url,
        config.mysql.tls,
        &config.daemon.instance_id,
        2,
    )?;
    store.migrate()?;
    Ok(store)
}

/// Checks that `name` is a configured queue or type, for a pause or a resume.
pub(crate) fn pausable(config: &Config, kind: PauseKind, name: &str) -> Result<(), OpsError> {
    let known = match kind {
        PauseKind::Queue => config.redis.queues.iter().any(|q| q == name),
        PauseKind::Type => config.types.contains_key(name),
    };
    if known {
        Ok(())
    } else {
        Err(OpsError::NotFound {
            what: match kind {
                PauseKind::Queue => "queue",
                PauseKind::Type => "task type",
            },
            id: name.to_string(),
        })
    }
}

/// Pauses or resumes a configured queue or type fleet-wide (persisted): every instance honours
/// it within a second. True when it changed anything.
pub fn set_paused(
    config: &Config,
    kind: PauseKind,
    name: &str,
    paused: bool,
) -> Result<bool, OpsError> {
    pausable(config, kind, name)?;
    let by = format!("cli@{}", crate::config::hostname());
    Ok(store(config)?.set_paused(kind, name, paused, &by)?)
}

/// `qsysd prune`: deletes every task past its state's retention (or, with `dry_run`, counts
/// them), by state. Holds the fleet-wide prune lock, so a daemon's prune waits its turn.
pub fn prune(config: &Config, dry_run: bool) -> Result<Vec<(State, u64)>, OpsError> {
    let store = store(config)?;
    // Rows that ended up to a minute ago can then count: only rolled-up rows are deleted.
    store.roll_up()?;
    let retention = &config.retention;
    if dry_run {
        return retention
            .states()
            .into_iter()
            .map(|(state, keep)| Ok((state, store.prunable(state, keep)?)))
            .collect();
    }
    match store.with_prune_lock(|| store.prune(retention, |_| true))? {
        Some(done) => Ok(done?),
        None => Err(OpsError::Busy(
            "another instance is pruning; try again in a minute",
        )),
    }
}

/// Drains or undrains `gpu` fleet-wide (persisted): it must be a configured GPU.
pub fn set_drained(config: &Config, gpu: &str, drained: bool) -> Result<(), OpsError> {
    if !config.gpus.iter().any(|g| g.id == gpu) {
        return Err(OpsError::NotFound {
            what: "gpu",
            id: gpu.to_string(),
        });
    }
    let by = format!("cli@{}", crate::config::hostname());
    store(config)?.set_drained(gpu, drained, &by)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_shows_each_gpu_and_queue() {
        let doc = serde_json::json!({
            "instance": "host-a", "summary": "1/8 GPU slots busy",
            "gpus": [
                {"id": "g0", "pool": "default", "health": "up", "drained": false, "busy": 1,
                 "slots": 4, "speed": 3.25, "dispatched": 10, "failures": 0, "last_error": null},
                {"id": "g1", "pool": "default", "health": "ejected", "drained": true, "busy": 0,
                 "slots": 4, "speed": null, "dispatched": 3, "failures": 3,
                 "last_error": "g1: connection failed"}
            ],
            "pools": [{"pool": "default", "gpus": 2, "gpus_up": 1, "slots_busy": 1,
                       "slots_up": 4, "capacity": 13.0, "backlog_cost": 650.4,
                       "time_to_drain_s": 50.03}],
            "queues": [{"name": "task_queue_1", "depth": 7}],
            "states": {"pending": 0, "finished": 12},
            "problems": {}
        });
        let t = status_table(&doc);
        assert!(
            t.contains("g0           default    up              1/4     3.25"),
            "{t}"
        );
        assert!(
            t.contains("g1           default    drained         0/4        -"),
            "{t}"
        );
        assert!(
            t.contains("default          1/2       1/4       13.00          650       50s"),
            "{t}"
        );
        assert!(t.contains("g1: connection failed"));
        assert!(t.contains("task_queue_1") && t.contains("7"));
        assert!(t.contains("finished") && !t.contains("PROBLEMS"));
    }
}

//! The `/status` document: GPUs and their slots, pools and their backlog, queues, counts by
//! state, recent failures (what `qsysd status` and the dashboard show).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::fleet::Health;
use crate::shared::Shared;
use crate::store::Liveness;
use crate::sync::Locked;

/// How many failures `/status` lists.
const RECENT_FAILURES: usize = 20;

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Ejected { .. } => "ejected",
        Health::Probing => "probing",
    }
}

/// One GPU's slot cells: the task in each, with its heartbeat's progress when it has one.
fn cells(g: &crate::fleet::GpuView, live: &HashMap<String, Liveness>) -> Vec<Value> {
    g.cells
        .iter()
        .enumerate()
        .map(|(i, c)| match c {
            Some(h) => {
                let mut cell = json!({
                    "slot": i, "task_id": h.task_id, "attempt": h.attempt,
                    "running_s": (h.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                });
                if let Some(l) = live.get(&h.task_id) {
                    cell["heartbeat_at"] = json!(l.heartbeat_at);
                    cell["heartbeat_age_s"] = json!(l.heartbeat_age_s);
                    cell["progress"] = json!(l.progress);
                    cell["message"] = json!(l.message);
                    cell["cancelling"] = json!(l.cancelling);
                }
                cell
            }
            None => json!({ "slot": i }),
        })
        .collect()
}

/// The GPUs with their slots (a removed GPU only while it still runs something).
fn gpus(shared: &Shared, live: &HashMap<String, Liveness>) -> Vec<Value> {
    shared
        .slots()
        .view()
        .into_iter()
        .filter(|g| !(g.retired && g.cells.iter().all(Option::is_none)))
        .map(|g| {
            json!({
                "id": g.id,
                "pool": g.pool,
                "speed": g.speed.map(round3),
                "health": health_name(g.health),
                "drained": g.drained,
                "retired": g.retired,
                "slots": g.slots,
                "usable": g.limit,
                "busy": g.cells.iter().filter(|c| c.is_some()).count(),
                "dispatched": g.dispatched,
                "failures": g.failed,
                "last_error": g.last_error,
                "cells": cells(&g, live),
            })
        })
        .collect()
}

/// Three decimals are plenty for a speed or a cost, and keep the document readable.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The pools: their GPUs and slots up, capacity, backlog and time to drain.
fn pools(shared: &Shared) -> Vec<Value> {
    shared
        .pools
        .locked()
        .iter()
        .map(|d| {
            let v = &d.view;
            json!({
                "pool": v.pool,
                "gpus": v.gpus,
                "gpus_up": v.gpus_up,
                "slots_up": v.slots_up,
                "slots_busy": v.slots_busy,
                "capacity": v.capacity.map(round3),
                "median_cost": v.median_cost.map(round3),
                "backlog_cost": round3(d.backlog_cost),
                "time_to_drain_s": d.drain_s.map(round3),
            })
        })
        .collect()
}

/// The queues (depth, oldest age, paused) and the task types (handler, paused).
fn queues_and_types(shared: &Shared) -> (Vec<Value>, Vec<Value>) {
    let paused = shared.paused();
    let ages = shared.queue_ages.locked().clone();
    let queues = shared
        .queue_depths
        .locked()
        .iter()
        .map(|(q, n)| {
            json!({ "name": q, "depth": n, "oldest_s": ages.get(q).copied().unwrap_or(0.0),
                    "paused": paused.queues.contains(q) })
        })
        .collect();
    let types = shared
        .config()
        .types
        .iter()
        .map(|(name, h)| {
            let (handler, pool) = match h {
                crate::config::Handler::Gpu { pool } => ("gpu", Some(pool)),
                crate::config::Handler::Exec { .. } => ("exec", None),
                crate::config::Handler::Http { .. } => ("http", None),
            };
            json!({ "name": name, "handler": handler, "pool": pool,
                    "paused": paused.types.contains(name) })
        })
        .collect();
    (queues, types)
}

/// The `/status` document.
pub(crate) fn status(shared: &Shared) -> Value {
    let mut problems = shared.problems();
    // Heartbeats may land on any instance: MySQL has them all.
    let live = shared.store.liveness().unwrap_or_else(|e| {
        problems.insert("mysql", e.to_string());
        Default::default()
    });
    let gpus = gpus(shared, &live);
    let (queues, types) = queues_and_types(shared);
    let mut states: BTreeMap<String, u64> =
        ["pending", "processing", "finished", "failed", "cancelled"]
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
    match shared.store.counts() {
        Ok(counts) => {
            for ((state, _), n) in counts {
                *states.entry(state).or_insert(0) += n;
            }
        }
        Err(e) => {
            problems.insert("mysql", e.to_string());
        }
    }
    let failures = shared
        .store
        .recent_failures(RECENT_FAILURES)
        .unwrap_or_default();
    let m = &shared.metrics;
    json!({
        "instance": shared.config().daemon.instance_id,
        "summary": shared.status_line(),
        "gpus": gpus,
        "pools": pools(shared),
        "queues": queues,
        "types": types,
        "states": states,
        "throughput": {
            "finished": m.attempts.get("finished"),
            "failed": m.attempts.get("failed"),
            "expired": m.attempts.get("expired"),
            "cancelled": m.attempts.get("cancelled"),
        },
        "recent_failures": failures,
        "problems": problems,
    })
}

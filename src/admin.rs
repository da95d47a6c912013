//! The admin server (`qsys-admin`): `tiny_http` on `admin.listen` (loopback by default), apart from
//! the callback listener so that a GPU host that can reach `/callback` cannot read task data.
//!
//! - `GET /healthz`: 200 when MySQL and Redis answer and every thread lives, else 503 saying what
//!   is wrong (always open, for load balancers and probes);
//! - `GET /metrics`: Prometheus text format ([`crate::metrics`] plus gauges read at scrape time);
//! - `GET /status`: GPUs and their slots, queues, counts by state, recent failures (JSON; what
//!   `qsysd status` and the dashboard show);
//! - `GET /tasks/<id>`: one task and its attempts;
//! - `POST /gpus/<id>/drain`, `POST /gpus/<id>/undrain`, `POST /tasks/<id>/requeue`: the operator's
//!   actions, each logged.
//!
//! With `admin.token` set, every request but `/healthz` needs `Authorization: Bearer <token>`.
//! Requests are served one at a time: each is a few short queries.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::callback::{health, reply};
use crate::metrics::label;
use crate::shared::Shared;
use crate::slots::Health;

/// How many failures `/status` lists.
const RECENT_FAILURES: usize = 20;

fn authorized(shared: &Shared, req: &Request) -> bool {
    let Some(token) = shared.config().admin.token.clone() else {
        return true;
    };
    let want = format!("Bearer {}", token.expose());
    req.headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .is_some_and(|h| {
            let got = h.value.as_str().as_bytes();
            // Constant time: the comparison must not leak how much of the token matched.
            got.len() == want.len()
                && got
                    .iter()
                    .zip(want.as_bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Ejected { .. } => "ejected",
        Health::Probing => "probing",
    }
}

/// The `/status` document.
pub fn status(shared: &Shared) -> Value {
    let gpus: Vec<Value> = shared
        .slots()
        .view()
        .into_iter()
        .filter(|g| !(g.retired && g.cells.iter().all(Option::is_none)))
        .map(|g| {
            let cells: Vec<Value> = g
                .cells
                .iter()
                .enumerate()
                .map(|(i, c)| match c {
                    Some(h) => json!({
                        "slot": i, "task_id": h.task_id, "attempt": h.attempt,
                        "running_s": (h.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                    }),
                    None => json!({ "slot": i }),
                })
                .collect();
            json!({
                "id": g.id,
                "health": health_name(g.health),
                "drained": g.drained,
                "retired": g.retired,
                "slots": g.slots,
                "usable": g.limit,
                "busy": g.cells.iter().filter(|c| c.is_some()).count(),
                "dispatched": g.dispatched,
                "failures": g.failed,
                "last_error": g.last_error,
                "cells": cells,
            })
        })
        .collect();
    let queues: Vec<Value> = shared
        .queue_depths
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(q, n)| json!({ "name": q, "depth": n }))
        .collect();
    let mut states: BTreeMap<String, u64> = ["pending", "processing", "finished", "failed"]
        .iter()
        .map(|s| (s.to_string(), 0))
        .collect();
    let mut problems = shared.problems();
    match shared.store.counts() {
        Ok(rows) => {
            for (state, _, n) in rows {
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
        "queues": queues,
        "states": states,
        "throughput": {
            "finished": m.attempts.get("finished"),
            "failed": m.attempts.get("failed"),
            "expired": m.attempts.get("expired"),
        },
        "recent_failures": failures,
        "problems": problems,
    })
}

/// Reads one per-GPU number off a slot-matrix row.
type GpuGauge = fn(&crate::slots::GpuView) -> u64;

/// The `/metrics` document.
pub fn metrics(shared: &Shared) -> String {
    let mut out = String::new();
    out.push_str("# HELP qsys_tasks Tasks in MySQL, by state and type.\n# TYPE qsys_tasks gauge\n");
    if let Ok(rows) = shared.store.counts() {
        for (state, kind, n) in rows {
            let _ = writeln!(
                out,
                "qsys_tasks{{state=\"{}\",type=\"{}\"}} {n}",
                label(&state),
                label(&kind)
            );
        }
    }
    out.push_str(
        "# HELP qsys_queue_depth Tasks waiting in a Redis queue.\n# TYPE qsys_queue_depth gauge\n",
    );
    for (q, n) in shared
        .queue_depths
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(out, "qsys_queue_depth{{queue=\"{}\"}} {n}", label(q));
    }
    let view = shared.slots().view();
    let gauges: [(&str, &str, GpuGauge); 4] = [
        ("qsys_gpu_slots", "Configured slots of a GPU.", |g| {
            g.slots as u64
        }),
        (
            "qsys_gpu_slots_busy",
            "Slots of a GPU running a task.",
            |g| g.cells.iter().filter(|c| c.is_some()).count() as u64,
        ),
        (
            "qsys_gpu_up",
            "1 when a GPU takes work (up and not drained).",
            |g| u64::from(g.health == Health::Up && !g.drained && !g.retired),
        ),
        ("qsys_gpu_dispatches_total", "Dispatches to a GPU.", |g| {
            g.dispatched
        }),
    ];
    for (name, help, f) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for g in &view {
            let _ = writeln!(out, "{name}{{gpu=\"{}\"}} {}", label(&g.id), f(g));
        }
    }
    shared.metrics.render(&mut out);
    out
}

fn drain(shared: &Shared, gpu: &str, drained: bool) -> (u16, Value) {
    if shared.slots().index(gpu).is_none() {
        return (404, json!({ "error": "unknown gpu", "gpu": gpu }));
    }
    let by = format!("admin@{}", shared.config().daemon.instance_id);
    match shared.store.set_drained(gpu, drained, &by) {
        Ok(()) => {
            let all = shared.store.drained().unwrap_or_default();
            shared.slots().set_drained(&all);
            shared.wake_scheduler();
            log::warn!(gpu, drained; "gpu drain changed from the admin api");
            (200, json!({ "gpu": gpu, "drained": drained }))
        }
        Err(e) => (503, json!({ "error": e.to_string() })),
    }
}

fn route(shared: &Shared, client: &redis::Client, mut req: Request) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    if path != "/healthz" && !authorized(shared, &req) {
        return reply(req, 401, &json!({ "error": "admin token required" }));
    }
    // Actions carry no body worth reading; drain it so the connection stays usable.
    let _ = crate::callback::read_body(&mut req, 4096);
    let (status, body) = match (&method, parts.as_slice()) {
        (Method::Get, ["healthz"]) => health(shared),
        (Method::Get, ["metrics"]) => {
            let text = metrics(shared);
            let header = Header::from_bytes("Content-Type", "text/plain; version=0.0.4")
                .expect("static header is valid");
            let _ = req.respond(Response::from_string(text).with_header(header));
            return;
        }
        (Method::Get, ["status"]) => (200, status(shared)),
        (Method::Get, ["tasks", id]) => match (shared.store.task(id), shared.store.attempts(id)) {
            (Ok(Some(task)), Ok(attempts)) => (200, json!({ "task": task, "attempts": attempts })),
            (Ok(None), _) => (404, json!({ "error": "unknown task", "task_id": id })),
            (Err(e), _) | (_, Err(e)) => (503, json!({ "error": e.to_string() })),
        },
        (Method::Post, ["gpus", gpu, "drain"]) => drain(shared, gpu, true),
        (Method::Post, ["gpus", gpu, "undrain"]) => drain(shared, gpu, false),
        (Method::Post, ["tasks", id, "requeue"]) => {
            match crate::ops::requeue(&shared.store, client, id) {
                Ok(true) => {
                    log::warn!(task_id = *id; "task requeued from the admin api");
                    (200, json!({ "task_id": id, "requeued": true }))
                }
                Ok(false) => (
                    409,
                    json!({ "error": "task is not terminal (or unknown)", "task_id": id }),
                ),
                Err(e) => (503, json!({ "error": e.to_string() })),
            }
        }
        (_, ["healthz" | "metrics" | "status"])
        | (_, ["tasks", _])
        | (_, ["gpus", _, "drain" | "undrain"])
        | (_, ["tasks", _, "requeue"]) => (405, json!({ "error": "method not allowed" })),
        _ => (404, json!({ "error": "not found" })),
    };
    reply(req, status, &body);
}

/// Serves until the stop reaches its closing stage.
pub fn serve(shared: Arc<Shared>, server: Server, client: redis::Client) {
    while !shared.stop.is_closing() {
        shared.tick("qsys-admin");
        match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(req)) => route(&shared, &client, req),
            Ok(None) => {}
            Err(e) => {
                log::error!(error:% = e; "admin listener failed");
                return;
            }
        }
    }
    log::debug!("admin server stopped");
}

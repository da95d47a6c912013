//! The admin server (`qsys-admin`): `tiny_http` on `admin.listen` (loopback by default), apart from
//! the callback listener so that a GPU host that can reach `/callback` cannot read task data.
//!
//! - `GET /healthz`: 200 when MySQL and Redis answer and every thread lives, else 503 saying what
//!   is wrong (always open, for load balancers and probes);
//! - `GET /metrics`: Prometheus text format ([`crate::obs::metrics`] plus gauges read at scrape time);
//! - `GET /status`: GPUs and their slots, queues, counts by state, recent failures (JSON; what
//!   `qsysd status` and the dashboard show);
//! - `GET /tasks/<id>`: one task and its attempts;
//! - `GET /`: the dashboard, one static page (`src/dashboard.html`) that polls `/status`;
//! - `POST /gpus/<id>/drain`, `POST /gpus/<id>/undrain`, `POST /tasks/<id>/requeue`: the operator's
//!   actions, each logged;
//! - `GET /openapi.json`: the OpenAPI 3.1 description of both listeners (`docs/openapi.json`).
//!
//! With `admin.token` set, every request but `/healthz` needs `Authorization: Bearer <token>`;
//! `GET /` also takes it as `?token=` (a browser cannot send a header when it opens a page), and
//! without it answers with a small login form. Without a token (loopback only), a browser request
//! from another site's page (`Origin`) or through a name that is not loopback (DNS rebinding) is
//! refused.
//! Requests are served one at a time: each is a few short queries.

pub mod ops;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::fleet::Health;
use crate::net::server::{not_allowed, reply};
use crate::obs::metrics::label;
use crate::shared::Shared;
use crate::sync::Locked;

/// How many failures `/status` lists.
const RECENT_FAILURES: usize = 20;

/// The dashboard, built into the binary: plain HTML, CSS and JavaScript, no build chain.
const DASHBOARD: &str = include_str!("dashboard.html");
/// What `GET /` answers without a valid token: a form that asks for one.
const LOGIN: &str = include_str!("dashboard-login.html");

/// Constant time: the comparison must not leak how much of the token matched.
fn same_secret(got: &[u8], want: &[u8]) -> bool {
    got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn header<'a>(req: &'a Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Whether the request carries the admin token (or none is configured). `query_token`: the page's
/// `?token=`, accepted for `GET /` only.
fn authorized(shared: &Shared, req: &Request, query_token: Option<&str>) -> bool {
    let Some(token) = shared.config().admin.token.clone() else {
        return true;
    };
    let want = crate::net::http::bearer(&token);
    header(req, "Authorization").is_some_and(|got| same_secret(got.as_bytes(), want.as_bytes()))
        || query_token.is_some_and(|got| same_secret(got.as_bytes(), token.expose().as_bytes()))
}

/// Why a browser request must be refused, if it must. Only a listener without a token needs this:
/// a page elsewhere cannot add the bearer header to its requests, but without a token it could
/// drain a GPU (cross-site POST) or, through a name of its own that resolves to loopback (DNS
/// rebinding), read task data. Clients other than browsers send no `Origin` and are unaffected.
fn foreign(shared: &Shared, req: &Request) -> Option<&'static str> {
    if shared.config().admin.token.is_some() {
        return None;
    }
    let host = header(req, "Host").unwrap_or("");
    if let Some(origin) = header(req, "Origin") {
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if origin_host != host {
            return Some("cross-origin request refused");
        }
    }
    // A tokenless listener is loopback (the config insists), so only loopback names reach it
    // honestly.
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    let loopback = name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !host.is_empty() && !loopback {
        return Some("host name refused (use a loopback address, or set admin.token)");
    }
    None
}

/// One path segment with its `%XX` escapes decoded (task ids may hold anything).
fn decode_segment(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Serves a built-in page. The headers keep it from being framed (a hidden drain button), from
/// leaking a `?token=` through `Referer`, and from running anything but its own inline script.
fn page(req: Request, status: u16, html: &'static str) {
    let headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        (
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
             frame-ancestors 'none'",
        ),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
    ];
    let mut resp = Response::from_string(html).with_status_code(status);
    for (k, v) in headers {
        resp.add_header(Header::from_bytes(k, v).expect("static header is valid"));
    }
    let _ = req.respond(resp);
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Up => "up",
        Health::Ejected { .. } => "ejected",
        Health::Probing => "probing",
    }
}

/// The `/status` document.
pub(crate) fn status(shared: &Shared) -> Value {
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
        .locked()
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
type GpuGauge = fn(&crate::fleet::GpuView) -> u64;

/// The `/metrics` document.
pub(crate) fn metrics(shared: &Shared) -> String {
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
    for (q, n) in shared.queue_depths.locked().iter() {
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

fn route(shared: &Shared, client: &redis::Client, req: Request) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(decode_segment)
        .collect();
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    if path == "/healthz" {
        if method != Method::Get {
            return not_allowed(req, "GET");
        }
        let (status, body) = shared.health();
        return reply(req, status, &body);
    }
    if let Some(why) = foreign(shared, &req) {
        log::warn!(reason = why; "admin request refused");
        return reply(req, 403, &json!({ "error": why }));
    }
    if method == Method::Get && path == "/" {
        let token = url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
        return if authorized(shared, &req, token.as_deref()) {
            page(req, 200, DASHBOARD)
        } else {
            page(req, 401, LOGIN)
        };
    }
    if !authorized(shared, &req, None) {
        return reply(req, 401, &json!({ "error": "admin token required" }));
    }
    // Actions carry no body worth reading; the listener has read (or refused) it already.
    if crate::net::server::body_refused(&req, MAX_BODY) {
        let body = json!({ "error": format!("body larger than {MAX_BODY} bytes") });
        return reply(req, 413, &body);
    }
    let (status, body) = match (&method, parts.as_slice()) {
        (Method::Get, ["metrics"]) => {
            let text = metrics(shared);
            let header = Header::from_bytes("Content-Type", "text/plain; version=0.0.4")
                .expect("static header is valid");
            let _ = req.respond(Response::from_string(text).with_header(header));
            return;
        }
        (Method::Get, ["status"]) => (200, status(shared)),
        (Method::Get, ["openapi.json"]) => {
            let header = Header::from_bytes("Content-Type", "application/json")
                .expect("static header is valid");
            let _ = req.respond(Response::from_string(OPENAPI).with_header(header));
            return;
        }
        (Method::Get, ["tasks", id]) => match (shared.store.task(id), shared.store.attempts(id)) {
            (Ok(Some(task)), Ok(attempts)) => (200, json!({ "task": task, "attempts": attempts })),
            (Ok(None), _) => (404, json!({ "error": "unknown task", "task_id": id })),
            (Err(e), _) | (_, Err(e)) => (503, json!({ "error": e.to_string() })),
        },
        (Method::Post, ["gpus", gpu, "drain"]) => drain(shared, gpu, true),
        (Method::Post, ["gpus", gpu, "undrain"]) => drain(shared, gpu, false),
        (Method::Post, ["tasks", id, "requeue"]) => {
            match crate::admin::ops::requeue(&shared.store, client, id) {
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
        (_, ["" | "metrics" | "status" | "openapi.json"]) | (_, ["tasks", _]) => {
            return not_allowed(req, "GET")
        }
        (_, ["gpus", _, "drain" | "undrain"]) | (_, ["tasks", _, "requeue"]) => {
            return not_allowed(req, "POST")
        }
        _ => (404, json!({ "error": "not found" })),
    };
    reply(req, status, &body);
}

/// The OpenAPI description of the callback and admin APIs, served at `/openapi.json`.
const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Largest request body the admin listener reads: actions carry none worth reading.
pub(crate) const MAX_BODY: usize = 4096;

/// Serves until the stop reaches its closing stage.
pub(crate) fn serve(shared: Arc<Shared>, server: Server, client: redis::Client) {
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

#[cfg(test)]
mod tests {
    use super::decode_segment;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(decode_segment("rep%3Cb%3E1%3C%2Fb%3E"), "rep<b>1</b>");
        assert_eq!(decode_segment("a%20b%C3%A9"), "a bé");
        // Malformed escapes stay as they are.
        assert_eq!(decode_segment("100%"), "100%");
        assert_eq!(decode_segment("%zz%4"), "%zz%4");
    }
}

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
//! - `POST /gpus/<id>/drain`, `POST /gpus/<id>/undrain`, `POST /tasks/<id>/requeue`,
//!   `POST /tasks/<id>/cancel` (optional `{"reason": "..."}` or `?reason=`),
//!   `POST /queues/<q>/pause|resume`, `POST /types/<t>/pause|resume`: the operator's actions,
//!   each logged;
//! - `GET /openapi.json`: the OpenAPI 3.1 description of both listeners (`docs/openapi.json`).
//!
//! With `admin.token` set, every request but `/healthz` needs `Authorization: Bearer <token>`;
//! `GET /` also takes it as `?token=` (a browser cannot send a header when it opens a page), and
//! without it answers with a small login form. Without a token (loopback only), a browser request
//! from another site's page (`Origin`) or through a name that is not loopback (DNS rebinding) is
//! refused.
//! Requests are served one at a time: each is a few short queries.

mod auth;
mod dashboard;
mod metrics;
pub mod ops;
mod status;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use auth::{authorized, foreign};
use dashboard::{page, DASHBOARD, LOGIN};

use crate::net::server::{not_allowed, reply};
use crate::shared::Shared;

/// Largest request body the admin listener reads: only a cancel's reason is worth reading.
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

/// The OpenAPI description of the callback and admin APIs, served at `/openapi.json`.
const OPENAPI: &str = include_str!("../../docs/openapi.json");

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
    // The listener has read (or refused) the body already.
    if crate::net::server::body_refused(&req, MAX_BODY) {
        let body = json!({ "error": format!("body larger than {MAX_BODY} bytes") });
        return reply(req, 413, &body);
    }
    api(shared, client, req, &method, &parts, query);
}

/// One authorized API request, by method and decoded path segments.
fn api(
    shared: &Shared,
    client: &redis::Client,
    mut req: Request,
    method: &Method,
    parts: &[&str],
    query: &str,
) {
    let (status, body) = match (method, parts) {
        (Method::Get, ["metrics"]) => {
            return text(req, metrics::metrics(shared), "text/plain; version=0.0.4")
        }
        (Method::Get, ["status"]) => (200, status::status(shared)),
        (Method::Get, ["openapi.json"]) => return text(req, OPENAPI.into(), "application/json"),
        (Method::Get, ["tasks", id]) => match (shared.store.task(id), shared.store.attempts(id)) {
            (Ok(Some(task)), Ok(attempts)) => (200, json!({ "task": task, "attempts": attempts })),
            (Ok(None), _) => (404, json!({ "error": "unknown task", "task_id": id })),
            (Err(e), _) | (_, Err(e)) => (503, json!({ "error": e.to_string() })),
        },
        (Method::Post, ["gpus", gpu, "drain"]) => drain(shared, gpu, true),
        (Method::Post, ["gpus", gpu, "undrain"]) => drain(shared, gpu, false),
        (Method::Post, ["tasks", id, "requeue"]) => requeue(shared, client, id),
        (Method::Post, ["queues", name, verb @ ("pause" | "resume")]) => pause(
            shared,
            crate::store::PauseKind::Queue,
            name,
            *verb == "pause",
        ),
        (Method::Post, ["types", name, verb @ ("pause" | "resume")]) => pause(
            shared,
            crate::store::PauseKind::Type,
            name,
            *verb == "pause",
        ),
        (Method::Post, ["tasks", id, "cancel"]) => match cancel_reason(&mut req, query) {
            Ok(reason) => cancel(shared, id, reason.as_deref()),
            Err(e) => (400, json!({ "error": e })),
        },
        (_, ["" | "metrics" | "status" | "openapi.json"]) | (_, ["tasks", _]) => {
            return not_allowed(req, "GET")
        }
        (_, ["gpus", _, "drain" | "undrain"])
        | (_, ["tasks", _, "requeue" | "cancel"])
        | (_, ["queues" | "types", _, "pause" | "resume"]) => return not_allowed(req, "POST"),
        _ => (404, json!({ "error": "not found" })),
    };
    reply(req, status, &body);
}

/// A 200 whose body is `body` as it is, of type `ctype`.
fn text(req: Request, body: String, ctype: &'static str) {
    let header = Header::from_bytes("Content-Type", ctype).expect("static header is valid");
    let _ = req.respond(Response::from_string(body).with_header(header));
}

/// Makes a terminal task pending again and pushes it to its queue, logged.
fn requeue(shared: &Shared, client: &redis::Client, id: &str) -> (u16, Value) {
    match ops::requeue(&shared.store, client, id) {
        Ok(true) => {
            log::warn!(task_id = id; "task requeued from the admin api");
            (200, json!({ "task_id": id, "requeued": true }))
        }
        Ok(false) => (
            409,
            json!({ "error": "task is not terminal (or unknown)", "task_id": id }),
        ),
        Err(e) => (503, json!({ "error": e.to_string() })),
    }
}

/// A cancel's reason: `?reason=`, else a JSON body's `reason`. A body, when there is one, must be
/// a JSON object whose `reason` (if any) is a string, whatever the query says.
fn cancel_reason(req: &mut Request, query: &str) -> Result<Option<String>, String> {
    let body = crate::net::server::read_body(req, MAX_BODY).unwrap_or_default();
    let from_body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| format!("body is not JSON: {e}"))?;
        let obj = v.as_object().ok_or("body must be a JSON object")?;
        match obj.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err("reason must be a string".into()),
        }
    };
    let from_query = url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "reason")
        .map(|(_, r)| r.into_owned());
    Ok(from_query.or(from_body))
}

/// Cancels a task, logged; a running attempt of this instance is stopped within a second (the
/// canceller's round), one of another instance by that instance.
fn cancel(shared: &Shared, id: &str, reason: Option<&str>) -> (u16, Value) {
    match ops::cancel(&shared.store, id, reason) {
        Ok(outcome) => {
            let label = match &outcome {
                crate::store::Cancel::Cancelled { .. } => "cancelled",
                crate::store::Cancel::Requested => "requested",
                crate::store::Cancel::Terminal { .. } => "terminal",
            };
            shared.metrics.cancels.inc(label);
            let reason = reason.unwrap_or("");
            log::warn!(task_id = id, reason, outcome:? = outcome; "task cancel from the admin api");
            ops::cancel_reply(id, &outcome)
        }
        Err(e @ ops::OpsError::BadTaskId { .. }) => (400, json!({ "error": e.to_string() })),
        Err(e) => (503, json!({ "error": e.to_string() })),
    }
}

/// Pauses or resumes a configured queue or type in MySQL, then here at once (every other
/// instance within a second).
fn pause(shared: &Shared, kind: crate::store::PauseKind, name: &str, paused: bool) -> (u16, Value) {
    let config = shared.config();
    if let Err(e) = ops::pausable(&config, kind, name) {
        return (404, json!({ "error": e.to_string() }));
    }
    let by = format!("admin@{}", config.daemon.instance_id);
    match shared.store.set_paused(kind, name, paused, &by) {
        Ok(_) => {
            if let Ok(all) = shared.store.paused() {
                shared.set_paused(all);
            }
            log::warn!(kind = kind.as_str(), name, paused; "pause changed from the admin api");
            (200, json!({ kind.as_str(): name, "paused": paused }))
        }
        Err(e) => (503, json!({ "error": e.to_string() })),
    }
}

/// Drains or undrains `gpu` in MySQL, then here at once (every other instance within a second).
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

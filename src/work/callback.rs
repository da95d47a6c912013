//! The callback server (`qsys-callback`): `tiny_http` on `callback.listen`, serving `POST /callback`
//! and `GET /healthz`.
//!
//! A callback must carry the per-attempt token that qsysd put in the `callback_url` it sent
//! ([`crate::contract::token`]); without it the answer is 401 and nothing changes. A few threads
//! (`qsys-callback-N`) share the listener, parse and verify; a valid callback goes with its open
//! request to the writer ([`run_writer`]), which ends the attempts of every callback waiting in one
//! transaction through [`Shared::end_attempts`] and then answers each by its typed result, mapped
//! onto the reply codes of docs/contracts.md §5: 200 applied, 200 with `"duplicate": true` for a repeat, 404
//! unknown task, 409 stale attempt or terminal conflict, 400 malformed, 413 too large, 405 wrong
//! method, 503 when MySQL cannot be reached (the GPU should retry).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::obs::trouble::Trouble;
use crate::shared::Shared;
use crate::store::{Ending, Finish, State, StoreError};

/// A parsed, not yet authenticated callback body.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub task_id: String,
    pub status: State,
    pub error: Option<String>,
}

/// Parses a callback body. Extra fields (results an endpoint may add) are ignored.
pub fn parse_report(body: &[u8]) -> Result<Report, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("body must be a JSON object")?;
    let task_id = match obj.get("task_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("task_id must be a non-empty string".into()),
    };
    let status = match obj.get("status").and_then(Value::as_str) {
        Some("finished") => State::Finished,
        Some("failed") => State::Failed,
        _ => return Err("status must be \"finished\" or \"failed\"".into()),
    };
    let error = match obj.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    Ok(Report {
        task_id,
        status,
        error,
    })
}

/// `attempt` and `token` from a callback URL's query string.
fn credentials(url: &str) -> (Option<u32>, Option<String>) {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let (mut attempt, mut token) = (None, None);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "attempt" => attempt = v.parse().ok(),
            "token" => token = Some(v.into_owned()),
            _ => {}
        }
    }
    (attempt, token)
}

/// A callback whose token checked out, waiting for the writer with its open request.
pub(crate) struct Verified {
    req: Request,
    report: Report,
    attempt: u32,
}

impl Verified {
    fn ending(&self) -> Ending<'_> {
        // A GPU that reports `failed` has judged the task itself: final, not retried.
        match self.report.status {
            State::Finished => Ending::Finished,
            _ => Ending::Failed {
                error: self
                    .report
                    .error
                    .as_deref()
                    .unwrap_or("reported failed by the gpu"),
                retryable: false,
            },
        }
    }
}

/// A callback's HTTP status, JSON reply, and `result` label for `qsys_callbacks_total`.
type Answer = (u16, Value, &'static str);

/// Parses a callback and checks its token; `url` is the request target with its query. `Err`: the
/// refusal to send.
pub(crate) fn verify(shared: &Shared, url: &str, body: &[u8]) -> Result<(Report, u32), Answer> {
    let report = parse_report(body).map_err(|e| (400, json!({ "error": e }), "malformed"))?;
    let (attempt, token) = credentials(url);
    let (Some(attempt), Some(token)) = (attempt, token) else {
        return Err((
            401,
            json!({ "error": "missing callback token" }),
            "unauthorized",
        ));
    };
    if !shared.signer.verify(&report.task_id, attempt, &token) {
        log::warn!(task_id = report.task_id.as_str(), attempt; "callback with an invalid token refused");
        return Err((
            401,
            json!({ "error": "invalid callback token" }),
            "unauthorized",
        ));
    }
    Ok((report, attempt))
}

/// The answer to a verified callback, given what ending its attempt did (docs/contracts.md §5 reply codes).
fn answer(report: &Report, attempt: u32, result: Result<&Finish, &StoreError>) -> Answer {
    let task_id = report.task_id.as_str();
    match result {
        Ok(Finish::Applied { .. }) => (
            200,
            json!({ "task_id": task_id, "state": report.status.as_str() }),
            "applied",
        ),
        Ok(Finish::Duplicate) => (
            200,
            json!({ "task_id": task_id, "state": report.status.as_str(), "duplicate": true }),
            "duplicate",
        ),
        Ok(Finish::Unknown) => (
            404,
            json!({ "error": "unknown task", "task_id": task_id }),
            "unknown",
        ),
        Ok(Finish::Stale { current }) => (
            409,
            json!({ "error": "stale attempt", "task_id": task_id, "attempt": attempt,
                    "current_attempt": current }),
            "stale",
        ),
        Ok(Finish::Conflict { state }) => (
            409,
            json!({ "error": "task is not awaiting this result", "task_id": task_id,
                    "state": state }),
            "conflict",
        ),
        Err(e) => {
            log::error!(task_id, error:% = e; "callback could not be recorded");
            (
                503,
                json!({ "error": "database unavailable, retry later" }),
                "unavailable",
            )
        }
    }
}

/// Most callbacks one writer transaction takes.
const WRITE_BATCH: usize = 256;

/// The callback writer (`qsys-callback-writer`): ends every verified callback waiting, up to
/// [`WRITE_BATCH`], in one MySQL transaction, and only then answers each (a 200 means recorded).
/// One commit for many callbacks is what lets completions keep up with a busy fleet: one transaction
/// per callback made MariaDB's CPU the ceiling (BENCHMARKS.md). Runs until every callback thread is
/// gone, so nothing received is left unanswered.
pub(crate) fn run_writer(shared: Arc<Shared>, verified: Receiver<Verified>) {
    loop {
        shared.tick("qsys-callback-writer");
        let first = match verified.recv_timeout(Duration::from_millis(200)) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let batch: Vec<Verified> = std::iter::once(first)
            .chain(verified.try_iter().take(WRITE_BATCH - 1))
            .collect();
        let ends: Vec<(&str, u32, Ending<'_>)> = batch
            .iter()
            .map(|v| (v.report.task_id.as_str(), v.attempt, v.ending()))
            .collect();
        let result = shared.end_attempts(&ends, "callback");
        if let Err(e) = &result {
            shared.raise(Trouble::Mysql, e);
        }
        drop(ends);
        for (i, v) in batch.into_iter().enumerate() {
            let (status, body, label) =
                answer(&v.report, v.attempt, result.as_ref().map(|out| &out[i]));
            shared.metrics.callbacks.inc(label);
            reply(v.req, status, &body);
        }
    }
    log::debug!("callback writer stopped");
}

/// 200 when MySQL answers now and no other dependency is known to fail; otherwise 503 with what is
/// wrong, by dependency.
pub(crate) fn health(shared: &Shared) -> (u16, Value) {
    let mut problems = shared.problems();
    // A loop that stopped going round is as unhealthy as a lost dependency (README: operations).
    let stalled = shared.stalled(crate::daemon::STALL_LIMIT);
    if !stalled.is_empty() && !shared.stop.is_stopping() {
        problems.insert(
            "threads",
            format!(
                "no progress for over {}s: {}",
                crate::daemon::STALL_LIMIT.as_secs(),
                stalled.join(", ")
            ),
        );
    }
    match shared.store.ping() {
        Ok(()) => {
            problems.remove("mysql");
        }
        Err(e) => {
            problems.insert("mysql", e.to_string());
        }
    }
    if problems.is_empty() {
        (200, json!({ "status": "ok" }))
    } else {
        (503, json!({ "status": "unhealthy", "problems": problems }))
    }
}

/// 405, with the `Allow` header RFC 9110 requires: the methods `allow` names.
pub(crate) fn not_allowed(req: Request, allow: &'static str) {
    let header = Header::from_bytes("Allow", allow).expect("static header is valid");
    let ctype =
        Header::from_bytes("Content-Type", "application/json").expect("static header is valid");
    let resp = Response::from_string(json!({ "error": "method not allowed" }).to_string())
        .with_status_code(405)
        .with_header(ctype)
        .with_header(header);
    let _ = req.respond(resp);
}

pub(crate) fn reply(req: Request, status: u16, body: &Value) {
    let header =
        Header::from_bytes("Content-Type", "application/json").expect("static header is valid");
    let resp = Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    let _ = req.respond(resp);
}

/// Reads the body, refusing more than `max` bytes. `None`: too large. The listener has read it
/// into memory already ([`crate::net::server`]), so this never waits on the client.
pub(crate) fn read_body(req: &mut Request, max: usize) -> Option<Vec<u8>> {
    if crate::net::server::body_refused(req, max) {
        return None;
    }
    let mut body = Vec::new();
    let limit = max as u64 + 1;
    if req.as_reader().take(limit).read_to_end(&mut body).is_err() {
        return Some(Vec::new()); // a broken body parses as malformed
    }
    (body.len() <= max).then_some(body)
}

fn route(shared: &Shared, mut req: Request, writer: &Sender<Verified>) {
    let url = req.url().to_string();
    let path = url.split('?').next().unwrap_or("");
    let (status, body) = match (path, req.method()) {
        ("/callback", Method::Post) => {
            let max = shared.config().callback.max_body;
            let Some(b) = read_body(&mut req, max) else {
                shared.metrics.callbacks.inc("too_large");
                let body = json!({ "error": format!("body larger than {max} bytes") });
                return reply(req, 413, &body);
            };
            match verify(shared, &url, &b) {
                // The writer answers once the ending is committed.
                Ok((report, attempt)) => {
                    let v = Verified {
                        req,
                        report,
                        attempt,
                    };
                    if let Err(e) = writer.send(v) {
                        let body = json!({ "error": "shutting down, retry later" });
                        reply(e.0.req, 503, &body);
                    }
                    return;
                }
                Err((status, body, label)) => {
                    shared.metrics.callbacks.inc(label);
                    (status, body)
                }
            }
        }
        ("/healthz", Method::Get) => health(shared),
        ("/callback", _) => return not_allowed(req, "POST"),
        ("/healthz", _) => return not_allowed(req, "GET"),
        _ => (404, json!({ "error": "not found" })),
    };
    reply(req, status, &body);
}

/// Serves until the stop reaches its closing stage. Several threads serve one listener, so the
/// short transactions of concurrent callbacks commit together.
pub(crate) fn serve(shared: Arc<Shared>, server: Arc<Server>, writer: Sender<Verified>) {
    while !shared.stop.is_closing() {
        shared.tick("qsys-callback");
        match server.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(req)) => route(&shared, req, &writer),
            Ok(None) => {}
            Err(e) => {
                log::error!(error:% = e; "callback listener failed");
                return;
            }
        }
    }
    log::debug!("callback server stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports() {
        let r = parse_report(br#"{"task_id":"t","status":"finished","words":3}"#).expect("ok");
        assert_eq!(r.status, State::Finished);
        let r = parse_report(br#"{"task_id":"t","status":"failed","error":"oom"}"#).expect("ok");
        assert_eq!(r.error.as_deref(), Some("oom"));
        for bad in [
            &b"nope"[..],
            br#"[]"#,
            br#"{"status":"finished"}"#,
            br#"{"task_id":"","status":"finished"}"#,
            br#"{"task_id":"t","status":"done"}"#,
            br#"{"task_id":"t","status":"processing"}"#,
            br#"{"task_id":5,"status":"finished"}"#,
        ] {
            assert!(
                parse_report(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn query_credentials() {
        assert_eq!(
            credentials("/callback?attempt=2&token=ab"),
            (Some(2), Some("ab".into()))
        );
        assert_eq!(credentials("/callback"), (None, None));
        assert_eq!(
            credentials("/callback?attempt=x&token="),
            (None, Some(String::new()))
        );
    }
}

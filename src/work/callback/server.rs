//! The callback listener's threads (`qsys-callback-N`): parse, verify the token, and pass the
//! callback with its open request to the writer.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde_json::json;
use tiny_http::{Method, Request, Server};

use super::{Answer, Verified};
use crate::contract::report::{credentials, parse_report, Report};
use crate::net::server::{not_allowed, read_body, reply};
use crate::shared::Shared;

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
    // Checked once the token is: a forged callback learns nothing, not even this limit.
    let max = shared.config().callback.max_result_bytes;
    if report.result.as_ref().is_some_and(|r| r.len() > max) {
        return Err((
            413,
            json!({ "error": format!("result larger than {max} bytes"), "task_id": report.task_id }),
            "too_large",
        ));
    }
    Ok((report, attempt))
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
        ("/healthz", Method::Get) => shared.health(),
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

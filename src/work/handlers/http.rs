//! The `http` handler: the task JSON POSTed to the type's URL; 2xx means finished.

use std::time::Duration;

use super::{retryable, Failure};
use crate::net::http;

/// Runs one `http` handler call: 2xx = finished.
pub(super) fn run_http(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&crate::config::Secret>,
    input: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let connect = timeout.min(Duration::from_secs(10));
    // The error is kept in MySQL and shown on the dashboard: no password of the URL in it.
    let shown = crate::obs::logging::redact_url(url);
    match http::post_json(agent, url, token, input, connect, timeout) {
        Ok(r) if r.is_success() => Ok(()),
        Ok(r) => Err(Failure {
            error: format!(
                "handler {shown} answered HTTP {}: {}",
                r.status,
                r.body.trim()
            ),
            retryable: crate::work::dispatch::retryable_status(r.status),
        }),
        Err(e) => Err(retryable(format!(
            "handler {shown}: {}",
            http::describe(&e)
        ))),
    }
}

//! The callback contract (docs/contracts.md §5): what a GPU endpoint POSTs to its `callback_url`,
//! and the attempt and token that URL carries. Pure parsing; authentication is
//! [`crate::contract::token`]'s.
//!
//! A body either ends its attempt (`finished`, with an optional `result`; `failed`, with an
//! optional `error`; `cancelled`, the GPU confirming a cancel) or proves the attempt alive
//! (`running`, a heartbeat, with an optional `progress` and `message`).

use serde_json::Value;

/// Longest heartbeat `message`, in bytes: a status line, not a log.
pub(crate) const MAX_PROGRESS_MESSAGE: usize = 1000;

/// A parsed, not yet authenticated callback body.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub task_id: String,
    pub status: Outcome,
    pub error: Option<String>,
    /// A heartbeat's fraction done, from 0 to 1.
    pub progress: Option<f64>,
    /// A heartbeat's status line.
    pub message: Option<String>,
    /// A `finished` body's `result`, as the JSON text the endpoint sent (any value but `null`).
    pub result: Option<String>,
}

/// What a callback says of its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Failed,
    /// The GPU stopped the attempt (it confirms a cancel).
    Cancelled,
    /// A heartbeat: the attempt is alive and not over.
    Running,
}

impl Outcome {
    /// The task state it leads to, as the reply names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Running => "processing",
        }
    }
}

/// Parses a callback body. Unknown fields are ignored, so an endpoint may add its own.
pub fn parse_report(body: &[u8]) -> Result<Report, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let obj = v.as_object().ok_or("body must be a JSON object")?;
    let task_id = match obj.get("task_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("task_id must be a non-empty string".into()),
    };
    let status = match obj.get("status").and_then(Value::as_str) {
        Some("finished") => Outcome::Finished,
        Some("failed") => Outcome::Failed,
        Some("cancelled") => Outcome::Cancelled,
        Some("running") => Outcome::Running,
        _ => {
            return Err(
                "status must be \"finished\", \"failed\", \"cancelled\" or \"running\"".into(),
            )
        }
    };
    let error = match obj.get("error") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let progress = match obj.get("progress") {
        None | Some(Value::Null) => None,
        Some(p) => match p.as_f64() {
            Some(f) if (0.0..=1.0).contains(&f) => Some(f),
            _ => return Err("progress must be a number from 0 to 1".into()),
        },
    };
    let message = match obj.get("message") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_PROGRESS_MESSAGE => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(format!(
                "message must be at most {MAX_PROGRESS_MESSAGE} bytes"
            ))
        }
        Some(_) => return Err("message must be a string".into()),
    };
    // Only a finished attempt has a result; a failed one says why in `error`. Kept as the
    // endpoint wrote it (its key order, its numbers), not as re-serialised here.
    let result = match (status, obj.get("result")) {
        (Outcome::Finished, Some(r)) if !r.is_null() => {
            #[derive(serde::Deserialize)]
            struct Raw<'a> {
                #[serde(borrow)]
                result: &'a serde_json::value::RawValue,
            }
            let raw: Raw<'_> =
                serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
            Some(raw.result.get().to_string())
        }
        _ => None,
    };
    Ok(Report {
        task_id,
        status,
        error,
        progress,
        message,
        result,
    })
}

/// `attempt` and `token` from a callback URL's query string.
pub(crate) fn credentials(url: &str) -> (Option<u32>, Option<String>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports() {
        let r = parse_report(br#"{"task_id":"t","status":"finished","words":3}"#).expect("ok");
        assert_eq!(r.status, Outcome::Finished);
        let r = parse_report(br#"{"task_id":"t","status":"failed","error":"oom"}"#).expect("ok");
        assert_eq!(r.error.as_deref(), Some("oom"));
        for bad in [
            &b"nope"[..],
            br#"[]"#,
            br#"{"status":"finished"}"#,
            br#"{"task_id":"","status":"finished"}"#,
            br#"{"task_id":"t","status":"done"}"#,
            br#"{"task_id":"t","status":"processing"}"#,
            br#"{"task_id":"t","status":"running","progress":1.5}"#,
            br#"{"task_id":"t","status":"running","progress":-0.1}"#,
            br#"{"task_id":"t","status":"running","progress":"half"}"#,
            br#"{"task_id":"t","status":"running","message":7}"#,
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
    fn heartbeats_and_results() {
        let r = parse_report(
            br#"{"task_id":"t","status":"running","progress":0.42,"message":"diarizing"}"#,
        )
        .expect("ok");
        assert_eq!(r.status, Outcome::Running);
        assert_eq!(r.progress, Some(0.42));
        assert_eq!(r.message.as_deref(), Some("diarizing"));
        let long = format!(
            r#"{{"task_id":"t","status":"running","message":"{}"}}"#,
            "x".repeat(MAX_PROGRESS_MESSAGE + 1)
        );
        assert!(parse_report(long.as_bytes()).is_err());
        let r = parse_report(
            br#"{"task_id":"t","status":"finished","result":{"text":"hi","n":[1,2]}}"#,
        )
        .expect("ok");
        assert_eq!(r.result.as_deref(), Some(r#"{"text":"hi","n":[1,2]}"#));
        // A failed attempt's result is not kept; null is no result.
        let r = parse_report(br#"{"task_id":"t","status":"failed","result":1}"#).expect("ok");
        assert_eq!(r.result, None);
        let r = parse_report(br#"{"task_id":"t","status":"finished","result":null}"#).expect("ok");
        assert_eq!(r.result, None);
        let r = parse_report(br#"{"task_id":"t","status":"cancelled"}"#).expect("ok");
        assert_eq!(r.status, Outcome::Cancelled);
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

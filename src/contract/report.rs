//! The callback contract (docs/contracts.md §5): what a GPU endpoint POSTs to its `callback_url`,
//! and the attempt and token that URL carries. Pure parsing; authentication is
//! [`crate::contract::token`]'s.

use serde_json::Value;

/// A parsed, not yet authenticated callback body.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub task_id: String,
    pub status: Outcome,
    pub error: Option<String>,
}

/// What a callback says of its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    Failed,
}

impl Outcome {
    /// The task state it leads to, as the reply names it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
        }
    }
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
        Some("finished") => Outcome::Finished,
        Some("failed") => Outcome::Failed,
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

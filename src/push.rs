//! The producer side: builds queue messages in the seed's exact format and pushes them with `RPUSH`.
//!
//! Used by the `qsys-push` binary (and by tests and the demo). A message is
//! `{"type": T, "data": {..., "task_id": ID}}`; the id is a UUIDv4 unless the caller gives one, so a
//! producer always learns the id it can look the task up by.

use redis::Client;
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Bad input: nothing was pushed.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

fn invalid(field: &str, reason: impl Into<String>) -> PushError {
    PushError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// One message ready to push: its id and its JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub task_id: String,
    pub json: String,
}

/// Builds a message from a type, a JSON object of data and an optional id.
pub fn build(kind: &str, data: &str, task_id: Option<&str>) -> Result<Outgoing, PushError> {
    if kind.trim().is_empty() {
        return Err(invalid("type", "must be a non-empty string"));
    }
    let mut data: Map<String, Value> = match serde_json::from_str::<Value>(data) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(invalid("data", "must be a JSON object")),
        Err(e) => return Err(invalid("data", format!("not valid JSON: {e}"))),
    };
    let task_id = match (task_id, data.get("task_id")) {
        (Some(id), _) => id.to_string(),
        (None, Some(Value::String(id))) => id.clone(),
        (None, Some(_)) => return Err(invalid("data.task_id", "must be a string")),
        (None, None) => uuid::Uuid::new_v4().to_string(),
    };
    if task_id.is_empty() || task_id.len() > crate::message::MAX_TASK_ID {
        return Err(invalid("task_id", "must be 1 to 255 bytes"));
    }
    data.insert("task_id".into(), Value::String(task_id.clone()));
    let mut msg = Map::new();
    msg.insert("type".into(), Value::String(kind.to_string()));
    msg.insert("data".into(), Value::Object(data));
    Ok(Outgoing {
        task_id,
        json: Value::Object(msg).to_string(),
    })
}

/// Pushes every message to the tail of `queue` in one atomic pipeline.
pub fn push(client: &Client, queue: &str, messages: &[Outgoing]) -> Result<(), PushError> {
    let mut conn = client.get_connection_with_timeout(std::time::Duration::from_secs(5))?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(std::time::Duration::from_secs(30)))?;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for m in messages {
        pipe.cmd("RPUSH").arg(queue).arg(&m.json).ignore();
    }
    pipe.query::<()>(&mut conn)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_seed_format() {
        let m = build("start_transcribe", r#"{"s3_key":"a.wav"}"#, Some("t1")).expect("valid");
        assert_eq!(m.task_id, "t1");
        let v: Value = serde_json::from_str(&m.json).expect("json");
        assert_eq!(v["type"], "start_transcribe");
        assert_eq!(v["data"]["task_id"], "t1");
        assert_eq!(v["data"]["s3_key"], "a.wav");
        let parsed = crate::message::parse(m.json.as_bytes(), || unreachable!()).expect("parses");
        assert_eq!(parsed.task_id, "t1");
    }

    #[test]
    fn generates_uuid_or_keeps_data_id() {
        let m = build("cleanup", "{}", None).expect("valid");
        assert!(uuid::Uuid::parse_str(&m.task_id).is_ok());
        let m = build("cleanup", r#"{"task_id":"x"}"#, None).expect("valid");
        assert_eq!(m.task_id, "x");
    }

    #[test]
    fn refuses_bad_input() {
        assert!(build("", "{}", None).is_err());
        assert!(build("x", "[1]", None).is_err());
        assert!(build("x", "{", None).is_err());
        assert!(build("x", r#"{"task_id":1}"#, None).is_err());
    }
}

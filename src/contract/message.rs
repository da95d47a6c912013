//! The queue message contract (docs/contracts.md §3): one Redis list element is one JSON object,
//! `{"type": "...", "data": {..., "task_id": "..."}}`, exactly as the seed's producer writes it.
//!
//! Pure parsing, no I/O: the poller thread calls [`parse`] on every popped element. A message that
//! cannot be understood becomes a [`Malformed`] value carrying the reason (and the task id, when one
//! could be read) so the poller can record it as `failed` and go on; parsing never panics.

use serde_json::{Map, Value};

/// Longest task id the `tasks.task_id` column holds.
pub(crate) const MAX_TASK_ID: usize = 255;
/// Longest type name the `tasks.type` column holds.
pub(crate) const MAX_TYPE: usize = 100;
/// Most attempts a message may ask for.
pub(crate) const MAX_ATTEMPTS: u64 = 1000;
/// Longest lease a message may ask for (`timeout_s`): 30 days. The column is a signed 32-bit
/// `INT`; a larger value made MySQL refuse the whole batch the element came in.
pub(crate) const MAX_TIMEOUT_S: u64 = 30 * 24 * 3600;
/// Longest wait a message may ask for (`delay_s`, or `run_at` from now): ten years.
pub(crate) const MAX_DELAY_S: f64 = 10.0 * 365.0 * 86_400.0;
/// Largest work size (`cost`): a billion units (thirty years of audio in seconds) is past any task,
/// and keeps a pool's sums far from where a double loses whole units.
pub(crate) const MAX_COST: f64 = 1e9;

/// When a delayed task may run (`run_at` or `delay_s`, docs/contracts.md §3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Due {
    /// At this time, in Unix seconds.
    At(f64),
    /// This many seconds after `enqueued_at`, or after qsysd takes it when there is none.
    After(f64),
}

/// One task as taken from a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub task_id: String,
    /// True when qsysd made the id up because the producer sent none.
    pub id_assigned: bool,
    pub kind: String,
    /// The task's `data` object, always holding `task_id`.
    pub data: Map<String, Value>,
    pub max_attempts: Option<u32>,
    pub timeout_s: Option<u64>,
    /// Not before then.
    pub due: Option<Due>,
    /// When the producer pushed it, in Unix seconds (`qsys-push` stamps it).
    pub enqueued_at: Option<f64>,
    /// How much work it is, as the producer said (`cost`); see [`Message::cost`].
    pub cost: Option<f64>,
}

/// Why an element was refused, and the task id if it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    pub task_id: Option<String>,
    pub reason: String,
}

fn malformed(task_id: Option<String>, reason: impl Into<String>) -> Malformed {
    Malformed {
        task_id,
        reason: reason.into(),
    }
}

fn id_from(v: &Value) -> Result<Option<String>, String> {
    let id = match v {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        // Python producers sometimes send numeric ids; the column is text either way.
        Value::Number(n) => n.to_string(),
        other => return Err(format!("task_id must be a string, got {}", kind_of(other))),
    };
    check_task_id(&id)?;
    Ok(Some(id))
}

/// Whether `id` is a task id qsysd could have recorded: 1 to [`MAX_TASK_ID`] bytes, no control
/// characters. Ids from elsewhere (slot events of other instances) are held to the same rule.
pub(crate) fn check_task_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("task_id must not be empty".into());
    }
    if id.len() > MAX_TASK_ID {
        return Err(format!("task_id longer than {MAX_TASK_ID} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err("task_id contains control characters".into());
    }
    Ok(())
}

/// "a string", "an object", ...: what a JSON value is, for error messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An optional whole number in `1..=max`.
fn bounded_int(obj: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, String> {
    let want = format!("{field} must be a whole number from 1 to {max}");
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (1..=max).contains(&v) => Ok(Some(v)),
            _ => Err(format!("{want}, got {n}")),
        },
        Some(other) => Err(format!("{want}, got {}", kind_of(other))),
    }
}

/// Parses one queue element. `new_id` supplies an id when the producer gave none.
pub fn parse(raw: &[u8], new_id: impl FnOnce() -> String) -> Result<Message, Malformed> {
    let value: Value =
        serde_json::from_slice(raw).map_err(|e| malformed(None, format!("not valid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(malformed(
            None,
            format!("expected a JSON object, got {}", kind_of(&value)),
        ));
    };
    let mut data = match obj.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => {
            let id = obj.get("task_id").and_then(|v| id_from(v).ok().flatten());
            return Err(malformed(
                id,
                format!("data must be an object, got {}", kind_of(&other)),
            ));
        }
    };
    // data.task_id wins over a top-level task_id (docs/contracts.md §3).
    let inner = data.get("task_id").map(id_from).transpose();
    let outer = obj.get("task_id").map(id_from).transpose();
    let id = match (inner, outer) {
        (Ok(Some(Some(id))), _) => Some(id),
        (Ok(_), Ok(Some(id))) => id,
        (Ok(_), Ok(None)) => None,
        (Err(e), _) | (_, Err(e)) => return Err(malformed(None, e)),
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) if s.is_empty() => {
            return Err(malformed(id, "type must not be empty"))
        }
        Some(Value::String(s)) if s.len() > MAX_TYPE => {
            return Err(malformed(id, format!("type longer than {MAX_TYPE} bytes")))
        }
        Some(Value::String(s)) if s.chars().any(char::is_control) => {
            return Err(malformed(id, "type contains control characters"))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(malformed(
                id,
                format!("type must be a string, got {}", kind_of(other)),
            ))
        }
        None => return Err(malformed(id, "missing \"type\"")),
    };
    let max_attempts = bounded_int(&obj, "max_attempts", MAX_ATTEMPTS)
        .map_err(|e| malformed(id.clone(), e))?
        .map(|n| u32::try_from(n).expect("at most MAX_ATTEMPTS"));
    let timeout_s =
        bounded_int(&obj, "timeout_s", MAX_TIMEOUT_S).map_err(|e| malformed(id.clone(), e))?;
    let due = due_of(&obj).map_err(|e| malformed(id.clone(), e))?;
    let cost = optional(&obj, "cost", cost_of).map_err(|e| malformed(id.clone(), e))?;
    let enqueued_at = optional(&obj, "enqueued_at", |v| {
        crate::contract::time::unix_seconds(v).map_err(|e| format!("enqueued_at: {e}"))
    })
    .map_err(|e| malformed(id.clone(), e))?;

    let (task_id, id_assigned) = match id {
        Some(id) => (id, false),
        None => (new_id(), true),
    };
    data.insert("task_id".into(), Value::String(task_id.clone()));
    Ok(Message {
        task_id,
        id_assigned,
        kind,
        data,
        max_attempts,
        timeout_s,
        due,
        enqueued_at,
        cost,
    })
}

/// Field `key` of `obj` read by `read`, or `None` when absent or null.
fn optional<T>(
    obj: &Map<String, Value>,
    key: &str,
    read: impl Fn(&Value) -> Result<T, String>,
) -> Result<Option<T>, String> {
    obj.get(key).filter(|v| !v.is_null()).map(read).transpose()
}

/// A work size: a finite number from 0 to [`MAX_COST`].
fn work_size(v: &Value) -> Option<f64> {
    v.as_f64().filter(|c| (0.0..=MAX_COST).contains(c))
}

/// A task's `cost`, checked as qsysd checks it (`qsys-push` uses this too).
pub(crate) fn cost_of(v: &Value) -> Result<f64, String> {
    work_size(v).ok_or_else(|| format!("cost must be a number from 0 to {MAX_COST}, got {v}"))
}

/// `run_at` (Unix seconds or RFC 3339) or `delay_s` (seconds), at most one of them.
fn due_of(obj: &Map<String, Value>) -> Result<Option<Due>, String> {
    let at = obj.get("run_at").filter(|v| !v.is_null());
    let after = obj.get("delay_s").filter(|v| !v.is_null());
    match (at, after) {
        (Some(_), Some(_)) => Err("give run_at or delay_s, not both".into()),
        (Some(v), None) => crate::contract::time::unix_seconds(v)
            .map(|t| Some(Due::At(t)))
            .map_err(|e| format!("run_at: {e}")),
        (None, Some(v)) => match v.as_f64() {
            Some(s) if (0.0..=MAX_DELAY_S).contains(&s) => Ok(Some(Due::After(s))),
            _ => Err(format!(
                "delay_s must be a number of seconds from 0 to {MAX_DELAY_S}, got {v}"
            )),
        },
        (None, None) => Ok(None),
    }
}

impl Message {
    /// The message in the seed's format, with the task id inside `data`: what qsysd stores and what
    /// it pushes back to Redis, so a task keeps its id however often it is taken.
    pub fn to_json(&self) -> String {
        let mut obj = Map::new();
        obj.insert("type".into(), Value::String(self.kind.clone()));
        obj.insert("data".into(), Value::Object(self.data.clone()));
        if let Some(n) = self.max_attempts {
            obj.insert("max_attempts".into(), n.into());
        }
        if let Some(n) = self.timeout_s {
            obj.insert("timeout_s".into(), n.into());
        }
        match self.due {
            Some(Due::At(t)) => obj.insert("run_at".into(), t.into()),
            Some(Due::After(s)) => obj.insert("delay_s".into(), s.into()),
            None => None,
        };
        if let Some(t) = self.enqueued_at {
            obj.insert("enqueued_at".into(), t.into());
        }
        if let Some(c) = self.cost {
            obj.insert("cost".into(), c.into());
        }
        Value::Object(obj).to_string()
    }

    /// How much work the task is, in its pool's unit: its `cost`, else `data.audio_seconds`, else
    /// `data.duration_s` (a transcription producer's own fields, used as they are). `None`: unknown
    /// (a field that is not a number from 0 to [`MAX_COST`] is not a size, and is the task's own
    /// business, so it is ignored rather than refused).
    pub fn cost(&self) -> Option<f64> {
        self.cost.or_else(|| {
            ["audio_seconds", "duration_s"]
                .iter()
                .find_map(|k| self.data.get(*k).and_then(work_size))
        })
    }

    /// Makes a `delay_s` without an `enqueued_at` a `run_at` counted from `now`, when qsysd first
    /// takes the task: the stored message (and any copy handed back to Redis) then keeps its
    /// time instead of waiting the delay again each time it is taken.
    pub(crate) fn fix_due(&mut self, now: f64) {
        if let (Some(Due::After(s)), None) = (self.due, self.enqueued_at) {
            self.due = Some(Due::At(now + s));
        }
    }

    /// How long from `now` (Unix seconds) until the task may run, if that is in the future, at
    /// most [`MAX_DELAY_S`]. A `delay_s` counts from `enqueued_at` when the message has one (the
    /// producer's push), else from now (qsysd taking it).
    pub(crate) fn wait_from(&self, now: f64) -> Option<std::time::Duration> {
        let secs = match self.due? {
            Due::At(t) => t - now,
            Due::After(s) => self.enqueued_at.map_or(s, |at| at + s - now),
        };
        (secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs.min(MAX_DELAY_S)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> String {
        "generated".into()
    }

    #[test]
    fn seed_producer_format_with_id_in_data() {
        // Exactly what Python's json.dumps writes (note the spaces).
        let raw = br#"{"type": "start_transcribe", "data": {"s3_bucket": "b", "s3_key": "k.wav", "task_id": "7c1e"}}"#;
        let m = parse(raw, id).expect("valid");
        assert_eq!(m.task_id, "7c1e");
        assert!(!m.id_assigned);
        assert_eq!(m.kind, "start_transcribe");
        assert_eq!(m.data["s3_key"], "k.wav");
    }

    #[test]
    fn top_level_id_then_assigned_id() {
        let m = parse(
            br#"{"type":"cleanup","task_id":"t1","data":{"user_id":789}}"#,
            id,
        )
        .expect("valid");
        assert_eq!(m.task_id, "t1");
        assert_eq!(m.data["task_id"], "t1");
        let m = parse(br#"{"type":"send_email","data":{"email":"a@b"}}"#, id).expect("valid");
        assert_eq!(m.task_id, "generated");
        assert!(m.id_assigned);
        assert_eq!(m.data["task_id"], "generated");
        let m = parse(
            br#"{"type":"x","task_id":"outer","data":{"task_id":"inner"}}"#,
            id,
        )
        .expect("valid");
        assert_eq!(m.task_id, "inner");
        let m = parse(br#"{"type":"x","data":{"task_id":42}}"#, id).expect("numeric id");
        assert_eq!(m.task_id, "42");
    }

    #[test]
    fn optional_fields() {
        let m = parse(br#"{"type":"x","max_attempts":5,"timeout_s":60}"#, id).expect("valid");
        assert_eq!((m.max_attempts, m.timeout_s), (Some(5), Some(60)));
        assert!(parse(br#"{"type":"x","max_attempts":0}"#, id).is_err());
        assert!(parse(br#"{"type":"x","timeout_s":"60"}"#, id).is_err());
        assert!(parse(br#"{"type":"x","max_attempts":1.5}"#, id).is_err());
    }

    /// Delays (issue 17): `run_at` as Unix seconds or RFC 3339, or `delay_s`; `enqueued_at`. Each
    /// survives the round trip through the stored payload.
    #[test]
    fn delays_and_enqueue_stamps() {
        let m = parse(
            br#"{"type":"x","delay_s":90,"enqueued_at":1796135400.5}"#,
            id,
        )
        .expect("ok");
        assert_eq!(m.due, Some(Due::After(90.0)));
        assert_eq!(m.enqueued_at, Some(1_796_135_400.5));
        // Counted from the producer's stamp.
        assert_eq!(
            m.wait_from(1_796_135_430.5),
            Some(std::time::Duration::from_secs(60))
        );
        let mut unstamped = parse(br#"{"type":"x","delay_s":90}"#, id).expect("ok");
        assert_eq!(
            unstamped.wait_from(5.0),
            Some(std::time::Duration::from_secs(90))
        );
        // Once taken, its time is fixed: a copy taken again later does not wait anew.
        unstamped.fix_due(5.0);
        assert_eq!(unstamped.due, Some(Due::At(95.0)));
        assert_eq!(
            unstamped.wait_from(50.0),
            Some(std::time::Duration::from_secs(45))
        );
        let back = parse(m.to_json().as_bytes(), id).expect("round trip");
        assert_eq!((back.due, back.enqueued_at), (m.due, m.enqueued_at));
        let m = parse(br#"{"type":"x","run_at":"2026-12-01T14:30:00Z"}"#, id).expect("ok");
        assert_eq!(m.due, Some(Due::At(1_796_135_400.0)));
        assert_eq!(
            m.wait_from(1_796_135_300.0),
            Some(std::time::Duration::from_secs(100))
        );
        // Due already: no wait.
        assert_eq!(m.wait_from(1_796_135_400.0), None);
        assert_eq!(
            parse(br#"{"type":"x","run_at":1}"#, id).expect("ok").due,
            Some(Due::At(1.0))
        );
        for bad in [
            &br#"{"type":"x","run_at":1,"delay_s":1}"#[..],
            br#"{"type":"x","run_at":"soon"}"#,
            br#"{"type":"x","run_at":-1}"#,
            br#"{"type":"x","delay_s":-1}"#,
            br#"{"type":"x","delay_s":"60"}"#,
            br#"{"type":"x","delay_s":1e12}"#,
            br#"{"type":"x","enqueued_at":"yesterday"}"#,
        ] {
            assert!(parse(bad, id).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// Every numeric field at 0, 1, its maximum, maximum + 1, negative and far beyond any
    /// column: only 1..=max is taken, so MySQL never sees a value it refuses.
    #[test]
    fn a_tasks_size_is_its_cost_else_its_audio_length() {
        let cost = |raw: &str| parse(raw.as_bytes(), id).map(|m| m.cost());
        assert_eq!(cost(r#"{"type":"x","cost":12.5}"#), Ok(Some(12.5)));
        assert_eq!(cost(r#"{"type":"x","cost":0}"#), Ok(Some(0.0)));
        assert_eq!(cost(r#"{"type":"x","cost":1e9}"#), Ok(Some(1e9)));
        assert_eq!(cost(r#"{"type":"x","cost":null}"#), Ok(None));
        // The producer's own fields, when no cost is given; cost wins.
        assert_eq!(
            cost(r#"{"type":"x","data":{"audio_seconds":90}}"#),
            Ok(Some(90.0))
        );
        assert_eq!(
            cost(r#"{"type":"x","data":{"duration_s":4.5}}"#),
            Ok(Some(4.5))
        );
        assert_eq!(
            cost(r#"{"type":"x","cost":3,"data":{"audio_seconds":90}}"#),
            Ok(Some(3.0))
        );
        // Fields of data that are no size are the task's business: unknown, not refused.
        assert_eq!(
            cost(r#"{"type":"x","data":{"audio_seconds":"long"}}"#),
            Ok(None)
        );
        assert_eq!(
            cost(r#"{"type":"x","data":{"audio_seconds":-3}}"#),
            Ok(None)
        );
        assert_eq!(
            cost(r#"{"type":"x","data":{"audio_seconds":-3,"duration_s":7}}"#),
            Ok(Some(7.0))
        );
        // A cost that is no size is refused, naming it.
        for bad in ["-1", "1.0000001e9", "\"5\"", "true", "[1]", "1e300"] {
            let e = parse(format!(r#"{{"type":"x","cost":{bad}}}"#).as_bytes(), id).expect_err(bad);
            assert!(e.reason.contains("cost must be a number"), "{bad}: {e:?}");
        }
        // Kept through the stored form.
        let m = parse(br#"{"type":"x","cost":7}"#, id).expect("valid");
        let again = parse(m.to_json().as_bytes(), id).expect("valid");
        assert_eq!(again.cost(), Some(7.0));
    }

    #[test]
    fn numeric_fields_at_their_boundaries() {
        for (field, max) in [("max_attempts", MAX_ATTEMPTS), ("timeout_s", MAX_TIMEOUT_S)] {
            for (v, ok) in [
                ("0".to_string(), false),
                ("1".to_string(), true),
                (max.to_string(), true),
                ((max + 1).to_string(), false),
                ("-1".to_string(), false),
                ("3000000000".to_string(), false),
                ("18446744073709551616".to_string(), false),
                ("1e300".to_string(), false),
            ] {
                let raw = format!(r#"{{"type":"x","{field}":{v}}}"#);
                assert_eq!(parse(raw.as_bytes(), id).is_ok(), ok, "{field} = {v}");
            }
        }
        // Lengths: at the limit is taken, one more byte is not.
        for (len, ok) in [(MAX_TASK_ID, true), (MAX_TASK_ID + 1, false)] {
            let raw = format!(
                r#"{{"type":"x","task_id":"{}"}}"#,
                "é".repeat(len / 2) + &"a".repeat(len % 2)
            );
            assert_eq!(
                parse(raw.as_bytes(), id).is_ok(),
                ok,
                "task_id of {len} bytes"
            );
        }
        for (len, ok) in [(MAX_TYPE, true), (MAX_TYPE + 1, false)] {
            let raw = format!(r#"{{"type":"{}"}}"#, "t".repeat(len));
            assert_eq!(parse(raw.as_bytes(), id).is_ok(), ok, "type of {len} bytes");
        }
        assert!(parse(
            br#"{"type":"a
b"}"#,
            id
        )
        .is_err());
    }

    #[test]
    fn malformed_elements_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (b"", "not valid JSON"),
            (b"[1,2]", "expected a JSON object"),
            (b"\"str\"", "expected a JSON object"),
            (br#"{"data":{"task_id":"t9"}}"#, "missing \"type\""),
            (br#"{"type":7}"#, "type must be a string"),
            (br#"{"type":""}"#, "type must not be empty"),
            (br#"{"type":"x","data":[1]}"#, "data must be an object"),
            (
                br#"{"type":"x","data":{"task_id":""}}"#,
                "task_id must not be empty",
            ),
            (
                br#"{"type":"x","data":{"task_id":{}}}"#,
                "task_id must be a string",
            ),
            (&[0xff, 0xfe], "not valid JSON"),
        ];
        for (raw, want) in cases {
            let e = parse(raw, id).expect_err("must be refused");
            assert!(e.reason.contains(want), "{:?}: {}", raw, e.reason);
        }
        // The id is kept when it could be read, so the failed row can be found by it.
        let e = parse(br#"{"data":{"task_id":"t9"}}"#, id).expect_err("no type");
        assert_eq!(e.task_id.as_deref(), Some("t9"));
        let long = format!(r#"{{"type":"x","task_id":"{}"}}"#, "a".repeat(300));
        assert!(parse(long.as_bytes(), id).is_err());
    }

    #[test]
    fn round_trip_keeps_id_and_fields() {
        let m = parse(br#"{"type":"x","max_attempts":2,"data":{"a":1}}"#, id).expect("valid");
        let again = parse(m.to_json().as_bytes(), || unreachable!("id is kept")).expect("valid");
        assert_eq!(again.task_id, "generated");
        assert!(!again.id_assigned);
        assert_eq!(again.data, m.data);
        assert_eq!(again.max_attempts, Some(2));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic sweep over JSON-looking byte strings.
        let alphabet = b"{}[]\":,typedaskid0123 \\";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len % 64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = parse(&bytes, id);
        }
    }
}

//! What a producer may send, and what it becomes: the event shapes `qsys-push` and its Lambda runtime
//! accept, checked and turned into queue messages in the seed's exact format (docs/contracts.md §3).
//!
//! Pure, no I/O: callers read files, stdin or the Lambda Runtime API, and push the result
//! ([`crate::producer::push`]). The shapes:
//!
//! - a task `{"type", "data"}`, the seed's single-task event (optional `task_id`, `queue_name`,
//!   `max_attempts`, `timeout_s`);
//! - a batch `{"tasks": [...]}`, the seed's multi-task event (optional `queue_name` for all);
//! - an API Gateway proxy event: `body`, a string holding a task or batch, base64 when
//!   `isBase64Encoded`;
//! - an SQS event: `Records[].body`, each a task or batch;
//! - an EventBridge event: `detail`, a task or batch;
//! - NDJSON, one task a line ([`Batch::add_line`]).
//!
//! Anything else is refused (the seed turned an unknown event into a real transcription of a sample
//! file). Every problem names its place (`tasks[3].data`, `Records[1].body`, `line 7.type`), and a
//! [`Batch`] yields messages only when its whole input is good, so callers push all or nothing.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::contract::message::{kind_of, MAX_ATTEMPTS, MAX_TASK_ID, MAX_TIMEOUT_S, MAX_TYPE};
use crate::contract::names::{is_key_name, NAME_RULE};

/// Problems reported by name; past this many only a count is kept.
const MAX_PROBLEMS: usize = 20;
/// How deep envelopes may nest (an EventBridge event in an SQS body is one level).
const MAX_DEPTH: usize = 3;
/// The fields a task may have.
const TASK_FIELDS: &[&str] = &[
    "type",
    "data",
    "task_id",
    "queue_name",
    "max_attempts",
    "timeout_s",
    "run_at",
    "delay_s",
    "cost",
];

/// How tasks are checked and where they go.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// The queue of a task that names none.
    pub default_queue: String,
    /// The task types the daemon knows; `None` accepts any.
    pub types: Option<BTreeSet<String>>,
    /// Stamped on every task as `enqueued_at` (Unix seconds), for the queue's latency.
    pub stamp: Option<f64>,
    /// `--at` / `--in`: the due time of the tasks that give none of their own.
    pub due: Option<Due>,
    /// `--cost`: the work size of the tasks that give none of their own.
    pub cost: Option<f64>,
}

/// When tasks may run, as `qsys-push --at TIME` or `--in D` says.
#[derive(Debug, Clone, PartialEq)]
pub enum Due {
    /// `run_at`: Unix seconds, or the RFC 3339 text as given.
    At(Value),
    /// `delay_s`: seconds after `enqueued_at`.
    After(f64),
}

/// One message ready to push.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outgoing {
    pub task_id: String,
    pub queue: String,
    pub kind: String,
    /// The list element: `{"type": ..., "data": {..., "task_id": ...}}`.
    pub json: String,
}

impl Outgoing {
    pub(crate) fn receipt(&self) -> Receipt<'_> {
        Receipt {
            task_id: &self.task_id,
            queue: &self.queue,
            kind: &self.kind,
        }
    }
}

/// `{"task_id", "queue", "type"}`, in that order: what `--json` prints and the Lambda answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Receipt<'a> {
    pub task_id: &'a str,
    pub queue: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
}

/// The outermost shape of an event (the Lambda answers an API Gateway event in its own format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Task,
    Batch,
    ApiGateway,
    Sqs,
    EventBridge,
}

/// Bad input: the problems found, each naming its place. Nothing of it may be pushed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) struct Invalid {
    pub problems: Vec<String>,
    /// Problems found beyond those listed.
    pub more: usize,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))?;
        if self.more > 0 {
            write!(f, "\n... and {} more problems", self.more)?;
        }
        Ok(())
    }
}

/// The tasks of one input, checked as they are added.
pub(crate) struct Batch<'r> {
    rules: &'r Rules,
    out: Vec<Outgoing>,
    /// Ids the input gave (generated ones are unique anyway): a repeat would be dropped by qsysd.
    given_ids: HashSet<String>,
    problems: Vec<String>,
    problem_count: usize,
}

impl<'r> Batch<'r> {
    pub(crate) fn new(rules: &'r Rules) -> Batch<'r> {
        Batch {
            rules,
            out: Vec::new(),
            given_ids: HashSet::new(),
            problems: Vec::new(),
            problem_count: 0,
        }
    }

    fn problem(&mut self, place: &str, reason: impl fmt::Display) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            let place = if place.is_empty() { "event" } else { place };
            self.problems.push(format!("{place}: {reason}"));
        }
    }

    /// Adds one event of any shape from its JSON text. `None` when no shape was recognised.
    pub(crate) fn add_event_bytes(&mut self, raw: &[u8]) -> Option<Shape> {
        match serde_json::from_slice(raw) {
            Ok(v) => self.add_event(v),
            Err(e) => {
                self.problem("event", format!("not valid JSON: {e}"));
                None
            }
        }
    }

    /// Adds one event of any shape. `None` when no shape was recognised.
    pub(crate) fn add_event(&mut self, event: Value) -> Option<Shape> {
        self.add_any("", event, 0)
    }

    /// Adds one NDJSON line (numbered from 1): a task.
    pub(crate) fn add_line(&mut self, line_no: usize, line: &str) {
        let place = format!("line {line_no}");
        match serde_json::from_str(line) {
            Ok(v) => self.add_task(&place, v, None),
            Err(e) => self.problem(&place, format!("not valid JSON: {e}")),
        }
    }

    /// Adds the task of `--type`, `--data` and `--task-id`.
    pub(crate) fn add_args(&mut self, kind: &str, data: &str, task_id: Option<&str>) {
        let data: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => return self.problem("data", format!("not valid JSON: {e}")),
        };
        let mut task = serde_json::json!({"type": kind, "data": data});
        if let Some(id) = task_id {
            task["task_id"] = Value::String(id.to_string());
        }
        self.add_task("", task, None);
    }

    /// The messages, in input order, if every task was good (and there was at least one).
    pub(crate) fn finish(mut self) -> Result<Vec<Outgoing>, Invalid> {
        if self.problem_count == 0 && self.out.is_empty() {
            self.problem("input", "no tasks");
        }
        if self.problem_count > 0 {
            return Err(Invalid {
                more: self.problem_count - self.problems.len(),
                problems: self.problems,
            });
        }
        Ok(self.out)
    }

    /// Any shape, at `place` (empty at the top).
    fn add_any(&mut self, place: &str, event: Value, depth: usize) -> Option<Shape> {
        let Value::Object(mut obj) = event else {
            self.problem(
                place,
                format!("must be a JSON object, got {}", kind_of(&event)),
            );
            return None;
        };
        if depth > MAX_DEPTH {
            self.problem(place, "envelopes nested too deep");
            return None;
        }
        if let Some(records) = obj.remove("Records") {
            self.add_sqs(&at(place, "Records"), records, depth);
            Some(Shape::Sqs)
        } else if let Some(detail) = obj.remove("detail") {
            self.add_container(&at(place, "detail"), detail);
            Some(Shape::EventBridge)
        } else if obj.contains_key("body") {
            self.add_api_gateway(place, obj, depth);
            Some(Shape::ApiGateway)
        } else if obj.contains_key("tasks") {
            self.add_batch(place, obj);
            Some(Shape::Batch)
        } else if obj.contains_key("type") {
            self.add_task(place, Value::Object(obj), None);
            Some(Shape::Task)
        } else {
            self.problem(
                place,
                format!(
                    "unrecognised shape (fields: {}): expected a task {{\"type\", \"data\"}}, a batch \
                     {{\"tasks\": [...]}}, an API Gateway proxy event (body), an SQS event (Records) \
                     or an EventBridge event (detail)",
                    field_list(&obj)
                ),
            );
            None
        }
    }

    fn add_sqs(&mut self, place: &str, records: Value, depth: usize) {
        let Value::Array(records) = records else {
            return self.problem(place, "must be an array of SQS records");
        };
        if records.is_empty() {
            return self.problem(place, "is empty");
        }
        for (i, record) in records.into_iter().enumerate() {
            let place = format!("{place}[{i}]");
            let Value::Object(mut record) = record else {
                self.problem(&place, "must be an SQS record object");
                continue;
            };
            match record.get("eventSource") {
                None => {}
                Some(Value::String(s)) if s == "aws:sqs" => {}
                Some(other) => {
                    self.problem(
                        &at(&place, "eventSource"),
                        format!("{other} is not supported: only aws:sqs records carry tasks"),
                    );
                    continue;
                }
            }
            match record.remove("body") {
                Some(Value::String(body)) => {
                    self.add_embedded(&at(&place, "body"), body.as_bytes(), depth)
                }
                _ => self.problem(
                    &at(&place, "body"),
                    "must be a string holding a task or a batch",
                ),
            }
        }
    }

    fn add_api_gateway(&mut self, place: &str, mut obj: Map<String, Value>, depth: usize) {
        let base64 = match obj.get("isBase64Encoded") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return self.problem(
                    &at(place, "isBase64Encoded"),
                    format!("must be true or false, got {}", kind_of(other)),
                )
            }
        };
        let body_place = at(place, "body");
        match obj.remove("body") {
            Some(Value::String(body)) if base64 => {
                // API Gateway encodes with the standard alphabet and padding.
                match base64::engine::general_purpose::STANDARD.decode(body.trim()) {
                    Ok(bytes) => self.add_embedded(&body_place, &bytes, depth),
                    Err(e) => self.problem(&body_place, format!("not valid base64: {e}")),
                }
            }
            Some(Value::String(body)) => self.add_embedded(&body_place, body.as_bytes(), depth),
            // A test invocation may hand the body over already parsed.
            Some(body @ Value::Object(_)) => self.add_container(&body_place, body),
            _ => self.problem(&body_place, "is empty: a task or a batch was expected"),
        }
    }

    /// JSON text inside an envelope: a task, a batch, or another envelope (EventBridge to SQS).
    fn add_embedded(&mut self, place: &str, raw: &[u8], depth: usize) {
        match serde_json::from_slice::<Value>(raw) {
            Ok(v) if is_container(&v) => self.add_container(place, v),
            Ok(v) => {
                self.add_any(place, v, depth + 1);
            }
            Err(e) => self.problem(place, format!("not valid JSON: {e}")),
        }
    }

    /// A task or a batch.
    fn add_container(&mut self, place: &str, v: Value) {
        match v {
            Value::Object(obj) if obj.contains_key("tasks") => self.add_batch(place, obj),
            Value::Object(obj) if obj.contains_key("type") => {
                self.add_task(place, Value::Object(obj), None)
            }
            Value::Object(obj) => self.problem(
                place,
                format!(
                    "expected a task {{\"type\", \"data\"}} or a batch {{\"tasks\": [...]}}, got fields: {}",
                    field_list(&obj)
                ),
            ),
            other => self.problem(
                place,
                format!(
                    "expected a task or a batch object, got {}",
                    kind_of(&other)
                ),
            ),
        }
    }

    fn add_batch(&mut self, place: &str, mut obj: Map<String, Value>) {
        let tasks = obj.remove("tasks");
        let queue = match obj.remove("queue_name") {
            None => None,
            Some(q) => match queue_name(&q) {
                Ok(q) => Some(q),
                Err(e) => return self.problem(&at(place, "queue_name"), e),
            },
        };
        if let Some(field) = obj.keys().next() {
            return self.problem(
                &at(place, field),
                "unknown field (a batch has tasks and queue_name)",
            );
        }
        let tasks_place = at(place, "tasks");
        let Some(Value::Array(tasks)) = tasks else {
            return self.problem(&tasks_place, "must be an array of tasks");
        };
        if tasks.is_empty() {
            return self.problem(&tasks_place, "is empty");
        }
        for (i, task) in tasks.into_iter().enumerate() {
            self.add_task(&format!("{tasks_place}[{i}]"), task, queue.as_deref());
        }
    }

    /// One task at `place`; `queue` is its batch's `queue_name`.
    fn add_task(&mut self, place: &str, task: Value, queue: Option<&str>) {
        let Value::Object(mut t) = task else {
            return self.problem(
                place,
                format!(
                    "a task must be an object {{\"type\", \"data\"}}, got {}",
                    kind_of(&task)
                ),
            );
        };
        let before = self.problem_count;
        if let Some(field) = t.keys().find(|k| !TASK_FIELDS.contains(&k.as_str())) {
            let field = field.clone();
            self.problem(
                &at(place, &field),
                format!("unknown field (a task has {})", TASK_FIELDS.join(", ")),
            );
        }
        let kind = self.task_type(place, t.remove("type"));
        let data = self.task_data(place, t.remove("data"));
        let task_id = self.task_id(place, data.as_ref(), t.remove("task_id"));
        let queue = match t.remove("queue_name") {
            Some(q) => queue_name(&q)
                .map_err(|e| self.problem(&at(place, "queue_name"), e))
                .ok(),
            None => Some(queue.unwrap_or(&self.rules.default_queue).to_string()),
        };
        let mut extra = String::new();
        // The daemon's own ranges: what qsys-push lands, qsysd takes.
        for (field, max) in [("max_attempts", MAX_ATTEMPTS), ("timeout_s", MAX_TIMEOUT_S)] {
            match positive(t.get(field), max) {
                Ok(None) => {}
                Ok(Some(n)) => extra.push_str(&format!(",\"{field}\":{n}")),
                Err(e) => self.problem(&at(place, field), e),
            }
        }
        self.due_fields(place, &t, &mut extra);
        match t.get("cost").filter(|v| !v.is_null()) {
            Some(v) => match crate::contract::message::cost_of(v) {
                Ok(c) => extra.push_str(&format!(",\"cost\":{c}")),
                Err(e) => self.problem(&at(place, "cost"), e),
            },
            None => {
                if let Some(c) = self.rules.cost {
                    extra.push_str(&format!(",\"cost\":{c}"));
                }
            }
        }
        // A part is `None` only after its problem was recorded, so nothing is dropped silently.
        let (Some(kind), Some(mut data), Some(task_id), Some(queue)) = (kind, data, task_id, queue)
        else {
            return;
        };
        if self.problem_count > before {
            return;
        }
        data.insert("task_id".into(), Value::String(task_id.clone()));
        // Built by hand so that "type" comes first, as the seed's json.dumps wrote it.
        let json = format!(
            "{{\"type\":{},\"data\":{}{extra}}}",
            Value::String(kind.clone()),
            Value::Object(data)
        );
        self.out.push(Outgoing {
            task_id,
            queue,
            kind,
            json,
        });
    }

    /// The task's `run_at` or `delay_s` (checked as qsysd checks them), else the `--at`/`--in`
    /// of the command line; then the `enqueued_at` stamp. Appended to `extra`.
    fn due_fields(&mut self, place: &str, t: &Map<String, Value>, extra: &mut String) {
        let own: Map<String, Value> = ["run_at", "delay_s"]
            .iter()
            .filter_map(|k| Some((k.to_string(), t.get(*k)?.clone())))
            .filter(|(_, v)| !v.is_null())
            .collect();
        let fields = if own.is_empty() {
            match &self.rules.due {
                Some(Due::At(v)) => Map::from_iter([("run_at".to_string(), v.clone())]),
                Some(Due::After(s)) => Map::from_iter([("delay_s".to_string(), Value::from(*s))]),
                None => Map::new(),
            }
        } else {
            own
        };
        let mut check = fields.clone();
        check.insert("type".into(), Value::String("x".into()));
        if let Err(m) = crate::contract::message::parse(
            Value::Object(check).to_string().as_bytes(),
            String::new,
        ) {
            let field = fields.keys().next().cloned().unwrap_or_default();
            return self.problem(&at(place, &field), m.reason);
        }
        for (k, v) in fields {
            extra.push_str(&format!(",\"{k}\":{v}"));
        }
        if let Some(t) = self.rules.stamp {
            extra.push_str(&format!(",\"enqueued_at\":{t:.3}"));
        }
    }

    /// The task's `type`: a short non-empty string without control characters, one the config
    /// knows when it lists types. `None` once its problem is recorded.
    fn task_type(&mut self, place: &str, value: Option<Value>) -> Option<String> {
        match value {
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.problem(&at(place, "type"), "must be a non-empty string");
                None
            }
            Some(Value::String(s)) if s.len() > MAX_TYPE => {
                self.problem(&at(place, "type"), format!("longer than {MAX_TYPE} bytes"));
                None
            }
            Some(Value::String(s)) if s.chars().any(char::is_control) => {
                self.problem(&at(place, "type"), "contains control characters");
                None
            }
            Some(Value::String(s)) => match &self.rules.types {
                Some(known) if !known.contains(&s) => {
                    let known: Vec<&str> = known.iter().map(String::as_str).collect();
                    self.problem(
                        &at(place, "type"),
                        format!(
                            "unknown task type {s:?} (the config knows: {})",
                            known.join(", ")
                        ),
                    );
                    None
                }
                _ => Some(s),
            },
            Some(other) => {
                self.problem(
                    &at(place, "type"),
                    format!("must be a non-empty string, got {}", kind_of(&other)),
                );
                None
            }
            None => {
                self.problem(&at(place, "type"), "missing");
                None
            }
        }
    }

    /// The task's `data` object. `None` once its problem is recorded.
    fn task_data(&mut self, place: &str, value: Option<Value>) -> Option<Map<String, Value>> {
        match value {
            Some(Value::Object(m)) => Some(m),
            Some(other) => {
                self.problem(
                    &at(place, "data"),
                    format!("must be an object, got {}", kind_of(&other)),
                );
                None
            }
            None => {
                self.problem(&at(place, "data"), "missing: a task needs a data object");
                None
            }
        }
    }

    /// The task's id: `data.task_id`, else its `task_id`, else a new UUIDv4 (docs/contracts.md §3).
    fn task_id(
        &mut self,
        place: &str,
        data: Option<&Map<String, Value>>,
        outer: Option<Value>,
    ) -> Option<String> {
        let inner = data.and_then(|d| d.get("task_id"));
        let inner = match inner.map(check_id).transpose() {
            Ok(id) => id,
            Err(e) => {
                self.problem(&at(place, "data.task_id"), e);
                return None;
            }
        };
        let outer = match outer.as_ref().map(check_id).transpose() {
            Ok(id) => id,
            Err(e) => {
                self.problem(&at(place, "task_id"), e);
                return None;
            }
        };
        let id = match (inner, outer) {
            (Some(a), Some(b)) if a != b => {
                self.problem(
                    &at(place, "task_id"),
                    format!("{b:?} differs from data.task_id {a:?}"),
                );
                return None;
            }
            (Some(id), _) | (None, Some(id)) => id,
            (None, None) => return Some(uuid::Uuid::new_v4().to_string()),
        };
        if !self.given_ids.insert(id.clone()) {
            self.problem(
                &at(place, "task_id"),
                format!("{id:?} is given to more than one task (qsysd would drop the repeat)"),
            );
            return None;
        }
        Some(id)
    }
}

/// `place.key`, or `key` at the top.
fn at(place: &str, key: &str) -> String {
    if place.is_empty() {
        key.to_string()
    } else {
        format!("{place}.{key}")
    }
}

fn is_container(v: &Value) -> bool {
    v.get("tasks").is_some() || v.get("type").is_some()
}

fn field_list(obj: &Map<String, Value>) -> String {
    if obj.is_empty() {
        return "none".into();
    }
    obj.keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A task id as the daemon's parser accepts it, but a string only: the id is echoed back and
/// looked up, so a producer should say exactly what it means.
fn check_id(v: &Value) -> Result<String, String> {
    let Value::String(id) = v else {
        return Err(format!("must be a string, got {}", kind_of(v)));
    };
    if id.is_empty() || id.len() > MAX_TASK_ID {
        return Err(format!("must be 1 to {MAX_TASK_ID} bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(id.clone())
}

/// A queue name as the config accepts one ([`crate::contract::names`]).
pub(crate) fn check_queue(name: &str) -> Result<(), String> {
    if !is_key_name(name) {
        return Err(format!("{name:?}: a queue name {NAME_RULE}"));
    }
    Ok(())
}

fn queue_name(v: &Value) -> Result<String, String> {
    let Value::String(q) = v else {
        return Err(format!("must be a string, got {}", kind_of(v)));
    };
    check_queue(q)?;
    Ok(q.clone())
}

/// An optional whole number from 1 (to `max`).
fn positive(v: Option<&Value>, max: u64) -> Result<Option<u64>, String> {
    let Some(v) = v else { return Ok(None) };
    match v.as_u64() {
        Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
        _ => Err(format!("must be a whole number from 1 to {max}, got {v}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            default_queue: "q1".into(),
            types: None,
            stamp: None,
            due: None,
            cost: None,
        }
    }

    fn event(rules: &Rules, v: Value) -> Result<(Option<Shape>, Vec<Outgoing>), Invalid> {
        let mut b = Batch::new(rules);
        let shape = b.add_event(v);
        b.finish().map(|out| (shape, out))
    }

    fn ok(v: Value) -> (Shape, Vec<Outgoing>) {
        let (shape, out) = event(&rules(), v).expect("valid event");
        (shape.expect("a shape"), out)
    }

    fn refused(v: Value) -> String {
        event(&rules(), v)
            .expect_err("event should be refused")
            .to_string()
    }

    /// Work sizes (issue 18): a task's own `cost` passes through as qsysd checks it, `--cost`
    /// fills in for tasks without one, and a bad cost is a problem naming its place.
    #[test]
    fn costs_are_checked_like_qsysd() {
        let mut r = rules();
        r.cost = Some(30.0);
        let (_, out) = event(
            &r,
            serde_json::json!({"tasks": [
                task("a", "1"),
                {"type": "a", "data": {}, "cost": 3600},
            ]}),
        )
        .expect("valid");
        assert!(out[0].json.contains(r#""cost":30"#), "{}", out[0].json);
        assert!(out[1].json.contains(r#""cost":3600"#), "{}", out[1].json);
        let parsed = crate::contract::message::parse(out[1].json.as_bytes(), String::new)
            .expect("qsysd reads what qsys-push writes");
        assert_eq!(parsed.cost(), Some(3600.0));
        for bad in [
            serde_json::json!({"type": "a", "cost": -1}),
            serde_json::json!({"type": "a", "cost": "1h"}),
            serde_json::json!({"type": "a", "cost": 2e9}),
        ] {
            let e = event(&rules(), bad.clone())
                .expect_err("a bad cost")
                .to_string();
            assert!(e.contains("cost"), "{bad}: {e}");
        }
    }

    /// Delays (issue 17): a task's own `run_at`/`delay_s` pass through as qsysd checks them, the
    /// command line's `--at`/`--in` fill in for tasks without one, and a bad one of either is a
    /// problem naming its place (nothing pushed); the stamp goes on every task.
    #[test]
    fn delays_are_checked_like_qsysd_and_every_task_is_stamped() {
        let mut r = rules();
        r.stamp = Some(1_796_135_400.5);
        r.due = Some(Due::After(600.0));
        let (_, out) = event(
            &r,
            serde_json::json!({"tasks": [
                task("a", "1"),
                {"type": "a", "data": {}, "run_at": "2026-12-01T14:30:00Z"},
            ]}),
        )
        .expect("valid");
        assert!(
            out[0]
                .json
                .contains(r#""delay_s":600.0,"enqueued_at":1796135400.500"#),
            "{}",
            out[0].json
        );
        assert!(
            out[1].json.contains(r#""run_at":"2026-12-01T14:30:00Z""#),
            "{}",
            out[1].json
        );
        for bad in [
            serde_json::json!({"type": "a", "run_at": "soon"}),
            serde_json::json!({"type": "a", "delay_s": -1}),
            serde_json::json!({"type": "a", "run_at": 1, "delay_s": 1}),
        ] {
            assert!(event(&rules(), bad.clone()).is_err(), "{bad}");
        }
        r.due = Some(Due::At(Value::String("next tuesday".into())));
        let e = event(&r, task("a", "1"))
            .expect_err("a bad --at")
            .to_string();
        assert!(e.contains("run_at"), "{e}");
    }

    /// The element as the daemon sees it.
    fn element(o: &Outgoing) -> Value {
        let parsed =
            crate::contract::message::parse(o.json.as_bytes(), || unreachable!("id given"))
                .expect("the daemon accepts what the producer writes");
        assert_eq!(parsed.task_id, o.task_id);
        assert_eq!(parsed.kind, o.kind);
        serde_json::from_str(&o.json).expect("json")
    }

    fn task(kind: &str, key: &str) -> Value {
        serde_json::json!({"type": kind, "data": {"s3_key": key}})
    }

    #[test]
    fn a_seed_task_becomes_exactly_the_seed_message() {
        let (shape, out) = ok(serde_json::json!({
            "type": "start_transcribe",
            "data": {"s3_bucket": "b", "s3_key": "recordings/audio.wav", "call_session": "1751353080.711222"}
        }));
        assert_eq!(shape, Shape::Task);
        assert_eq!(out.len(), 1);
        let o = &out[0];
        assert!(uuid::Uuid::parse_str(&o.task_id).is_ok());
        assert_eq!(
            uuid::Uuid::parse_str(&o.task_id).map(|u| u.get_version_num()),
            Ok(4)
        );
        assert_eq!(o.queue, "q1");
        assert!(o
            .json
            .starts_with("{\"type\":\"start_transcribe\",\"data\":{"));
        let v = element(o);
        assert_eq!(
            v,
            serde_json::json!({"type": "start_transcribe", "data": {
                "s3_bucket": "b", "s3_key": "recordings/audio.wav",
                "call_session": "1751353080.711222", "task_id": o.task_id}})
        );
        assert_eq!(
            serde_json::to_string(&o.receipt()).expect("json"),
            format!(
                r#"{{"task_id":"{}","queue":"q1","type":"start_transcribe"}}"#,
                o.task_id
            )
        );
    }

    #[test]
    fn ids_come_from_data_then_the_task_and_options_pass_through() {
        let (_, out) = ok(serde_json::json!({"tasks": [
            {"type": "a", "data": {"task_id": "in-data"}},
            {"type": "a", "task_id": "top", "data": {}, "max_attempts": 5, "timeout_s": 60},
            {"type": "a", "task_id": "same", "data": {"task_id": "same"}},
        ]}));
        let ids: Vec<&str> = out.iter().map(|o| o.task_id.as_str()).collect();
        assert_eq!(ids, ["in-data", "top", "same"]);
        let v = element(&out[1]);
        assert_eq!(v["data"]["task_id"], "top");
        assert_eq!(v["max_attempts"], 5);
        assert_eq!(v["timeout_s"], 60);
        assert!(v.get("task_id").is_none(), "the id moves into data");
    }

    #[test]
    fn a_batch_keeps_order_and_queues() {
        let (shape, out) = ok(serde_json::json!({"queue_name": "qb", "tasks": [
            task("start_transcribe", "a"),
            {"type": "send_email", "data": {"email": "u@x"}, "queue_name": "qt"},
            task("cleanup", "c"),
        ]}));
        assert_eq!(shape, Shape::Batch);
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|o| (o.kind.as_str(), o.queue.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("start_transcribe", "qb"),
                ("send_email", "qt"),
                ("cleanup", "qb")
            ]
        );
        out.iter().for_each(|o| {
            element(o);
        });
    }

    #[test]
    fn api_gateway_bodies_plain_base64_and_parsed() {
        let body = serde_json::json!({"tasks": [task("a", "1"), task("a", "2")]}).to_string();
        let (shape, out) = ok(serde_json::json!({
            "resource": "/push", "httpMethod": "POST", "headers": {}, "body": body,
            "isBase64Encoded": false
        }));
        assert_eq!((shape, out.len()), (Shape::ApiGateway, 2));
        let encoded = base64::engine::general_purpose::STANDARD.encode(task("b", "3").to_string());
        let (_, out) = ok(serde_json::json!({
            "version": "2.0", "requestContext": {"http": {"method": "POST"}},
            "body": encoded, "isBase64Encoded": true
        }));
        assert_eq!(element(&out[0])["data"]["s3_key"], "3");
        let (_, out) = ok(serde_json::json!({"body": task("c", "4")}));
        assert_eq!(out[0].kind, "c");
    }

    #[test]
    fn sqs_records_each_carry_a_task_or_batch() {
        let (shape, out) = ok(serde_json::json!({"Records": [
            {"messageId": "m1", "eventSource": "aws:sqs", "body": task("a", "1").to_string()},
            {"messageId": "m2", "eventSource": "aws:sqs",
             "body": serde_json::json!({"queue_name": "q2", "tasks": [task("b", "2"), task("c", "3")]}).to_string()},
        ]}));
        assert_eq!(shape, Shape::Sqs);
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|o| (o.kind.as_str(), o.queue.as_str()))
            .collect();
        assert_eq!(got, [("a", "q1"), ("b", "q2"), ("c", "q2")]);
    }

    #[test]
    fn eventbridge_detail_and_eventbridge_through_sqs() {
        let eb = serde_json::json!({
            "version": "0", "id": "e1", "detail-type": "qsys task", "source": "my.app",
            "detail": task("a", "1")
        });
        let (shape, out) = ok(eb.clone());
        assert_eq!((shape, out.len()), (Shape::EventBridge, 1));
        let (shape, out) = ok(serde_json::json!({"Records": [
            {"eventSource": "aws:sqs", "body": eb.to_string()}
        ]}));
        assert_eq!((shape, out.len()), (Shape::Sqs, 1));
        assert_eq!(element(&out[0])["data"]["s3_key"], "1");
    }

    #[test]
    fn ndjson_lines_and_args() {
        let r = rules();
        let mut b = Batch::new(&r);
        b.add_line(1, &task("a", "1").to_string());
        b.add_line(
            2,
            r#"{"type":"b","data":{"task_id":"x"},"queue_name":"q9"}"#,
        );
        b.add_args("c", r#"{"k":1}"#, Some("given"));
        let out = b.finish().expect("valid");
        assert_eq!(out[1].task_id, "x");
        assert_eq!(out[1].queue, "q9");
        assert_eq!(out[2].task_id, "given");
        assert_eq!(element(&out[2])["data"]["k"], 1);
        let mut b = Batch::new(&r);
        b.add_line(1, &task("a", "1").to_string());
        b.add_line(2, "{oops");
        b.add_line(3, r#"{"type":"","data":{}}"#);
        let e = b.finish().expect_err("bad lines").to_string();
        assert!(e.contains("line 2: not valid JSON"), "{e}");
        assert!(e.contains("line 3.type: must be a non-empty string"), "{e}");
    }

    #[test]
    fn unrecognised_events_are_refused_never_a_sample_task() {
        for (v, want) in [
            (
                serde_json::json!({}),
                "event: unrecognised shape (fields: none)",
            ),
            (
                serde_json::json!({"key1": "value1"}),
                "unrecognised shape (fields: key1)",
            ),
            (
                serde_json::json!([task("a", "1")]),
                "must be a JSON object, got an array",
            ),
            (serde_json::json!("start_transcribe"), "got a string"),
            (
                serde_json::json!({"Records": [{"eventSource": "aws:s3", "s3": {}}]}),
                "Records[0].eventSource: \"aws:s3\" is not supported",
            ),
            (
                serde_json::json!({"body": null, "httpMethod": "GET"}),
                "body: is empty",
            ),
            (
                serde_json::json!({"body": "{\"hello\": 1}"}),
                "body: unrecognised shape (fields: hello)",
            ),
            (
                serde_json::json!({"detail": {"foo": 1}}),
                "detail: expected a task",
            ),
        ] {
            let e = refused(v.clone());
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn every_bad_field_is_named_with_its_place() {
        for (v, want) in [
            (
                serde_json::json!({"tasks": [task("a", "1"), {"type": "", "data": {}}]}),
                "tasks[1].type: must be a non-empty string",
            ),
            (
                serde_json::json!({"tasks": [task("a", "1"), {"type": 7, "data": {}}]}),
                "tasks[1].type: must be a non-empty string, got a number",
            ),
            (
                serde_json::json!({"tasks": [{"type": "a", "data": [1]}]}),
                "tasks[0].data: must be an object, got an array",
            ),
            (
                serde_json::json!({"tasks": [{"type": "a"}]}),
                "tasks[0].data: missing",
            ),
            (
                serde_json::json!({"type": "a", "dta": {}, "data": {}}),
                "dta: unknown field",
            ),
            (serde_json::json!({"tasks": []}), "tasks: is empty"),
            (
                serde_json::json!({"tasks": {"type": "a"}}),
                "tasks: must be an array",
            ),
            (
                serde_json::json!({"tasks": [task("a", "1")], "extra": 1}),
                "extra: unknown field",
            ),
            (
                serde_json::json!({"type": "a", "data": {"task_id": 5}}),
                "data.task_id: must be a string, got a number",
            ),
            (
                serde_json::json!({"type": "a", "task_id": "x", "data": {"task_id": "y"}}),
                "task_id: \"x\" differs from data.task_id \"y\"",
            ),
            (
                serde_json::json!({"tasks": [
                    {"type": "a", "data": {"task_id": "d"}},
                    {"type": "a", "data": {"task_id": "d"}}]}),
                "tasks[1].task_id: \"d\" is given to more than one task",
            ),
            (
                serde_json::json!({"type": "a", "data": {}, "queue_name": "my queue"}),
                "queue_name: \"my queue\": a queue name must be non-empty",
            ),
            (
                serde_json::json!({"type": "a", "data": {}, "max_attempts": 0}),
                "max_attempts: must be a whole number from 1 to 1000",
            ),
            (
                serde_json::json!({"type": "a", "data": {}, "timeout_s": "1m"}),
                "timeout_s: must be a whole number from 1 to 2592000",
            ),
            (
                serde_json::json!({"type": "x".repeat(101), "data": {}}),
                "type: longer than 100 bytes",
            ),
            (
                serde_json::json!({"Records": [{"body": "{not json"}]}),
                "Records[0].body: not valid JSON",
            ),
            (
                serde_json::json!({"body": "***", "isBase64Encoded": true}),
                "body: not valid base64",
            ),
        ] {
            let e = refused(v.clone());
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn one_bad_task_refuses_the_batch_and_problems_are_capped() {
        let mut tasks: Vec<Value> = (0..30).map(|i| task("a", &i.to_string())).collect();
        let e =
            event(&rules(), serde_json::json!({"tasks": tasks.clone()})).map(|(_, out)| out.len());
        assert_eq!(e, Ok(30));
        tasks[29]["data"] = Value::Null;
        assert!(event(&rules(), serde_json::json!({"tasks": tasks.clone()})).is_err());
        for t in &mut tasks {
            t["type"] = Value::Null;
        }
        let e = event(&rules(), serde_json::json!({"tasks": tasks})).expect_err("all bad");
        assert_eq!(e.problems.len(), MAX_PROBLEMS);
        assert_eq!(e.more, 31 - MAX_PROBLEMS);
        assert!(e.to_string().ends_with("... and 11 more problems"));
    }

    #[test]
    fn types_are_checked_against_the_config() {
        let r = Rules {
            default_queue: "q1".into(),
            types: Some(["start_transcribe".to_string(), "send_email".to_string()].into()),
            stamp: None,
            due: None,
            cost: None,
        };
        assert!(event(&r, task("send_email", "1")).is_ok());
        let e = event(
            &r,
            serde_json::json!({"tasks": [task("send_email", "1"), task("make_coffee", "2")]}),
        )
        .expect_err("unknown type")
        .to_string();
        assert_eq!(
            e,
            "tasks[1].type: unknown task type \"make_coffee\" (the config knows: send_email, start_transcribe)"
        );
    }

    #[test]
    fn args_form_reports_data_problems() {
        let r = rules();
        for (data, want) in [
            ("[1]", "data: must be an object, got an array"),
            ("{", "data: not valid JSON"),
        ] {
            let mut b = Batch::new(&r);
            b.add_args("x", data, None);
            let e = b.finish().expect_err("bad data").to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let mut b = Batch::new(&r);
        b.add_args(" ", "{}", None);
        assert!(b.finish().is_err());
        assert_eq!(
            Batch::new(&r).finish().expect_err("empty").to_string(),
            "input: no tasks"
        );
    }
}

//! The producer: reads tasks (`--type`, a JSON event, or NDJSON from stdin or `--file`), checks
//! them all ([`crate::producer::events`]), then pushes them with `RPUSH` in one MULTI/EXEC transaction, so a
//! batch lands whole or not at all, and prints their ids. `--wait` then follows them in MySQL
//! ([`crate::producer::follow`]).
//!
//! Runs on the main thread of `qsys-push` (and of its Lambda runtime, [`crate::producer::lambda`]). What lands
//! in Redis is exactly the seed producer's format, `{"type": T, "data": {..., "task_id": ID}}`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{ConfigError, Env, ProducerConfig};
use crate::net::redis::Timeouts;
pub use crate::producer::events::Due;
use crate::producer::events::{self, Batch, Invalid, Outgoing, Rules};
use crate::producer::follow::{self, WaitError};

/// Messages per `RPUSH`: a transaction of 100,000 tasks is ten commands, not 100,000.
const CHUNK: usize = 10_000;
/// Bounds one transaction's send and reply; 100,000 tasks take well under a second locally.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(crate) enum PushError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Bad input: nothing was pushed.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("cannot read {what}: {source}")]
    Read {
        what: String,
        source: std::io::Error,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: queue {queue:?} holds a {kind}, not a list; nothing was pushed")]
    NotAList { queue: String, kind: String },
    #[error(
        "redis: a push inside the transaction failed ({0}); part of the batch may have landed"
    )]
    Partial(String),
    #[error("{0}")]
    Wait(#[from] WaitError),
}

impl PushError {
    /// 2 for bad input or config (retrying cannot help), 1 when Redis or MySQL failed.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            PushError::Config(_) | PushError::Invalid(_) | PushError::Read { .. } => 2,
            PushError::Redis(_)
            | PushError::NotAList { .. }
            | PushError::Partial(_)
            | PushError::Wait(_) => 1,
        }
    }
}

/// A Redis connection for pushing: opened on first use and dropped after an error, so the next
/// push (the Lambda's next invocation) starts on a fresh one.
pub(crate) struct Pusher {
    client: redis::Client,
    conn: Option<redis::Connection>,
}

impl Pusher {
    pub(crate) fn new(url: &str) -> Result<Pusher, PushError> {
        Ok(Pusher {
            client: redis::Client::open(url)?,
            conn: None,
        })
    }

    /// Pushes every message to the tail of its queue, in order, in one MULTI/EXEC.
    pub(crate) fn push(&mut self, messages: &[Outgoing]) -> Result<(), PushError> {
        let result = self.try_push(messages);
        if result.is_err() {
            // A connection that failed mid-exchange may hold a late reply; never reuse it.
            self.conn = None;
        }
        result
    }

    fn try_push(&mut self, messages: &[Outgoing]) -> Result<(), PushError> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                let c = crate::net::redis::connect(
                    &self.client,
                    Timeouts {
                        read: IO_TIMEOUT,
                        write: IO_TIMEOUT,
                        ..Timeouts::SHORT
                    },
                )?;
                self.conn.insert(c)
            }
        };
        let mut queues: Vec<(&str, Vec<&str>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for m in messages {
            let i = *index.entry(m.queue.as_str()).or_insert_with(|| {
                queues.push((m.queue.as_str(), Vec::new()));
                queues.len() - 1
            });
            queues[i].1.push(m.json.as_str());
        }
        // EXEC does not roll back: an RPUSH onto a key of another type would fail alone while the
        // rest landed. Checking first keeps the batch whole.
        let mut types = redis::pipe();
        for (q, _) in &queues {
            types.cmd("TYPE").arg(*q);
        }
        let kinds: Vec<String> = types.query(conn)?;
        if let Some(((q, _), kind)) = queues
            .iter()
            .zip(&kinds)
            .find(|(_, k)| *k != "list" && *k != "none")
        {
            return Err(PushError::NotAList {
                queue: q.to_string(),
                kind: kind.clone(),
            });
        }
        // One transaction, sent a chunk at a time so that only one chunk is ever copied into a
        // command. Redis applies nothing before EXEC, and drops the transaction if the connection
        // dies first; a chunk it refuses (out of memory) makes EXEC refuse the whole.
        redis::cmd("MULTI").query::<()>(conn)?;
        for (q, jsons) in &queues {
            for chunk in jsons.chunks(CHUNK) {
                redis::cmd("RPUSH").arg(*q).arg(chunk).query::<()>(conn)?;
            }
        }
        // Errors inside EXEC's reply do not roll the others back; the type check above makes
        // them all but impossible, but if one comes the caller must not be told "nothing pushed".
        let replies: Vec<redis::Value> = redis::cmd("EXEC").query(conn)?;
        match replies.into_iter().find_map(|r| match r {
            redis::Value::ServerError(e) => Some(e),
            _ => None,
        }) {
            Some(e) => Err(PushError::Partial(e.to_string())),
            None => Ok(()),
        }
    }
}

/// Reads one input: a JSON event of any shape (on one line or pretty-printed over many), or NDJSON,
/// one task a line. Lines are parsed as they are read; only the built messages are kept.
pub(crate) fn read_input(
    mut input: impl BufRead,
    rules: &Rules,
) -> Result<Vec<Outgoing>, PushError> {
    let mut batch = Batch::new(rules);
    let mut line = String::new();
    let mut line_no = 0;
    // Everything read so far, in case the input is one document over several lines.
    let mut head = String::new();
    let first_no = loop {
        line.clear();
        if read_line(&mut input, &mut line, line_no + 1)? == 0 {
            return Ok(batch.finish()?);
        }
        line_no += 1;
        head.push_str(&line);
        if !line.trim().is_empty() {
            break line_no;
        }
    };
    if serde_json::from_str::<serde::de::IgnoredAny>(&line).is_err() {
        // Not a whole value on its first line: one document over several lines (or bad JSON,
        // which the parser reports with its line and column).
        input
            .read_to_string(&mut head)
            .map_err(|e| read_error(e, "the input"))?;
        batch.add_event_bytes(head.as_bytes());
        return Ok(batch.finish()?);
    }
    let first = std::mem::take(&mut line);
    // One value and nothing after it: an event of any shape. More lines: NDJSON.
    loop {
        line.clear();
        if read_line(&mut input, &mut line, line_no + 1)? == 0 {
            batch.add_event_bytes(first.as_bytes());
            return Ok(batch.finish()?);
        }
        line_no += 1;
        if !line.trim().is_empty() {
            break;
        }
    }
    batch.add_line(first_no, &first);
    loop {
        if !line.trim().is_empty() {
            batch.add_line(line_no, &line);
        }
        line.clear();
        if read_line(&mut input, &mut line, line_no + 1)? == 0 {
            return Ok(batch.finish()?);
        }
        line_no += 1;
    }
}

fn read_line(
    input: &mut impl BufRead,
    buf: &mut String,
    line_no: usize,
) -> Result<usize, PushError> {
    input.read_line(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            PushError::Invalid(Invalid {
                problems: vec![format!("line {line_no}: not valid UTF-8")],
                more: 0,
            })
        } else {
            read_error(e, "the input")
        }
    })
}

fn read_error(source: std::io::Error, what: &str) -> PushError {
    PushError::Read {
        what: what.to_string(),
        source,
    }
}

/// Where the tasks come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// `--type`, `--data`, `--task-id`.
    Args {
        kind: String,
        data: String,
        task_id: Option<String>,
    },
    /// `--file F`.
    File(PathBuf),
    /// stdin (also `--file -`).
    Stdin,
}

/// One run of `qsys-push`, as its arguments ask.
#[derive(Debug, Clone)]
pub struct Request {
    pub input: Input,
    pub config: Option<PathBuf>,
    /// The queue of tasks that name none (else `QUEUE_NAME`, else the config's first queue).
    pub queue: Option<String>,
    /// Print `{"task_id", "queue", "type"}` objects instead of bare ids.
    pub json: bool,
    /// `--wait`: follow the tasks until each is terminal, at most this long.
    pub wait: Option<Duration>,
    /// `--at` / `--in`: when the tasks (those that say nothing of their own) may run.
    pub due: Option<Due>,
    /// `--cost`: how much work each task is (those that say nothing of their own).
    pub cost: Option<f64>,
}

/// Runs `qsys-push`: messages to stderr, ids to stdout. Returns the exit status: 0 pushed (and,
/// with `--wait`, all finished), 1 Redis or MySQL failed (or a task failed or the wait timed out),
/// 2 bad input or config, nothing pushed.
pub fn cli(req: &Request, env: &Env) -> u8 {
    match run(req, env) {
        Ok(code) => code,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("qsys-push: {line}");
            }
            if e.exit_code() == 2 {
                eprintln!("qsys-push: nothing was pushed");
            }
            e.exit_code()
        }
    }
}

/// A bad command-line value, named by its flag: nothing is pushed.
fn bad_flag(flag: &str) -> impl Fn(String) -> Invalid + '_ {
    move |e| Invalid {
        problems: vec![format!("{flag}: {e}")],
        more: 0,
    }
}

/// How this run's tasks are checked and completed, from its flags and the config.
fn rules(req: &Request, config: &ProducerConfig) -> Result<Rules, PushError> {
    if let Some(c) = req.cost {
        crate::contract::message::cost_of(&serde_json::Value::from(c))
            .map_err(bad_flag("--cost"))?;
    }
    Ok(Rules {
        default_queue: match &req.queue {
            Some(q) => {
                events::check_queue(q).map_err(bad_flag("--queue"))?;
                q.clone()
            }
            None => config.default_queue.clone(),
        },
        types: config.types.clone(),
        stamp: Some(crate::contract::time::now_unix()),
        due: req.due.clone(),
        cost: req.cost,
    })
}

fn run(req: &Request, env: &Env) -> Result<u8, PushError> {
    let config = ProducerConfig::load(req.config.as_deref(), env)?;
    // Resolved before anything is pushed: a bad [mysql] must not leave tasks pushed but unfollowed.
    let mysql = match req.wait {
        Some(_) => Some(config.mysql()?),
        None => None,
    };
    let rules = rules(req, &config)?;
    let messages = messages(&req.input, &rules)?;
    // Before the push: an id whose task is already running or done is dropped by qsysd as a
    // duplicate, and its old state must not be reported as this push's result.
    let known = match (req.wait, &mysql) {
        (Some(_), Some(mysql)) => {
            let ids: Vec<String> = messages.iter().map(|m| m.task_id.clone()).collect();
            follow::known_before(mysql, &ids)
        }
        _ => Default::default(),
    };
    Pusher::new(&config.redis.url)?.push(&messages)?;
    // With --wait --json, each task's line comes once it has ended, with its end.
    let receipts = if req.wait.is_some() && req.json {
        Ok(())
    } else {
        print_receipts(&messages, req.json)
    };
    if let Err(e) = receipts {
        eprintln!(
            "qsys-push: pushed {} tasks but cannot print their ids: {e}",
            messages.len()
        );
        return Ok(1);
    }
    let (Some(timeout), Some(mysql)) = (req.wait, mysql) else {
        return Ok(0);
    };
    let ids: Vec<String> = messages.iter().map(|m| m.task_id.clone()).collect();
    let mut types: Vec<String> = messages.iter().map(|m| m.kind.clone()).collect();
    types.sort_unstable();
    types.dedup();
    let started = Instant::now();
    let mut bar = follow::ProgressBar::new(std::io::stderr().is_terminal());
    let follow = follow::Follow {
        ids: &ids,
        known: &known,
        timeout,
        results: req.json,
        types: &types,
    };
    let summary = match follow::wait(&mysql, &follow, |tally, eta| bar.draw(tally, eta, started)) {
        Ok(s) => s,
        Err(e) => {
            bar.clear();
            // The tasks are pushed: their ids must not be lost with the wait.
            if req.json {
                let _ = print_receipts(&messages, true);
            }
            return Err(e.into());
        }
    };
    bar.clear();
    for line in summary.report(timeout) {
        eprintln!("qsys-push: {line}");
    }
    if req.json {
        if let Err(e) = print_ends(&messages, &summary) {
            eprintln!("qsys-push: cannot print the tasks' ends: {e}");
            return Ok(1);
        }
    }
    Ok(if summary.all_finished() { 0 } else { 1 })
}

/// `--wait --json`: one line per task, in push order: its receipt with its final `state`
/// (`null` when it did not end in time, the old state for an id already known), `error` and
/// `result` (the endpoint's JSON).
fn print_ends(messages: &[Outgoing], summary: &follow::Summary) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let known: std::collections::HashMap<&str, &str> = summary
        .known
        .iter()
        .map(|(id, s)| (id.as_str(), s.as_str()))
        .collect();
    for m in messages {
        let end = summary.ended.get(&m.task_id);
        let result: Option<serde_json::Value> = end
            .and_then(|e| e.result.as_deref())
            .and_then(|r| serde_json::from_str(r).ok());
        let state = end
            .map(|e| e.state.as_str())
            .or_else(|| known.get(m.task_id.as_str()).copied());
        let line = serde_json::json!({
            "task_id": m.task_id,
            "queue": m.queue,
            "type": m.kind,
            "state": state,
            "error": end.and_then(|e| e.error.as_deref()),
            "result": result,
        });
        serde_json::to_writer(&mut out, &line)?;
        writeln!(out)?;
    }
    out.flush()
}

/// The checked messages of the request's input: its arguments, its file or stdin (not a
/// terminal: a producer that forgot its input is told so rather than waited on).
fn messages(input: &Input, rules: &Rules) -> Result<Vec<Outgoing>, PushError> {
    Ok(match input {
        Input::Args {
            kind,
            data,
            task_id,
        } => {
            let mut batch = Batch::new(rules);
            batch.add_args(kind, data, task_id.as_deref());
            batch.finish()?
        }
        Input::File(path) => {
            let file = std::fs::File::open(path).map_err(|e| read_error(e, &display(path)))?;
            read_input(std::io::BufReader::with_capacity(1 << 16, file), rules)?
        }
        Input::Stdin => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(Invalid {
                    problems: vec![
                        "nothing to push: give --type TYPE [--data JSON], --file F, or an event \
                     on stdin"
                            .into(),
                    ],
                    more: 0,
                }
                .into());
            }
            read_input(stdin.lock(), rules)?
        }
    })
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn print_receipts(messages: &[Outgoing], json: bool) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for m in messages {
        if json {
            serde_json::to_writer(&mut out, &m.receipt())?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", m.task_id)?;
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            default_queue: "q".into(),
            types: None,
            stamp: None,
            due: None,
            cost: None,
        }
    }

    fn read(text: &str) -> Result<Vec<Outgoing>, PushError> {
        read_input(text.as_bytes(), &rules())
    }

    fn problems(text: &str) -> String {
        match read(text) {
            Err(PushError::Invalid(e)) => e.to_string(),
            other => panic!("expected bad input, got {other:?}"),
        }
    }

    #[test]
    fn one_line_or_pretty_printed_is_one_event() {
        let out = read(
            "{\"tasks\": [{\"type\": \"a\", \"data\": {}}, {\"type\": \"b\", \"data\": {}}]}\n",
        )
        .expect("batch on one line");
        assert_eq!(out.len(), 2);
        let pretty = "\n{\n  \"type\": \"a\",\n  \"data\": {\"k\": 1}\n}\n\n";
        assert_eq!(read(pretty).expect("pretty event").len(), 1);
        let e = problems("{\n  \"type\": \"a\",\n  \"data\": {\n}\n");
        assert!(
            e.starts_with("event: not valid JSON") && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn several_lines_are_ndjson_with_line_numbers() {
        let text = "{\"type\":\"a\",\"data\":{}}\n\n{\"type\":\"b\",\"data\":{}}\n{\"type\":\"c\",\"data\":{}}";
        let kinds: Vec<String> = read(text)
            .expect("ndjson")
            .into_iter()
            .map(|o| o.kind)
            .collect();
        assert_eq!(kinds, ["a", "b", "c"]);
        let e = problems("{\"type\":\"a\",\"data\":{}}\n{\"type\":\"b\"}\n\n{\"tasks\":[]}\n");
        assert!(e.contains("line 2.data: missing"), "{e}");
        assert!(e.contains("line 4.tasks: unknown field"), "{e}");
    }

    #[test]
    fn empty_and_non_utf8_input_are_refused() {
        assert_eq!(problems(""), "input: no tasks");
        assert_eq!(problems("\n \n"), "input: no tasks");
        let bad = b"{\"type\":\"a\",\"data\":{}}\n\xff\xfe\n";
        match read_input(&bad[..], &rules()) {
            Err(PushError::Invalid(e)) => assert_eq!(e.to_string(), "line 2: not valid UTF-8"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exit_codes() {
        let invalid = PushError::Invalid(Invalid {
            problems: vec!["x".into()],
            more: 0,
        });
        assert_eq!(invalid.exit_code(), 2);
        let not_list = PushError::NotAList {
            queue: "q".into(),
            kind: "string".into(),
        };
        assert_eq!(not_list.exit_code(), 1);
    }
}

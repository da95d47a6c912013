//! `qsys-push`: pushes tasks onto qsysd queues in the seed producer's format and prints their ids;
//! with `AWS_LAMBDA_RUNTIME_API` set, runs as the Lambda producer instead ([`qsys::lambda`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use qsys::push::{self, Input, Request};

/// Push tasks onto qsysd queues (RPUSH, the seed producer's format) and print their ids.
///
/// Tasks come from --type/--data, or from a JSON event or NDJSON (one task a line) on stdin or in
/// --file: a task {"type","data"}, a batch {"tasks":[...]}, an API Gateway proxy event, an SQS
/// event or an EventBridge event. Everything is checked first; a batch is pushed whole or not at
/// all. Exit status: 0 pushed (and, with --wait, all finished), 1 Redis or MySQL failed or a
/// waited-for task failed or the wait timed out, 2 bad input or config (nothing pushed).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Task type, e.g. start_transcribe, send_email, generate_report, cleanup.
    #[arg(long = "type", value_name = "TYPE", conflicts_with = "file")]
    kind: Option<String>,
    /// The task's data, a JSON object [default: {}].
    #[arg(long, value_name = "JSON", requires = "kind")]
    data: Option<String>,
    /// Task id (default: data.task_id, else a new UUIDv4).
    #[arg(long, requires = "kind")]
    task_id: Option<String>,
    /// Read a JSON event or NDJSON from this file ("-" for stdin; stdin is the default).
    #[arg(long, value_name = "F")]
    file: Option<PathBuf>,
    /// Queue for tasks whose event names no queue_name (default: QUEUE_NAME, else the config's
    /// first queue).
    #[arg(long)]
    queue: Option<String>,
    /// qsysd config to read [redis], [types] and [mysql] from (default /etc/qsysd.toml if it
    /// exists); the seed's REDIS_*, DB_*, TASK_QUEUES and QUEUE_NAME variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print {"task_id","queue","type"} objects, one a line, instead of bare ids; with --wait,
    /// once each task has ended, with its "state", "error" and "result".
    #[arg(long)]
    json: bool,
    /// Follow the tasks in MySQL until each is finished, failed or cancelled.
    #[arg(long)]
    wait: bool,
    /// Run the tasks at this time: RFC 3339 (2026-12-01T14:30:00Z) or Unix seconds.
    #[arg(long, value_name = "TIME", conflicts_with = "in_")]
    at: Option<String>,
    /// Run the tasks this long after the push, e.g. 10m, 2h.
    #[arg(long = "in", id = "in_", value_name = "D", value_parser = qsys::parse_duration)]
    in_: Option<Duration>,
    /// How much work each task is (seconds of audio, or the unit its pool uses), for tasks that
    /// give no "cost" of their own; qsysd weighs placement and time to drain by it.
    #[arg(long, value_name = "N")]
    cost: Option<f64>,
    /// How long --wait waits at most, e.g. 90s, 30m.
    #[arg(long, value_name = "D", requires = "wait", value_parser = qsys::parse_duration, default_value = "1h")]
    timeout: Duration,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let env = qsys::producer_env();
    if let Some(api) = std::env::var("AWS_LAMBDA_RUNTIME_API")
        .ok()
        .filter(|v| !v.is_empty())
    {
        return ExitCode::from(qsys::lambda::run(&api, args.config.as_deref(), &env));
    }
    let input = match (args.kind, args.file) {
        (Some(kind), _) => Input::Args {
            kind,
            data: args.data.unwrap_or_else(|| "{}".into()),
            task_id: args.task_id,
        },
        (None, Some(f)) if f.as_os_str() != "-" => Input::File(f),
        (None, _) => Input::Stdin,
    };
    let request = Request {
        input,
        config: args.config,
        queue: args.queue,
        json: args.json,
        wait: args.wait.then_some(args.timeout),
        due: match (args.at, args.in_) {
            (Some(at), _) => Some(push::Due::At(match at.trim().parse::<f64>() {
                Ok(n) => serde_json::Value::from(n),
                Err(_) => serde_json::Value::String(at),
            })),
            (None, Some(d)) => Some(push::Due::After(d.as_secs_f64())),
            (None, None) => None,
        },
        cost: args.cost,
    };
    ExitCode::from(push::cli(&request, &env))
}

//! `qsys-push`: pushes a task onto a qsysd queue in the seed producer's format and prints its id.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use qsys::config::{self, Config};
use qsys::push::{self, PushError};

/// Push a task onto a qsysd queue (RPUSH, the seed producer's format). Prints the task id.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Task type, e.g. start_transcribe, send_email, generate_report, cleanup.
    #[arg(long = "type", value_name = "TYPE")]
    kind: String,
    /// The task's data, a JSON object.
    #[arg(long, default_value = "{}")]
    data: String,
    /// Task id (default: data.task_id, else a new UUIDv4).
    #[arg(long)]
    task_id: Option<String>,
    /// Queue (default: the first queue of the config).
    #[arg(long)]
    queue: Option<String>,
    /// qsysd config to read [redis] from; without it, the seed's REDIS_* variables and defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let env = config::process_env();
    let path = args.config.clone().or_else(|| {
        let default = PathBuf::from(config::DEFAULT_PATH);
        default.exists().then_some(default)
    });
    let redis = match path {
        Some(p) => Config::load_redis(&p, &env),
        None => Config::default_redis(&env),
    };
    let redis = match redis {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qsys-push: {e}");
            return ExitCode::from(2);
        }
    };
    let msg = match push::build(&args.kind, &args.data, args.task_id.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("qsys-push: {e}");
            return ExitCode::from(2);
        }
    };
    let queue = args.queue.unwrap_or_else(|| redis.queues[0].clone());
    let result = redis::Client::open(redis.url.as_str())
        .map_err(PushError::from)
        .and_then(|c| push::push(&c, &queue, std::slice::from_ref(&msg)));
    match result {
        Ok(()) => {
            println!("{}", msg.task_id);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qsys-push: {e}");
            ExitCode::FAILURE
        }
    }
}

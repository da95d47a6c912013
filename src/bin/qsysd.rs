//! `qsysd`: parses arguments, loads the config and hands over to [`qsys::Daemon`] (no subcommand)
//! or to [`qsys::ops`] (the operator's commands).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use qsys::ops;
use qsys::Config;

/// Task-queue daemon: Redis queues to GPU slots and handlers, state in MySQL.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file.
    #[arg(long, global = true, default_value = qsys::DEFAULT_PATH)]
    config: PathBuf,
    /// Validate the configuration, print a summary and exit (0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// GPUs and slots, queues and task counts of the running daemon.
    Status {
        /// The admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Take a GPU out: it finishes what it runs and takes nothing new (persisted, fleet-wide).
    Drain { gpu: String },
    /// Put a drained GPU back.
    Undrain { gpu: String },
    /// Send terminal tasks back to their queue with a fresh set of attempts.
    Requeue {
        /// Task ids.
        task_ids: Vec<String>,
        /// With --since: every task in this state ("failed", "finished" or "cancelled").
        #[arg(long, requires = "since")]
        state: Option<String>,
        /// With --state: that ended within this long, e.g. "1h".
        #[arg(long, requires = "state")]
        since: Option<String>,
    },
    /// Stop tasks: one still queued or waiting never runs; a running one is stopped (its GPU's
    /// cancel_url, its exec program killed) and ends `cancelled`.
    Cancel {
        /// Task ids.
        #[arg(required = true)]
        task_ids: Vec<String>,
        /// Why: kept as the task's error ("cancelled: TEXT").
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Stop taking from a queue (its tasks stay in Redis) or running a type (its tasks wait in
    /// MySQL): persisted, fleet-wide, honoured within a second.
    Pause(Target),
    /// Take from a paused queue, or run a paused type, again.
    Resume(Target),
    /// Delete the tasks past their state's retention ([retention]), with their attempts and
    /// results, and print how many by state.
    Prune {
        /// Only count them.
        #[arg(long)]
        dry_run: bool,
    },
    /// One task's row and every attempt.
    Task {
        task_id: String,
        #[arg(long)]
        json: bool,
    },
}

/// What `pause` and `resume` name: one queue or one task type.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A configured queue.
    #[arg(long)]
    queue: Option<String>,
    /// A configured task type.
    #[arg(long = "type", value_name = "TYPE")]
    kind: Option<String>,
}

impl Target {
    fn named(&self) -> (qsys::PauseKind, &str) {
        match (&self.queue, &self.kind) {
            (Some(q), _) => (qsys::PauseKind::Queue, q),
            (None, Some(t)) => (qsys::PauseKind::Type, t),
            (None, None) => unreachable!("clap requires one of --queue and --type"),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config, &qsys::process_env()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qsysd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        print!("{}", config.summary());
        println!("config ok: {}", args.config.display());
        return ExitCode::SUCCESS;
    }
    let result = match args.command {
        None => {
            qsys::logging::init(config.daemon.log_target, config.daemon.log_level);
            let r = run(config, args.config);
            if let Err(e) = &r {
                log::error!("{e:#}");
            }
            return if r.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        Some(cmd) => command(&config, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qsysd: {e:#}");
            match e.downcast_ref::<UsageError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Bad arguments to a subcommand (exit 2, like clap's own).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// `qsysd requeue`: the ids given, and those of `--state` that ended within `--since`.
fn requeue(
    config: &Config,
    mut task_ids: Vec<String>,
    state: Option<String>,
    since: Option<String>,
) -> anyhow::Result<()> {
    let store = ops::store(config)?;
    if let (Some(state), Some(since)) = (state, since) {
        let state = match qsys::State::parse(&state) {
            Some(s) if s.is_terminal() => s,
            _ => {
                return Err(UsageError(format!(
                    "--state {state:?}: expected failed, finished or cancelled"
                ))
                .into())
            }
        };
        let since = qsys::parse_duration(&since)
            .map_err(|e| UsageError(format!("--since {since:?}: {e}")))?;
        task_ids.extend(store.terminal_since(state, since)?);
    }
    if task_ids.is_empty() {
        return Err(UsageError("no task ids given (or --state and --since)".into()).into());
    }
    let client = redis::Client::open(config.redis.url.as_str())?;
    let mut refused = 0;
    for id in &task_ids {
        if ops::requeue(&store, &client, id)? {
            println!("{id}");
        } else {
            refused += 1;
            eprintln!("qsysd: {id}: unknown or not terminal; not requeued");
        }
    }
    if refused > 0 {
        anyhow::bail!("{refused} of {} tasks not requeued", task_ids.len());
    }
    Ok(())
}

/// `qsysd cancel`: every id checked first, then each cancelled; exit 1 if one was terminal.
fn cancel(config: &Config, task_ids: &[String], reason: Option<&str>) -> anyhow::Result<()> {
    let ids: Vec<&str> = task_ids.iter().map(String::as_str).collect();
    ops::check_cancel(&ids).map_err(|e| UsageError(e.to_string()))?;
    let store = ops::store(config)?;
    let mut refused = 0;
    for id in task_ids {
        let outcome = ops::cancel(&store, id, reason)?;
        if matches!(outcome, qsys::Cancel::Terminal { .. }) {
            refused += 1;
            eprintln!("qsysd: {id}: {}", ops::describe_cancel(&outcome));
        } else {
            println!("{id}: {}", ops::describe_cancel(&outcome));
        }
    }
    if refused > 0 {
        anyhow::bail!("{refused} of {} tasks not cancelled", task_ids.len());
    }
    Ok(())
}

/// `qsysd pause` / `qsysd resume`.
fn pause(config: &Config, target: &Target, paused: bool) -> anyhow::Result<()> {
    let (kind, name) = target.named();
    let changed = ops::set_paused(config, kind, name, paused)?;
    let what = match kind {
        qsys::PauseKind::Queue => "queue",
        qsys::PauseKind::Type => "type",
    };
    let now = if paused { "paused" } else { "resumed" };
    let note = if changed { "" } else { " (it already was)" };
    println!("{what} {name} {now}{note}");
    Ok(())
}

fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let mut daemon = qsys::Daemon::start(config)?;
    daemon.reload_from(path);
    daemon.handle_signals()?;
    daemon.wait()?;
    Ok(())
}

fn command(config: &Config, cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Status { json } => {
            let doc = ops::fetch_status(config)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", ops::status_table(&doc));
            }
        }
        Command::Drain { gpu } => {
            ops::set_drained(config, &gpu, true)?;
            println!("{gpu} drained: it finishes what it runs and takes nothing new");
        }
        Command::Undrain { gpu } => {
            ops::set_drained(config, &gpu, false)?;
            println!("{gpu} undrained");
        }
        Command::Requeue {
            task_ids,
            state,
            since,
        } => requeue(config, task_ids, state, since)?,
        Command::Cancel { task_ids, reason } => cancel(config, &task_ids, reason.as_deref())?,
        Command::Pause(target) => pause(config, &target, true)?,
        Command::Resume(target) => pause(config, &target, false)?,
        Command::Prune { dry_run } => {
            let counts = ops::prune(config, dry_run)?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for (state, n) in &counts {
                println!("{state:<10} {n:>10} {verb}", state = state.as_str());
            }
            if counts.is_empty() {
                println!("every state is kept for ever ([retention]): nothing to prune");
            }
        }
        Command::Task { task_id, json } => {
            let (task, attempts) = ops::task(&ops::store(config)?, &task_id)?;
            if json {
                let doc = serde_json::json!({ "task": task, "attempts": attempts });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", ops::task_report(&task, &attempts));
            }
        }
    }
    Ok(())
}
